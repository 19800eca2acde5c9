"""Image tensors in [-1, 1] to PIL images, PNG files (written atomically), grids and enlarged previews."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from .fileio import atomic_write


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(batch, 3, H, W) in [-1, 1] to RGB images, rounded as diffusers' `numpy_to_pil` does."""
    pixels = ((images.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write `image` to `path` as PNG via a temporary file in the same directory and a rename."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_pngs(images: torch.Tensor | list[Image.Image], out_dir: str | Path, prefix: str, start: int = 0) -> list[Path]:
    """Save images as out_dir/{prefix}{index:04d}.png, indices from `start`; return the paths."""
    out_dir = Path(out_dir)
    pils = to_pil(images) if isinstance(images, torch.Tensor) else images
    return [save_png(pil, out_dir / f"{prefix}{start + i:04d}.png") for i, pil in enumerate(pils)]


def make_grid(pils: list[Image.Image], cols: int) -> Image.Image:
    """Tile images row by row, `cols` per row, into one RGB image (cells sized to the largest image)."""
    if not pils:
        raise ValueError("make_grid needs at least one image")
    cols = max(1, min(cols, len(pils)))
    rows = math.ceil(len(pils) / cols)
    cell_w = max(p.width for p in pils)
    cell_h = max(p.height for p in pils)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for i, pil in enumerate(pils):
        grid.paste(pil.convert("RGB"), ((i % cols) * cell_w, (i // cols) * cell_h))
    return grid


PREVIEW_WIDTH = 512  # previews narrower than this are enlarged to be seen without zooming


def enlarged(image: Image.Image, min_width: int = PREVIEW_WIDTH) -> Image.Image:
    """`image` scaled up by the smallest whole factor that makes it at least `min_width` wide, nearest-neighbour
    (every pixel becomes a sharp square block, no blur); an image that wide already is returned as it is."""
    factor = math.ceil(min_width / image.width)
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
