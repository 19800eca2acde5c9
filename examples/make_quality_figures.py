"""Draw the pictures of QUALITY.md and the README from trained models (seeded: the same models give the same
pictures). Base-stage images are 32 px, shown enlarged with nearest-neighbour so the pixels stay visible.

    python examples/make_quality_figures.py --pretrained dreambooth_fast/default_model \
        --prior runs/toy-prior --no-prior runs/toy-noprior --demo runs/demo-heart

Each option is optional; each picture is written only when its models are given:
- pretrained_cascade.png: 8 captions, base stage (top row) and stage II (bottom row) of --pretrained;
- dreambooth_prior_vs_no_prior.png: --prior run (top row) and --no-prior run (bottom row), 4 recontextualisation
  prompts then 4 class prompts;
- quickstart_result.png: the first 8 samples `make demo` wrote into --demo/samples/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from dreambooth_fast.identifier import class_prompt, instance_prompt
from dreambooth_fast.images import make_grid, save_png, to_pil
from dreambooth_fast.models import load_cascade
from dreambooth_fast.sample import generate_cascade
from dreambooth_fast.toy.world import on_background

OUT = Path(__file__).resolve().parent
CAPTIONS = ("a red star on a blue background", "a green circle on a white background",
            "a yellow square on a black striped background", "a white heart on a red background",
            "a blue triangle on an orange background", "a purple ring on a green background",
            "a black cross on a yellow background", "an orange moon on a blue background")
RECONTEXT = (("red", "plain"), ("white", "dotted"), ("green", "checked"), ("black", "striped"))
STEPS = 50
SEED = 0


def enlarge(images: list[Image.Image], side: int) -> list[Image.Image]:
    return [im.resize((side, side), Image.NEAREST) for im in images]


def sample(model: Path, prompts: list[str], stages: tuple[str, ...]) -> dict[str, list[Image.Image]]:
    cascade = load_cascade(model, stages=stages)
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(prompts))]
    images = generate_cascade(cascade, prompts, stages=stages, base_steps=STEPS, sr_steps=25,
                              generator=generators, progress=False)
    return {stage: to_pil(x) for stage, x in images.items()}


def pretrained_figure(model: Path) -> Path:
    images = sample(model, list(CAPTIONS), ("base", "sr"))
    cells = enlarge(images["base"], 64) + images["sr"]
    return save_png(make_grid(cells, cols=len(CAPTIONS)), OUT / "pretrained_cascade.png")


def dreambooth_figure(prior: Path, no_prior: Path) -> Path:
    cells = []
    for run in (prior, no_prior):
        info = json.loads((run / "dreambooth.json").read_text())
        subject = instance_prompt(info["identifier"], info["class_noun"])
        prompts = [f"{subject} {on_background(*place)}" for place in RECONTEXT] + [class_prompt(info["class_noun"])] * 4
        cells += enlarge(sample(run, prompts, ("base",))["base"], 64)
    return save_png(make_grid(cells, cols=8), OUT / "dreambooth_prior_vs_no_prior.png")


def demo_figure(run: Path) -> Path:
    samples = sorted((run / "samples").glob("image-*.png"))[:8]
    return save_png(make_grid(enlarge([Image.open(p) for p in samples], 128), cols=4), OUT / "quickstart_result.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained", type=Path)
    parser.add_argument("--prior", type=Path)
    parser.add_argument("--no-prior", type=Path)
    parser.add_argument("--demo", type=Path)
    args = parser.parse_args()
    written = []
    if args.pretrained:
        written.append(pretrained_figure(args.pretrained))
    if args.prior and args.no_prior:
        written.append(dreambooth_figure(args.prior, args.no_prior))
    if args.demo:
        written.append(demo_figure(args.demo))
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
