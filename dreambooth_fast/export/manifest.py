"""Manifests beside exported files, the engine cache key, and the staleness rules. Pure Python, no TensorRT.

Every exported file gets a JSON manifest beside it (`unet.fp16.onnx.json`, `unet.fp16.engine.json`), written
last, so a file without its manifest is an unfinished export. The weights are identified by the sha256 of the
source UNet's config.json, weights file(s) and LoRA adapter (if any); file sizes and mtimes are kept beside it
so unchanged weights are not re-hashed on every load.

An engine's cache key is a hash of what makes a built engine valid: TensorRT version, GPU name and compute
capability, precision, batch profile, opset, weights and refittability. At build time a matching key reuses
the engine, a change of weights alone refits a refittable engine, anything else rebuilds. At load time a
different TensorRT, GPU or weights makes the engine stale, and it is refused with the reasons, never used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write_json, sha256_files
from ..models import weights_files

MANIFEST_FORMAT = 1
ONNX_KEY_FIELDS = ("precision", "opset", "weights_sha256")
ENGINE_KEY_FIELDS = ("tensorrt_version", "gpu_name", "compute_capability", "precision", "profile", "opset",
                     "weights_sha256", "refittable")
RUNTIME_FIELDS = ("tensorrt_version", "gpu_name", "compute_capability", "weights_sha256")
_LABELS = {"tensorrt_version": "TensorRT version", "gpu_name": "GPU", "compute_capability": "compute capability",
           "precision": "precision", "profile": "batch profile", "opset": "opset", "weights_sha256": "weights",
           "refittable": "refittable"}


def manifest_path(path: str | Path) -> Path:
    """The manifest of an exported file: the file's name plus .json."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def weights_record(stage_dir: str | Path, previous: dict | None = None) -> dict:
    """{"sha256", "files": {relative path: [size, mtime_ns]}} of a stage's UNet weights (weights_files). Reuses
    `previous`'s hash when every file still has the recorded size and mtime, so a 17 GB UNet is hashed once."""
    stage_dir = Path(stage_dir)
    files = weights_files(stage_dir)
    stats = {str(f.relative_to(stage_dir)): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    if previous is not None and previous.get("files") == stats:
        return {"sha256": previous["sha256"], "files": stats}
    return {"sha256": sha256_files(files), "files": stats}


def engine_cache_key(fields: dict) -> str:
    """A short hash of the ENGINE_KEY_FIELDS of `fields`."""
    canonical = json.dumps({name: fields[name] for name in ENGINE_KEY_FIELDS}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def _short(value) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)


def changed_fields(old: dict, new: dict, fields: tuple[str, ...]) -> list[str]:
    """One human line per field of `fields` whose value differs between `old` and `new`."""
    return [f"{_LABELS[name]} {_short(old.get(name))} -> {_short(new[name])}"
            for name in fields if name in new and old.get(name) != new[name]]


def onnx_action(existing: dict | None, wanted: dict) -> tuple[str, list[str]]:
    """("reuse", []) when an existing ONNX manifest matches `wanted` (precision, opset, weights), else
    ("export", reasons)."""
    if existing is None:
        return "export", ["no export yet"]
    reasons = changed_fields(existing, wanted, ONNX_KEY_FIELDS)
    return ("export", reasons) if reasons else ("reuse", [])


def engine_action(existing: dict | None, wanted: dict) -> tuple[str, list[str]]:
    """Decide what to do with an engine: "reuse" (same cache key), "refit" (only the weights changed and both the
    existing engine and the request are refittable) or "build"; with the reasons."""
    if existing is None:
        return "build", ["no engine yet"]
    if existing.get("cache_key") == engine_cache_key(wanted):
        return "reuse", []
    reasons = changed_fields(existing, wanted, ENGINE_KEY_FIELDS)
    only_weights = [name for name in ENGINE_KEY_FIELDS if existing.get(name) != wanted[name]] == ["weights_sha256"]
    if only_weights and existing.get("refittable") and wanted["refittable"]:
        return "refit", reasons
    return "build", reasons or ["cache key differs"]


def stale_reasons(manifest: dict, current: dict) -> list[str]:
    """Why an engine cannot be used in the current environment (TensorRT version, GPU, compute capability,
    weights); empty when it can."""
    return changed_fields(manifest, current, RUNTIME_FIELDS)


def read_manifest(path: str | Path) -> dict | None:
    """The manifest at `path`, or None when there is none."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable export manifest ({err}); delete it and export again") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: not a dbfast export manifest of format {MANIFEST_FORMAT}; export again")
    return data


def write_manifest(path: str | Path, data: dict) -> None:
    """Write `data` (plus the format number) as JSON to `path`, atomically."""
    atomic_write_json(path, {"format": MANIFEST_FORMAT, **data})
