"""The Stable Diffusion x4 upscaler as the SR stage of a Stable Diffusion run: check and load it.

An upscaler directory is what `StableDiffusionUpscalePipeline.save_pretrained` writes (stabilityai/
stable-diffusion-x4-upscaler): model_index.json naming StableDiffusionUpscalePipeline with max_noise_level, vae/
(AutoencoderKL, 3 levels: 4x), text_encoder/ and tokenizer/ (its own CLIP: the prompts of this stage are encoded
with them, not with the base's), unet/ (UNet2DConditionModel taking the noisy latent and the low-res image, 4 + 3
channels, with `num_class_embeds`: the low-res image's noise level is its class label), scheduler/ (DDIM,
v-prediction) and low_res_scheduler/ (DDPM: it noises the low-res image).

The stage works like IF's stage II: the low-res image (pixels in [-1, 1] at the UNet's latent size) is noised by
low_res_scheduler to a noise level, concatenated with the noisy latent, and the level is the class label. Training
sizes are the upscaler's own: low-res images at its UNet's sample_size, targets 4x that (the real upscaler:
128 -> 512 px), encoded by its VAE like sd.encode_latents. Generation upscales the base's whole image (the UNet is
convolutional). `--sr-noise-level N` is the upscaler's `noise_level` itself (the step of low_res_scheduler, as
the pipeline's argument), 0 to max_noise_level; the pipeline samples at 20, training defaults to 0 (the paper's
low augmentation for the SR fine-tune).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import sd
from .errors import UserError

UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"
PARTS = (*sd.PARTS, "low_res_scheduler")
IMAGE_CHANNELS = 3  # the low-res RGB image concatenated with the latents
MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's default max_noise_level
NOISE_LEVEL = 20  # the pipeline's default noise_level when sampling
GUIDANCE = 9.0  # the pipeline's default guidance_scale
NO_TENSORRT = ("the x4 upscaler has no TensorRT engine yet (its input size follows the base image's, an engine "
               "profile fixes it)")


def is_upscaler(index: dict) -> bool:
    """Whether a model_index.json (read as `index`) names the x4 upscaler."""
    return index.get("_class_name") == UPSCALE_PIPELINE


def check_upscaler_dir(path: Path, index: dict) -> None:
    """Raise a UserError naming what is wrong when `path` is not a complete x4 upscaler directory."""
    sd.check_sd_dir(path, index, pipeline=UPSCALE_PIPELINE, parts=PARTS, image_channels=IMAGE_CHANNELS)
    unet = sd._config(path / "unet" / "config.json")
    if not unet.get("num_class_embeds"):
        raise UserError(f"{path}/unet has no class embeddings (num_class_embeds) for the noise level: it is not an "
                        "x4 upscaler UNet")
    low_res = sd._config(path / "low_res_scheduler" / "scheduler_config.json")
    if low_res.get("_class_name") != "DDPMScheduler":
        raise UserError(f"{path}/low_res_scheduler names {low_res.get('_class_name')!r}; the x4 upscaler noises its "
                        "low-res image with a DDPMScheduler: restore scheduler_config.json")
    top = max_noise_level(index)
    if not 0 <= top < min(unet["num_class_embeds"], low_res.get("num_train_timesteps", 1000)):
        raise UserError(f"{path}/model_index.json: max_noise_level {top} is past the UNet's "
                        f"{unet['num_class_embeds']} noise levels: the parts are from different models")


def max_noise_level(index: dict) -> int:
    return int(index.get("max_noise_level", MAX_NOISE_LEVEL))


def check_noise_level(level: int, sr_dir: Path, option: str) -> None:
    """The upscaler takes noise levels 0 to its max_noise_level (350 for the real one)."""
    top = max_noise_level(sd._config(Path(sr_dir) / "model_index.json"))
    if not 0 <= level <= top:
        raise UserError(f"{option} {level}: the x4 upscaler {sr_dir} takes noise levels 0 to {top} (its "
                        f"max_noise_level; the pipeline samples at {NOISE_LEVEL})")


def load_upscaler_parts(path: Path, *, device: str, dtype: torch.dtype, with_text_encoder: bool) -> dict:
    """The `models.Cascade` fields of the SR stage besides its UNet: schedulers, VAE, tokenizer, text encoder."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel

    return {
        "sr_scheduler": sd.load_scheduler(path),
        "sr_noising_scheduler": DDPMScheduler.from_pretrained(path, subfolder="low_res_scheduler",
                                                              local_files_only=True),
        "sr_vae": sd._load_part(AutoencoderKL, path / "vae", device, dtype),
        "sr_vae_scale_factor": sd.vae_scale_factor(path),
        "sr_tokenizer": sd.load_tokenizer(path),
        "sr_text_encoder": (sd._load_part(CLIPTextModel, path / "text_encoder", device, dtype) if with_text_encoder
                            else None),
    }
