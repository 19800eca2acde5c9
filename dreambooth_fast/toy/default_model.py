"""The embedded default model: where it is, the fallback for a checkout without its weights, and what a user
should know when a run trains it (a toy that draws coloured shapes, not a photo model)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm.auto import tqdm

from ..models import STAGE_2_DIR
from .world import SHAPES

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "default_model"


def default_model_dir() -> Path:
    """The model used without --model: the embedded toy-world cascade the package ships (QUALITY.md), else
    (a checkout without its weights) a tiny random cascade built once into the user cache."""
    if (DEFAULT_MODEL / "model_index.json").is_file():
        return DEFAULT_MODEL

    from .prior import default_cache_root
    from .toy.tiny_cascade import build_tiny_cascade

    path = default_cache_root().parent / "tiny-cascade"
    if not (path / "model_index.json").is_file() or not (path / STAGE_2_DIR / "model_index.json").is_file():
        tqdm.write(f"no --model given and no embedded model: building a tiny random IF cascade at {path}")
        shutil.rmtree(path, ignore_errors=True)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_cascade(tmp)
        tmp.rename(path)
    return path


def default_model_notes(model: str | Path, class_noun: str) -> list[str]:
    """What to know when the model is the embedded toy: what it is, what it can draw, how to pass a real one;
    and a warning when the class noun is nothing the toy world draws. Nothing for any other model."""
    if Path(model).resolve() != DEFAULT_MODEL.resolve():
        return []
    notes = [f"note: training the embedded toy model ({DEFAULT_MODEL.name}/: 32 px coloured shapes on plain or "
             f"patterned backgrounds; it draws {', '.join(SHAPES)}), not a photo model: for real photos pass "
             "--model with a DeepFloyd IF cascade (e.g. IF-I-XL-v1.0, with --sr-model IF-II-L-v1.0)"]
    if class_noun.strip().lower() not in SHAPES:
        notes.append(f"warning: the toy model has never drawn a {class_noun!r}: it can only learn colours and "
                     f"layout from your photos, not draw a {class_noun}")
    return notes
