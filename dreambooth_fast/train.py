"""DreamBooth fine-tuning of a cascade, stage by stage (base, then super-resolution).

One run: validate every input before anything is written; pick or check the identifier; encode the prompts
once and free the text encoder (Stable Diffusion with --train-text-encoder: it trains with the base UNet,
text_training.py); make (or reuse) the class images with the frozen cascade; then per stage
train the UNet on subject rows plus prior rows with the fused ops, checkpointing atomically, and write the
tuned UNet into the output directory, which mirrors the input's IF layout plus dreambooth.json.

The step (per micro-batch): sample t and noise for subject + prior rows -> `ops.add_noise` -> UNet (the
SR stage's input is [x_t, noise-augmented upscaled low-res image], the augmentation level its class label)
-> epsilon half of the 6-channel output -> `ops.dreambooth_loss_with_parts` -> backward -> clip -> optimizer -> lr.
Each step appends its losses (total, subject, prior), lr, grad norm and time to logs/metrics.csv (metrics.py); at
the end plots.py draws the loss plot and the validation sheets.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import __version__, data, identifier, lora, ops, sd, sd_upscale, sdxl, text_training
from .backends import TORCH_BACKENDS, unet_runner
from .checkpoint import checkpoint_dir, load_checkpoint, mark_stage_done, read_latest, save_checkpoint
from .compiled import compile_unet
from .config import TrainConfig
from .distributed import (
    SINGLE,
    Dist,
    full_state,
    full_tensor,
    gather,
    is_lost_rank,
    load_full_state,
    local_tensor,
    lost_rank,
    mean_over_ranks,
    process_device,
    rank0_first,
    shard_unet,
    stop_on_sigterm,
)
from .errors import Interrupted, UserError
from .fileio import atomic_write_dir, atomic_write_json, existing_ancestor, link_or_copy_tree
from .fused_norm import fuse_resnet_norms
from .images import enlarged, make_grid, save_png, to_pil
from .memory import release_freed_memory
from .metrics import StepMetrics, open_metrics_log
from .models import (
    STAGE_2_DIR,
    Cascade,
    check_sr_family,
    check_stage_dir,
    find_sr_dir,
    load_cascade,
    load_tokenizer,
    load_unet,
    model_family,
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
from .sample import (
    BASE_GUIDANCE,
    SR_GUIDANCE,
    SR_NOISE_LEVEL,
    sample_base,
    sample_sr,
    sample_upscale,
    torch_unet_fn,
)
from .snr import min_snr_weights
from .text import encode_negative, encode_prompts
from .text_training import TextTraining
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
    vae: object | None = None  # Stable Diffusion: `size` is the latents', which this VAE decodes


def _stage_dir(out: Path, stage: str) -> Path:
    return out if stage == "base" else out / STAGE_2_DIR


def _pick_stages(cfg: TrainConfig, has_sr: bool, family: str = "if") -> list[str]:
    """The stages to train: --stages as given, or by default (None) every stage the model has."""
    if cfg.stages is None:
        if not has_sr and family == "if":  # a Stable Diffusion model without its x4 upscaler is just a base
            tqdm.write(f"{cfg.model} has no stage II (stage_2/): training the base stage only")
        return ["base", "sr"] if has_sr else ["base"]
    if "sr" in cfg.stages and not has_sr:
        sr = "x4 upscaler (StableDiffusionUpscalePipeline)" if family == "sd" else "stage II"
        raise UserError(f"--stages {','.join(cfg.stages)}: {cfg.model} has no {sr} in stage_2/; pass --sr-model DIR"
                        + ("" if tuple(cfg.stages) == ("sr",) else " or --stages base"))
    return [s for s in ("base", "sr") if s in cfg.stages]


def make_prompts(cascade: Cascade, cfg: TrainConfig, captions: list[str] | None = None) -> Prompts:
    """The identifier, the prompts and their embeddings. The identifier is --identifier if given, else the
    one the input model was tuned with (a tuned base whose SR stage is trained now must keep its [V]), else
    the rare-token search's pick. The subject's prompt is 'a [V] [class]', or with `captions` each photo's own."""
    tok = cascade.tokenizer
    ident = cfg.identifier or run_identifier(cfg.model)
    if ident and not cfg.identifier:
        tqdm.write(f"{cfg.model} was tuned with identifier {ident!r}: keeping it")
    ident = ident or identifier.choose_identifier(tok, n_tokens=cfg.identifier_tokens, seed=cfg.seed)
    if cascade.family == "sdxl":
        for warning in sdxl.check_second_tokenizer(cascade.text_encoder, ident):
            tqdm.write(f"warning: {warning}")
    if captions:
        instance = [identifier.fill_placeholder(c, ident) for c in captions]
    else:
        instance = [identifier.instance_prompt(ident, cfg.class_noun)]
    class_ = identifier.class_prompt(cfg.class_noun)
    embeds = encode_prompts(tok, cascade.text_encoder, [*instance, class_])
    negative = encode_negative(tok, cascade.text_encoder)
    return Prompts(ident, instance, class_, embeds[:-1], embeds[-1:], negative)


