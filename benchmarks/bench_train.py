"""Training-step benchmark: this project's whole DreamBooth step against an eager step written the way diffusers'
examples/dreambooth/train_dreambooth.py writes it, on the same UNet, the same batch shapes and the same optimizer,
alternating step by step in one run after warm-up.

Ours is `StageTrainer.optimizer_step()` (dreambooth_fast/train.py) with the options a user runs: prior
preservation (lambda 1), Adam, gradient clipping at 1.0; on a GPU `--precision bf16` (bf16 autocast over float32
weights) and, at IF's sizes, gradient checkpointing (diffusers' IF DreamBooth recipe turns it on too; the UNet is
shared, so the eager step runs with it as well). Its step: batch assembly, `ops.add_noise`, UNet,
`ops.dreambooth_loss` on the epsilon half, backward, clip, optimizer and lr step. The eager step: torch.cat of the
subject and prior rows, `DDPMScheduler.add_noise`, UNet, torch.chunk of the prediction (epsilon / variance, then
subject / prior) and of the target, two F.mse_loss calls, prior_loss_weight, autograd, the same clip, optimizer
and lr step. Gradients are freed with zero_grad(set_to_none=True) on both sides (diffusers' script defaults to
zero-filling them; that difference is not the project's to claim). The SR stage adds the noise-augmented upscaled
low-res image as 3 more input channels and its level as the class label, on both sides.

Also measured, at the step's shapes: the fused ops alone (add_noise + dreambooth_loss forward and backward) against
their eager expressions, so that the table shows what share of the step they are and how much of the step they
could save at most. A kernel ratio says nothing about the step by itself.

Peak memory: the peak of what one step allocates above what is allocated when it starts (weights, gradients
of the last step freed, Adam state), per implementation, after warm-up: torch.cuda.max_memory_allocated on a
GPU; on a CPU the peak of the running sum of the allocations and frees that torch.profiler(profile_memory=True)
records during the step.

Stable Diffusion (the latent family): both steps train the UNet on latents, 4 channels, with the scheduler's
prediction type (epsilon for SD 1.x, v-prediction for SD 2.x: ops.add_noise's velocity target against
`get_velocity`). dbfast encodes the subject photos and class images with the VAE once, before the loop
(sd.latent_rows: the posterior's mean), so its step never runs the VAE; diffusers' train_dreambooth.py encodes the
batch every step (a posterior sample). The benchmark measures both sides of that honestly: the headline ratio is
ours against the diffusers-style step on the same pre-encoded latents (the same work: noise, UNet, loss, backward,
optimizer), and a third step, `diffusers_eager_vae`, is the script's step as it runs, the VAE encode of the
batch's pixels included (the VAE frozen, in the weights' dtype, as the script keeps it); its ratio to ours is
reported beside (the rows' `ratio_vs_eager_vae`), so what the encode-once design saves per step is visible and
not mixed into the step's ratio. The VAE's one pass before the loop is part of the job suite's figures.

Sizes: on a CPU the tiny cascade's stages (base 32 px, SR 64 px) and the tiny Stable Diffusion model
(dreambooth_fast/toy/tiny_sd.py at 64 px: 16x16 latents, 4x VAE; SD 1.x-style epsilon and SD 2.x-style
v-prediction); on a GPU UNets of IF-I-XL's and IF-II-L's published configs, and of SD 1.5's (4x64x64 latents,
77x768 text, 512 px through the VAE) and SD 2.1's (4x96x96, 77x1024, v-prediction, 768 px) with their VAEs, all
with random weights, at 4 and 2 subject rows (plus as many prior rows). A case that does not fit in the GPU's
memory gets a row saying so.

    python -m benchmarks --suite train [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    RESULTS_DIR,
    Timed,
    append_rows,
    format_table,
    load_average,
    measure_paired,
    ratio_spread,
    run_info,
    summarize,
)
from benchmarks.diffusers_step import diffusers_step
from dreambooth_fast import ops
from dreambooth_fast.config import TrainConfig
from dreambooth_fast.models import STAGE_2_DIR, load_cascade, load_scheduler, load_unet
from dreambooth_fast.optim import adam_implementation
from dreambooth_fast.toy.default_model import DEFAULT_MODEL
from dreambooth_fast.toy.if_layout import if_noising_scheduler_config, if_scheduler_config, if_unet_config
from dreambooth_fast.toy.tiny_cascade import build_tiny_cascade
from dreambooth_fast.toy.tiny_sd import SD_BETAS, SD_VAE_SCALING, build_tiny_sd
from dreambooth_fast.train import AUTOCAST, Prompts, StageData, StageTrainer

CHANNELS = 3
TEXT_LENGTH = 77
SUBJECT_IMAGES = 4  # a user's 3-5 photos
PRIOR_IMAGES = 8
OURS, EAGER, OURS_COMPILED = "dreambooth_fast", "diffusers_eager", "dreambooth_fast_compile"
OURS_FUSED_NORM = "dreambooth_fast_fused_norm"  # ours with --fused-norm (on its own UNet copy)
EAGER_VAE = "diffusers_eager_vae"  # Stable Diffusion: the diffusers-style step with its VAE encode of every batch
LATENT_CHANNELS = 4
FUSED_OPS, EAGER_OPS = "fused_ops", "eager_ops"


@dataclass(frozen=True)
class Case:
    stage: str  # "base" or "sr"
    model: str  # "tiny" or the IF UNet whose config is used
    size: int
    batch: int  # subject rows per step; as many prior rows follow them
    dtype: str  # "fp32" or "bf16": TrainConfig.precision (bf16: autocast; weights stay float32)
    checkpointing: bool = False  # gradient checkpointing
    compiled: bool = False  # also ours with --compile, a third step alternating with the other two
    fused_norm: bool = False  # also ours with --fused-norm, one more step alternating with the others
    family: str = "if"  # "if" (pixels) or "sd" (latents behind a VAE; `size` is the latents')

    @property
    def channels(self) -> int:
        return LATENT_CHANNELS if self.family == "sd" else CHANNELS

    @property
    def shape(self) -> str:
        return f"{2 * self.batch}x{self.channels}x{self.size}x{self.size}"


def published_unet_config(stage: str) -> dict:
    """The UNet config of IF-I-XL-v1.0 (stage I, 64 px, 4.3B parameters) or IF-II-L-v1.0 (stage II, 256 px, 1.2B
    parameters) as published in their unet/config.json."""
    if stage == "base":
        return if_unet_config(64, [704, 1408, 2112, 2816], [False, True, True, True], text_dim=4096,
                              attention_head_dim=64, layers_per_block=3, addition_embed_type_num_heads=64)
    return if_unet_config(256, [160, 320, 640, 960, 1280], [False, False, False, True, True], text_dim=4096,
                          attention_head_dim=64, super_resolution=True, layers_per_block=[2, 2, 3, 5, 5],
                          addition_embed_type_num_heads=64, time_embedding_dim=1280, resnet_skip_time_act=True,
                          resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071)


IF_MODELS = {"base": "IF-I-XL", "sr": "IF-II-L"}
# Stable Diffusion on a GPU: latent size, text width, prediction type of SD 1.5 and SD 2.1 (768-v).
SD_MODELS = {"SD-1.5": (64, 768, "epsilon"), "SD-2.1": (96, 1024, "v_prediction")}
TINY_SD = {"tiny-sd": "epsilon", "tiny-sd-v": "v_prediction"}  # the tiny SD model, SD 1.x-style and 2.x-style
TINY_SD_IMAGE = 64  # px of the tiny SD model the CPU cases train (16x16 latents); --smoke: its default 32


def published_sd_configs(model: str) -> tuple[dict, dict]:
    """The UNet and VAE configs of SD 1.5 (runwayml/stable-diffusion-v1-5) or SD 2.1 (stabilityai/stable-diffusion-2-1,
    768 px) as published in their unet/ and vae/ config.json."""
    latent, text_dim, _ = SD_MODELS[model]
    v2 = model == "SD-2.1"
    unet = dict(
        sample_size=latent, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=2,
        block_out_channels=[320, 640, 1280, 1280], down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=text_dim,
        attention_head_dim=[5, 10, 20, 20] if v2 else 8, use_linear_projection=v2, upcast_attention=v2,
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    )
    vae = dict(
        sample_size=8 * latent, in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=2,
        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, scaling_factor=SD_VAE_SCALING,
    )
    return unet, vae


def cases(device: str, *, quick: bool, smoke: bool, base_size: int, sr_size: int, sd_size: int) -> list[Case]:
    if torch.device(device).type == "cuda" and not smoke:
        batches = (4,) if quick else (4, 2)
        return ([Case(stage, IF_MODELS[stage], 64 if stage == "base" else 256, b, "bf16", checkpointing=True)
                 for stage in ("base", "sr") for b in batches]
                + [Case("base", model, SD_MODELS[model][0], b, "bf16", family="sd")
                   for model in SD_MODELS for b in batches])
    if smoke:  # the tiny cascade's UNets at half their size: proves the suite runs, in seconds
        return [Case("base", "tiny", base_size // 2, 1, "fp32", fused_norm=True),
                Case("sr", "tiny", sr_size // 2, 1, "fp32"), Case("base", "tiny-sd", sd_size, 1, "fp32", family="sd")]
    cpu = [Case("base", "tiny", base_size, 2, "fp32", fused_norm=True), Case("sr", "tiny", sr_size, 2, "fp32")]
    cpu += [Case("base", model, sd_size, 2, "fp32", family="sd") for model in TINY_SD]
    if (DEFAULT_MODEL / "model_index.json").is_file():  # the model a user trains without --model, as they run it
        size = load_cascade(DEFAULT_MODEL, with_text_encoder=False, with_unets=False).base_size
        cpu.append(Case("base", "default", size, 1, "fp32", compiled=True, fused_norm=True))
    return cpu


@dataclass
class Setup:
    """One case, ready to step: the shared UNet and trainer (ours), the eager step, and the ops-only pair."""

    trainer: StageTrainer
    compiled: StageTrainer | None  # ours with --compile, on a copy of the UNet
    fused_norm: StageTrainer | None  # ours with --fused-norm, on a copy of the UNet
    eager_step: Callable[[], float]
    fused_ops: Timed
    eager_ops: Timed
    eager_vae_step: Callable[[], float] | None = None  # Stable Diffusion: the eager step encoding its batch


def saved_model_dir(case: Case, model_dirs: dict[str, Path]) -> Path | None:
    """The model a case's UNet is read from: one of `model_dirs` (the tiny cascade "tiny", the tiny SD models), the
    embedded default model, or None (a UNet of a published config, randomly initialised)."""
    return {**model_dirs, "default": DEFAULT_MODEL}.get(case.model)


def _unet(case: Case, model_dir: Path | None, device: str) -> torch.nn.Module:
    if model_dir is not None:
        return load_unet(model_dir if case.stage == "base" else model_dir / STAGE_2_DIR, device)
    from diffusers import UNet2DConditionModel

    config = published_sd_configs(case.model)[0] if case.family == "sd" else published_unet_config(case.stage)
    with torch.device(device):  # random init on the device: a 4.3B model is slow to initialise on a CPU
        return UNet2DConditionModel(**config)


def sd_parts(case: Case, model_dir: Path | None, device: str, dtype: torch.dtype):
    """A Stable Diffusion case's training scheduler (DDPMScheduler, as diffusers' script loads it from the model's
    scheduler/: the same noise schedule the model's sampler holds) and its frozen VAE in `dtype` (the script's
    weight dtype)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    if model_dir is not None:
        scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    else:
        scheduler = DDPMScheduler(**SD_BETAS, prediction_type=SD_MODELS[case.model][2])
        with torch.device(device):
            vae = AutoencoderKL(**published_sd_configs(case.model)[1])
    return scheduler, vae.to(device, dtype).requires_grad_(False).eval()


