"""The toy world's measured miniature of the paper: sample a cascade, read the pictures with the judge.

For any cascade trained on the toy world (the embedded default model, or a DreamBooth run made from it):
- prompt fidelity on the held-out (shape, colour) captions: shape right, colour right, both right (and the
  same on captions of pairs seen in training, for comparison);
- named-thing fidelity: on "a bako ring on ..." captions, the named thing's shape and both its colours right;
- stage II fidelity (for a cascade with a stage II): on the held-out captions, the share of stage II images
  that keep what the stage I image they upscale shows (shape, object colours, background), judged after
  area-downsampling to stage I's size (stage II at its default guidance and noise level).
For a DreamBooth run (a directory with dreambooth.json) also, with its identifier and class noun:
- subject fidelity: share of recontextualisation samples ("a [V] heart on a red striped background") that
  show the subject, and share with the requested background colour (and pattern);
- PRES: share of class-prompt samples ("a heart") that show the subject (language drift), and the same on the
  class noun in the recontextualisation prompts' places ("a heart on a red striped background"), where the
  paper's PRES does not look;
- DIV: share of pairs of class-prompt samples whose judged (object colour, background, pattern) differ.
Judged at the base stage's 32 px (the judge reads that resolution without loss; see tests/test_judge.py).

    dbfast eval --toy [--model DIR] [--n 4] [--seed 0] [--steps 50] [--out FILE]

Results go to --out, else DIR/toy_eval.json for a DreamBooth run, else ./toy_eval.json.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..fileio import atomic_write_json
from ..identifier import class_prompt, instance_prompt
from ..rundir import read_run
from . import world
from .judge import Verdict, judge

STEPS = 50
GUIDANCE = 7.0
BATCH = 16
# New places for the subject: none of these is a background of its 4 images (world.SUBJECT_BACKGROUNDS).
RECONTEXT = (("red", "plain"), ("white", "plain"), ("red", "striped"), ("white", "dotted"), ("green", "checked"),
             ("black", "striped"), ("blue", "dotted"), ("orange", "plain"))


def sample_stages(cascade, prompts: list[str], seed: int, steps: int = STEPS, guidance: float = GUIDANCE,
                  stages: tuple[str, ...] = ("base",)) -> dict[str, list[np.ndarray]]:
    """Samples (HxWx3 uint8) of each stage in `stages`, image i drawn with seed + i; both stages take `steps`,
    stage II its default guidance and noise level."""
    from ..sample import generate_cascade

    images: dict[str, list[np.ndarray]] = {stage: [] for stage in stages}
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start:start + BATCH]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = generate_cascade(cascade, chunk, stages=stages, base_steps=steps, base_guidance=guidance,
                               sr_steps=steps, generator=generators, progress=False)
        for stage in stages:
            x = out[stage].clamp(-1, 1)
            images[stage] += list(((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return images


def sample_images(cascade, prompts: list[str], seed: int, steps: int = STEPS,
                  guidance: float = GUIDANCE) -> list[np.ndarray]:
    """Base-stage samples (HxWx3 uint8), image i drawn with seed + i."""
    return sample_stages(cascade, prompts, seed, steps, guidance)["base"]


def caption_cases(n: int = 4, seed: int = 0, held_out: bool = True) -> list[tuple[str, world.Scene]]:
    """The held-out (shape, colour) captions, `n` per pair; with `held_out` False, as many full captions of
    training pairs."""
    cases = world.held_out_prompts(seed, per_pair=n)
    if held_out:
        return cases
    rng = random.Random(seed)
    return [(world.caption(s), s) for s in (world.random_scene(rng) for _ in cases)]


def prompt_fidelity(cases: list[tuple[str, world.Scene]], images: list[np.ndarray]) -> dict:
    """Shape, colour and both right: what the judge reads on each image against its caption's scene."""
    verdicts = [judge(im) for im in images]
    shape = [v.shape == s.shape for v, (_, s) in zip(verdicts, cases)]
    colour = [v.colour == s.colour for v, (_, s) in zip(verdicts, cases)]
    return {"n": len(cases), "shape": float(np.mean(shape)), "colour": float(np.mean(colour)),
            "shape_and_colour": float(np.mean([a and b for a, b in zip(shape, colour)]))}


