"""DreamBooth fine-tuning of a cascade, stage by stage (base, then super-resolution).

One run: validate every input before anything is written; pick or check the identifier; encode the prompts
once and free the text encoder; make (or reuse) the class images with the frozen cascade; then per stage
train the UNet on subject rows plus prior rows with the fused ops, checkpointing atomically, and write the
tuned UNet into the output directory, which mirrors the input's IF layout plus dreambooth.json.

The step (per micro-batch): sample t and noise for subject + prior rows -> `ops.add_noise` -> UNet (the
SR stage's input is [x_t, noise-augmented upscaled low-res image], the augmentation level its class label)
-> epsilon half of the 6-channel output -> `ops.dreambooth_loss_with_parts` -> backward -> clip -> optimizer -> lr.
Each step appends its losses (total, subject, prior), lr, grad norm and time to logs/metrics.csv (metrics.py); at
the end plots.py draws the loss plot and the validation sheets.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__, data, identifier, lora, ops
from .backends import TORCH_BACKENDS, unet_runner
from .checkpoint import load_checkpoint, mark_stage_done, read_latest, save_checkpoint
from .compiled import compile_unet
from .config import TrainConfig
from .errors import UserError
from .fileio import atomic_write_dir, atomic_write_json, existing_ancestor, link_or_copy_tree
from .fused_norm import fuse_resnet_norms
from .images import enlarged, make_grid, save_png, to_pil
from .memory import release_freed_memory
from .metrics import StepMetrics, open_metrics_log
from .models import (
    STAGE_2_DIR,
    Cascade,
    check_stage_dir,
    find_sr_dir,
    load_cascade,
    load_tokenizer,
    load_unet,
    resolve_device,
    weights_files,
)
from .optim import adam_options, load_optimizer_state
from .plots import write_run_pictures
from .prior import PriorSettings, default_cache_root, generate_class_images
from .rundir import (
    CHECKPOINTS,
    LOGS,
    RUN_ARTIFACTS,
    RUN_FILE,
    VALIDATION,
    check_can_create,
    check_free_space,
    check_not_finished,
    check_output_dir,
    check_output_not_input,
    check_resume_config,
    clear_run,
    output_lock,
    read_run,
    run_identifier,
    stop_on_full_disk,
)
from .sample import BASE_GUIDANCE, SR_GUIDANCE, SR_NOISE_LEVEL, sample_base, sample_sr, torch_unet_fn
from .snr import min_snr_weights
from .text import encode_negative, encode_prompts
from .toy.default_model import default_model_dir, default_model_notes

VALIDATION_STEPS = 25
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Prompts:
    identifier: str
    instance: list[str]  # one prompt for every subject photo, or one per photo (--captions)
    class_: str
    instance_embeds: torch.Tensor  # one row per instance prompt
    class_embeds: torch.Tensor
    negative_embeds: torch.Tensor


@dataclass
class Validation:
    """What a stage's validation grids are drawn with (--validation-prompt, every --validation-every steps)."""

    embeds: torch.Tensor  # the validation prompt, one row per image of the grid
    negative: torch.Tensor
    size: int  # the stage's resolution
    base_size: int
    guidance: float
    noising_scheduler: object | None  # stage II's augmentation schedule
    steps: int = VALIDATION_STEPS
    noise_level: int = SR_NOISE_LEVEL


def _stage_dir(out: Path, stage: str) -> Path:
    return out if stage == "base" else out / STAGE_2_DIR


def _pick_stages(cfg: TrainConfig, has_sr: bool) -> list[str]:
    if "sr" in cfg.stages and not has_sr:
        if cfg.stages == ("sr",):
            raise UserError(f"--stages sr: {cfg.model} has no stage II (stage_2/); pass --sr-model DIR")
        tqdm.write(f"{cfg.model} has no stage II (stage_2/): training the base stage only")
    return [s for s in ("base", "sr") if s in cfg.stages and (s == "base" or has_sr)]


