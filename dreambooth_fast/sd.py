"""Stable Diffusion 1.x/2.x (the paper's latent setting) in diffusers' layout: check, load, and the VAE steps.

A Stable Diffusion directory is what `StableDiffusionPipeline.save_pretrained` writes: model_index.json naming
StableDiffusionPipeline, vae/ (AutoencoderKL), text_encoder/ (CLIPTextModel), tokenizer/ (CLIPTokenizer, BPE),
unet/ (UNet2DConditionModel on latents) and scheduler/ (the pipeline's sampler: PNDM for SD 1.x, DDIM or Euler
for SD 2.x, epsilon or v prediction). It is the base stage of a `models.Cascade` with `family="sd"` and its VAE.

Training runs on latents: the subject photos and class images are encoded once, before the loop, to the VAE
posterior's *mean* times the VAE's `scaling_factor` (diffusers' train_dreambooth.py draws a posterior sample
every step instead; the SD VAE's posterior standard deviation is small next to the latents, and the mean lets
the VAE be freed before training and keeps a resumed run bit-exact). Class images are drawn in latent space by
the model's own scheduler and decoded by the VAE. The output is the same layout with the tuned unet/ (or the
LoRA adapter beside it), so `StableDiffusionPipeline.from_pretrained(output)` loads it.

The SR stage is the x4 upscaler (StableDiffusionUpscalePipeline, checked and loaded by sd_upscale.py): given as
--sr-model, or in the model's stage_2/ (a dbfast output), fine-tuned like IF's stage II on (low-res subject,
high-res subject) pairs in its own VAE's latents, and written to the output's stage_2/.

The UNets export through export/ like IF stages (the VAE decoders stay in PyTorch: they run once per image).
With --train-text-encoder (text_training.py) the CLIP text encoder trains with the base UNet: the output holds the
tuned text_encoder/, or its adapter in the LoRA file, which `load_sd_parts` folds into the loaded encoder.
SDXL base: sdxl.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from . import lora
from .errors import UserError
from .weights import has_weights, prefer_safetensors, unloadable

SD_PIPELINE = "StableDiffusionPipeline"
SDXL_PIPELINE = "StableDiffusionXLPipeline"  # checked and loaded by sdxl.py
PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what ops.add_noise serves
VAE_BATCH = 8  # images per VAE call: bounds the encoder's activation memory at SD's 512 px
# StableDiffusionPipeline's own sampling defaults (num_inference_steps, guidance_scale): what dbfast eval draws with.
PIPELINE_STEPS = 50
PIPELINE_GUIDANCE = 7.5
SDXL_PIPELINE_GUIDANCE = 5.0  # StableDiffusionXLPipeline's default guidance_scale


def _config(path: Path) -> dict:
    """A component's config file, or one line saying the directory is not a Stable Diffusion layout."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the model directory is not in Stable Diffusion's diffusers layout"
                        ) from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}): restore the file") from None


def unsupported_pipeline(name: str) -> str | None:
    """Why a Stable Diffusion pipeline other than SD 1.x/2.x's or SDXL's text-to-image one cannot be used yet (None:
    it can)."""
    if name in (SD_PIPELINE, SDXL_PIPELINE) or not name.startswith("StableDiffusion"):
        return None
    if name.startswith("StableDiffusionXL"):
        return (f"{name} is not supported (the SDXL refiner and other SDXL pipelines); SDXL base "
                f"({SDXL_PIPELINE}) and Stable Diffusion 1.x/2.x ({SD_PIPELINE}) are")
    if name == "StableDiffusionUpscalePipeline":
        return (f"{name} is the x4 upscaler: pass it as --sr-model (the SR stage) beside a {SD_PIPELINE} "
                "directory as --model")
    return f"{name} is not supported; pass a Stable Diffusion 1.x/2.x text-to-image directory ({SD_PIPELINE})"


