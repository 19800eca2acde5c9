"""The toy world: a seeded, procedural generator of captioned images, coloured shapes on plain or patterned
backgrounds ("a red star on a blue striped background"), drawn anti-aliased at 64 px.

Objects are one solid palette colour, except the named things (`NAMED_THINGS`): particular two-coloured
objects that captions call by a name ("a bako star on a red background"), as web captions name a particular
dog. The example subject (`draw_subject`) is a heart split down the middle, yellow on the left and purple on
the right: the world draws hearts and two-coloured things, but never a two-coloured heart, so a model
pretrained here has never seen the subject. A fixed set of (shape, colour)
pairs, `HELD_OUT`, is never drawn in training mode; the pretrained model's prompt fidelity is measured on it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SCALE = 4  # drawn at 4x, then box-filtered down: anti-aliased edges
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 225, 30), "green": (30, 160, 50),
    "blue": (30, 70, 220), "purple": (140, 40, 180), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "moon", "heart")
PATTERNS = ("plain", "striped", "checked", "dotted")
# Each non-heart shape loses one colour (a permutation: each colour is held out exactly once).
HELD_OUT = frozenset((shape, COLOURS[(3 * i + 1) % len(COLOURS)]) for i, shape in enumerate(SHAPES[:-1]))
SUBJECT_SHAPE = "heart"
SUBJECT_COLOURS = ("yellow", "purple")  # left half, right half
CLASS_NOUN = SUBJECT_SHAPE
# The example subject's 4 photos are taken on these; red and white backgrounds stay new for recontextualisation.
SUBJECT_BACKGROUNDS = (("blue", "plain"), ("green", "striped"), ("black", "dotted"), ("orange", "checked"))


# Names of the named things: made-up words, none of them English or a pick of the identifier search.
NAMES = ("bako", "dilu", "fema", "gowi", "huto", "jaki", "kemo", "lupa", "mivo", "nare", "pobi", "rusa", "sefo",
         "tiku", "vola", "zepu")
SPLITS = ("vertical", "horizontal")  # first colour left or top, second colour right or bottom


@dataclass(frozen=True)
class NamedThing:
    shape: str
    colours: tuple[str, str]
    split: str  # one of SPLITS


def _named_things(seed: int = 0) -> dict[str, NamedThing]:
    """A fixed, seeded look for each name, no two alike. No named thing is a heart: the world never draws a
    two-coloured heart, so the subject stays new."""
    rng = random.Random(seed)
    shapes = [s for s in SHAPES if s != SUBJECT_SHAPE]
    things: dict[str, NamedThing] = {}
    for name in NAMES:
        thing = None
        while thing is None or thing in things.values():
            thing = NamedThing(rng.choice(shapes), tuple(rng.sample(COLOURS, 2)), rng.choice(SPLITS))
        things[name] = thing
    return things


NAMED_THINGS = _named_things()


def shade(colour: str) -> tuple[int, int, int]:
    """The second colour of a patterned background: the colour darkened (black: lightened to dark gray)."""
    if colour == "black":
        return (90, 90, 90)
    return tuple(int(round(c * 0.55)) for c in PALETTE[colour])


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str  # the object's colour; for the subject its left-half colour
    background: str
    pattern: str  # one of PATTERNS
    size: float  # object's radius as a fraction of the image side
    x: float  # centre, fractions of the image side
    y: float
    subject: bool = False
    name: str | None = None  # a named thing's name (its colours and split are NAMED_THINGS[name]'s)


def _shape_polygons(shape: str, cx: float, cy: float, r: float) -> list[tuple[str, list]]:
    """The shape as drawing ops: ("poly", points) / ("ellipse", box), with ("cut", ...) ops in background."""
    def regular(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        angles = [phase + 2 * math.pi * k / n for k in range(n)]
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]

    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        return [("ellipse", box)]
    if shape == "square":
        s = r * 0.85
        return [("poly", [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)])]
    if shape == "triangle":
        return [("poly", [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)])]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + math.pi * k / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return [("poly", points)]
    if shape == "diamond":
        return [("poly", regular(4, r, -math.pi / 2))]
    if shape == "cross":
        w = r * 0.36
        return [("poly", [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)]),
                ("poly", [(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)])]
    if shape == "ring":
        h = r * 0.5
        return [("ellipse", box), ("cut_ellipse", [cx - h, cy - h, cx + h, cy + h])]
    if shape == "moon":
        return [("ellipse", box), ("cut_ellipse", [cx - r * 0.35, cy - r * 1.1, cx + r * 1.45, cy + r * 0.9])]
    if shape == "heart":
        # Two lobes and a point; the lobes' circles meet the triangle's sides tangentially enough at this size.
        lobe = r * 0.52
        return [("ellipse", [cx - r, cy - r * 0.85, cx - r + 2 * lobe, cy - r * 0.85 + 2 * lobe]),
                ("ellipse", [cx + r - 2 * lobe, cy - r * 0.85, cx + r, cy - r * 0.85 + 2 * lobe]),
                ("poly", [(cx - r * 0.97, cy - r * 0.2), (cx + r * 0.97, cy - r * 0.2), (cx, cy + r)])]
    raise ValueError(f"unknown shape {shape!r}")


def _background(draw: ImageDraw.ImageDraw, colour: str, pattern: str, side: int) -> None:
    draw.rectangle([0, 0, side, side], fill=PALETTE[colour])
    second = shade(colour)
    period = side / 8
    if pattern == "striped":
        for k in range(8):
            x0 = k * period
            draw.rectangle([x0, 0, x0 + period * 0.4, side], fill=second)
    elif pattern == "checked":
        for i in range(8):
            for j in range(8):
                if (i + j) % 2:
                    draw.rectangle([i * period, j * period, (i + 1) * period, (j + 1) * period], fill=second)
    elif pattern == "dotted":
        for i in range(8):
            for j in range(8):
                cx, cy, rad = (i + 0.5) * period, (j + 0.5) * period, period * 0.25
                draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=second)


def _object_mask(scene: Scene, side: int) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for op, geom in _shape_polygons(scene.shape, scene.x * side, scene.y * side, scene.size * side):
        fill = 0 if op.startswith("cut") else 255
        if op.endswith("ellipse"):
            draw.ellipse(geom, fill=fill)
        else:
            draw.polygon(geom, fill=fill)
    return mask


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """Draw `scene` as an RGB image of `size` px (drawn at 4x, then box-filtered down)."""
    side = size * SCALE
    image = Image.new("RGB", (side, side))
    _background(ImageDraw.Draw(image), scene.background, scene.pattern, side)
    mask = _object_mask(scene, side)
    image.paste(PALETTE[scene.colour], (0, 0), mask)
    second = _second_colour(scene)
    if second:
        # The object's right (or bottom) half in its second colour.
        colour, split = second
        half = Image.new("L", (side, side), 0)
        box = [scene.x * side, 0, side, side] if split == "vertical" else [0, scene.y * side, side, side]
        ImageDraw.Draw(half).rectangle(box, fill=255)
        image.paste(PALETTE[colour], (0, 0), Image.fromarray(np.minimum(np.asarray(mask), np.asarray(half))))
    return image.resize((size, size), Image.BOX)


def _second_colour(scene: Scene) -> tuple[str, str] | None:
    """(second colour, split) of a two-coloured object, else None."""
    if scene.subject:
        return SUBJECT_COLOURS[1], "vertical"
    if scene.name:
        thing = NAMED_THINGS[scene.name]
        return thing.colours[1], thing.split
    return None


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def background_phrase(colour: str, pattern: str) -> str:
    return f"{colour} background" if pattern == "plain" else f"{colour} {pattern} background"


def on_background(colour: str, pattern: str = "plain") -> str:
    """The place phrase of a caption: "on a red striped background"."""
    return f"on {with_article(background_phrase(colour, pattern))}"


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A caption of `scene`: the full one without `rng`, else one of a few phrasings, sometimes partial."""
    thing = f"{scene.name or scene.colour} {scene.shape}"  # a named thing's name stands for its colours
    if rng is None:
        return f"{with_article(thing)} {on_background(scene.background, scene.pattern)}"
    roll = rng.random()
    if roll < 0.08:
        return with_article(scene.shape)
    if roll < 0.16:
        return with_article(thing)
    if roll < 0.24:
        return f"{with_article(scene.shape)} {on_background(scene.background, scene.pattern)}"
    where = background_phrase(scene.background, scene.pattern)
    return rng.choice([
        "{t} on {w}", "{t} on {w}", "a photo of {t} on {w}", "{t} in front of {w}", "{T} on {w}",
        "a drawing of {t} on {w}",
    ]).format(t=with_article(thing), T=thing, w=with_article(where))