def make_prompts(cascade: Cascade, cfg: TrainConfig, captions: list[str] | None = None) -> Prompts:
    """The identifier, the prompts and their embeddings. The identifier is --identifier if given, else the
    one the input model was tuned with (a tuned base whose SR stage is trained now must keep its [V]), else
    the rare-token search's pick. The subject's prompt is 'a [V] [class]', or with `captions` each photo's own."""
    tok = cascade.tokenizer
    ident = cfg.identifier or run_identifier(cfg.model)
    if ident and not cfg.identifier:
        tqdm.write(f"{cfg.model} was tuned with identifier {ident!r}: keeping it")
    ident = ident or identifier.choose_identifier(tok, n_tokens=cfg.identifier_tokens, seed=cfg.seed)
    if captions:
        instance = [identifier.fill_placeholder(c, ident) for c in captions]
    else:
        instance = [identifier.instance_prompt(ident, cfg.class_noun)]
    class_ = identifier.class_prompt(cfg.class_noun)
    embeds = encode_prompts(tok, cascade.text_encoder, [*instance, class_])
    negative = encode_negative(tok, cascade.text_encoder)
    return Prompts(ident, instance, class_, embeds[:-1], embeds[-1:], negative)


def _load_class_images(folder: Path, sub: str, size: int) -> torch.Tensor:
    loaded = data.load_subject_images(folder / sub if (folder / sub).is_dir() else folder, option="--class-images-dir")
    return data.prepare(loaded, size)


def _upscaled(low_res: torch.Tensor, size: int) -> torch.Tensor:
    # The SR conditioning image: a low-resolution image brought back to the SR size as IF's pipeline does.
    return F.interpolate(low_res, (size, size), mode="bilinear", align_corners=True)


@dataclass
class StageData:
    """Training rows of one stage: targets x0 and, for SR, the upscaled low-res conditioning per row."""

    subject: torch.Tensor
    subject_cond: torch.Tensor | None
    prior: torch.Tensor | None
    prior_cond: torch.Tensor | None