def named_fidelity(cascade, n: int = 4, seed: int = 0, **sampling) -> dict:
    """Shape, colours and both right on captions of the named things, `n // 2` samples per name. Right means
    what the judge reads on the world's own drawing of the caption's scene (a crescent moon split left|right
    shows only a sliver of its second colour, too little for the judge to call it two-coloured)."""
    rng = random.Random(seed)
    scenes = [world.named_scene(rng, name) for name in world.NAMES for _ in range(max(1, n // 2))]
    verdicts = [judge(im) for im in sample_images(cascade, [world.caption(s) for s in scenes], seed, **sampling)]
    truths = [judge(world.render(s, cascade.base_size)) for s in scenes]
    shape = [v.shape == t.shape for v, t in zip(verdicts, truths)]
    colours = [set(v.colours) == set(t.colours) for v, t in zip(verdicts, truths)]
    return {"n": len(scenes), "shape": float(np.mean(shape)), "colours": float(np.mean(colours)),
            "shape_and_colours": float(np.mean([a and b for a, b in zip(shape, colours)]))}


def stage2_fidelity(base: list[np.ndarray], sr: list[np.ndarray]) -> dict:
    """Shares of stage II images that keep the shape, object colours and background the judge reads on the stage
    I image each one upscales (and all three), stage II judged after area-downsampling to stage I's size."""
    size = base[0].shape[:2][::-1]
    pairs = [(judge(low), judge(Image.fromarray(high).resize(size, Image.BOX))) for low, high in zip(base, sr)]
    kept = {key: [getattr(a, key) == getattr(b, key) for a, b in pairs] for key in ("shape", "colours", "background")}
    return {"n": len(pairs), **{k: float(np.mean(v)) for k, v in kept.items()},
            "all": float(np.mean([all(row) for row in zip(*kept.values())]))}


def diversity(verdicts: list[Verdict]) -> float:
    """Share of pairs whose judged (object colour, background colour, pattern) differ."""
    keys = [(v.colours, v.background, v.pattern) for v in verdicts]
    pairs = list(itertools.combinations(keys, 2))
    return float(np.mean([a != b for a, b in pairs])) if pairs else 0.0


def subject_metrics(cascade, ident: str, class_noun: str, n: int = 4, seed: int = 0, **sampling) -> dict:
    """Subject and background fidelity on the recontextualisation prompts; PRES and DIV on the class prompt, and
    PRES on the class noun in the recontextualisation places."""
    contexts = [(c, p) for c, p in RECONTEXT for _ in range(n)]
    places = [world.on_background(c, p) for c, p in contexts]
    cases = [(f"{instance_prompt(ident, class_noun)} {place}", c, p) for place, (c, p) in zip(places, contexts)]
    verdicts = [judge(im) for im in sample_images(cascade, [p for p, _, _ in cases], seed, **sampling)]
    in_context = [f"{class_prompt(class_noun)} {place}" for place in places]
    context_verdicts = [judge(im) for im in sample_images(cascade, in_context, seed + 20_000, **sampling)]
    class_prompts = [class_prompt(class_noun)] * len(places)
    class_verdicts = [judge(im) for im in sample_images(cascade, class_prompts, seed + 10_000, **sampling)]
    return {
        "n": len(cases),
        "subject": float(np.mean([v.subject for v in verdicts])),
        "background": float(np.mean([v.background == c for v, (_, c, _) in zip(verdicts, cases)])),
        "background_and_pattern": float(np.mean([v.background == c and v.pattern == p
                                                 for v, (_, c, p) in zip(verdicts, cases)])),
        "subject_and_background": float(np.mean([v.subject and v.background == c
                                                 for v, (_, c, _) in zip(verdicts, cases)])),
        "n_class": len(class_verdicts),
        "pres": float(np.mean([v.subject for v in class_verdicts])),
        "pres_in_context": float(np.mean([v.subject for v in context_verdicts])),
        "div": diversity(class_verdicts),
    }


def evaluate(model_dir: str | Path, *, n: int = 4, seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
             out: str | Path | None = None) -> tuple[dict, Path]:
    """Measure a toy-world cascade (and, for a DreamBooth run, its subject); write the results as JSON."""
    from ..models import load_cascade

    model_dir = Path(model_dir)
    torch.manual_seed(seed)
    random.seed(seed)
    cascade = load_cascade(model_dir)
    # The held-out captions' stage I images serve both prompt fidelity and stage II fidelity: drawn once.
    held_out, seen = caption_cases(n, seed), caption_cases(n, seed, held_out=False)
    stages = ("base",) if cascade.sr_unet is None else ("base", "sr")
    images = sample_stages(cascade, [p for p, _ in held_out], seed, steps, guidance, stages)
    results: dict = {"model": str(model_dir), "steps": steps, "guidance": guidance, "seed": seed,
                     "prompt_fidelity": prompt_fidelity(held_out, images["base"]),
                     "prompt_fidelity_seen": prompt_fidelity(seen, sample_images(cascade, [p for p, _ in seen], seed,
                                                                                 steps, guidance)),
                     "named_fidelity": named_fidelity(cascade, n, seed, steps=steps, guidance=guidance)}
    if "sr" in images:
        results["stage2_fidelity"] = stage2_fidelity(images["base"], images["sr"])
    run = read_run(model_dir)
    if run:
        results["identifier"], results["class_noun"] = run["identifier"], run["class_noun"]
        results["prior_preservation"] = run.get("config", {}).get("prior_preservation")
        results["dreambooth"] = subject_metrics(cascade, run["identifier"], run["class_noun"], n, seed, steps=steps,
                                                guidance=guidance)
    # A run's results go beside it; a plain model (maybe the packaged default) is not written into.
    path = Path(out) if out else (model_dir if run else Path.cwd()) / "toy_eval.json"
    atomic_write_json(path, results)
    return results, path


def format_results(results: dict) -> str:
    pf = results["prompt_fidelity"]
    lines = [f"model: {results['model']}",
             f"held-out prompt fidelity ({pf['n']} samples): shape {pf['shape']:.0%}, colour {pf['colour']:.0%}, "
             f"both {pf['shape_and_colour']:.0%}"]
    if "prompt_fidelity_seen" in results:
        seen = results["prompt_fidelity_seen"]
        lines.append(f"training-pair prompt fidelity ({seen['n']} samples): shape {seen['shape']:.0%}, "
                     f"colour {seen['colour']:.0%}, both {seen['shape_and_colour']:.0%}")
    if "named_fidelity" in results:
        named = results["named_fidelity"]
        lines.append(f"named-thing fidelity ({named['n']} samples): shape {named['shape']:.0%}, both colours "
                     f"{named['colours']:.0%}, both {named['shape_and_colours']:.0%}")
    if "stage2_fidelity" in results:
        kept = results["stage2_fidelity"]
        lines.append(f"stage II fidelity ({kept['n']} samples, kept from stage I): shape {kept['shape']:.0%}, "
                     f"colours {kept['colours']:.0%}, background {kept['background']:.0%}, all {kept['all']:.0%}")
    if "dreambooth" in results:
        d = results["dreambooth"]
        lines += [f"subject fidelity ({d['n']} recontextualisation samples): subject {d['subject']:.0%}, "
                  f"requested background {d['background']:.0%} (with pattern {d['background_and_pattern']:.0%}), "
                  f"both {d['subject_and_background']:.0%}",
                  f"class prompt ({d['n_class']} samples): PRES {d['pres']:.0%}, DIV {d['div']:.2f}; in the "
                  f"recontextualisation places ('a {results['class_noun']} on ...'): PRES {d['pres_in_context']:.0%}"]
    return "\n".join(lines)