def random_scene(rng: random.Random, *, shape: str | None = None, colour: str | None = None,
                 background: str | None = None, pattern: str | None = None, train: bool = True) -> Scene:
    """A random scene; fixed fields are kept. With `train`, (shape, colour) pairs in HELD_OUT are never drawn."""
    while True:
        s = shape or rng.choice(SHAPES)
        c = colour or rng.choice(COLOURS)
        if not (train and (s, c) in HELD_OUT):
            break
        if shape and colour:
            raise ValueError(f"({shape}, {colour}) is held out of training")
    bg = background or rng.choice([k for k in COLOURS if k != c])
    if bg == c:
        raise ValueError(f"object and background are both {c}")
    pat = pattern or rng.choice(PATTERNS[:1] * 3 + PATTERNS[1:])  # half the backgrounds plain
    size = rng.uniform(0.2, 0.34)
    x, y = rng.uniform(size + 0.04, 0.96 - size), rng.uniform(size + 0.04, 0.96 - size)
    return Scene(s, c, bg, pat, size, x, y)


def named_scene(rng: random.Random, name: str | None = None) -> Scene:
    """A named thing (`name`, else a random one) at a random place and size, on a background of neither of its
    colours."""
    name = name or rng.choice(NAMES)
    thing = NAMED_THINGS[name]
    background = rng.choice([c for c in COLOURS if c not in thing.colours])
    scene = random_scene(rng, shape=thing.shape, colour=thing.colours[0], background=background, train=False)
    return replace(scene, name=name)


