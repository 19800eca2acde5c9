"""`dbfast generate`: prompt -> base stage -> SR stage -> PNGs and a grid, over any UNet backend."""

from __future__ import annotations

from pathlib import Path

import torch

from .backends import TORCH_BACKENDS, unet_runner
from .errors import UserError
from .export.cascade import default_export_dir
from .identifier import PLACEHOLDER, fill_placeholder
from .images import enlarged, make_grid, save_png, save_pngs, to_pil
from .models import find_sr_dir, load_cascade, model_family, resolve_device
from .rundir import RUN_FILE, run_identifier
from .sample import sample_cascade
from .sd import sd_stages
from .text import encode_negative, encode_prompts


def expand_prompt(prompt: str, model_dir: Path) -> str:
    """Replace the literal [V] with the identifier the run in `model_dir` was trained with."""
    if PLACEHOLDER not in prompt:
        return prompt
    ident = run_identifier(model_dir)
    if ident is None:
        raise UserError(
            f"the prompt uses [V] but {model_dir} has no {RUN_FILE} (not a dbfast train output); "
            "write the identifier itself"
        )
    return fill_placeholder(prompt, ident)


def generate_images(
    prompt: str,
    model: str | Path,
    *,
    sr_model: str | Path | None = None,
    n: int = 4,
    stages: tuple[str, ...] = ("base", "sr"),
    steps: int = 50,
    sr_steps: int = 25,
    sampler: str = "ddpm",
    guidance: float = 7.0,
    sr_guidance: float = 4.0,
    noise_level: int = 250,
    seed: int = 0,
    backend: str = "torch",
    export_dir: str | Path | None = None,
    device: str = "auto",
    out: str | Path | None = None,
) -> list[Path]:
    """Write `n` images for `prompt` at their exact size plus grid.png (enlarged to be seen when they are small);
    return the image paths with the grid last."""
    model = Path(model)
    unknown = set(stages) - {"base", "sr"}
    if unknown or "base" not in stages:
        raise UserError(f"--stages must be base or base,sr, got {','.join(stages)}")
    if model_family(model) in ("sd", "sdxl"):
        stages = sd_stages(sr_model, sampler)
    if "sr" in stages and find_sr_dir(model, sr_model) is None:
        raise UserError(f"{model} has no stage II (stage_2/): pass --sr-model DIR or --stages base")
    text = expand_prompt(prompt, model)
    dev = resolve_device(device)
    # Exported backends run their own copy of the UNets: the torch ones are not loaded.
    cascade = load_cascade(model, sr_model, device=str(dev), stages=stages, with_unets=backend in TORCH_BACKENDS)
    export_dir = Path(export_dir) if export_dir else default_export_dir(model)
    cond = encode_prompts(cascade.tokenizer, cascade.text_encoder, [text] * n)
    uncond = encode_negative(cascade.tokenizer, cascade.text_encoder)
    cascade.text_encoder = None
    runners = {stage: unet_runner(backend, getattr(cascade, f"{stage}_unet"), getattr(cascade, f"{stage}_dir"),
                                  export_dir, stage, dev) for stage in stages}
    # One generator per image, seeded seed + k: image k is the same whatever n is.
    generators = [torch.Generator().manual_seed(seed + k) for k in range(n)]
    images = sample_cascade(cascade, runners, cond, uncond, stages=stages, base_steps=steps, base_guidance=guidance,
                            sr_steps=sr_steps, sr_guidance=sr_guidance, noise_level=noise_level, sampler=sampler,
                            generator=generators)["sr" if "sr" in stages else "base"]
    out_dir = Path(out) if out else model / "samples"
    paths = save_pngs(images, out_dir, prefix="image-")
    grid = save_png(enlarged(make_grid(to_pil(images), cols=min(n, 4))), out_dir / "grid.png")
    return paths + [grid]
