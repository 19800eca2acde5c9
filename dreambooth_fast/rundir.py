"""The run directory: what `dbfast train` writes beside the model layout, and the checks before it writes.

A run directory is a cascade in IF's layout plus `dreambooth.json` (the run file: identifier, prompts,
options), `checkpoints/`, `validation/` and `logs/` (metrics.py, plots.py). This module names those files,
reads the run file for every command that needs it, refuses outputs that would destroy an input or another run,
and holds the lock that keeps two runs out of one output directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .config import TrainConfig
from .errors import UserError
from .fileio import existing_ancestor, file_lock, free_bytes, human_bytes, is_disk_full, lock_holder

RUN_FILE = "dreambooth.json"
CHECKPOINTS = "checkpoints"
VALIDATION = "validation"
LOGS = "logs"  # metrics.csv, TensorBoard event files, the loss plot
LOCK_FILE = ".dbfast.lock"  # held by the run writing the directory; not part of the run
# What a run adds beside the model layout; not copied when a tuned model is the input of another run.
RUN_ARTIFACTS = (RUN_FILE, CHECKPOINTS, VALIDATION, LOGS, LOCK_FILE)
# Options that may change between a run and its --resume (they do not change what is learnt).
RESUMABLE_CHANGES = {
    "steps", "sr_steps", "checkpoint_every", "validation_prompt", "validation_every", "device", "report_to",
    "class_batch_size", "class_backend", "class_export_dir", "dist_timeout",
}


def read_run(model_dir: str | Path) -> dict | None:
    """The run file of a dbfast output, or None where `model_dir` is not one."""
    path = Path(model_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); restore it from a backup") from None


def run_identifier(model_dir: str | Path) -> str | None:
    """The identifier a dbfast run in `model_dir` was trained with (None if it is not a dbfast output)."""
    run = read_run(model_dir)
    return run["identifier"] if run else None


def check_output_dir(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a directory that holds something else; --overwrite replaces only a dbfast run."""
    if not output.exists():
        if resume:
            raise UserError(f"--resume: {output} does not exist; start a new run without --resume")
        return
    if not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a directory")
    is_run = (output / RUN_FILE).is_file()
    if resume:
        if not is_run:
            raise UserError(f"--resume: {output} holds no dbfast run to resume")
        return
    if any(p.name != LOCK_FILE for p in output.iterdir()):
        if not is_run:
            raise UserError(f"--output {output} is not empty and holds no dbfast run; choose another directory")
        if not overwrite:
            raise UserError(
                f"--output {output} already holds a run: pass --resume to continue it or --overwrite to replace it"
            )


def check_resume_config(cfg: TrainConfig, saved: dict) -> None:
    now, defaults = cfg.to_dict(), TrainConfig().to_dict()
    # --stages base,sr is what the default (None: every stage the model has) was written as before it had its own
    # value; a model either has both stages (the two mean the same) or base,sr was refused before this check.
    now["stages"], saved = _default_stages(now["stages"]), {**saved, "stages": _default_stages(saved.get("stages"))}
    # An option added to dbfast since the run was saved is not in its config: the run used its default.
    differ = sorted(k for k in now if k not in RESUMABLE_CHANGES and now[k] != saved.get(k, defaults[k]))
    if differ:
        raise UserError(
            f"--resume with different options than the run ({', '.join(differ)}): use the same options "
            "or start a new run"
        )


def _default_stages(stages: list[str] | None) -> list[str] | None:
    return None if stages == ["base", "sr"] else stages


def check_not_finished(latest: dict | None, out: Path, stages: list[str]) -> None:
    """--resume continues an interrupted run; a finished one has nothing left (a larger --steps does not
    extend it: its optimizer and schedule ended), so say how to train further instead of doing nothing."""
    if latest and set(stages) <= set(latest["completed_stages"]):
        raise UserError(
            f"--resume: {out} is finished (stages {', '.join(stages)} done): to train it further, start a new "
            f"run from it with --model {out} --output NEW_DIR"
        )


def overlaps(a: Path, b: Path) -> bool:
    """True when one of the two directories is the other or lies inside it (after resolving links)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_output_not_input(output: Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an --output that is an input directory, inside one, or holds one: --overwrite would delete the
    input, and copying a model into itself never ends. `inputs` maps an option name to its directory."""
    for option, folder in inputs.items():
        if folder is not None and Path(folder).exists() and overlaps(output, Path(folder)):
            raise UserError(
                f"--output {output} overlaps {option} {folder}: a run never writes into or around its inputs; "
                "choose a new --output (to train a finished run further, pass it as --model)"
            )


def check_can_create(folder: Path, option: str) -> None:
    """Check, without leaving anything behind, that `folder` exists as a writable directory or can be made:
    a read-only or virtual file system fails here with one line instead of a traceback mid-run."""
    existing = existing_ancestor(folder)
    if not existing.is_dir():
        raise UserError(f"{option} {folder}: {existing} is a file, so the directory cannot be created there")
    probe = existing / f".dbfast-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise UserError(
            f"{option} {folder} cannot be written ({err.strerror} in {existing}); choose a writable place"
        ) from None


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold the output directory for one run: a second run into it is refused at once. The lock is an flock on
    OUTPUT/.dbfast.lock (released by the OS when the process ends, kill -9 too). A run that stops before its
    run file exists (refused, or failed loading) takes its lock file away again, and the directory too if it
    made it: a directory that is not a run is left as it was."""
    made = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    lock = output / LOCK_FILE
    had_lock = lock.exists()
    with file_lock(lock, wait=False) as held:
        if not held:
            raise UserError(
                f"--output {output} is in use by another dbfast run (pid {lock_holder(lock)}): wait for it to "
                "finish or choose another --output"
            )
        try:
            yield
        finally:
            if not had_lock and not (output / RUN_FILE).exists():
                lock.unlink()
                if made and not any(output.iterdir()):
                    output.rmdir()


def clear_run(output: Path) -> None:
    """--overwrite: remove the previous run's files, keeping the lock this run holds."""
    for item in output.iterdir():
        if item.name == LOCK_FILE:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


def check_free_space(folder: Path, need: int, what: str) -> str | None:
    """A warning when `folder`'s file system has less free space than `need` bytes (None when it fits)."""
    free = free_bytes(folder)
    if free >= need:
        return None
    return (f"{what} needs about {human_bytes(need)} but {folder} has {human_bytes(free)} free: "
            "the run will stop when the disk is full (the last checkpoint survives)")


@contextlib.contextmanager
def stop_on_full_disk(what: str, folder: Path, need: int, last_good: str | None) -> Iterator[None]:
    """Turn a write inside the block that runs out of space into one line (which write, about how much it needs,
    what is free, the last good checkpoint); any other error passes through as it is."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        keep = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
        raise UserError(
            f"writing {what} failed: the disk is full (it needs about {human_bytes(need)}, {folder} has "
            f"{human_bytes(free_bytes(folder))} free); {keep}: free space, then continue with --resume"
        ) from None