def stage_data(
    stage: str, cascade: Cascade, images: list, class_dir: Path | None, flip: bool, user_class_images: bool
) -> StageData:
    base_size = cascade.base_size
    if stage == "base":
        prior = _load_class_images(class_dir, "base", base_size) if class_dir else None
        return StageData(data.prepare(images, base_size, flip=flip), None, prior, None)
    sr_size = cascade.sr_size
    subject = data.prepare(images, sr_size, flip=flip)
    subject_cond = _upscaled(data.prepare(images, base_size, flip=flip), sr_size)
    if class_dir is None:
        return StageData(subject, subject_cond, None, None)
    prior = _load_class_images(class_dir, "sr", sr_size)
    # Generated pairs: the base image and its frozen-SR upscaling. User-given class images: downsampled.
    low = (
        _load_class_images(class_dir, "base", base_size)
        if not user_class_images
        else F.interpolate(prior, (base_size, base_size), mode="area")
    )
    return StageData(subject, subject_cond, prior, _upscaled(low, sr_size))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate of update `step + 1` as a share of --learning-rate: linear warm-up over `warmup`
    updates, then constant, or decaying to 0 at `total` (diffusers' `linear` and `cosine` schedules)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(params: list, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb  # presence checked by TrainConfig.validate

        return bnb.optim.Adam8bit(params, lr=lr)
    # The paper trains with Adam (no weight decay); fused or foreach, whichever the device has (optim.py).
    return torch.optim.Adam(params, lr=lr, **adam_options(params))


class StageTrainer:
    """Trains one stage's UNet; `run` returns the final loss."""

    def __init__(
        self,
        stage: str,
        unet: torch.nn.Module,
        scheduler,
        noising_scheduler,
        rows: StageData,
        prompts: Prompts,
        cfg: TrainConfig,
        device: torch.device,
        out: Path,
        completed: list[str],
        validation: Validation | None,
    ):
        self.stage, self.unet, self.cfg, self.device, self.out = stage, unet, cfg, device, out
        self.rows, self.prompts, self.completed, self.validation = rows, prompts, completed, validation
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.prediction_type = scheduler.config.prediction_type
        self.noising_ac = (
            noising_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
            if noising_scheduler is not None
            else None
        )
        self.total_steps = (cfg.sr_steps or cfg.steps) if stage == "sr" else cfg.steps
        self.generator = torch.Generator().manual_seed(cfg.seed + (0 if stage == "base" else 1))
        self.predicted_prior = cfg.prior_preservation and cfg.prior_mode == "predictions"
        self.has_prior = rows.prior is not None or self.predicted_prior
        # --prior-mode predictions with full fine-tuning: the frozen model is a copy of the UNet as loaded (made
        # before a checkpoint's weights are restored into the trained one). With LoRA: the UNet, adapter off.
        self.frozen = None
        if self.predicted_prior and not cfg.lora_rank:
            self.frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.fused_norm:
            fuse_resnet_norms(unet)
        if cfg.compile:
            compile_unet(unet, stage)
        if cfg.lora_rank:
            self.params = lora.add_lora(unet, cfg.lora_rank)
        else:
            unet.requires_grad_(True)
            self.params = list(unet.parameters())
        unet.train()
        self.optimizer = _optimizer(self.params, cfg, cfg.learning_rate)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, cfg.lr_warmup_steps, cfg.lr_schedule)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.skipped = 0
        self.last_checkpoint: str | None = None

    # -- state ------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return lora.adapter_state(self.unet) if self.cfg.lora_rank else self.unet.state_dict()

    def check_finite(self) -> None:
        """Never write weights that are not all finite. The loss of each step is checked before its update, so
        weights that are not finite now went so in the last update: name that step."""
        bad = sum(int((~torch.isfinite(p)).sum()) for p in self.params)
        if bad:
            raise UserError(
                f"stage {self.stage}: {bad} weights are not finite after step {self.step}; nothing was written "
                f"for this step (the last checkpoint is {self.last_checkpoint or 'none'}); try a lower "
                "--learning-rate, --max-grad-norm 1, or --precision fp32"
            )

    def trainable_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    def save(self) -> None:
        self.check_finite()
        state = {
            "step": self.step,
            "skipped": self.skipped,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "config": self.cfg.to_dict(),
        }
        # It needs the weights and Adam's two moments, written beside the previous checkpoint before it goes.
        with stop_on_full_disk(f"the {self.stage} checkpoint at step {self.step}", self.out,
                               3 * self.trainable_bytes(), self.last_checkpoint):
            path = save_checkpoint(self.out / CHECKPOINTS, self.stage, self.step, self.trainable_state(), state,
                                   self.completed)
        self.last_checkpoint = str(path)

    def restore(self, root: Path, latest: dict) -> None:
        """Continue from the checkpoint `latest` (checkpoint.read_latest) names under `root`."""
        weights, state = load_checkpoint(root, latest)
        self.last_checkpoint = str(root / latest["dir"])
        if self.cfg.lora_rank:
            lora.load_adapter_state(self.unet, weights)
        else:
            self.unet.load_state_dict(weights)
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.step, self.skipped = state["step"], state["skipped"]

    # -- one step ---------------------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
        """x0 (subject rows then prior rows), SR conditioning, text embeddings, number of subject rows."""
        g, bs, rows = self.generator, self.cfg.batch_size, self.rows
        pick = torch.randint(len(rows.subject), (bs,), generator=g)
        x0, cond = [rows.subject[pick]], [rows.subject_cond[pick]] if rows.subject_cond is not None else None
        # Row i of the subject (i + N: its mirror with --flip) has prompt i, or the one prompt for all.
        embeds = [self.prompts.instance_embeds[pick % len(self.prompts.instance_embeds)]]
        if rows.prior is not None:
            pick = torch.randint(len(rows.prior), (bs,), generator=g)
            x0.append(rows.prior[pick])
            if cond is not None:
                cond.append(rows.prior_cond[pick])
            embeds.append(self.prompts.class_embeds.expand(bs, -1, -1))
        cond_t = torch.cat(cond).to(self.device) if cond is not None else None
        return torch.cat(x0).to(self.device), cond_t, torch.cat(embeds).to(self.device), bs

    @torch.no_grad()
    def frozen_prediction(self, model_input: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                          class_labels: torch.Tensor | None, channels: int) -> torch.Tensor:
        """The frozen model's prediction (epsilon or v half) for --prior-mode predictions."""
        if self.frozen is not None:
            out = self.frozen(model_input, timesteps, encoder_hidden_states=embeds, class_labels=class_labels).sample
        else:
            self.unet.eval()
            self.unet.disable_adapters()
            try:
                out = self.unet(model_input, timesteps, encoder_hidden_states=embeds, class_labels=class_labels).sample
            finally:
                self.unet.enable_adapters()
                self.unet.train()
        return out[:, :channels]

    def loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of one micro-batch and its two parts [subject, prior] (ops.dreambooth_loss_with_parts)."""
        x0, cond, embeds, n_instance = self._batch()
        g, n = self.generator, x0.shape[0]
        timesteps = torch.randint(0, len(self.alphas_cumprod), (n,), generator=g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        x_t, target = ops.add_noise(x0, noise, timesteps, self.alphas_cumprod, self.prediction_type)
        class_labels = None
        if cond is not None:
            # Noise-conditioning augmentation of the low-res image, at the level given as the class label.
            class_labels = torch.full((n,), self.cfg.sr_noise_level, dtype=torch.long, device=self.device)
            aug_noise = torch.randn(cond.shape, generator=g).to(self.device)
            noisy_cond, _ = ops.add_noise(cond, aug_noise, class_labels, self.noising_ac, "epsilon")
            x_t = torch.cat([x_t, noisy_cond], dim=1)
        dtype = AUTOCAST[self.cfg.precision]
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if self.predicted_prior:
                # The prior rows: the subject rows' noisy input again, with the class prompt; their target is the
                # frozen model's prediction there, so no class image is needed.
                class_embeds = self.prompts.class_embeds.to(self.device).expand(n, -1, -1)
                prior_target = self.frozen_prediction(x_t, timesteps, class_embeds, class_labels, target.shape[1])
                x_t, timesteps = torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps])
                target = torch.cat([target, prior_target.to(target.dtype)])
                embeds = torch.cat([embeds, class_embeds])
                class_labels = None if class_labels is None else torch.cat([class_labels, class_labels])
            out = self.unet(x_t, timesteps, encoder_hidden_states=embeds, class_labels=class_labels).sample
        pred = out[:, : target.shape[1]]  # the epsilon half; the other half is the learned variance
        if pred.dtype != target.dtype:
            pred = pred.float()
        weights = None
        if self.cfg.min_snr_gamma:
            weights = min_snr_weights(
                timesteps[:n_instance], self.alphas_cumprod, self.cfg.min_snr_gamma, self.prediction_type
            )
        return ops.dreambooth_loss_with_parts(
            pred, target, weights, n_instance if self.has_prior else None, self.cfg.prior_weight
        )

    def optimizer_step(self) -> StepMetrics:
        start = time.perf_counter()
        total = subject = prior = 0.0  # averaged over the micro-batches
        for _ in range(self.cfg.gradient_accumulation):
            loss, parts = self.loss()
            value = loss.item()
            if not math.isfinite(value) and not self.scaler.is_enabled():
                raise UserError(
                    f"stage {self.stage}, step {self.step + 1}: the loss is {value}; try a lower "
                    f"--learning-rate, --precision fp32, or --max-grad-norm 1"
                )
            self.scaler.scale(loss / self.cfg.gradient_accumulation).backward()
            total += value / self.cfg.gradient_accumulation
            subject_part, prior_part = parts.tolist()
            subject += subject_part / self.cfg.gradient_accumulation
            prior += prior_part / self.cfg.gradient_accumulation
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is not None and self.scaler.get_scale() < scale:
            self.skipped += 1  # fp16 overflow: the scaler skipped this update and lowered the scale
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        self.step += 1
        # Read the norm once the whole step is queued: on a GPU, reading it earlier would wait for the backward
        # pass before the optimizer's kernels are launched.
        grad_norm = float(grad_norm)
        return StepMetrics(self.stage, self.step, total, subject, prior, lr, grad_norm, time.perf_counter() - start,
                           self.skipped)

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> float:
        loss = float("nan")
        # The metrics log keeps the rows of the finished stages and of this one up to the step it resumes from.
        log = open_metrics_log(self.out / LOGS, self.cfg.report_to, self.completed, self.stage, self.step)
        with tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.stage}", unit="step") as bar, log:
            try:
                while self.step < self.total_steps:
                    metrics = self.optimizer_step()
                    log.write(metrics)
                    loss = metrics.loss
                    bar.update(1)
                    bar.set_postfix(self._postfix(metrics))
                    if self.step % self.cfg.checkpoint_every == 0 and self.step < self.total_steps:
                        self.save()
                    if self.validation and self.cfg.validation_every and self.step % self.cfg.validation_every == 0:
                        self.validate()
            except KeyboardInterrupt:
                self.save()
                raise UserError(
                    f"interrupted at {self.stage} step {self.step}: checkpoint saved, continue with --resume"
                ) from None
        if self.skipped:
            tqdm.write(f"stage {self.stage}: {self.skipped} steps skipped by fp16 loss scaling (overflow)")
        return loss

    def _postfix(self, metrics: StepMetrics) -> dict[str, str | int]:
        postfix = {"loss": f"{metrics.loss:.4f}"}
        if self.has_prior:
            postfix |= {"subject": f"{metrics.subject_loss:.4f}", "prior": f"{metrics.prior_loss:.4f}"}
        return postfix | ({"skipped": self.skipped} if self.skipped else {})

    @torch.no_grad()
    def validate(self) -> Path:
        """A grid of validation samples: the base stage draws the validation prompt; the SR stage upscales
        the subject's own low-res images (what it must get right)."""
        self.unet.eval()
        v = self.validation
        unet_fn = torch_unet_fn(self.unet)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        n = v.embeds.shape[0]
        embeds, negative = v.embeds.to(self.device), v.negative.to(self.device)
        if self.stage == "base":
            images = sample_base(unet_fn, self.scheduler, embeds, negative, size=v.size, steps=v.steps,
                                 guidance_scale=v.guidance, generator=generator, progress=False)
        else:
            low = F.interpolate(self.rows.subject_cond[:n], size=(v.base_size,) * 2, mode="area")
            images = sample_sr(unet_fn, self.scheduler, v.noising_scheduler, low.to(self.device),
                               embeds[: len(low)], negative, size=v.size, steps=v.steps, guidance_scale=v.guidance,
                               noise_level=v.noise_level, generator=generator, progress=False)
        self.unet.train()
        path = self.out / VALIDATION / f"{self.stage}-step-{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_png(enlarged(make_grid(to_pil(images), cols=len(images))), path)


