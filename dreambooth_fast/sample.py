"""The cascade sampler: IF's stage I (text to image) and stage II (super-resolution) loops, written out.

The loops are the ones in diffusers' `IFPipeline` and `IFSuperResolutionPipeline`, step for step and draw for
draw, so the same embeddings, seed and settings give the same images (tests/test_sample.py checks it). They
run over any UNet runner `unet_fn(sample, timestep, encoder_hidden_states, class_labels=None) -> Tensor`
returning the UNet's full 6-channel output (epsilon + learned-range variance): `torch_unet_fn(unet)` for a
diffusers UNet, the export backends for ONNX Runtime and TensorRT. The runner gets `timestep` as an int64
tensor of shape (batch,) and, for stage II, `class_labels` as the int64 noise levels of shape (batch,).

Images are float tensors (batch, 3, H, W) in [-1, 1]. Sampling runs on the device and in the dtype of
`prompt_embeds`: cast them to the UNet's dtype and device first (`generate_cascade` does).

Randomness: `generator` is a torch.Generator or a list of them, one per image (an image's draws then do not
depend on the rest of the batch). A CPU generator gives the same noise on any device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from . import sd_upscale
from .errors import UserError
from .ops import add_noise
from .samplers import sampler_schedule
from .sd import decode_latents
from .sdxl import unet_kwargs
from .text import encode_negative, encode_prompts

UnetFn = Callable[..., torch.Tensor]
Generator = torch.Generator | list[torch.Generator] | None

CHANNELS = 3  # IF works in RGB pixel space
# IF's own defaults (IFPipeline and IFSuperResolutionPipeline).
BASE_STEPS = 100
BASE_GUIDANCE = 7.0
SR_STEPS = 50
SR_GUIDANCE = 4.0
SR_NOISE_LEVEL = 250


def torch_unet_fn(unet: torch.nn.Module) -> UnetFn:
    """The runner for a diffusers UNet2DConditionModel (for SDXL's, the packed embedding unpacked: sdxl.py)."""

    def run(sample, timestep, encoder_hidden_states, class_labels=None):
        return unet(sample, timestep, **unet_kwargs(unet.config, encoder_hidden_states, class_labels),
                    return_dict=False)[0]

    return run


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _set_timesteps(scheduler, steps: int, timesteps: list[int] | None, device: torch.device) -> None:
    # As the IF pipelines do: explicit timesteps (e.g. IF's "smart" schedules) win over a step count.
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps, device=device)
    else:
        if not 1 <= steps <= scheduler.config.num_train_timesteps:
            raise UserError(f"--steps {steps}: choose 1 to {scheduler.config.num_train_timesteps}")
        scheduler.set_timesteps(steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)