def stage_schedulers(stage: str, model_dir: Path | None):
    """The stage's training scheduler and, for SR, the noising scheduler of its low-res input: a saved cascade's
    (`model_dir`), else IF's configs."""
    if model_dir is not None:
        stage_dir = model_dir if stage == "base" else model_dir / STAGE_2_DIR
        noising = load_scheduler(stage_dir, "image_noising_scheduler") if stage == "sr" else None
        return load_scheduler(stage_dir), noising
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**if_scheduler_config(sample_max_value=1.5 if stage == "base" else 1.0))
    noising = DDPMScheduler(**if_noising_scheduler_config()) if stage == "sr" else None
    return scheduler, noising


def _rows(case: Case, low_size: int, generator: torch.Generator) -> StageData:
    """Random training rows (the trainer's StageData): pixel values in [-1, 1], SR conditioning upscaled from
    `low_size` as train.py does; Stable Diffusion: latents (unit scale, as the VAE's scaled latents are)."""

    def images(n: int, size: int) -> torch.Tensor:
        return torch.rand((n, CHANNELS, size, size), generator=generator) * 2 - 1

    if case.family == "sd":
        latents = (LATENT_CHANNELS, case.size, case.size)
        return StageData(torch.randn((SUBJECT_IMAGES, *latents), generator=generator), None,
                         torch.randn((PRIOR_IMAGES, *latents), generator=generator), None)
    if case.stage == "base":
        return StageData(images(SUBJECT_IMAGES, case.size), None, images(PRIOR_IMAGES, case.size), None)

    def upscaled(n: int) -> torch.Tensor:
        return F.interpolate(images(n, low_size), (case.size, case.size), mode="bilinear", align_corners=True)

    return StageData(images(SUBJECT_IMAGES, case.size), upscaled(SUBJECT_IMAGES), images(PRIOR_IMAGES, case.size),
                     upscaled(PRIOR_IMAGES))


