"""Training checkpoints: everything needed to continue a stage bit for bit (trainable weights, optimizer,
lr schedule, loss scaler, the training RNG, the step), written atomically; `latest.json` points at the
newest one and records which stages are finished. Read back with safetensors and weights_only loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .fileio import atomic_write_dir, atomic_write_json

LATEST = "latest.json"


def checkpoint_dir(root: Path, stage: str, step: int) -> Path:
    """Where the checkpoint of `stage` at `step` lives."""
    return root / f"{stage}-{step:06d}"


def save_checkpoint(
    root: Path, stage: str, step: int, weights: dict[str, torch.Tensor], state: dict, completed_stages: list[str]
) -> Path:
    """Write checkpoint `root/<stage>-<step>/` (weights.safetensors + state.pt), point latest.json at it,
    then delete the older checkpoints of that stage."""
    name = checkpoint_dir(root, stage, step).name

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        torch.save(state, tmp / "state.pt")

    path = atomic_write_dir(root / name, write)
    atomic_write_json(root / LATEST, {"stage": stage, "step": step, "dir": name, "completed_stages": completed_stages})
    for old in root.glob(f"{stage}-*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old)
    return path


def mark_stage_done(root: Path, completed_stages: list[str]) -> None:
    """Record finished stages and drop their checkpoints (their weights are in the output by now)."""
    atomic_write_json(root / LATEST, {"stage": None, "step": 0, "dir": None, "completed_stages": completed_stages})
    for stage in completed_stages:
        for old in root.glob(f"{stage}-*"):
            shutil.rmtree(old, ignore_errors=True)


def read_latest(root: Path) -> dict | None:
    path = root / LATEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is corrupt: remove it to restart the current stage, or use --overwrite") from None


def load_checkpoint(root: Path, latest: dict) -> tuple[dict[str, torch.Tensor], dict]:
    folder = root / latest["dir"]
    try:
        weights = load_file(str(folder / "weights.safetensors"))
        state = torch.load(folder / "state.pt", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise UserError(f"cannot read checkpoint {folder}: {err}; remove it to restart that stage") from None
    return weights, state
