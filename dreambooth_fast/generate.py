"""`dbfast generate`: prompt -> base stage -> SR stage -> PNGs and a grid, over any UNet backend.

Stable Diffusion: base latents -> VAE decode -> x4 upscaler (its own prompts, latents) -> its VAE decode."""

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
from .sample import sample_cascade, sr_prompt_embeds
from .sd import check_sampler
from .sd_upscale import NO_TENSORRT, check_noise_level
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
    stages: tuple[str, ...] | None = None,
    steps: int = 50,
    sr_steps: int = 25,
    sampler: str = "ddpm",
    guidance: float = 7.0,
    sr_guidance: float | None = None,
    noise_level: int | None = None,
    seed: int = 0,
    backend: str = "torch",
    export_dir: str | Path | None = None,
    device: str = "auto",
    out: str | Path | None = None,
) -> list[Path]:
    """Write `n` images for `prompt` at their exact size plus grid.png (enlarged to be seen when they are small);
    return the image paths with the grid last. `stages` default: base and sr (IF), every stage the model has
    (Stable Diffusion: base, and the x4 upscaler where there is one). `sr_guidance` and `noise_level` default to the
    SR stage's pipeline's (sample.sample_cascade)."""
    model = Path(model)
    family = model_family(model)
    sd = family in ("sd", "sdxl")  # latent models; SDXL has no SR stage here (its refiner is not supported)
    if family == "sdxl" and sr_model is not None:
        raise UserError("--sr-model: SDXL has no SR stage here (its refiner is not supported); generate with the "
                        "base alone")
    sr_dir = find_sr_dir(model, sr_model) if family != "sdxl" else None
    if stages is None:
        stages = ("base",) if sd and sr_dir is None else ("base", "sr")
    unknown = set(stages) - {"base", "sr"}
    if unknown or "base" not in stages:
        raise UserError(f"--stages must be base or base,sr, got {','.join(stages)}")
    if sd:
        check_sampler(sampler, "--sampler")
    if "sr" in stages and family == "sdxl":
        raise UserError("--stages sr: SDXL has no SR stage here (its refiner is not supported); use --stages base")
    if "sr" in stages and sr_dir is None:
        sr = "x4 upscaler (StableDiffusionUpscalePipeline)" if sd else "stage II"
        raise UserError(f"{model} has no {sr} in stage_2/: pass --sr-model DIR or --stages base")
    if family == "sd" and "sr" in stages and noise_level is not None:
        check_noise_level(noise_level, sr_dir, "--noise-level")
    if family == "sd" and "sr" in stages and backend == "trt":
        raise UserError(f"--backend trt: {NO_TENSORRT}; use --backend onnx, or --stages base")
    text = expand_prompt(prompt, model)
    dev = resolve_device(device)
    # Exported backends run their own copy of the UNets: the torch ones are not loaded.
    cascade = load_cascade(model, sr_model, device=str(dev), stages=stages, with_unets=backend in TORCH_BACKENDS)
    export_dir = Path(export_dir) if export_dir else default_export_dir(model)
    cond = encode_prompts(cascade.tokenizer, cascade.text_encoder, [text] * n)
    uncond = encode_negative(cascade.tokenizer, cascade.text_encoder)
    sr_embeds = sr_prompt_embeds(cascade, [text] * n) if "sr" in stages else None
    cascade.text_encoder = cascade.sr_text_encoder = None
    runners = {stage: unet_runner(backend, getattr(cascade, f"{stage}_unet"), getattr(cascade, f"{stage}_dir"),
                                  export_dir, stage, dev) for stage in stages}
    # One generator per image, seeded seed + k: image k is the same whatever n is.
    generators = [torch.Generator().manual_seed(seed + k) for k in range(n)]
    images = sample_cascade(cascade, runners, cond, uncond, stages=stages, base_steps=steps, base_guidance=guidance,
                            sr_steps=sr_steps, sr_guidance=sr_guidance, noise_level=noise_level, sampler=sampler,
                            generator=generators, sr_embeds=sr_embeds)["sr" if "sr" in stages else "base"]
    out_dir = Path(out) if out else model / "samples"
    paths = save_pngs(images, out_dir, prefix="image-")
    grid = save_png(enlarged(make_grid(to_pil(images), cols=min(n, 4))), out_dir / "grid.png")
    return paths + [grid]