def make_trainer(case: Case, unet: torch.nn.Module, scheduler, noising, device: str, out: Path,
                 generator: torch.Generator, **options) -> StageTrainer:
    """The project's StageTrainer on `unet` with random rows and prompt embeddings of the case's shapes;
    `options` are more TrainConfig fields."""
    text_dim = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
    embeds = torch.randn((3, TEXT_LENGTH, text_dim), generator=generator)
    prompts = Prompts("x", ["a x dog"], "a dog", embeds[:1], embeds[1:2], embeds[2:])
    rows = _rows(case, max(case.size // 4, 8), generator)
    cfg = TrainConfig(images="-", class_noun="dog", batch_size=case.batch, precision=case.dtype,
                      gradient_checkpointing=case.checkpointing, seed=0, **options)
    return StageTrainer(case.stage, unet, scheduler, noising, rows, prompts, cfg, torch.device(device), out, [], None)


def setup_case(case: Case, model_dirs: dict[str, Path], device: str, out: Path) -> Setup:
    model_dir = saved_model_dir(case, model_dirs)
    unet = _unet(case, model_dir, device)
    vae = None
    if case.family == "sd":
        scheduler, vae = sd_parts(case, model_dir, device, AUTOCAST[case.dtype] or torch.float32)
        noising = None
    else:
        scheduler, noising = stage_schedulers(case.stage, model_dir)
    generator = torch.Generator().manual_seed(0)
    compiled = (make_trainer(case, copy.deepcopy(unet), scheduler, noising, device, out,
                             torch.Generator().manual_seed(0), compile=True) if case.compiled else None)
    fused_norm = (make_trainer(case, copy.deepcopy(unet), scheduler, noising, device, out,
                               torch.Generator().manual_seed(0), fused_norm=True) if case.fused_norm else None)
    trainer = make_trainer(case, unet, scheduler, noising, device, out, generator)
    eager = eager_step_fn(trainer, scheduler, noising, case.batch)
    eager_vae = None
    if vae is not None:  # the script's step as it runs: the batch's pixels through the VAE every step
        pixels = 2 ** (len(vae.config.block_out_channels) - 1) * case.size
        image_rows = StageData(torch.rand((SUBJECT_IMAGES, CHANNELS, pixels, pixels), generator=generator) * 2 - 1,
                               None, torch.rand((PRIOR_IMAGES, CHANNELS, pixels, pixels), generator=generator) * 2 - 1,
                               None)
        eager_vae = eager_step_fn(trainer, scheduler, noising, case.batch, vae=vae, image_rows=image_rows)
    fused_ops, eager_ops = ops_candidates(case, trainer, scheduler, noising, torch.device(device), generator)
    return Setup(trainer, compiled, fused_norm, eager, fused_ops, eager_ops, eager_vae)


def eager_step_fn(trainer: StageTrainer, scheduler, noising, batch_size: int, *, vae=None,
                  image_rows: StageData | None = None) -> Callable[[], float]:
    """One training step written the way diffusers' train_dreambooth.py writes it (diffusers_step.py), on the
    trainer's UNet, with `batch_size` subject rows and as many prior rows, and an optimizer of its own as that
    script makes it: torch.optim.Adam with torch's default implementation on a CPU (per parameter), constant
    learning rate. `vae` and `image_rows`: the batch is those pixels, encoded by the VAE every step (Stable
    Diffusion as the script runs it); else the trainer's rows (pixels, or latents encoded before the loop)."""
    prompts, cfg, device = trainer.prompts, trainer.cfg, trainer.device
    rows = image_rows if image_rows is not None else trainer.rows
    # The batch: the same numbers of subject and prior rows, collated as diffusers does (torch.cat).
    pick = torch.arange(batch_size) % SUBJECT_IMAGES
    batch = {
        "subject": rows.subject[pick], "prior": rows.prior[pick],
        "subject_embeds": prompts.instance_embeds.expand(batch_size, -1, -1),
        "prior_embeds": prompts.class_embeds.expand(batch_size, -1, -1),
        "subject_cond": rows.subject_cond[pick] if rows.subject_cond is not None else None,
        "prior_cond": rows.prior_cond[pick] if rows.prior_cond is not None else None,
    }
    params = trainer.params
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, foreach=False if device.type == "cpu" else None)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # diffusers' "constant"

    def step() -> float:
        return diffusers_step(trainer.unet, params, optimizer, lr_schedule, scheduler, noising, batch,
                              prior_weight=cfg.prior_weight, max_grad_norm=cfg.max_grad_norm,
                              sr_noise_level=cfg.sr_noise_level, autocast=AUTOCAST[cfg.precision], vae=vae)

    return step


def ops_candidates(case: Case, trainer: StageTrainer, scheduler, noising, device: torch.device,
                   generator: torch.Generator) -> tuple[Timed, Timed]:
    """The step's noise and loss work alone, at its shapes: the fused ops as the trainer calls them, and the
    eager expressions of eager_step_fn. The UNet output is a leaf (its channels: IF's 6, SD's 4; in the autocast
    dtype) so that the loss backward stops there; the slice's backward into it is part of both."""
    n, channels = 2 * case.batch, case.channels
    x0 = (torch.rand((n, channels, case.size, case.size), generator=generator) * 2 - 1).to(device)
    eps = torch.randn(x0.shape, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (n,), generator=generator).to(device)
    out_dtype = AUTOCAST[trainer.cfg.precision] or torch.float32
    out_channels = trainer.unet.config.out_channels
    unet_out = torch.randn((n, out_channels, case.size, case.size), generator=generator).to(device, out_dtype)
    unet_out.requires_grad_()
    cond = aug = labels = None
    if case.stage == "sr":
        cond, aug = torch.rand_like(x0) * 2 - 1, torch.randn_like(x0)
        labels = torch.full((n,), trainer.cfg.sr_noise_level, dtype=torch.long, device=device)
    prior_weight = trainer.cfg.prior_weight

    def clear_grad() -> None:
        unet_out.grad = None

    def fused() -> None:
        _, target = ops.add_noise(x0, eps, timesteps, trainer.alphas_cumprod, trainer.prediction_type)
        if cond is not None:
            ops.add_noise(cond, aug, labels, trainer.noising_ac, "epsilon")
        pred = unet_out[:, :channels]
        if pred.dtype != target.dtype:
            pred = pred.float()
        ops.dreambooth_loss(pred, target, None, case.batch, prior_weight).backward()

    def eager() -> None:
        scheduler.add_noise(x0, eps, timesteps)
        if cond is not None:
            noising.add_noise(cond, aug, labels)
        model_pred = torch.chunk(unet_out, 2, dim=1)[0] if out_channels == 6 else unet_out
        velocity = trainer.prediction_type == "v_prediction"
        target = scheduler.get_velocity(x0, eps, timesteps) if velocity else eps
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss = loss + prior_weight * F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
        loss.backward()

    return Timed(fused, clear_grad), Timed(eager, clear_grad)


def peak_step_memory(step: Callable[[], object], device: str) -> float:
    """Bytes one call of `step` allocates at its peak above what is allocated when it starts."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Allocations are recorded on the op that made them, frees outside any op as "[memory]" events.
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated over one step, above the allocation at its start",
    "cpu": "torch.profiler(profile_memory=True): peak running sum of one step's allocations and frees",
}


def bench_case(case: Case, model_dirs: dict[str, Path], device: str, *, rounds: int, ops_rounds: int,
               warmup: int) -> list[dict]:
    """Rows of one case (without the run-wide columns): the steps, then the two ops-only measurements."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        s = setup_case(case, model_dirs, device, Path(tmp))
        step_fns = {OURS: s.trainer.optimizer_step, EAGER: s.eager_step}
        if s.eager_vae_step is not None:
            step_fns[EAGER_VAE] = s.eager_vae_step
        if s.compiled is not None:  # compilation happens in the warm-up calls
            step_fns[OURS_COMPILED] = s.compiled.optimizer_step
        if s.fused_norm is not None:
            step_fns[OURS_FUSED_NORM] = s.fused_norm.optimizer_step
        steps = measure_paired({name: Timed(fn) for name, fn in step_fns.items()}, device, rounds=rounds,
                               warmup=warmup)
        ops_samples = measure_paired({FUSED_OPS: s.fused_ops, EAGER_OPS: s.eager_ops}, device, rounds=ops_rounds,
                                     warmup=warmup)
        memory = {name: peak_step_memory(fn, device) for name, fn in step_fns.items()}
        n_params = sum(p.numel() for p in s.trainer.params)
    step_stats = {name: summarize(v, rounds) for name, v in steps.items()}
    ops_stats = {name: summarize(v, ops_rounds) for name, v in ops_samples.items()}
    ratios = {name: ratio_spread(steps[EAGER], samples) for name, samples in steps.items()}
    # Each option's step against our step with the default options, per paired round.
    vs_ours = {name: ratio_spread(steps[OURS], samples) for name, samples in steps.items()
               if name not in (OURS, EAGER, EAGER_VAE)}
    # Stable Diffusion: the script's step with its VAE encode against ours, per paired round.
    vs_vae = ratio_spread(steps[EAGER_VAE], steps[OURS]) if EAGER_VAE in steps else None
    ops_ratio = ratio_spread(ops_samples[EAGER_OPS], ops_samples[FUSED_OPS])
    eager_step, saved = step_stats[EAGER].median, ops_stats[EAGER_OPS].median - ops_stats[FUSED_OPS].median
    common = {"suite": "train", "stage": case.stage, "model": case.model, "params_m": round(n_params / 1e6, 2),
              "dtype": case.dtype, "shape": case.shape, "subject_rows": case.batch, "prior_rows": case.batch,
              "family": case.family, "prediction": s.trainer.prediction_type, "options": options(s.trainer),
              **load_average()}
    rows = []
    for impl, st in step_stats.items():
        rows.append({
            **common, "what": "step", "impl": impl, **_ms(st),
            "ratio_vs_eager": round(ratios[impl][0], 3),
            "ratio_min": round(ratios[impl][1], 3) if impl != EAGER else "",
            "ratio_max": round(ratios[impl][2], 3) if impl != EAGER else "",
            "ratio_vs_ours": round(vs_ours[impl][0], 3) if impl in vs_ours else "",
            "ratio_vs_ours_min": round(vs_ours[impl][1], 3) if impl in vs_ours else "",
            "ratio_vs_ours_max": round(vs_ours[impl][2], 3) if impl in vs_ours else "",
            "peak_step_mb": round(memory[impl] / 2**20, 2),
            "mem_method": MEMORY_METHOD[torch.device(device).type],
            # What the step's speed-up would be if the fused ops were the only difference (the most they can give).
            "ops_bound_ratio": round(eager_step / (eager_step - saved), 3) if impl == OURS else "",
            "vae": vae_note(case, impl),
            **({"ratio_vs_eager_vae": round(vs_vae[0], 3), "ratio_vs_eager_vae_min": round(vs_vae[1], 3),
                "ratio_vs_eager_vae_max": round(vs_vae[2], 3)} if vs_vae and impl == OURS else {}),
        })
    for impl, st in ops_stats.items():
        step_impl = OURS if impl == FUSED_OPS else EAGER
        rows.append({
            **common, "what": "ops", "impl": impl, **_ms(st),
            "ratio_vs_eager": round(ops_ratio[0], 3) if impl == FUSED_OPS else 1.0,
            "ratio_min": round(ops_ratio[1], 3) if impl == FUSED_OPS else "",
            "ratio_max": round(ops_ratio[2], 3) if impl == FUSED_OPS else "",
            "share_of_step_pct": round(100 * st.median / step_stats[step_impl].median, 2),
        })
    return rows


def vae_note(case: Case, impl: str) -> str:
    """Where a Stable Diffusion step's latents come from ("" for IF, which trains on pixels)."""
    if case.family != "sd":
        return ""
    return ("VAE encode of the batch every step (posterior sample)" if impl == EAGER_VAE
            else "latents encoded once before the loop (not timed)")


def options(trainer: StageTrainer) -> str:
    """The training options both steps ran with, in words; ours' Adam implementation (the eager step's is torch's
    default, per parameter on a CPU)."""
    cfg = trainer.cfg
    adam = "Adam8bit" if cfg.use_8bit_adam else f"Adam ({adam_implementation(trainer.optimizer)} in ours)"
    words = [f"prior lambda {cfg.prior_weight}", f"clip {cfg.max_grad_norm}", adam, f"precision {cfg.precision}"]
    return ", ".join(words + (["gradient checkpointing"] if cfg.gradient_checkpointing else []))


def _ms(stats) -> dict:
    return {"median_ms": round(stats.median * 1e3, 3), "min_ms": round(stats.minimum * 1e3, 3),
            "max_ms": round(stats.maximum * 1e3, 3), "q1_ms": round(stats.q1 * 1e3, 3),
            "q3_ms": round(stats.q3 * 1e3, 3), "samples": stats.samples}


def run(device: str, *, quick: bool = False, smoke: bool = False, out: Path | None = None,
        model_dir: Path | None = None, command: str = "") -> list[dict]:
    """Runs the training-step benchmark, appends its rows to `out` (default benchmarks/results/train.csv), prints
    a table and returns the rows. `model_dir` is a tiny cascade for the CPU sizes (built in a temp dir if None);
    the tiny Stable Diffusion models are built in a temp dir."""
    out = Path(out) if out is not None else RESULTS_DIR / "train.csv"
    rounds, ops_rounds, warmup = (1, 1, 1) if smoke else (8, 50, 3) if quick else (20, 200, 3)
    info = run_info(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir or build_tiny_cascade(Path(tmp) / "tiny")
        sizes = load_cascade(model_dir, with_text_encoder=False, with_unets=False)
        sd_image = 32 if smoke else TINY_SD_IMAGE
        all_cases = cases(device, quick=quick, smoke=smoke, base_size=sizes.base_size, sr_size=sizes.sr_size,
                          sd_size=sd_image // 4)
        model_dirs = {"tiny": model_dir}
        for name in {c.model for c in all_cases} & set(TINY_SD):  # built only when a case trains it
            model_dirs[name] = build_tiny_sd(Path(tmp) / name, image_size=sd_image, prediction_type=TINY_SD[name])
        for case in all_cases:
            try:
                case_rows = bench_case(case, model_dirs, device, rounds=rounds, ops_rounds=ops_rounds, warmup=warmup)
            except torch.OutOfMemoryError as err:
                case_rows = [{"suite": "train", "stage": case.stage, "model": case.model, "dtype": case.dtype,
                              "shape": case.shape, "what": "step", "impl": "skipped",
                              "note": f"out of memory: {str(err).splitlines()[0]}", **load_average()}]
                torch.cuda.empty_cache()
            rows += [{**info, "command": command, **row} for row in case_rows]
    append_rows(out, rows)
    print(f"{info['device_name']} ({device}), torch {info['torch']}, diffusers {info['diffusers']}, "
          f"commit {info['commit']}")
    print(table(rows))
    print(f"appended {len(rows)} rows to {out}")
    return rows


def table(rows: list[dict]) -> str:
    """One line per case and measurement (step, ops): ours and eager median (min-max), the paired ratio."""
    by_key = {(r["model"], r["stage"], r["shape"], r["what"], r["impl"]): r for r in rows}
    lines = []
    for (model, stage, shape, what, impl), r in by_key.items():
        if impl not in (OURS, OURS_COMPILED, OURS_FUSED_NORM, FUSED_OPS):
            continue
        e = by_key[(model, stage, shape, what, EAGER if what == "step" else EAGER_OPS)]
        option = {OURS_COMPILED: "--compile", OURS_FUSED_NORM: "--fused-norm"}.get(impl)
        notes = (f"peak MB {r['peak_step_mb']:.1f} / {e['peak_step_mb']:.1f}"
                 + (f"; ops bound {r['ops_bound_ratio']:.3f}x" if impl == OURS else
                    f"; {option}: {r['ratio_vs_ours']:.2f}x ({r['ratio_vs_ours_min']:.2f}-{r['ratio_vs_ours_max']:.2f})"
                    " our default step")
                 if what == "step" else f"{r['share_of_step_pct']:.2g}% of our step")
        lines.append([r["model"], stage, shape, r["dtype"], what, _cell(r), _cell(e),
                      f"{r['ratio_vs_eager']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})", notes])
        if impl == OURS and what == "step" and r.get("ratio_vs_eager_vae", "") != "":
            v = by_key[(model, stage, shape, what, EAGER_VAE)]
            lines.append([r["model"], stage, shape, r["dtype"], "step, eager + VAE", _cell(r), _cell(v),
                          f"{r['ratio_vs_eager_vae']:.2f}x ({r['ratio_vs_eager_vae_min']:.2f}-"
                          f"{r['ratio_vs_eager_vae_max']:.2f})",
                          f"the script's VAE encode every step; peak MB eager {v['peak_step_mb']:.1f}"])
    lines += [[r["model"], r["stage"], r["shape"], r["dtype"], "skipped", "", "", "", r["note"]]
              for r in rows if r["impl"] == "skipped"]
    header = ["model", "stage", "rows", "dtype", "what", "ours ms (min-max)", "eager ms (min-max)",
              "ratio (min-max)", "notes"]
    return format_table(header, lines)


def _cell(r: dict) -> str:
    return f"{r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f})"
