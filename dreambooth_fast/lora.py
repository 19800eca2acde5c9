"""LoRA adapters on the UNets (peft through diffusers' adapter API), saved in diffusers' LoRA format so that
`IFPipeline.load_lora_weights(out_dir)` loads them too."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# IF's attention: self/cross projections plus the added key/value projections of the text tokens.
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def add_lora(unet: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    """Freeze `unet`, attach a rank-`rank` adapter, return the adapter's (trainable) parameters."""
    from peft import LoraConfig  # presence checked by TrainConfig.validate

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    return [p for p in unet.parameters() if p.requires_grad]


def adapter_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_adapter_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint adapter does not fit this UNet: unexpected keys {result.unexpected_keys[:3]}")


def save_adapter(unet: torch.nn.Module, out_dir: Path) -> Path:
    """Write the adapter as `out_dir`/pytorch_lora_weights.safetensors in diffusers' format."""
    from diffusers import IFPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    IFPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
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
