"""Class-image benchmark: how fast the class images of prior preservation are drawn, and whether they still show
the class, per sampler, side by side with the way diffusers' DreamBooth script draws them.

Candidates (stage I, the class images both jobs draw; the SR stage's prior pairs are left out here):
- "diffusers": what examples/dreambooth/train_dreambooth.py does: the pipeline's own defaults (IF stage I: DDPM,
  100 steps), 4 images per call (its --sample_batch_size);
- "before": this project's defaults until session 9: DDPM 50 steps, 4 per call;
- "default": `dbfast train`'s defaults now (TrainConfig: --class-sampler, --class-sample-steps,
  --class-batch-size);
- the other samplers worth choosing from (DPM-Solver++ at other step counts, IF's smart27 / fast27 presets).
Every candidate draws with the same guidance (the demo's 2 for the toy model: speed does not depend on it, since
every guided step runs the UNet on 2 rows per image) through `prior.generate_class_images` into a fresh cache (the
time includes hashing the weights and writing the PNGs, as in a run), alternating round by round. Each call draws
`chunk` images with its own seed, so the calls' images are all different; the judged columns count all of them
(warm-up calls included).

Quality, on the embedded toy model (whose world the judge reads exactly): the share of images judged to show the
class (the class prompt is "a heart") and DIV, the share of pairs of images that differ in colours, background or
pattern. With another model those columns stay empty.

    python -m benchmarks --suite prior [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    RESULTS_DIR,
    Timed,
    append_rows,
    format_table,
    load_average,
    measure_paired,
    ratio_spread,
    run_info,
    summarize,
)
from dreambooth_fast.config import TrainConfig
from dreambooth_fast.models import load_cascade
from dreambooth_fast.prior import PriorSettings, generate_class_images
from dreambooth_fast.sample import SR_GUIDANCE, SR_NOISE_LEVEL
from dreambooth_fast.text import encode_negative, encode_prompts
from dreambooth_fast.toy.default_model import DEFAULT_MODEL

CLASS_NOUN = "heart"  # a class the toy world draws, so that the judge can tell whether an image shows it
GUIDANCE = 2.0  # the demo's --class-guidance-scale for the toy model


@dataclass(frozen=True)
class Candidate:
    name: str
    sampler: str
    steps: int
    batch: int


def candidates() -> list[Candidate]:
    cfg = TrainConfig()
    default = Candidate("default", cfg.class_sampler, cfg.class_sample_steps, cfg.class_batch_size)
    others = [Candidate("diffusers", "ddpm", 100, 4), Candidate("before", "ddpm", 50, 4), default,
              Candidate("ddpm 15", "ddpm", 15, cfg.class_batch_size),
              Candidate("dpm++ 15", "dpm++", 15, cfg.class_batch_size),
              Candidate("smart27", "smart27", 27, cfg.class_batch_size)]
    # The default is one of the others' settings: measure it once, under its own name.
    return [c for c in others if c == default or (c.sampler, c.steps, c.batch) != (default.sampler, default.steps,
                                                                                    default.batch)]


def _judged(folders: list[Path], toy: bool) -> dict:
    if not toy:
        return {"judged": "", "class_share": "", "div": ""}
    from PIL import Image

    from dreambooth_fast.toy.evaluation import diversity
    from dreambooth_fast.toy.judge import judge

    verdicts = [judge(Image.open(p)) for folder in folders for p in sorted((folder / "base").glob("*.png"))]
    return {"judged": len(verdicts), "class_share": round(sum(v.shape == CLASS_NOUN for v in verdicts)
                                                          / len(verdicts), 3), "div": round(diversity(verdicts), 3)}


def run(device: str, *, quick: bool = False, smoke: bool = False, out: Path | None = None,
        model_dir: Path | None = None, command: str = "") -> list[dict]:
    """Runs the class-image benchmark on `model_dir` (default: the embedded toy model), appends one row per
    candidate to `out` (default benchmarks/results/prior.csv), prints the table and returns the rows. Smoke
    mode: 2 steps, one image per call, one round (proves it runs)."""
    out = Path(out) if out is not None else RESULTS_DIR / "prior.csv"
    model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL
    toy = model_dir.resolve() == DEFAULT_MODEL.resolve()
    chunk, rounds, warmup = (8, 2, 1) if quick else (16, 3, 1)
    cands = candidates()
    if smoke:
        chunk, rounds, warmup = 1, 1, 0
        cands = [Candidate(c.name, c.sampler, 2, 1) for c in cands[:3]]
    cascade = load_cascade(model_dir, device=device, stages=("base",))
    class_embeds = encode_prompts(cascade.tokenizer, cascade.text_encoder, [f"a {CLASS_NOUN}"])
    negative = encode_negative(cascade.tokenizer, cascade.text_encoder)
    cascade.text_encoder = None
    info, load_before = run_info(device), load_average()
    with tempfile.TemporaryDirectory() as tmp:
        folders: dict[str, list[Path]] = {c.name: [] for c in cands}

        def draw(c: Candidate) -> Timed:
            calls = itertools.count()

            def body() -> None:
                k = next(calls)  # each call: its own seed and an empty cache
                settings = PriorSettings(f"a {CLASS_NOUN}", c.sampler, c.steps, GUIDANCE, 1, SR_GUIDANCE,
                                         SR_NOISE_LEVEL, False, k)
                folder, _ = generate_class_images(cascade, class_embeds, negative, chunk, settings,
                                                  cache_root=Path(tmp) / c.name / str(k), batch_size=c.batch)
                folders[c.name].append(folder)

            return Timed(body)

        samples = measure_paired({c.name: draw(c) for c in cands}, device, rounds=rounds, warmup=warmup)
        judged = {c.name: _judged(folders[c.name], toy) for c in cands}
    rows = []
    for c in cands:
        seconds = summarize(samples[c.name], rounds)
        vs = {ref: ratio_spread(samples[ref], samples[c.name]) for ref in ("diffusers", "before") if ref in samples}
        rows.append({
            **info, "command": command, "suite": "prior", "model": "toy default" if toy else model_dir.name,
            "dtype": "fp32", "candidate": c.name, "sampler": c.sampler, "steps": c.steps, "batch_size": c.batch,
            "guidance": GUIDANCE, "size": cascade.base_size, "images_per_call": chunk,
            "median_s": round(seconds.median, 3), "min_s": round(seconds.minimum, 3),
            "max_s": round(seconds.maximum, 3), "rounds": rounds,
            "images_per_s": round(chunk / seconds.median, 3), "images_per_s_min": round(chunk / seconds.maximum, 3),
            "images_per_s_max": round(chunk / seconds.minimum, 3),
            **{f"vs_{ref}": round(r[0], 2) for ref, r in vs.items()},
            **{f"vs_{ref}_min": round(r[1], 2) for ref, r in vs.items()},
            **{f"vs_{ref}_max": round(r[2], 2) for ref, r in vs.items()},
            **judged[c.name], **load_before, **{f"{k}_end": v for k, v in load_average().items()},
        })
    append_rows(out, rows)
    print(f"{info['device_name']} ({device}), torch {info['torch']}, diffusers {info['diffusers']}, "
          f"commit {info['commit']}")
    print(table(rows))
    print(f"appended {len(rows)} rows to {out}")
    return rows


def table(rows: list[dict]) -> str:
    header = ["candidate", "sampler", "steps", "batch", "images/s (min-max)", "x diffusers (min-max)", "x before",
              "judged", "class share", "DIV"]
    lines = [[r["candidate"], r["sampler"], r["steps"], r["batch_size"],
              f"{r['images_per_s']:.2f} ({r['images_per_s_min']:.2f}-{r['images_per_s_max']:.2f})",
              f"{r['vs_diffusers']:.2f} ({r['vs_diffusers_min']:.2f}-{r['vs_diffusers_max']:.2f})"
              if "vs_diffusers" in r else "", f"{r['vs_before']:.2f}" if "vs_before" in r else "",
              r["judged"], r["class_share"], r["div"]] for r in rows]
    return format_table(header, lines)