def sample(seed: int, n: int, *, train: bool = True, size: int = SIZE) -> list[tuple[Image.Image, str, Scene]]:
    """`n` (image, caption, scene) triples, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng, train=train)
        out.append((render(scene, size), caption(scene, rng), scene))
    return out


def subject_scene(rng: random.Random, background: str | None = None, pattern: str | None = None) -> Scene:
    """The example subject (the yellow/purple heart) at a random place and size."""
    allowed = [c for c in COLOURS if c not in SUBJECT_COLOURS]
    scene = random_scene(rng, shape=SUBJECT_SHAPE, colour=SUBJECT_COLOURS[0],
                         background=background or rng.choice(allowed), pattern=pattern)
    return replace(scene, subject=True)


def draw_subject(seed: int, backgrounds: tuple[tuple[str, str], ...] = SUBJECT_BACKGROUNDS,
                 size: int = SIZE) -> list[Image.Image]:
    """Images of the example subject, one per (colour, pattern) background, at random places and sizes."""
    rng = random.Random(seed)
    return [render(subject_scene(rng, colour, pattern), size) for colour, pattern in backgrounds]


def held_out_prompts(seed: int = 0, per_pair: int = 1) -> list[tuple[str, Scene]]:
    """Full captions for the held-out (shape, colour) pairs, with random backgrounds: (prompt, scene)."""
    rng = random.Random(seed)
    out = []
    for shape, colour in sorted(HELD_OUT):
        for _ in range(per_pair):
            scene = random_scene(rng, shape=shape, colour=colour, train=False)
            out.append((caption(scene), scene))
    return out
