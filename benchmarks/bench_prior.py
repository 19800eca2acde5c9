"""Class-image generation benchmark: images per second of `prior.generate_class_images` (what a DreamBooth run
with prior preservation does before training) at the settings `dbfast train` uses by default: the base stage's
50 guided steps and, since both stages are trained by default, the SR stage's 25 guided steps, 4 images per
batch. Each timed call generates into a fresh cache (a filled cache returns at once); the time includes the
cache key (hashing the weights) and writing the PNGs, as in a run. On the tiny cascade, in fp32.

    python -m benchmarks --suite prior [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmarks.common import (
    RESULTS_DIR,
    Timed,
    append_rows,
    format_table,
    load_average,
    measure_paired,
    run_info,
    summarize,
)
from dreambooth_fast.config import TrainConfig
from dreambooth_fast.models import load_cascade
from dreambooth_fast.prior import PriorSettings, generate_class_images
from dreambooth_fast.sample import SR_GUIDANCE, SR_NOISE_LEVEL
from dreambooth_fast.text import encode_negative, encode_prompts
from dreambooth_fast.toy.tiny_cascade import build_tiny_cascade
from dreambooth_fast.train import CLASS_IMAGE_BATCH

CLASS_PROMPT = "a dog"


def default_settings() -> PriorSettings:
    """The class-image settings of a default `dbfast train` run (train.py builds the same from TrainConfig)."""
    cfg = TrainConfig()
    return PriorSettings(CLASS_PROMPT, cfg.class_sample_steps, cfg.class_guidance_scale, cfg.sr_sample_steps,
                         SR_GUIDANCE, SR_NOISE_LEVEL, "sr" in cfg.stages, cfg.seed, CLASS_IMAGE_BATCH)


def run(device: str, *, quick: bool = False, smoke: bool = False, out: Path | None = None,
        model_dir: Path | None = None, command: str = "") -> list[dict]:
    """Runs the class-image benchmark, appends its row to `out` (default benchmarks/results/prior.csv), prints
    it and returns the rows. Smoke mode: 2 steps per stage, one image, one call (proves it runs)."""
    out = Path(out) if out is not None else RESULTS_DIR / "prior.csv"
    settings = default_settings()
    n_images = settings.batch_size if quick else 2 * settings.batch_size
    rounds, warmup = (3, 1) if quick else (5, 1)
    if smoke:
        settings = replace(settings, base_steps=2, sr_steps=2, batch_size=1)
        n_images, rounds, warmup = 1, 1, 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = model_dir or build_tiny_cascade(tmp / "tiny")
        cascade = load_cascade(model_dir, device=device)
        class_embeds = encode_prompts(cascade.tokenizer, cascade.text_encoder, [settings.prompt])
        negative = encode_negative(cascade.tokenizer, cascade.text_encoder)
        cascade.text_encoder = None
        calls = itertools.count()

        def generate() -> None:
            cache_root = tmp / f"cache-{next(calls)}"
            generate_class_images(cascade, class_embeds, negative, n_images, settings, cache_root=cache_root)

        info = run_info(device)
        samples = measure_paired({"generate_class_images": Timed(generate)}, device, rounds=rounds, warmup=warmup)
        base_size, sr_size = cascade.base_size, cascade.sr_size
    seconds = summarize(samples["generate_class_images"], rounds)
    row = {
        **info, "command": command, "suite": "prior", "model": "tiny", "dtype": "fp32",
        "base_shape": f"{settings.batch_size}x3x{base_size}x{base_size}",
        "sr_shape": f"{settings.batch_size}x3x{sr_size}x{sr_size}" if settings.with_sr else "",
        "images": n_images, "batch_size": settings.batch_size, "base_steps": settings.base_steps,
        "sr_steps": settings.sr_steps if settings.with_sr else "", "guidance": settings.guidance_scale,
        "sr_guidance": settings.sr_guidance_scale if settings.with_sr else "",
        "median_s": round(seconds.median, 3), "min_s": round(seconds.minimum, 3), "max_s": round(seconds.maximum, 3),
        "samples": seconds.samples,
        "images_per_s": round(n_images / seconds.median, 3),
        "images_per_s_min": round(n_images / seconds.maximum, 3),
        "images_per_s_max": round(n_images / seconds.minimum, 3),
        **load_average(),
    }
    append_rows(out, [row])
    print(f"{info['device_name']} ({device}), torch {info['torch']}, diffusers {info['diffusers']}, "
          f"commit {info['commit']}")
    print(table([row]))
    print(f"appended 1 row to {out}")
    return [row]


def table(rows: list[dict]) -> str:
    header = ["model", "dtype", "images", "batch", "steps (base+sr)", "s per call (min-max)", "images/s (min-max)"]
    lines = [[r["model"], r["dtype"], r["images"], r["batch_size"], f"{r['base_steps']}+{r['sr_steps'] or 0}",
              f"{r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f})",
              f"{r['images_per_s']:.3f} ({r['images_per_s_min']:.3f}-{r['images_per_s_max']:.3f})"] for r in rows]
    return format_table(header, lines)
