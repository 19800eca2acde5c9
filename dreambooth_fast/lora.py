"""LoRA adapters on the UNets (peft through diffusers' adapter API), and on Stable Diffusion's CLIP text encoder
with --train-text-encoder, saved in diffusers' LoRA format (one file, the text encoder's keys prefixed
`text_encoder.`) so that `IFPipeline.load_lora_weights(out_dir)` / `StableDiffusionPipeline.load_lora_weights` load
them too."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# IF's attention: self/cross projections plus the added key/value projections of the text tokens.
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
# CLIP's attention projections, as diffusers' train_dreambooth_lora.py adapts them.
TEXT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_PREFIX = "text_encoder."  # the text encoder's keys in the adapter file


def _config(rank: int, targets: list[str]):
    from peft import LoraConfig  # presence checked by TrainConfig.validate

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)


def add_lora(unet: torch.nn.Module, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """Freeze `unet`, attach a rank-`rank` adapter (its random init drawn from `seed`), return the adapter's
    (trainable) parameters."""
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # peft draws the init from torch's global generator
        torch.manual_seed(seed)
        unet.add_adapter(_config(rank, TARGET_MODULES))
    return [p for p in unet.parameters() if p.requires_grad]


def add_text_lora(text_encoder: torch.nn.Module, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """Freeze the CLIP text encoder, attach a rank-`rank` adapter to its attention projections (init drawn from
    `seed`), return its (trainable) parameters."""
    from peft import inject_adapter_in_model

    text_encoder.requires_grad_(False)
    # peft itself, not transformers' add_adapter (which wants a newer peft than diffusers does); peft_config is
    # what get_peft_model_state_dict reads, as add_adapter would set it.
    config = _config(rank, TEXT_TARGET_MODULES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, text_encoder)
    text_encoder.peft_config = {"default": config}
    return [p for p in text_encoder.parameters() if p.requires_grad]


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights (peft's names) of a UNet or a text encoder."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint adapter does not fit this model: unexpected keys {result.unexpected_keys[:3]}")


def save_adapter(unet: torch.nn.Module, out_dir: Path, text_encoder: torch.nn.Module | None = None) -> Path:
    """Write the adapter (and the text encoder's, if given) as `out_dir`/pytorch_lora_weights.safetensors in
    diffusers' format."""
    from diffusers import IFPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    text_layers = None
    if text_encoder is not None:
        text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
    IFPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=text_layers,
        weight_name=LORA_WEIGHTS,
    )
    return out_dir / LORA_WEIGHTS


def merge_adapter(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapter into the base weights and drop it: a plain UNet again."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def load_saved_adapter(unet: torch.nn.Module, stage_dir: Path) -> bool:
    """Attach the adapter saved in `stage_dir`, if there is one; return whether there was."""
    if not (stage_dir / LORA_WEIGHTS).is_file():
        return False
    unet.load_lora_adapter(stage_dir, weight_name=LORA_WEIGHTS, prefix="unet")
    return True


def folded_text_encoder(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of a CLIP text encoder with its adapter folded into the weights (what text_encoder/ holds)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in text_encoder.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    state = {k.replace(".base_layer.", "."): v for k, v in text_encoder.state_dict().items() if "lora_" not in k}
    plain = type(text_encoder)(text_encoder.config)
    plain.load_state_dict(state)
    return plain.to(device=text_encoder.device, dtype=text_encoder.dtype).eval().requires_grad_(False)


def has_text_adapter(stage_dir: Path) -> bool:
    """Whether `stage_dir` holds an adapter file with `text_encoder.` keys (a --train-text-encoder LoRA output)."""
    from safetensors import safe_open

    path = Path(stage_dir) / LORA_WEIGHTS
    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        return any(k.startswith(TEXT_PREFIX) for k in f.keys())


def load_saved_text_adapter(text_encoder: torch.nn.Module, stage_dir: Path) -> torch.nn.Module:
    """The text encoder with the adapter saved in `stage_dir` folded in, where that file has `text_encoder.` keys
    (a --train-text-encoder LoRA run's output); else `text_encoder` as it is."""
    if not has_text_adapter(stage_dir):
        return text_encoder
    from diffusers import StableDiffusionPipeline

    state, alphas = StableDiffusionPipeline.lora_state_dict(stage_dir, weight_name=LORA_WEIGHTS)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=text_encoder, prefix="text_encoder")
    return folded_text_encoder(text_encoder)
