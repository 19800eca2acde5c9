"""Reading a model's weight files safely: which files hold weights, safetensors before pickle, and one line for
weights that cannot be loaded (a pickle file is read as plain tensors only, never run as code)."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_NAMES) or any(folder.glob("*.safetensors"))


def prefer_safetensors(folder: Path) -> bool:
    # Pickle-format weights are read only as a last resort, and then through weights_only loading.
    return any(folder.glob("*.safetensors"))


def unloadable(folder: Path, err: Exception) -> UserError:
    """One line for weights that cannot be read: a pickle file is read as plain tensors only (never run as
    code), so one holding anything else is refused; say how to convert it to safetensors."""
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles and not prefer_safetensors(folder):
        return UserError(
            f"{folder / pickles[0]} cannot be loaded: pickle weights are loaded only as plain tensors, never as "
            "code, and this file holds something else or is damaged; convert it to safetensors on a machine "
            "where you trust it (torch.load it, then safetensors.torch.save_file the state dict beside it)"
        )
    cause = err.__cause__ or err
    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
    return UserError(f"the weights in {folder} cannot be loaded ({reason}): restore or re-download them")
