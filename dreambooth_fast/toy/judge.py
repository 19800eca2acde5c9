"""The toy world's judge: what an image shows, measured from its pixels in closed form.

- background colour: the palette colour most border pixels are nearest to (a patterned background's second
  colour is that colour's shade, so both colours of a pattern vote for it);
- background pattern: share of the background in the shade, and whether the shade runs in whole columns;
- object colour(s): nearest palette colour of the pixels that are not background, by vote; an object whose
  second colour holds a large share is two-coloured;
- shape: the largest connected blob of object pixels, cropped to its box, resized, matched by IoU against
  the world's own shape masks (shapes are drawn upright, so box-normalised masks compare directly);
- the subject: a heart whose left half is yellow and right half purple.
Accuracy on fresh generator samples is measured by `accuracy` (tests/test_judge.py holds it to a floor).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from . import world

GRID = 24  # shapes are compared as GRID x GRID box-normalised masks
# Extended palette: the colours, then their shades; entry i and i + n both mean colour i.
_ENTRIES = np.array([world.PALETTE[c] for c in world.COLOURS] + [world.shade(c) for c in world.COLOURS], float)
_N = len(world.COLOURS)
_OBJECT_MAX_DIST = 90.0  # an object pixel must be this close to a palette colour (edges blend two colours)
_BORDER_SHARE = 0.2  # a palette entry on this share of the border is background (an object touches it less)


@dataclass(frozen=True)
class Verdict:
    shape: str | None  # None: no object found
    colour: str | None  # the object's main colour
    colours: tuple[str, ...]  # one colour, or two for a two-coloured object (largest first)
    background: str
    pattern: str
    subject: bool  # the example subject: a heart, yellow left half, purple right half


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=float)


def _nearest(pixels: np.ndarray, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(pixels[..., None, :] - entries, axis=-1)
    return d.argmin(-1), d.min(-1)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        blob, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _dilated(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _eroded(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _box_normalised(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((GRID, GRID), Image.BILINEAR)) > 127


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    templates = {}
    for shape in world.SHAPES:
        scene = world.Scene(shape, "white", "black", "plain", 0.4, 0.5, 0.5)
        templates[shape] = _box_normalised(np.asarray(world._object_mask(scene, 256)) > 127)
    return templates


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose box-normalised mask overlaps `mask`'s best (IoU)."""
    grid = _box_normalised(mask)
    scores = {s: (grid & t).sum() / max(1, (grid | t).sum()) for s, t in _templates().items()}
    return max(scores, key=scores.get)


def _pattern(shaded: np.ndarray, background: np.ndarray) -> str:
    share = shaded[background].mean() if background.any() else 0.0
    if share < 0.08:
        return "plain"
    # Stripes are vertical: in each column the shade is (nearly) all or nothing.
    cols = [shaded[:, j][background[:, j]].mean() for j in range(shaded.shape[1]) if background[:, j].sum() > 2]
    purity = float(np.mean([max(f, 1 - f) for f in cols])) if cols else 0.0
    if purity > 0.85:
        return "striped"
    return "checked" if share > 0.33 else "dotted"


def judge(image) -> Verdict:
    """Measure a toy-world image (PIL image or HxWx3 array, any size): shape, colours, background, subject."""
    px = _as_array(image)
    h, w, _ = px.shape
    idx, _ = _nearest(px, _ENTRIES)
    b = max(1, h // 32)
    border = np.concatenate([idx[:b].ravel(), idx[-b:].ravel(), idx[:, :b].ravel(), idx[:, -b:].ravel()])
    share = np.bincount(border, minlength=2 * _N) / border.size
    bg = int((share[:_N] + share[_N:]).argmax())
    # The background is the bg colour and its shade, plus any entry that covers much of the border: a sampled
    # pattern's second colour can land nearer another palette entry than the shade (dark olive stripes).
    background_entries = np.flatnonzero(share >= _BORDER_SHARE).tolist() + [bg, bg + _N]
    background = np.isin(idx, background_entries)
    pattern = _pattern(background & (idx != bg), background)

    obj_idx, obj_dist = _nearest(px, _ENTRIES[:_N])
    # Closed first: a seam blended from two object colours can land on a background colour's shade.
    mask = _largest_blob(_eroded(_dilated(~background)))
    if mask.sum() < max(4, h * w // 400):
        return Verdict(None, None, (), world.COLOURS[bg], pattern, False)
    # Colours are voted by the blob's interior: its edges (and the seam of two colours) blend into others.
    interior = _eroded(mask)
    voters = (interior if interior.any() else mask) & (obj_dist < _OBJECT_MAX_DIST) & (obj_idx != bg)
    if not voters.any():
        return Verdict(None, None, (), world.COLOURS[bg], pattern, False)
    votes = np.bincount(obj_idx[voters], minlength=_N)
    order = [int(i) for i in votes.argsort()[::-1] if votes[i] > 0]
    main = order[0]
    two = len(order) > 1 and votes[order[1]] >= 0.3 * votes[main]
    kept = order[:2] if two else order[:1]
    shape = classify_shape(mask)
    colours = tuple(world.COLOURS[i] for i in kept)
    return Verdict(shape, world.COLOURS[main], colours, world.COLOURS[bg], pattern,
                   _is_subject(shape, voters, obj_idx))


def _is_subject(shape: str, mask: np.ndarray, obj_idx: np.ndarray) -> bool:
    if shape != world.SUBJECT_SHAPE:
        return False
    xs = np.nonzero(mask)[1]
    middle = (xs.min() + xs.max()) / 2
    left_colour, right_colour = (world.COLOURS.index(c) for c in world.SUBJECT_COLOURS)
    cols = np.arange(mask.shape[1])[None, :]
    left = obj_idx[mask & (cols < middle - 0.5)]
    right = obj_idx[mask & (cols > middle + 0.5)]
    return bool(left.size and right.size and (left == left_colour).mean() > 0.6
                and (right == right_colour).mean() > 0.6)


def accuracy(seed: int, n: int, size: int = world.SIZE, subject_every: int = 5) -> dict[str, float]:
    """The judge's accuracy on `n` fresh generator images (every `subject_every`-th one the subject):
    the share right per field."""
    rng = random.Random(seed)
    right = {"shape": 0, "colour": 0, "background": 0, "pattern": 0, "subject": 0}
    for i in range(n):
        scene = world.subject_scene(rng) if i % subject_every == 0 else world.random_scene(rng, train=False)
        v = judge(world.render(scene, size))
        right["shape"] += v.shape == scene.shape
        right["colour"] += set(v.colours) == ({*world.SUBJECT_COLOURS} if scene.subject else {scene.colour})
        right["background"] += v.background == scene.background
        right["pattern"] += v.pattern == scene.pattern
        right["subject"] += v.subject == scene.subject
    return {k: r / n for k, r in right.items()}