def write_output_stage(out: Path, stage: str, trainer: StageTrainer, cfg: TrainConfig) -> None:
    """Put the tuned stage into the output layout: merged or full weights in unet/, or the LoRA adapter."""
    trainer.check_finite()
    stage_dir = _stage_dir(out, stage)
    with stop_on_full_disk(f"the tuned {stage} UNet", out, trainer.trainable_bytes(), trainer.last_checkpoint):
        if cfg.lora_rank and not cfg.merge_lora:
            lora.save_adapter(trainer.unet, stage_dir)
            return
        unet = lora.merge_adapter(trainer.unet) if cfg.lora_rank else trainer.unet
        atomic_write_dir(stage_dir / "unet", lambda tmp: unet.save_pretrained(tmp, safe_serialization=True))
    # An adapter copied from the input model is folded into these weights now: it must not apply twice.
    (stage_dir / lora.LORA_WEIGHTS).unlink(missing_ok=True)


def _versions() -> dict:
    import diffusers
    import transformers

    return {
        "dreambooth_fast": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "native_ops": ops.native_status(),
    }


def class_image_runners(cfg: TrainConfig, cascade: Cascade, stages: list[str], device: torch.device) -> dict | None:
    """The frozen UNets on --class-backend as sampler runners, made before the run writes anything (so that a
    missing or stale export is refused first); None: the torch UNets as they are (prior.py's default)."""
    if cfg.class_backend == "torch" or not cfg.draws_class_images():
        return None
    from .export import default_export_dir

    export_dir = Path(cfg.class_export_dir) if cfg.class_export_dir else default_export_dir(cfg.model)
    unets = {"base": cascade.base_unet, "sr": cascade.sr_unet}
    if cfg.class_backend in TORCH_BACKENDS and unets["base"] is None:  # SR only: stage I still draws them
        unets["base"] = load_unet(cascade.base_dir, str(device), cascade.sr_unet.dtype)
    return {stage: unet_runner(cfg.class_backend, unets[stage], getattr(cascade, f"{stage}_dir"), export_dir, stage,
                               device) for stage in ("base", *(["sr"] if "sr" in stages else []))}


