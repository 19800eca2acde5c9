"""Loading and saving cascades in DeepFloyd IF's diffusers layout, offline, from local directories only.

A cascade directory is an IF stage I directory (model_index.json, unet/, text_encoder/, tokenizer/,
scheduler/) that may hold an IF stage II directory in `stage_2/`. Real IF ships the stages as separate
directories (IF-I-XL-v1.0, IF-II-L-v1.0): pass the second as `sr_model_dir`. A Stable Diffusion directory
(model_index.json naming StableDiffusionPipeline) is detected here and checked and loaded by sd.py; its SR stage,
the x4 upscaler (StableDiffusionUpscalePipeline, in stage_2/ or given as `sr_model_dir`), by sd_upscale.py; an SDXL
base directory (StableDiffusionXLPipeline) by sdxl.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import lora, sd, sd_upscale, sdxl
from .errors import UserError
from .weights import has_weights, prefer_safetensors, unloadable

STAGE_2_DIR = "stage_2"
BASE_PARTS = ("unet", "scheduler", "tokenizer")
SR_PARTS = ("unet", "scheduler", "image_noising_scheduler")
# model_index.json's _class_name -> family; anything else is "if"
FAMILIES = {sd.SD_PIPELINE: "sd", sd_upscale.UPSCALE_PIPELINE: "sd", sd.SDXL_PIPELINE: "sdxl"}
LATENT_FAMILIES = ("sd", "sdxl")  # a base UNet on a VAE's latents


@dataclass
class Cascade:
    tokenizer: object
    text_encoder: torch.nn.Module | None
    base_unet: torch.nn.Module | None
    base_scheduler: object
    sr_unet: torch.nn.Module | None
    sr_scheduler: object | None
    sr_noising_scheduler: object | None
    base_dir: Path
    sr_dir: Path | None
    family: str = "if"  # "sd" or "sdxl": a Stable Diffusion model (sd.py, sdxl.py), its base UNet on the VAE's latents
    vae: torch.nn.Module | None = None
    vae_scale_factor: int = 1  # pixels per latent along a side (1: pixel space)
    # Stable Diffusion's SR stage, the x4 upscaler, has a VAE and a text encoder of its own (sd_upscale.py).
    sr_vae: torch.nn.Module | None = None
    sr_vae_scale_factor: int = 1
    sr_tokenizer: object | None = None
    sr_text_encoder: torch.nn.Module | None = None

    @property
    def latent(self) -> bool:
        return self.family in LATENT_FAMILIES

    @property
    def base_size(self) -> int:
        """The base stage's image size in pixels (for Stable Diffusion, its latents are vae_scale_factor smaller)."""
        return int(_read_json(self.base_dir / "unet" / "config.json")["sample_size"]) * self.vae_scale_factor

    @property
    def sr_size(self) -> int | None:
        """The SR stage's training image size in pixels (the x4 upscaler: 4x its UNet's latent size)."""
        if self.sr_dir is None:
            return None
        return int(_read_json(self.sr_dir / "unet" / "config.json")["sample_size"]) * self.sr_vae_scale_factor

    @property
    def sr_input_size(self) -> int | None:
        """The low-res image size the SR stage trains on: IF's stage II takes the base's images; the x4 upscaler
        takes images of its UNet's latent size (the real one: 128 px in, 512 px out)."""
        if self.sr_dir is None:
            return None
        return self.sr_size // self.sr_vae_scale_factor if self.family == "sd" else self.base_size


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: no CUDA device is available here (torch {torch.__version__}); use --device cpu"
        )
    return torch.device(name)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the model directory is not in the DeepFloyd IF diffusers layout") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}): restore the file") from None


def model_family(path: Path) -> str:
    """The model family: sd when `path`'s model_index.json names StableDiffusionPipeline (or its x4 upscaler), sdxl
    for StableDiffusionXLPipeline, else if (DeepFloyd IF)."""
    return FAMILIES.get(_read_json(Path(path) / "model_index.json").get("_class_name"), "if")


