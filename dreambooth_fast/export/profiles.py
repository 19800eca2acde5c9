"""Batch-size profiles of exported UNets: `--batch-sizes MIN:OPT:MAX`, the guidance doubling, presets.

The user gives the *prompt batch*: how many images one generate call makes. IF samples with classifier-free
guidance, which runs the UNet on the conditional and the unconditional half together, so the UNet sees twice
the prompt batch. Engines therefore cover UNet batches from MIN (guidance off) through 2*OPT (the size TensorRT
tunes its kernels for) to 2*MAX. Presets are small JSON files (export/presets/ in the repository) holding any
of `batch_sizes`, `precision`, `opset`, `refit`; options given on the command line win over a preset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from .onnx_export import UNetSpec

DEFAULT_BATCH_SIZES = "1:4:8"  # generate makes 4 images a call by default, eval 8
PRECISIONS = ("fp16", "fp32")
PRESET_KEYS = {"batch_sizes": str, "precision": str, "opset": int, "refit": bool}


@dataclass(frozen=True)
class BatchSizes:
    """A TensorRT optimisation profile over the batch axis: smallest, tuned-for and largest batch."""

    min: int
    opt: int
    max: int

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def as_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def parse_batch_sizes(text: str, option: str = "--batch-sizes") -> BatchSizes:
    """Parse a prompt batch profile "MIN:OPT:MAX" (positive integers, MIN <= OPT <= MAX)."""
    parts = str(text).split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"{option} {text!r}: expected MIN:OPT:MAX, three whole numbers such as {DEFAULT_BATCH_SIZES}")
    low, opt, high = (int(p) for p in parts)
    if low < 1:
        raise UserError(f"{option} {text!r}: the smallest batch must be at least 1")
    if not low <= opt <= high:
        raise UserError(f"{option} {text!r}: need MIN <= OPT <= MAX")
    return BatchSizes(low, opt, high)


def unet_batch_sizes(prompt: BatchSizes) -> BatchSizes:
    """The UNet batch profile for a prompt batch profile: guidance doubles OPT and MAX; MIN stays for no guidance."""
    return BatchSizes(prompt.min, 2 * prompt.opt, 2 * prompt.max)


def profile_shapes(spec: UNetSpec, unet: BatchSizes) -> dict[str, tuple[tuple[int, ...], ...]]:
    """TensorRT's optimisation profile: {input name: (min shape, opt shape, max shape)} of a UNet's graph inputs
    (`spec` is read from the UNet's config, so IF's and Stable Diffusion's alike) over the UNet batch profile;
    only the batch axis varies."""
    sizes = (unet.min, unet.opt, unet.max)
    return {name: tuple(spec.shapes(b)[name] for b in sizes) for name in spec.input_names}


def parity_batch_sizes(unet: BatchSizes) -> tuple[int, int]:
    """Two different UNet batch sizes inside the profile, the cheapest ones, for the parity check."""
    return unet.min, unet.min + 1  # a UNet profile has max >= 2 * min, so min + 1 is inside it


def load_preset(path: str | Path) -> dict:
    """Read a preset JSON file; return its options (a subset of PRESET_KEYS), validated."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--preset {path}: no such file (presets live in export/presets/)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"--preset {path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"--preset {path}: expected a JSON object such as {{\"batch_sizes\": \"1:1:4\"}}")
    for key, value in data.items():
        if key not in PRESET_KEYS:
            raise UserError(f"--preset {path}: unknown key {key!r}; allowed: {', '.join(PRESET_KEYS)}")
        if type(value) is not PRESET_KEYS[key]:
            raise UserError(f"--preset {path}: {key} must be a {PRESET_KEYS[key].__name__}")
    if "precision" in data and data["precision"] not in PRECISIONS:
        raise UserError(f"--preset {path}: precision must be one of {', '.join(PRECISIONS)}")
    if "batch_sizes" in data:
        parse_batch_sizes(data["batch_sizes"], option=f"--preset {path}: batch_sizes")
    return data