def prepare_class_images(
    cfg: TrainConfig, cascade: Cascade, prompts: Prompts, stages: list[str], device: torch.device,
    runners: dict | None = None,
) -> Path | None:
    """The class images' directory: the user's, or the frozen cascade's (generated now or found in the cache)."""
    if cfg.class_images_dir and cfg.prior_preservation:
        return Path(cfg.class_images_dir)
    if not cfg.draws_class_images():
        return None
    settings = PriorSettings(
        prompts.class_,
        cfg.class_sampler,
        cfg.class_sample_steps,
        cfg.class_guidance_scale,
        cfg.sr_sample_steps,
        SR_GUIDANCE,
        SR_NOISE_LEVEL,
        "sr" in stages,
        cfg.seed,
    )
    # Raw RGB bytes per image, an upper bound for the PNGs
    need = cfg.num_class_images * 3 * (cascade.base_size**2 + (cascade.sr_size**2 if "sr" in stages else 0))
    warning = check_free_space(default_cache_root(), need, f"{cfg.num_class_images} class images")
    if warning:
        tqdm.write(f"warning: {warning}")
    dtype = AUTOCAST[cfg.precision]
    try:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return generate_class_images(cascade, prompts.class_embeds, prompts.negative_embeds,
                                         cfg.num_class_images, settings, batch_size=cfg.class_batch_size,
                                         runners=runners)
    except KeyboardInterrupt:
        raise UserError(
            "interrupted while generating class images: the ones made are kept, continue with --resume"
        ) from None