def stage_prompts(cascade: Cascade, prompts: Prompts) -> dict[str, Prompts]:
    """Each stage's prompts: IF's stages share one T5's embeddings; Stable Diffusion's x4 upscaler has a text
    encoder of its own, which encodes the same prompts for it."""
    if cascade.sr_text_encoder is None:
        return {"base": prompts, "sr": prompts}
    tok, encoder = cascade.sr_tokenizer, cascade.sr_text_encoder
    embeds = encode_prompts(tok, encoder, [*prompts.instance, prompts.class_])
    sr = Prompts(prompts.identifier, prompts.instance, prompts.class_, embeds[:-1], embeds[-1:],
                 encode_negative(tok, encoder))
    return {"base": prompts, "sr": sr}


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
        rows = StageData(data.prepare(images, base_size, flip=flip), None, prior, None)
        return sd.latent_rows(cascade.vae, rows) if cascade.latent else rows  # SD, SDXL train on VAE latents
    sr_size, low_size = cascade.sr_size, cascade.sr_input_size
    # IF's stage II is conditioned on the low-res image upscaled to its size; the x4 upscaler (Stable Diffusion)
    # on the low-res image as it is, beside latents of the same size.
    latent = cascade.family == "sd"

    def conditioning(low: torch.Tensor) -> torch.Tensor:
        return low if latent else _upscaled(low, sr_size)

    subject = data.prepare(images, sr_size, flip=flip)
    rows = StageData(subject, conditioning(data.prepare(images, low_size, flip=flip)), None, None)
    if class_dir is not None:
        prior = _load_class_images(class_dir, "sr", sr_size)
        # Generated pairs: the base image and its frozen-SR upscaling. User-given class images: downsampled.
        low = _load_class_images(class_dir, "base", base_size) if not user_class_images else prior
        if low.shape[-1] != low_size:  # the x4 upscaler drew from the base image brought to its input size
            low = F.interpolate(low, (low_size, low_size), mode="area")
        rows = dataclasses.replace(rows, prior=prior, prior_cond=conditioning(low))
    return sd.latent_rows(cascade.sr_vae, rows) if latent else rows  # the upscaler's targets: its VAE's latents


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate of update `step + 1` as a share of --learning-rate: linear warm-up over `warmup`
    updates, then constant, or decaying to 0 at `total` (diffusers' `linear` and `cosine` schedules)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def rank_rows(batch_size: int, dist: Dist, parts: int) -> torch.Tensor:
    """This rank's rows of a global batch made of `parts` blocks (subject rows, then prior rows) of
    batch_size x world_size rows each: rank r takes rows r*batch_size ... of every block. With DDP averaging the
    gradients, the ranks together take the step one process would take on the whole global batch."""
    block = batch_size * dist.world_size
    first = dist.rank * batch_size
    return torch.cat([torch.arange(p * block + first, p * block + first + batch_size) for p in range(parts)])


def _optimizer(params: list, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """Adam at `lr` over `params`: tensors, or parameter groups (dicts, as torch takes them; the text encoder's
    group has its own lr)."""
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb  # presence checked by TrainConfig.validate

        return bnb.optim.Adam8bit(params, lr=lr)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    # The paper trains with Adam (no weight decay); fused or foreach, whichever the device has (optim.py).
    return torch.optim.Adam(params, lr=lr, **adam_options(tensors))


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
        dist: Dist = SINGLE,
        text: TextTraining | None = None,
    ):
        self.stage, self.unet, self.cfg, self.device, self.out = stage, unet, cfg, device, out
        self.dist = dist
        self.rows, self.prompts, self.completed, self.validation = rows, prompts, completed, validation
        self.text = text  # --train-text-encoder: the encoder trained with this (base) stage's UNet
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
            self.params = lora.add_lora(unet, cfg.lora_rank, cfg.seed)
        else:
            unet.requires_grad_(True)
            if cfg.fsdp:  # each rank keeps its shard of the weights (and of the frozen copy); params are DTensors
                shard_unet(unet, AUTOCAST[cfg.precision])
                if self.frozen is not None:
                    shard_unet(self.frozen, AUTOCAST[cfg.precision])
            self.params = list(unet.parameters())
        unet.train()
        # What the step calls: the UNet itself (one process, or sharded by FSDP), or DDP's wrapper, which
        # averages the gradients over the ranks during the backward pass.
        self.model = unet
        if dist.is_distributed and not cfg.fsdp:
            self.model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
        groups = self.params
        if text is not None:  # one Adam, two groups; clipped, checked and counted together
            groups = [{"params": self.params}, {"params": text.params, "lr": text.lr}]
            self.params = self.params + text.params
        self.optimizer = _optimizer(groups, cfg, cfg.learning_rate)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, cfg.lr_warmup_steps, cfg.lr_schedule)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.skipped = 0
        self.last_checkpoint: str | None = None

    # -- state ------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = lora.adapter_state(self.unet) if self.cfg.lora_rank else self.unet.state_dict()
        return state | self.text.state() if self.text is not None else state

    def check_finite(self) -> None:
        """Never write weights that are not all finite. The loss of each step is checked before its update, so
        weights that are not finite now went so in the last update: name that step. Under DDP every rank holds
        the same weights, so rank 0 alone counts and the others learn its count (all stop alike); under FSDP
        each rank counts its own shard."""
        bad = 0
        if self.dist.is_main or self.cfg.fsdp:
            bad = sum(int((~torch.isfinite(local_tensor(p.detach()))).sum()) for p in self.params)
        if self.dist.is_distributed:
            bad = sum(gather(self.dist, bad))
        if bad:
            raise UserError(
                f"stage {self.stage}: {bad} weights are not finite after step {self.step}; nothing was written "
                f"for this step (the last checkpoint is {self.last_checkpoint or 'none'}); try a lower "
                "--learning-rate, --max-grad-norm 1, or --precision fp32"
            )

    def trainable_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    def save(self) -> None:
        """Write a checkpoint (every rank calls it; rank 0 writes: with --fsdp the others send their shards)."""
        self.check_finite()
        weights, optimizer_state = full_state(self.unet, self.optimizer) if self.cfg.fsdp else (None, None)
        if not self.dist.is_main:
            self.last_checkpoint = str(checkpoint_dir(self.out / CHECKPOINTS, self.stage, self.step))
            return
        state = {
            "step": self.step,
            "skipped": self.skipped,
            "optimizer": optimizer_state if self.cfg.fsdp else self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "config": self.cfg.to_dict(),
        }
        # It needs the weights and Adam's two moments, written beside the previous checkpoint before it goes.
        with stop_on_full_disk(f"the {self.stage} checkpoint at step {self.step}", self.out,
                               3 * self.trainable_bytes(), self.last_checkpoint):
            path = save_checkpoint(self.out / CHECKPOINTS, self.stage, self.step,
                                   weights if self.cfg.fsdp else self.trainable_state(), state, self.completed)
        self.last_checkpoint = str(path)

    def restore(self, root: Path, latest: dict) -> None:
        """Continue from the checkpoint `latest` (checkpoint.read_latest) names under `root`."""
        weights, state = load_checkpoint(root, latest)  # every rank reads it
        self.last_checkpoint = str(root / latest["dir"])
        if self.text is not None:
            self.text.load_state(weights)
            weights = text_training.split_weights(weights)
        if self.cfg.fsdp:
            load_full_state(self.unet, self.optimizer, weights, state["optimizer"])
        elif self.cfg.lora_rank:
            lora.load_adapter_state(self.unet, weights)
        else:
            self.unet.load_state_dict(weights)
        if not self.cfg.fsdp:
            load_optimizer_state(self.optimizer, state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.step, self.skipped = state["step"], state["skipped"]

    # -- one step ---------------------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
        """x0 (subject rows then prior rows), SR conditioning, text embeddings, number of subject rows: of the
        global batch (every rank's rows), drawn alike on every rank from the same generator."""
        g, bs, rows = self.generator, self.cfg.batch_size * self.dist.world_size, self.rows
        pick = torch.randint(len(rows.subject), (bs,), generator=g)
        x0, cond = [rows.subject[pick]], [rows.subject_cond[pick]] if rows.subject_cond is not None else None
        # Row i of the subject (i + N: its mirror with --flip) has prompt i, or the one prompt for all. With
        # --train-text-encoder the rows are the prompts' tokens, encoded in the step (`loss`).
        instance = self.text.instance if self.text is not None else self.prompts.instance_embeds
        class_ = self.text.class_ if self.text is not None else self.prompts.class_embeds
        embeds = [instance[pick % len(instance)]]
        if rows.prior is not None:
            pick = torch.randint(len(rows.prior), (bs,), generator=g)
            x0.append(rows.prior[pick])
            if cond is not None:
                cond.append(rows.prior_cond[pick])
            embeds.append(class_.expand(bs, -1, -1))
        return torch.cat(x0), torch.cat(cond) if cond is not None else None, torch.cat(embeds), bs

    def conditioning(self, embeds: torch.Tensor, class_labels: torch.Tensor | None) -> dict:
        """The UNet's conditioning keywords (SDXL's: the tokens, pooled embedding and time ids: sdxl.unet_kwargs)."""
        return sdxl.unet_kwargs(self.unet.config, embeds, class_labels)

    @torch.no_grad()
    def frozen_prediction(self, model_input: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                          class_labels: torch.Tensor | None, channels: int) -> torch.Tensor:
        """The frozen model's prediction (epsilon or v half) for --prior-mode predictions."""
        if self.frozen is not None:
            out = self.frozen(model_input, timesteps, **self.conditioning(embeds, class_labels)).sample
        else:
            self.unet.eval()
            self.unet.disable_adapters()
            try:
                out = self.unet(model_input, timesteps, **self.conditioning(embeds, class_labels)).sample
            finally:
                self.unet.enable_adapters()
                self.unet.train()
        return out[:, :channels]

    def loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of one micro-batch and its two parts [subject, prior] (ops.dreambooth_loss_with_parts)."""
        x0, cond, embeds, n_global = self._batch()
        g = self.generator
        timesteps = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        aug_noise = torch.randn(cond.shape, generator=g) if cond is not None else None
        rows = [x0, cond, embeds, timesteps, noise, aug_noise]
        if self.dist.is_distributed:  # this rank's share of the global batch
            mine = rank_rows(self.cfg.batch_size, self.dist, parts=x0.shape[0] // n_global)
            rows = [t[mine] if t is not None else None for t in rows]
        x0, cond, embeds, timesteps, noise, aug_noise = (t.to(self.device) if t is not None else None for t in rows)
        n, n_instance = x0.shape[0], self.cfg.batch_size
        x_t, target = ops.add_noise(x0, noise, timesteps, self.alphas_cumprod, self.prediction_type)
        class_labels = None
        if cond is not None:
            # Noise-conditioning augmentation of the low-res image, at the level given as the class label.
            class_labels = torch.full((n,), self.cfg.sr_noise_level, dtype=torch.long, device=self.device)
            noisy_cond, _ = ops.add_noise(cond, aug_noise, class_labels, self.noising_ac, "epsilon")
            x_t = torch.cat([x_t, noisy_cond], dim=1)
        dtype = AUTOCAST[self.cfg.precision]
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if self.text is not None:  # the prompts through the encoder being trained
                embeds = self.text.encode(embeds)
            if self.predicted_prior:
                # The prior rows: the subject rows' noisy input again, with the class prompt; their target is the
                # frozen model's prediction there, so no class image is needed. The frozen target's class
                # embeddings are the frozen text encoder's (computed before training).
                class_embeds = self.prompts.class_embeds.to(self.device).expand(n, -1, -1)
                prior_target = self.frozen_prediction(x_t, timesteps, class_embeds, class_labels, target.shape[1])
                if self.text is not None:
                    class_embeds = self.text.encode(self.text.class_.expand(n, -1, -1))
                x_t, timesteps = torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps])
                target = torch.cat([target, prior_target.to(target.dtype)])
                embeds = torch.cat([embeds, class_embeds])
                class_labels = None if class_labels is None else torch.cat([class_labels, class_labels])
            out = self.model(x_t, timesteps, **self.conditioning(embeds, class_labels)).sample
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
        for micro in range(self.cfg.gradient_accumulation):
            last = micro == self.cfg.gradient_accumulation - 1
            with self._gradient_sync(last):
                loss, parts = self.loss()
                # The losses averaged over the ranks: every rank logs, and stops on, the same values.
                value, subject_part, prior_part = mean_over_ranks(
                    self.dist, torch.cat([loss.detach().reshape(1), parts.detach()]).float().cpu()).tolist()
                if not math.isfinite(value) and not self.scaler.is_enabled():
                    raise UserError(
                        f"stage {self.stage}, step {self.step + 1}: the loss is {value}; try a lower "
                        f"--learning-rate, --precision fp32, or --max-grad-norm 1"
                    )
                self.scaler.scale(loss / self.cfg.gradient_accumulation).backward()
            total += value / self.cfg.gradient_accumulation
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
        grad_norm = float(full_tensor(grad_norm))
        return StepMetrics(self.stage, self.step, total, subject, prior, lr, grad_norm, time.perf_counter() - start,
                           self.skipped)

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradients are averaged over the ranks only in the last micro-batch of an update (accumulation)."""
        if self.cfg.fsdp:
            self.unet.set_requires_gradient_sync(sync)
        elif isinstance(self.model, DistributedDataParallel) and not sync:
            return self.model.no_sync()
        return contextlib.nullcontext()

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> float:
        loss = float("nan")
        # The metrics log keeps the rows of the finished stages and of this one up to the step it resumes from.
        # Rank 0 writes it (the losses it logs are the means over the ranks).
        log = (open_metrics_log(self.out / LOGS, self.cfg.report_to, self.completed, self.stage, self.step)
               if self.dist.is_main else None)
        with (tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.stage}", unit="step") as bar,
              log or contextlib.nullcontext()):
            try:
                while self.step < self.total_steps:
                    metrics = self.optimizer_step()
                    if log:
                        log.write(metrics)
                    loss = metrics.loss
                    bar.update(1)
                    bar.set_postfix(self._postfix(metrics))
                    if self.step % self.cfg.checkpoint_every == 0 and self.step < self.total_steps:
                        self.save()
                    # With FSDP every rank takes part in the sampling (each holds a shard); else rank 0 draws alone.
                    if (self.validation and self.cfg.validation_every and self.step % self.cfg.validation_every == 0
                            and (self.dist.is_main or self.cfg.fsdp)):
                        self.validate()
            except KeyboardInterrupt:
                if self.dist.is_distributed:  # the other ranks stop too: take the last checkpoint
                    raise Interrupted(
                        f"interrupted at {self.stage} step {self.step}; {resume_hint(self.out)}") from None
                self.save()
                raise Interrupted(
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
    def validate(self) -> Path | None:
        """A grid of validation samples: the base stage draws the validation prompt; the SR stage upscales
        the subject's own low-res images (what it must get right)."""
        self.unet.eval()
        v = self.validation
        unet_fn = torch_unet_fn(self.unet)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        n = v.embeds.shape[0]
        embeds, negative = v.embeds.to(self.device), v.negative.to(self.device)
        if self.text is not None:  # the prompt and the empty prompt through the encoder being trained
            embeds, negative = self.text.validation_embeds(n)
        if self.stage == "base":
            channels = {"channels": v.vae.config.latent_channels} if v.vae is not None else {}
            images = sample_base(unet_fn, self.scheduler, embeds, negative, size=v.size, steps=v.steps,
                                 guidance_scale=v.guidance, generator=generator, progress=False, **channels)
            images = sd.decode_latents(v.vae, images) if v.vae is not None else images
        elif v.vae is not None:  # the x4 upscaler: the subject's low-res images as they are, then its VAE
            low = self.rows.subject_cond[:n].to(self.device)
            latents = sample_upscale(unet_fn, self.scheduler, v.noising_scheduler, low, embeds[: len(low)], negative,
                                     channels=v.vae.config.latent_channels, steps=v.steps, guidance_scale=v.guidance,
                                     noise_level=v.noise_level, generator=generator, progress=False)
            images = sd.decode_latents(v.vae, latents)
        else:
            low = F.interpolate(self.rows.subject_cond[:n], size=(v.base_size,) * 2, mode="area")
            images = sample_sr(unet_fn, self.scheduler, v.noising_scheduler, low.to(self.device),
                               embeds[: len(low)], negative, size=v.size, steps=v.steps, guidance_scale=v.guidance,
                               noise_level=v.noise_level, generator=generator, progress=False)
        self.unet.train()
        if not self.dist.is_main:
            return None
        path = self.out / VALIDATION / f"{self.stage}-step-{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_png(enlarged(make_grid(to_pil(images), cols=len(images))), path)


def write_output_stage(out: Path, stage: str, trainer: StageTrainer, cfg: TrainConfig) -> None:
    """Put the tuned stage into the output layout: merged or full weights in unet/, or the LoRA adapter. Every
    rank calls it; rank 0 writes (with --fsdp, from the weights the ranks gather to it)."""
    trainer.check_finite()
    weights = full_state(trainer.unet)[0] if cfg.fsdp else None
    if not trainer.dist.is_main:
        return
    stage_dir = _stage_dir(out, stage)
    with stop_on_full_disk(f"the tuned {stage} UNet", out, trainer.trainable_bytes(), trainer.last_checkpoint):
        if cfg.lora_rank and not cfg.merge_lora:
            lora.save_adapter(trainer.unet, stage_dir, trainer.text.encoder if trainer.text is not None else None)
            return
        if trainer.text is not None:
            text_training.write_encoder(trainer.text, stage_dir)
        if weights is not None:
            atomic_write_dir(stage_dir / "unet", lambda tmp: save_unet_weights(weights, stage_dir / "unet", tmp))
        else:
            unet = lora.merge_adapter(trainer.unet) if cfg.lora_rank else trainer.unet
            atomic_write_dir(stage_dir / "unet", lambda tmp: unet.save_pretrained(tmp, safe_serialization=True))
    # An adapter copied from the input model is folded into these weights now: it must not apply twice.
    (stage_dir / lora.LORA_WEIGHTS).unlink(missing_ok=True)


def save_unet_weights(weights: dict[str, torch.Tensor], source: Path, folder: Path) -> None:
    """A UNet folder in diffusers' layout from a state dict: the config of `source` (training does not change
    it) and the weights as diffusion_pytorch_model.safetensors, as save_pretrained writes them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    shutil.copyfile(source / "config.json", folder / "config.json")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})


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
    runners: dict | None = None, dist: Dist = SINGLE, sr_prompts: Prompts | None = None,
) -> tuple[Path | None, int]:
    """The class images' directory (the user's, or the frozen cascade's: generated now or found in the cache) and
    how many of them this process drew (the ranks of a distributed run share the drawing). `sr_prompts`: the SR
    stage's own (stage_prompts), where it has a text encoder of its own."""
    if cfg.class_images_dir and cfg.prior_preservation:
        return Path(cfg.class_images_dir), 0
    if not cfg.draws_class_images():
        return None, 0
    upscaler = cascade.family == "sd" and "sr" in stages  # the x4 upscaler samples at its pipeline's defaults
    settings = PriorSettings(
        prompts.class_,
        cfg.class_sampler,
        cfg.class_sample_steps,
        cfg.class_guidance_scale,
        cfg.sr_sample_steps,
        sd_upscale.GUIDANCE if upscaler else SR_GUIDANCE,
        sd_upscale.NOISE_LEVEL if upscaler else SR_NOISE_LEVEL,
        "sr" in stages,
        cfg.seed,
    )
    sr_embeds = (sr_prompts.class_embeds, sr_prompts.negative_embeds) if sr_prompts is not None else None
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
                                         runners=runners, share=(dist.rank, dist.world_size), sr_embeds=sr_embeds)
    except KeyboardInterrupt:
        raise Interrupted(
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
    tokenizer: object  # the model's, loaded once: for these checks and the run


def check_inputs(cfg: TrainConfig) -> RunInputs:
    """Every mistake a user can make in the options, paths, photos and class noun, found before the first
    byte is written (the model's weights are loaded later; their errors also come before any write)."""
    cfg.validate()
    if cfg.model is None:
        cfg.model = str(default_model_dir())
    for line in default_model_notes(cfg.model, cfg.class_noun):
        tqdm.write(line)
    out = Path(cfg.output)
    device = process_device(resolve_device(cfg.device))  # under a launcher: the local rank's GPU
    check_stage_dir(Path(cfg.model), "base")
    family = model_family(Path(cfg.model))
    if family == "sd":
        sd.check_options(cfg)
    elif family == "sdxl":
        sdxl.check_options(cfg)
    text_training.check_family(cfg, family)
    text_training.check_input_adapter(cfg.model)
    sr_dir = find_sr_dir(Path(cfg.model), cfg.sr_model)
    if cfg.sr_model is not None or (family == "sd" and sr_dir is not None):
        check_stage_dir(sr_dir, "sr")
        check_sr_family(sr_dir, family)
    stages = _pick_stages(cfg, sr_dir is not None, family)
    if family == "sd" and "sr" in stages:
        sd_upscale.check_noise_level(cfg.sr_noise_level, sr_dir, "--sr-noise-level")
        if cfg.class_backend == "trt" and cfg.draws_class_images():
            raise UserError(f"--class-backend trt: {sd_upscale.NO_TENSORRT}; use onnx, or --stages base")
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
    return RunInputs(out, device, stages, sr_dir, images, captions, tokenizer)


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


def start_run(cfg: TrainConfig, inputs: RunInputs, prompts: Prompts, saved_run: dict | None, overwrite: bool,
              dist: Dist = SINGLE) -> dict:
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
        "text_encoder": text_training.record(cfg),
        "stages": inputs.stages,
        "distributed": distributed_record(cfg, dist),
        "final_loss": saved_run.get("final_loss", {}) if saved_run else {},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(out / RUN_FILE, run)
    return run


def stage_validation(cfg: TrainConfig, cascade: Cascade, stage: str, embeds: torch.Tensor | None,
                     negative: torch.Tensor) -> Validation | None:
    if embeds is None:
        return None
    upscaler = stage == "sr" and cascade.family == "sd"
    return Validation(
        embeds=embeds,
        negative=negative,
        size=cascade.base_size // cascade.vae_scale_factor if stage == "base" else cascade.sr_size,
        base_size=cascade.base_size,
        guidance=BASE_GUIDANCE if stage == "base" else sd_upscale.GUIDANCE if upscaler else SR_GUIDANCE,
        noising_scheduler=cascade.sr_noising_scheduler if stage == "sr" else None,
        noise_level=sd_upscale.NOISE_LEVEL if upscaler else SR_NOISE_LEVEL,
        # Stable Diffusion: kept through the loop only when validating; the x4 upscaler decodes with its own VAE
        vae=cascade.sr_vae if stage == "sr" else cascade.vae,
    )


def _lap(timings: dict[str, float], phase: str, since: float) -> float:
    """Adds the seconds since `since` to timings[phase] (dreambooth.json's "timings"); returns now."""
    now = time.perf_counter()
    timings[phase] = round(timings.get(phase, 0.0) + now - since, 3)
    return now


def open_output(stack: contextlib.ExitStack, cfg: TrainConfig, inputs: RunInputs, resume: bool, overwrite: bool,
                dist: Dist) -> tuple[dict | None, dict | None]:
    """Rank 0 takes the output's lock (held until `stack` closes) and checks the directory; every rank reads the
    run and the checkpoint it continues (a new run starts from an empty directory: None, None)."""
    out = inputs.out
    if dist.is_main:
        stack.enter_context(output_lock(out))
        check_output_dir(out, resume, overwrite)
    saved_run = read_run(out) if resume else None
    latest = read_latest(out / CHECKPOINTS) if resume else None
    if saved_run:
        check_resume_config(cfg, saved_run["config"])
        saved = (saved_run.get("distributed") or {}).get("world_size", 1)
        if saved != dist.world_size:
            how = "without a launcher" if saved == 1 else f"on {saved} processes (torchrun --nproc_per_node ...)"
            raise UserError(f"--resume: the run trained on {saved} process(es), this is {dist.world_size}: another "
                            f"number changes the global batch and the random draws; resume it {how}")
        check_not_finished(latest, out, inputs.stages)
    return saved_run, latest


def distributed_record(cfg: TrainConfig, dist: Dist) -> dict:
    """How the run is spread over processes (dreambooth.json's "distributed"); the global batch counts the
    subject rows of one update (each comes with a prior row under prior preservation)."""
    return {
        "world_size": dist.world_size,
        "backend": dist.backend,
        "sharding": "fsdp" if cfg.fsdp else "ddp" if dist.is_distributed else "none",
        "batch_per_process": cfg.batch_size,
        "gradient_accumulation": cfg.gradient_accumulation,
        "global_batch": cfg.batch_size * dist.world_size * cfg.gradient_accumulation,
    }


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, dist: Dist = SINGLE) -> Path:
    """Run DreamBooth as `cfg` says; return the output directory: check the inputs, prepare the output, then
    train stage by stage. dreambooth.json's "timings" holds the seconds of this call's phases: load (checks,
    model, prompts), class_images, train_<stage>, write (the tuned UNets), pictures (loss plot, sheets).

    `dist`: this process's place in a run over several (distributed.init_from_env). Every rank loads the model,
    draws its share of the class images and trains on its rows of each global batch (DDP, or FSDP2 with --fsdp);
    rank 0 alone checks and writes the output directory. A rank that loses the others stops with one line."""
    with stop_on_sigterm(dist, lambda: resume_hint(Path(cfg.output))):
        try:
            return _train(cfg, resume, overwrite, dist)
        except RuntimeError as err:
            if dist.is_distributed and is_lost_rank(err):
                raise lost_rank(err, resume_hint(Path(cfg.output))) from None
            raise


