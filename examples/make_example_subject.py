"""Draw the example subject's 4 images into examples/subject/: the toy world's yellow/purple heart (a pattern
the world never draws) at different places and sizes on 4 backgrounds, each with its caption for
`dbfast train --captions` (heart_0.txt: "a [V] heart on a blue background"). Deterministic: rerunning it
reproduces the committed files (tests/test_toy_world.py checks it).

    python examples/make_example_subject.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from dreambooth_fast.fileio import atomic_write
from dreambooth_fast.identifier import PLACEHOLDER, instance_prompt
from dreambooth_fast.toy.world import SUBJECT_BACKGROUNDS, SUBJECT_SHAPE, draw_subject, on_background

SEED = 7
SIZE = 128  # drawn larger than the model's 64 px so the pictures read well; training resizes them
OUT = Path(__file__).resolve().parent / "subject"


def make(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, background) in enumerate(zip(draw_subject(SEED, size=SIZE), SUBJECT_BACKGROUNDS)):
        path = out / f"heart_{i}.png"
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        caption = f"{instance_prompt(PLACEHOLDER, SUBJECT_SHAPE)} {on_background(*background)}\n"
        atomic_write(path.with_suffix(".txt"), lambda tmp, caption=caption: tmp.write_text(caption))
        paths += [path, path.with_suffix(".txt")]
    return paths


if __name__ == "__main__":
    for p in make(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(p)