@dataclass
class RunInputs:
    """What a run reads, checked before anything is written."""

    out: Path
    device: torch.device
    stages: list[str]
    sr_dir: Path | None
    images: list[data.SubjectImage]
    captions: list[str] | None


def check_inputs(cfg: TrainConfig) -> RunInputs:
    """Every mistake a user can make in the options, paths, photos and class noun, found before the first
    byte is written (the model's weights are loaded later; their errors also come before any write)."""
    cfg.validate()
    if cfg.model is None:
        cfg.model = str(default_model_dir())
    for line in default_model_notes(cfg.model, cfg.class_noun):
        tqdm.write(line)
    out = Path(cfg.output)
    device = resolve_device(cfg.device)
    check_stage_dir(Path(cfg.model), "base")
    sr_dir = find_sr_dir(Path(cfg.model), cfg.sr_model)
    if cfg.sr_model is not None:
        check_stage_dir(sr_dir, "sr")
    stages = _pick_stages(cfg, sr_dir is not None)
    inputs = {"--model": cfg.model, "--sr-model": sr_dir if "sr" in stages else None, "--images": cfg.images,
              "--class-images-dir": cfg.class_images_dir}
    check_output_not_input(out, inputs)
    check_can_create(out, "--output")
    if cfg.draws_class_images():
        check_can_create(default_cache_root(), "the class-image cache")
    images = data.load_subject_images(cfg.images, skip_bad=cfg.skip_bad_images)
    captions = data.load_captions(images) if cfg.captions else None
    unused = [] if cfg.captions else data.unused_captions(images)
    if unused:
        tqdm.write(f"note: caption files beside the photos ({', '.join(p.name for p in unused)}) are not read: "
                   f"every photo is 'a [V] {cfg.class_noun}' (pass --captions to use them)")
    tokenizer = load_tokenizer(cfg.model)
    warnings = identifier.check_class_noun(tokenizer, cfg.class_noun)
    if cfg.identifier:
        warnings += identifier.check_identifier(tokenizer, cfg.identifier)
    # The prior rows ('a [class]') keep the class; a caption without the noun does not tie the subject to it.
    warnings += [f"{c!r} does not name the class noun {cfg.class_noun!r}" for c in captions or []
                 if f" {cfg.class_noun} " not in f" {c} "]
    for warning in warnings:
        tqdm.write(f"warning: {warning}")
    return RunInputs(out, device, stages, sr_dir, images, captions)