def check_stage_dir(path: Path, stage: str) -> None:
    """Raise a UserError naming what is missing when `path` is not an IF stage directory of that stage (or, for
    the base stage, a Stable Diffusion directory: sd.check_sd_dir)."""
    if not path.is_dir():
        raise UserError(
            f"model directory {path} does not exist (expected a DeepFloyd IF directory in diffusers layout)"
        )
    index = _read_json(path / "model_index.json")
    if stage == "sr" and sd_upscale.is_upscaler(index):
        sd_upscale.check_upscaler_dir(path, index)
        return
    unsupported = sd.unsupported_pipeline(str(index.get("_class_name", "")))
    if unsupported:
        raise UserError(f"{path}: {unsupported}")
    if index.get("_class_name") == sd.SD_PIPELINE:
        if stage != "base":
            raise UserError(f"{path} is a Stable Diffusion text-to-image model, not an SR stage (IF stage II: "
                            f"IFSuperResolutionPipeline; the x4 upscaler: {sd_upscale.UPSCALE_PIPELINE})")
        sd.check_sd_dir(path, index)
        return
    if index.get("_class_name") == sd.SDXL_PIPELINE:
        if stage != "base":
            raise UserError(f"{path} is an SDXL model, not an IF stage II (IFSuperResolutionPipeline) directory")
        sdxl.check_sdxl_dir(path, index)
        return
    parts = BASE_PARTS if stage == "base" else SR_PARTS
    missing = [p for p in parts if not (path / p).is_dir() or index.get(p) in (None, [None, None])]
    if missing:
        kind = "stage I (IFPipeline)" if stage == "base" else "stage II (IFSuperResolutionPipeline)"
        raise UserError(f"{path} is not an IF {kind} directory: missing {', '.join(missing)}")
    for folder in ["unet"] + (["text_encoder"] if stage == "base" and (path / "text_encoder").is_dir() else []):
        if not has_weights(path / folder):
            raise UserError(f"no weight files in {path / folder} (expected *.safetensors): the download is incomplete")
    in_channels = _read_json(path / "unet" / "config.json").get("in_channels")
    if stage == "sr" and in_channels != 6:
        raise UserError(f"{path}/unet has {in_channels} input channels; an IF stage II UNet has 6")


def check_sr_family(sr_dir: Path, family: str) -> None:
    """The SR stage must be of the base's family: IF's stage II after an IF base, the x4 upscaler after SD."""
    upscaler = sd_upscale.is_upscaler(_read_json(Path(sr_dir) / "model_index.json"))
    if family == "sd" and not upscaler:
        raise UserError(f"{sr_dir}: a Stable Diffusion model's SR stage is the x4 upscaler "
                        f"({sd_upscale.UPSCALE_PIPELINE}), not an IF stage II")
    if family == "if" and upscaler:
        raise UserError(f"{sr_dir} is the Stable Diffusion x4 upscaler; a DeepFloyd IF base takes an IF stage II "
                        "(IFSuperResolutionPipeline)")


def find_sr_dir(model_dir: Path, sr_model_dir: str | Path | None) -> Path | None:
    if sr_model_dir is not None:
        return Path(sr_model_dir)
    candidate = Path(model_dir) / STAGE_2_DIR
    return candidate if candidate.is_dir() else None


def load_tokenizer(model_dir: str | Path):
    if model_family(model_dir) in LATENT_FAMILIES:  # SDXL: tokenizer/ (tokenizer_2/ is sdxl.py's)
        return sd.load_tokenizer(model_dir)
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(Path(model_dir) / "tokenizer", local_files_only=True)