def _denoise(unet_fn: UnetFn, scheduler, x: torch.Tensor, prompt_embeds: torch.Tensor,
             negative_embeds: torch.Tensor | None, guidance_scale: float, generator: Generator, progress: bool,
             desc: str, upscaled: torch.Tensor | None = None, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising loop both IF stages share; stage II adds the upscaled image as 3 more input channels."""
    guided = guidance_scale > 1.0
    embeds = prompt_embeds
    if guided:
        if negative_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_embeds (see text.encode_negative)")
        negative_embeds = negative_embeds.to(prompt_embeds).expand(prompt_embeds.shape[0], -1, -1)
        embeds = torch.cat([negative_embeds, prompt_embeds])
        if class_labels is not None:
            class_labels = torch.cat([class_labels] * 2)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    channels = x.shape[1]
    if upscaled is not None and guided:
        upscaled = torch.cat([upscaled] * 2)
    for t in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False):
        model_input = torch.cat([x] * 2) if guided else x
        # The sample alone is scaled, as StableDiffusionUpscalePipeline does; IF's pipelines scale the
        # concatenation, which is the same with IF's schedulers (DDPM, DPM-Solver++: no input scaling).
        model_input = scheduler.scale_model_input(model_input, t)
        if upscaled is not None:
            model_input = torch.cat([model_input, upscaled], dim=1)
        pred = unet_fn(model_input, t.expand(model_input.shape[0]), embeds, class_labels)
        if guided:
            # Guide the epsilon half; the variance half comes from the conditional prediction.
            uncond, cond = pred.chunk(2)
            eps = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
            pred = torch.cat([eps, cond[:, channels:]], dim=1)
        if scheduler.config.get("variance_type") not in ("learned", "learned_range"):
            pred = pred[:, :channels]
        x = scheduler.step(pred, t, x, **step_kwargs, return_dict=False)[0]
    return x


@torch.no_grad()
def sample_base(unet_fn: UnetFn, scheduler, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, *,
                size: int | tuple[int, int], steps: int = BASE_STEPS, guidance_scale: float = BASE_GUIDANCE,
                timesteps: list[int] | None = None, generator: Generator = None,
                progress: bool = True, channels: int = CHANNELS) -> torch.Tensor:
    """IF stage I: images (batch, 3, H, W) in [-1, 1], one per row of `prompt_embeds`.

    `negative_embeds` (batch or 1 rows) is the unconditional embedding; unused when guidance_scale <= 1.
    `timesteps`, when given, replaces `steps` (as the pipelines' `timesteps` argument does). With `channels`
    (Stable Diffusion's latent channels) and a latent `size`, the same loop is StableDiffusionPipeline's: it
    returns latents, not images.
    """
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    _set_timesteps(scheduler, steps, timesteps, device)
    x = randn_tensor((prompt_embeds.shape[0], channels, *_hw(size)), generator=generator, device=device, dtype=dtype)
    x = x * scheduler.init_noise_sigma
    return _denoise(unet_fn, scheduler, x, prompt_embeds, negative_embeds, guidance_scale, generator, progress, "base")


@torch.no_grad()
def sample_sr(unet_fn: UnetFn, scheduler, noising_scheduler, low_res: torch.Tensor, prompt_embeds: torch.Tensor,
              negative_embeds: torch.Tensor | None, *, size: int | tuple[int, int], steps: int = SR_STEPS,
              guidance_scale: float = SR_GUIDANCE, noise_level: int = SR_NOISE_LEVEL,
              timesteps: list[int] | None = None, generator: Generator = None,
              progress: bool = True) -> torch.Tensor:
    """IF stage II: upscale `low_res` (batch, 3, h, w) in [-1, 1] to `size`, conditioned on the prompt.

    The low-res image is upsampled (bilinear, align_corners=True, as diffusers does), noise-augmented to
    `noise_level` (0-999 on the noising scheduler's scale) and that level is the UNet's class label.
    """
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    n_levels = len(noising_scheduler.alphas_cumprod)
    if not 0 <= noise_level < n_levels:
        raise UserError(f"--noise-level {noise_level}: choose 0 to {n_levels - 1}")
    if low_res.shape[0] != prompt_embeds.shape[0]:
        raise ValueError(f"low_res has {low_res.shape[0]} images but prompt_embeds has {prompt_embeds.shape[0]} rows")
    _set_timesteps(scheduler, steps, timesteps, device)
    height, width = _hw(size)
    # Same draws in the same order as the pipeline: the initial noise, then the augmentation noise.
    x = randn_tensor((low_res.shape[0], CHANNELS, height, width), generator=generator, device=device, dtype=dtype)
    x = x * scheduler.init_noise_sigma
    upscaled = F.interpolate(low_res.to(device=device, dtype=dtype), (height, width), mode="bilinear",
                             align_corners=True)
    noise = randn_tensor(upscaled.shape, generator=generator, device=device, dtype=dtype)
    levels = torch.full((upscaled.shape[0],), noise_level, dtype=torch.long, device=device)
    upscaled, _ = add_noise(upscaled, noise, levels, noising_scheduler.alphas_cumprod.to(device))
    return _denoise(unet_fn, scheduler, x, prompt_embeds, negative_embeds, guidance_scale, generator, progress, "sr",
                    upscaled=upscaled, class_labels=levels)


@torch.no_grad()
def sample_upscale(unet_fn: UnetFn, scheduler, noising_scheduler, low_res: torch.Tensor, prompt_embeds: torch.Tensor,
                   negative_embeds: torch.Tensor | None, *, channels: int, steps: int = SR_STEPS,
                   guidance_scale: float = SR_GUIDANCE, noise_level: int = SR_NOISE_LEVEL,
                   timesteps: list[int] | None = None, generator: Generator = None,
                   progress: bool = True) -> torch.Tensor:
    """The Stable Diffusion x4 upscaler (StableDiffusionUpscalePipeline's loop): latents (batch, `channels`, h, w)
    for `low_res` (batch, 3, h, w) in [-1, 1], which is noised to `noise_level` by `noising_scheduler` (the
    pipeline's low_res_scheduler), concatenated with the latents at every step, the level its class label. Decode
    the latents with the upscaler's VAE (sd.decode_latents) for the 4x image."""
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    if low_res.shape[0] != prompt_embeds.shape[0]:
        raise ValueError(f"low_res has {low_res.shape[0]} images but prompt_embeds has {prompt_embeds.shape[0]} rows")
    _set_timesteps(scheduler, steps, timesteps, device)
    low_res = low_res.to(device=device, dtype=dtype)
    # Same draws in the same order as the pipeline: the augmentation noise, then the initial latents.
    noise = randn_tensor(low_res.shape, generator=generator, device=device, dtype=dtype)
    levels = torch.full((low_res.shape[0],), noise_level, dtype=torch.long, device=device)
    image, _ = add_noise(low_res, noise, levels, noising_scheduler.alphas_cumprod.to(device))
    x = randn_tensor((low_res.shape[0], channels, *low_res.shape[2:]), generator=generator, device=device,
                     dtype=dtype)
    x = x * scheduler.init_noise_sigma
    return _denoise(unet_fn, scheduler, x, prompt_embeds, negative_embeds, guidance_scale, generator, progress, "sr",
                    upscaled=image, class_labels=levels)


def _placement(unet: torch.nn.Module | None, fallback: torch.nn.Module) -> dict:
    module = unet if unet is not None else fallback
    return {"device": module.device, "dtype": module.dtype}


@torch.no_grad()
def sample_cascade(cascade, runners: dict[str, UnetFn], cond: torch.Tensor, uncond: torch.Tensor, *,
                   stages: tuple[str, ...] = ("base", "sr"), base_steps: int = BASE_STEPS,
                   base_guidance: float = BASE_GUIDANCE, sr_steps: int = SR_STEPS, sr_guidance: float | None = None,
                   noise_level: int | None = None, sampler: str = "ddpm", generator: Generator = None,
                   progress: bool = True, placement: dict[str, dict] | None = None,
                   sr_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                   sr_input_size: int | None = None) -> dict[str, torch.Tensor]:
    """The cascade: stage I draws one image per row of the prompt embeddings `cond` (`uncond`: the empty
    prompt's row), then, with "sr" in `stages`, stage II upscales them. `runners` maps "base" and "sr" to a
    UNet runner (any backend); the schedulers and sizes come from the loaded `models.Cascade`. One generator
    runs through both stages, as in diffusers' IF example. `sampler` (samplers.SAMPLERS) steps both stages.
    `placement` gives each stage's embedding device
    and dtype where they differ from `cond`'s. Returns {"base": ..., "sr": ...} for the stages run.

    Stable Diffusion: the SR stage is the x4 upscaler, with prompt embeddings of its own text encoder
    (`sr_embeds`: cond, uncond); it upscales the base images 4x, or first brought to `sr_input_size` (area).
    `sr_guidance` and `noise_level` default to the SR stage's pipeline's: IF's 4 and 250, the upscaler's 9 and 20."""
    if "sr" in stages and cascade.sr_scheduler is None:
        raise UserError(f"{cascade.base_dir} has no stage II (stage_2/): pass --sr-model or --stages base")
    place = placement or {}
    out: dict[str, torch.Tensor] = {}
    to = place.get("base", {})
    scheduler, timesteps = sampler_schedule(cascade.base_scheduler, sampler)
    # Stable Diffusion: the base stage draws latents (the UNet's channels at 1/vae_scale_factor the size), then
    # the VAE decodes them.
    latent = cascade.latent
    channels = cascade.vae.config.latent_channels if latent else CHANNELS
    out["base"] = sample_base(runners["base"], scheduler, cond.to(**to), uncond.to(**to),
                              size=cascade.base_size // cascade.vae_scale_factor, steps=base_steps,
                              guidance_scale=base_guidance, timesteps=timesteps, generator=generator,
                              progress=progress, channels=channels)
    if latent:
        out["base"] = decode_latents(cascade.vae, out["base"])
    if "sr" in stages:
        to = place.get("sr", {})
        scheduler, timesteps = sampler_schedule(cascade.sr_scheduler, sampler)
        if latent:
            sr_guidance = sd_upscale.GUIDANCE if sr_guidance is None else sr_guidance
            noise_level = sd_upscale.NOISE_LEVEL if noise_level is None else noise_level
            low = out["base"]
            if sr_input_size is not None and low.shape[-1] != sr_input_size:
                low = F.interpolate(low, (sr_input_size, sr_input_size), mode="area")
            sr_cond, sr_uncond = sr_embeds
            latents = sample_upscale(runners["sr"], scheduler, cascade.sr_noising_scheduler, low, sr_cond.to(**to),
                                     sr_uncond.to(**to), channels=cascade.sr_vae.config.latent_channels,
                                     steps=sr_steps, guidance_scale=sr_guidance, noise_level=noise_level,
                                     timesteps=timesteps, generator=generator, progress=progress)
            out["sr"] = decode_latents(cascade.sr_vae, latents)
            return out
        sr_guidance = SR_GUIDANCE if sr_guidance is None else sr_guidance
        noise_level = SR_NOISE_LEVEL if noise_level is None else noise_level
        out["sr"] = sample_sr(runners["sr"], scheduler, cascade.sr_noising_scheduler, out["base"], cond.to(**to),
                              uncond.to(**to), size=cascade.sr_size, steps=sr_steps, guidance_scale=sr_guidance,
                              noise_level=noise_level, timesteps=timesteps, generator=generator, progress=progress)
    return out


def sr_prompt_embeds(cascade, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The SR stage's own (cond, uncond) embeddings of `prompts` where it has a text encoder of its own (the Stable
    Diffusion x4 upscaler); None where the stages share one (IF)."""
    if cascade.sr_text_encoder is None:
        return None
    return (encode_prompts(cascade.sr_tokenizer, cascade.sr_text_encoder, prompts),
            encode_negative(cascade.sr_tokenizer, cascade.sr_text_encoder))


@torch.no_grad()
def generate_cascade(cascade, prompts: list[str], *, stages: tuple[str, ...] = ("base", "sr"),
                     base_unet_fn: UnetFn | None = None, sr_unet_fn: UnetFn | None = None,
                     **sampling) -> dict[str, torch.Tensor]:
    """`sample_cascade` for prompts given as text, on a cascade loaded with its text encoder.

    The runners default to the cascade's torch UNets; embeddings follow each UNet's device and dtype (for a
    non-torch runner without a UNet loaded: the text encoder's). `sampling`: sample_cascade's settings.
    """
    if cascade.text_encoder is None:
        raise ValueError("generate_cascade needs the cascade loaded with its text encoder")
    cond = encode_prompts(cascade.tokenizer, cascade.text_encoder, prompts)
    uncond = encode_negative(cascade.tokenizer, cascade.text_encoder)
    runners = {"base": base_unet_fn or torch_unet_fn(cascade.base_unet)}
    placement = {"base": _placement(cascade.base_unet, cascade.text_encoder)}
    if "sr" in stages:
        runners["sr"] = sr_unet_fn or (torch_unet_fn(cascade.sr_unet) if cascade.sr_unet is not None else None)
        placement["sr"] = _placement(cascade.sr_unet, cascade.text_encoder)
        sampling["sr_embeds"] = sr_prompt_embeds(cascade, prompts)
    return sample_cascade(cascade, runners, cond, uncond, stages=stages, placement=placement, **sampling)