def check_sd_dir(path: Path, index: dict, *, pipeline: str = SD_PIPELINE, parts: tuple[str, ...] = PARTS,
                 image_channels: int = 0) -> None:
    """Raise a UserError naming what is wrong when `path` (its model_index.json read as `index`) is not a complete
    Stable Diffusion 1.x/2.x directory: a missing part, missing weights, an unknown scheduler, parts that do not fit.
    The x4 upscaler (sd_upscale.py) is checked the same way: its `parts`, a UNet taking `image_channels` more."""

    missing = [p for p in parts if not (path / p).is_dir() or index.get(p) in (None, [None, None])]
    if missing:
        raise UserError(f"{path} is not a Stable Diffusion ({pipeline}) directory: missing {', '.join(missing)}")
    for folder in ("unet", "vae", "text_encoder"):
        if not has_weights(path / folder):
            raise UserError(f"no weight files in {path / folder} (expected *.safetensors): the download is incomplete")
    tok = path / "tokenizer"
    bpe_files = (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
    if not (tok / "tokenizer.json").is_file() and not bpe_files:
        raise UserError(f"{tok} has no CLIP BPE vocabulary (vocab.json and merges.txt, or tokenizer.json): restore it")
    unet = _config(path / "unet" / "config.json")
    vae = _config(path / "vae" / "config.json")
    text = _config(path / "text_encoder" / "config.json")
    latent = vae.get("latent_channels", 4)
    if unet.get("in_channels") != latent + image_channels:
        image = f" plus {image_channels} of the low-res image" if image_channels else ""
        raise UserError(f"{path}/unet takes {unet.get('in_channels')} input channels but the VAE makes "
                        f"{latent} latent channels{image}: the parts are from different models")
    if unet.get("cross_attention_dim") != text.get("hidden_size"):
        raise UserError(f"{path}/unet attends to {unet.get('cross_attention_dim')}-wide text embeddings but the "
                        f"text encoder makes {text.get('hidden_size')}: the parts are from different models")
    scheduler = _config(path / "scheduler" / "scheduler_config.json")
    _scheduler_class(path, scheduler)
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise UserError(f"{path}/scheduler predicts {prediction!r}; training serves {', '.join(PREDICTION_TYPES)}")


def _scheduler_class(path: Path, config: dict):
    import diffusers

    name = config.get("_class_name", "")
    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if cls is None:
        raise UserError(f"{path}/scheduler names {name!r}, not a diffusers scheduler: restore scheduler_config.json")
    return cls


def check_options(cfg) -> None:
    """The training options that do not apply to a Stable Diffusion model, refused before anything is written."""
    check_sampler(cfg.class_sampler, "--class-sampler")


def check_sampler(sampler: str, option: str) -> None:
    """DeepFloyd IF's timestep presets are IF's alone: Stable Diffusion samples with its own scheduler or dpm++."""
    from .samplers import IF_PRESETS

    if sampler in IF_PRESETS:
        raise UserError(f"{option} {sampler}: a DeepFloyd IF timestep preset; for Stable Diffusion use ddpm (the "
                        "model's own scheduler) or dpm++")


def vae_scale_factor(model_dir: Path) -> int:
    """Pixels per latent along a side: 2 ** (VAE levels - 1), as StableDiffusionPipeline computes it."""
    return 2 ** (len(_config(Path(model_dir) / "vae" / "config.json")["block_out_channels"]) - 1)


def prompt_length(model_dir: str | Path) -> int:
    """The token count of an encoded prompt, as text.encode_clip pads it: the tokenizer's model_max_length, held to
    the text encoder's positions (77 for SD 1.x/2.x)."""
    positions = _config(Path(model_dir) / "text_encoder" / "config.json")["max_position_embeddings"]
    return min(load_tokenizer(model_dir).model_max_length, positions)


def load_tokenizer(model_dir: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(Path(model_dir) / "tokenizer", local_files_only=True)


def _load_part(cls, folder: Path, device: str, dtype: torch.dtype):
    # transformers names the dtype argument `dtype`, diffusers `torch_dtype`.
    dtype_arg = {"dtype" if cls.__module__.startswith("transformers") else "torch_dtype": dtype}
    try:
        model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=prefer_safetensors(folder),
                                    **dtype_arg)
    except (OSError, ValueError, RuntimeError) as err:
        raise unloadable(folder, err) from None
    return model.to(device).eval().requires_grad_(False)


def load_scheduler(model_dir: str | Path):
    """The pipeline's own scheduler (it also holds the training noise schedule: alphas_cumprod, prediction_type)."""
    folder = Path(model_dir) / "scheduler"
    cls = _scheduler_class(Path(model_dir), _config(folder / "scheduler_config.json"))
    scheduler = cls.from_pretrained(Path(model_dir), subfolder="scheduler", local_files_only=True)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise UserError(f"{folder}: {cls.__name__} has no DDPM noise schedule (alphas_cumprod) to train with")
    return scheduler


def load_sd_parts(model_dir: Path, *, device: str, dtype: torch.dtype, with_text_encoder: bool,
                  tokenizer=None) -> dict:
    """The parts of a Stable Diffusion directory models.load_cascade builds its one-stage Cascade from, besides
    the UNet: tokenizer, text encoder, scheduler, and the VAE with its scale factor."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    text_encoder = None
    if with_text_encoder:  # a --train-text-encoder LoRA run's adapter is folded in (full runs wrote text_encoder/)
        text_encoder = lora.load_saved_text_adapter(
            _load_part(CLIPTextModel, model_dir / "text_encoder", device, dtype), model_dir)
    return {
        "tokenizer": tokenizer or load_tokenizer(model_dir),
        "text_encoder": text_encoder,
        "base_scheduler": load_scheduler(model_dir),
        # The VAE decodes whatever UNet backend drew the latents (exported ones too: with_unets=False).
        "vae": _load_part(AutoencoderKL, model_dir / "vae", device, dtype),
        "vae_scale_factor": vae_scale_factor(model_dir),
    }


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> the VAE posterior's mean times its scaling_factor, (N, C, H/f, W/f),
    float32 on the CPU (the training rows; the trainer moves its batches to the device)."""
    place = {"device": vae.device, "dtype": vae.dtype}
    with _own_dtype(vae):
        means = [vae.encode(chunk.to(**place)).latent_dist.mean for chunk in images.split(VAE_BATCH)]
    return (torch.cat(means) * vae.config.scaling_factor).float().cpu()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents as the UNet makes them -> images (N, 3, H, W) in [-1, 1], as StableDiffusionPipeline decodes."""
    latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    with _own_dtype(vae):
        return torch.cat([vae.decode(chunk).sample for chunk in latents.split(VAE_BATCH)]).clamp(-1, 1)


def _own_dtype(vae) -> torch.autocast:
    # The VAE runs in the dtype it was loaded in, not under the run's autocast: SDXL's VAE overflows in float16.
    return torch.autocast(vae.device.type, enabled=False)


def latent_rows(vae, rows):
    """A stage's training rows (train.StageData) with the subject and prior images encoded to latents."""
    prior = encode_latents(vae, rows.prior) if rows.prior is not None else None
    return dataclasses.replace(rows, subject=encode_latents(vae, rows.subject), prior=prior)