def load_text_encoder(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import T5EncoderModel

    folder = Path(model_dir) / "text_encoder"
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: stage I must ship its T5 text encoder")
    try:
        encoder = T5EncoderModel.from_pretrained(
            folder, local_files_only=True, use_safetensors=prefer_safetensors(folder), dtype=dtype
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise unloadable(folder, err) from None
    return encoder.to(device).eval().requires_grad_(False)


def load_unet(stage_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    folder = Path(stage_dir) / "unet"
    try:
        unet = UNet2DConditionModel.from_pretrained(
            folder, local_files_only=True, torch_dtype=dtype, use_safetensors=prefer_safetensors(folder)
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise unloadable(folder, err) from None
    # A LoRA run's output holds the adapter beside the untouched UNet: apply it, folded into the weights.
    if lora.load_saved_adapter(unet, Path(stage_dir)):
        lora.merge_adapter(unet)
    return unet.to(device)


def load_scheduler(stage_dir: str | Path, subfolder: str = "scheduler"):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(Path(stage_dir), subfolder=subfolder, local_files_only=True)


def load_cascade(
    model_dir: str | Path,
    sr_model_dir: str | Path | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    stages: tuple[str, ...] = ("base", "sr"),
    with_text_encoder: bool = True,
    with_unets: bool = True,
    tokenizer=None,
) -> Cascade:
    """Load the parts of a cascade that `stages` need. A stage II directory is optional unless "sr" is asked
    for explicitly with `sr_model_dir`. `tokenizer`: the model's, when the caller has loaded it already."""
    base_dir = Path(model_dir)
    check_stage_dir(base_dir, "base")
    family = model_family(base_dir)
    if family == "sdxl":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if sr_model_dir is not None:
            raise UserError("--sr-model: SDXL has no SR stage here (its refiner is not supported)")
        parts = sdxl.load_sdxl_parts(base_dir, device=device, dtype=dtype, with_text_encoder=with_text_encoder)
        return Cascade(**parts,
                       base_unet=load_unet(base_dir, device, dtype) if "base" in stages and with_unets else None,
                       sr_unet=None, sr_scheduler=None, sr_noising_scheduler=None, base_dir=base_dir, sr_dir=None,
                       family=family)
    sr_dir = find_sr_dir(base_dir, sr_model_dir) if "sr" in stages else None
    if sr_dir is not None:
        check_stage_dir(sr_dir, "sr")
        check_sr_family(sr_dir, family)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if family == "sd":
        upscaler = (sd_upscale.load_upscaler_parts(sr_dir, device=device, dtype=dtype,
                                                   with_text_encoder=with_text_encoder) if sr_dir else {})
        return Cascade(**sd.load_sd_parts(base_dir, device=device, dtype=dtype, with_text_encoder=with_text_encoder,
                                          tokenizer=tokenizer),
                       **{"sr_scheduler": None, "sr_noising_scheduler": None, **upscaler},
                       base_unet=load_unet(base_dir, device, dtype) if "base" in stages and with_unets else None,
                       sr_unet=load_unet(sr_dir, device, dtype) if sr_dir is not None and with_unets else None,
                       base_dir=base_dir, sr_dir=sr_dir, family="sd")
    return Cascade(
        tokenizer=tokenizer or load_tokenizer(base_dir),
        text_encoder=load_text_encoder(base_dir, device, dtype) if with_text_encoder else None,
        base_unet=load_unet(base_dir, device, dtype) if "base" in stages and with_unets else None,
        base_scheduler=load_scheduler(base_dir),
        sr_unet=load_unet(sr_dir, device, dtype) if sr_dir is not None and with_unets else None,
        sr_scheduler=load_scheduler(sr_dir) if sr_dir is not None else None,
        sr_noising_scheduler=load_scheduler(sr_dir, "image_noising_scheduler") if sr_dir is not None else None,
        base_dir=base_dir,
        sr_dir=sr_dir,
    )


WEIGHTS_STEM = "diffusion_pytorch_model"


def weights_files(stage_dir: str | Path) -> list[Path]:
    """The files that define a stage's UNet as models.load_unet loads it: unet/config.json, the weights (one
    safetensors file, the shards its index names, or a .bin), and a LoRA adapter beside unet/ if there is one."""
    stage_dir = Path(stage_dir)
    unet_dir = stage_dir / "unet"
    index = unet_dir / f"{WEIGHTS_STEM}.safetensors.index.json"
    if (unet_dir / f"{WEIGHTS_STEM}.safetensors").is_file():
        files = [unet_dir / f"{WEIGHTS_STEM}.safetensors"]
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [index, *(unet_dir / shard for shard in shards)]
    elif (unet_dir / f"{WEIGHTS_STEM}.bin").is_file():
        files = [unet_dir / f"{WEIGHTS_STEM}.bin"]
    else:
        raise UserError(f"{unet_dir}: no {WEIGHTS_STEM}.safetensors (or sharded/.bin weights)")
    adapter = [stage_dir / lora.LORA_WEIGHTS] if (stage_dir / lora.LORA_WEIGHTS).is_file() else []
    return [unet_dir / "config.json", *files, *adapter]