def resume_hint(out: Path) -> str:
    """Where a stopped run of several processes continues from (read from its latest.json)."""
    try:
        latest = read_latest(out / CHECKPOINTS)
    except UserError:
        latest = None
    where = (f"the last checkpoint is {latest['stage']} step {latest['step']}" if latest and latest.get("dir")
             else "no checkpoint of the current stage yet")
    return f"{where}; continue with --resume (with the same number of processes)"


def _train(cfg: TrainConfig, resume: bool, overwrite: bool, dist: Dist) -> Path:
    clock, timings = time.perf_counter(), {}
    if cfg.fsdp and not dist.is_distributed:
        raise UserError("--fsdp shards the UNet over the processes of a distributed run: start it with torchrun "
                        "--nproc_per_node N -m dreambooth_fast train ... (see README, 'More than one GPU')")
    text_training.check_processes(cfg, dist.world_size)
    inputs = rank0_first(dist, lambda: check_inputs(cfg))
    out, stages = inputs.out, inputs.stages
    with contextlib.ExitStack() as stack:
        saved_run, latest = rank0_first(dist, lambda: open_output(stack, cfg, inputs, resume, overwrite, dist))
        cascade = load_cascade(cfg.model, cfg.sr_model, device=str(inputs.device), stages=tuple(stages),
                               tokenizer=inputs.tokenizer)
        for stage in stages:
            data.check_sizes(inputs.images, cascade.base_size if stage == "base" else cascade.sr_size)
        prompts = make_prompts(cascade, cfg, inputs.captions)
        per_stage = stage_prompts(cascade, prompts)
        if saved_run and saved_run.get("instance_prompts", prompts.instance) != prompts.instance:
            raise UserError(f"--resume: the captions changed since the run started (it trained on "
                            f"{saved_run['instance_prompts']}); restore them or start a new run")
        validation_embeds, validation_text = {}, None
        if cfg.validation_prompt and cfg.validation_every:
            validation_text = identifier.fill_placeholder(cfg.validation_prompt, prompts.identifier)
            validation_embeds["base"] = encode_prompts(cascade.tokenizer, cascade.text_encoder, [validation_text] * 2)
            validation_embeds["sr"] = (validation_embeds["base"] if cascade.sr_text_encoder is None else
                                       encode_prompts(cascade.sr_tokenizer, cascade.sr_text_encoder,
                                                      [validation_text] * 2))
        # --train-text-encoder: the base's encoder trains with the base stage; else the embeddings are cached and
        # the text encoders are not needed any more.
        text = text_training.setup(cfg, cascade, prompts, validation_text)
        cascade.text_encoder = cascade.sr_text_encoder = None
        warning = check_free_space(out, estimated_write_bytes(cfg, inputs, cascade), "the run's output")
        if warning:
            tqdm.write(f"warning: {warning}")

        runners = class_image_runners(cfg, cascade, stages, inputs.device)
        run = start_run(cfg, inputs, prompts, saved_run, overwrite, dist) if dist.is_main else {}
        if dist.is_distributed:
            d = run["distributed"] if dist.is_main else distributed_record(cfg, dist)
            tqdm.write(f"distributed: {dist.world_size} processes ({dist.backend}, {d['sharding'].upper()}); global "
                       f"batch {d['global_batch']} = {cfg.batch_size} per process x {dist.world_size} processes x "
                       f"{cfg.gradient_accumulation} accumulation steps")
        clock = _lap(timings, "load", clock)
        started, cpu_started = time.time(), time.process_time()
        class_dir, drawn = prepare_class_images(cfg, cascade, prompts, stages, inputs.device, runners, dist,
                                                per_stage["sr"] if cascade.family == "sd" else None)
        # Each rank's (start, end, images drawn, CPU seconds) of the phase.
        spans = gather(dist, (started, time.time(), drawn, time.process_time() - cpu_started))
        del runners
        clock = _lap(timings, "class_images", clock)
        if dist.is_distributed:  # the phase runs from the first rank's start to the last rank's end
            timings["class_images"] = round(max(s[1] for s in spans) - min(s[0] for s in spans), 3)
        if dist.is_main:
            run["class_images"] = str(class_dir) if class_dir else None
            run["class_images_drawn"] = [s[2] for s in spans]  # by each rank, in this call
            run["class_images_cpu_s"] = [round(s[3], 3) for s in spans]
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
            validation = stage_validation(cfg, cascade, stage, validation_embeds.get(stage),
                                          per_stage[stage].negative_embeds)
            # Stable Diffusion: the rows are latents now; only validation grids need a VAE (the x4 upscaler's VAE
            # encodes its rows when its stage comes)
            cascade.vae = None
            if stage == "sr":
                cascade.sr_vae = None
            trainer = StageTrainer(stage, unet, scheduler, noising, rows, per_stage[stage], cfg, inputs.device, out,
                                   completed, validation, dist, text if stage == "base" else None)
            if latest and latest.get("stage") == stage:
                trainer.restore(out / CHECKPOINTS, latest)
            final_loss = trainer.run()
            clock = _lap(timings, f"train_{stage}", clock)
            write_output_stage(out, stage, trainer, cfg)
            completed.append(stage)
            if dist.is_main:
                run["final_loss"][stage] = final_loss
                run.setdefault("skipped_steps", {})[stage] = trainer.skipped  # fp16 overflows
                mark_stage_done(out / CHECKPOINTS, completed)
                run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                atomic_write_json(out / RUN_FILE, run)
            del trainer, unet
            text = None  # the tuned encoder went out with the base stage
            clock = _lap(timings, "write", clock)
        if dist.is_main:
            release_freed_memory()  # else the loss plot's matplotlib import adds ~22 MiB to the run's peak (memory.py)
            for line in write_run_pictures(out, stages):
                tqdm.write(line)
            _lap(timings, "pictures", clock)
            atomic_write_json(out / RUN_FILE, run)
    return out