def estimated_write_bytes(cfg: TrainConfig, inputs: RunInputs, cascade: Cascade) -> int:
    """About how much the run writes into --output: each tuned UNet, its checkpoint (weights and Adam's two
    moments, briefly twice while the next replaces it) and, where hard links cannot be made, a copy of the
    model. An estimate for the warning before the run, not a promise."""
    stage_dirs = [cascade.base_dir if s == "base" else cascade.sr_dir for s in inputs.stages]
    unet_bytes = max(sum(f.stat().st_size for f in weights_files(d)) for d in stage_dirs)
    total = len(stage_dirs) * unet_bytes + 6 * unet_bytes
    if existing_ancestor(inputs.out).stat().st_dev != Path(cfg.model).stat().st_dev:
        total += sum(f.stat().st_size for f in Path(cfg.model).rglob("*") if f.is_file())
    return total


def start_run(cfg: TrainConfig, inputs: RunInputs, prompts: Prompts, saved_run: dict | None, overwrite: bool) -> dict:
    """Lay out the output directory (the input model's layout, hard-linked) and write its run file: from then on
    the directory is a run that --resume continues."""
    out = inputs.out
    if overwrite and saved_run is None:
        clear_run(out)
    link_or_copy_tree(cfg.model, out, skip=RUN_ARTIFACTS)
    if "sr" in inputs.stages and cfg.sr_model is not None:
        link_or_copy_tree(inputs.sr_dir, out / STAGE_2_DIR, skip=RUN_ARTIFACTS)
    run = {
        "identifier": prompts.identifier,
        "class_noun": cfg.class_noun,
        "instance_prompts": prompts.instance,
        "class_prompt": prompts.class_,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": _versions(),
        "class_images": None,
        "source_model": str(cfg.model),
        "source_sr_model": str(inputs.sr_dir) if inputs.sr_dir else None,
        "stages": inputs.stages,
        "final_loss": saved_run.get("final_loss", {}) if saved_run else {},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(out / RUN_FILE, run)
    return run


def stage_validation(cfg: TrainConfig, cascade: Cascade, stage: str, embeds: torch.Tensor | None,
                     negative: torch.Tensor) -> Validation | None:
    if embeds is None:
        return None
    return Validation(
        embeds=embeds,
        negative=negative,
        size=cascade.base_size if stage == "base" else cascade.sr_size,
        base_size=cascade.base_size,
        guidance=BASE_GUIDANCE if stage == "base" else SR_GUIDANCE,
        noising_scheduler=cascade.sr_noising_scheduler if stage == "sr" else None,
    )


def _lap(timings: dict[str, float], phase: str, since: float) -> float:
    """Adds the seconds since `since` to timings[phase] (dreambooth.json's "timings"); returns now."""
    now = time.perf_counter()
    timings[phase] = round(timings.get(phase, 0.0) + now - since, 3)
    return now


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run DreamBooth as `cfg` says; return the output directory: check the inputs, prepare the output, then
    train stage by stage. dreambooth.json's "timings" holds the seconds of this call's phases: load (checks,
    model, prompts), class_images, train_<stage>, write (the tuned UNets), pictures (loss plot, sheets)."""
    clock, timings = time.perf_counter(), {}
    inputs = check_inputs(cfg)
    out, stages = inputs.out, inputs.stages
    with output_lock(out):
        check_output_dir(out, resume, overwrite)
        saved_run = read_run(out) if resume else None
        latest = read_latest(out / CHECKPOINTS) if resume else None  # a new run starts from an empty directory
        if saved_run:
            check_resume_config(cfg, saved_run["config"])
            check_not_finished(latest, out, stages)

        cascade = load_cascade(cfg.model, cfg.sr_model, device=str(inputs.device), stages=tuple(stages))
        for stage in stages:
            data.check_sizes(inputs.images, cascade.base_size if stage == "base" else cascade.sr_size)
        prompts = make_prompts(cascade, cfg, inputs.captions)
        if saved_run and saved_run.get("instance_prompts", prompts.instance) != prompts.instance:
            raise UserError(f"--resume: the captions changed since the run started (it trained on "
                            f"{saved_run['instance_prompts']}); restore them or start a new run")
        validation_embeds = None
        if cfg.validation_prompt and cfg.validation_every:
            text = identifier.fill_placeholder(cfg.validation_prompt, prompts.identifier)
            validation_embeds = encode_prompts(cascade.tokenizer, cascade.text_encoder, [text] * 2)
        cascade.text_encoder = None  # embeddings are cached: the text encoder is not needed any more
        warning = check_free_space(out, estimated_write_bytes(cfg, inputs, cascade), "the run's output")
        if warning:
            tqdm.write(f"warning: {warning}")

        runners = class_image_runners(cfg, cascade, stages, inputs.device)
        run = start_run(cfg, inputs, prompts, saved_run, overwrite)
        clock = _lap(timings, "load", clock)
        class_dir = prepare_class_images(cfg, cascade, prompts, stages, inputs.device, runners)
        del runners
        clock = _lap(timings, "class_images", clock)
        run["class_images"] = str(class_dir) if class_dir else None
        run["timings"] = timings
        atomic_write_json(out / RUN_FILE, run)

        completed = list(latest["completed_stages"]) if latest else []
        for stage in stages:
            if stage in completed:
                continue
            unet = getattr(cascade, f"{stage}_unet")
            setattr(cascade, f"{stage}_unet", None)  # the trainer holds it now; freed with the trainer
            scheduler = cascade.base_scheduler if stage == "base" else cascade.sr_scheduler
            noising = cascade.sr_noising_scheduler if stage == "sr" else None
            rows = stage_data(stage, cascade, inputs.images, class_dir, cfg.flip, bool(cfg.class_images_dir))
            validation = stage_validation(cfg, cascade, stage, validation_embeds, prompts.negative_embeds)
            trainer = StageTrainer(stage, unet, scheduler, noising, rows, prompts, cfg, inputs.device, out,
                                   completed, validation)
            if latest and latest.get("stage") == stage:
                trainer.restore(out / CHECKPOINTS, latest)
            run["final_loss"][stage] = trainer.run()
            clock = _lap(timings, f"train_{stage}", clock)
            run.setdefault("skipped_steps", {})[stage] = trainer.skipped  # fp16 overflows
            write_output_stage(out, stage, trainer, cfg)
            completed.append(stage)
            mark_stage_done(out / CHECKPOINTS, completed)
            run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            atomic_write_json(out / RUN_FILE, run)
            del trainer, unet
            clock = _lap(timings, "write", clock)
        release_freed_memory()  # else the loss plot's matplotlib import adds ~22 MiB to the run's peak (memory.py)
        for line in write_run_pictures(out, stages):
            tqdm.write(line)
        _lap(timings, "pictures", clock)
        atomic_write_json(out / RUN_FILE, run)
    return out
