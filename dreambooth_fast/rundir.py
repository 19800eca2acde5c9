"""The run directory: what `dbfast train` writes beside the model layout, and the checks before it writes.

A run directory is a cascade in IF's layout plus `dreambooth.json` (the run file: identifier, prompts,
options), `checkpoints/` and `validation/`. This module names those files, reads the run file for every
command that needs it, refuses outputs that would destroy an input or another run, and holds the lock that
keeps two runs out of one output directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import TrainConfig
from .errors import UserError

RUN_FILE = "dreambooth.json"
CHECKPOINTS = "checkpoints"
VALIDATION = "validation"
# What a run adds beside the model layout; not copied when a tuned model is the input of another run.
RUN_ARTIFACTS = (RUN_FILE, CHECKPOINTS, VALIDATION)
# Options that may change between a run and its --resume (they do not change what is learnt).
RESUMABLE_CHANGES = {"steps", "sr_steps", "checkpoint_every", "validation_prompt", "validation_every", "device"}


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
    if any(output.iterdir()):
        if not is_run:
            raise UserError(f"--output {output} is not empty and holds no dbfast run; choose another directory")
        if not overwrite:
            raise UserError(
                f"--output {output} already holds a run: pass --resume to continue it or --overwrite to replace it"
            )


def check_resume_config(cfg: TrainConfig, saved: dict) -> None:
    now, defaults = cfg.to_dict(), TrainConfig().to_dict()
    # An option added to dbfast since the run was saved is not in its config: the run used its default.
    differ = sorted(k for k in now if k not in RESUMABLE_CHANGES and now[k] != saved.get(k, defaults[k]))
    if differ:
        raise UserError(
            f"--resume with different options than the run ({', '.join(differ)}): use the same options "
            "or start a new run"
        )


def check_not_finished(latest: dict | None, out: Path, stages: list[str]) -> None:
    """--resume continues an interrupted run; a finished one has nothing left (a larger --steps does not
    extend it: its optimizer and schedule ended), so say how to train further instead of doing nothing."""
    if latest and set(stages) <= set(latest["completed_stages"]):
        raise UserError(
            f"--resume: {out} is finished (stages {', '.join(stages)} done): to train it further, start a new "
            f"run from it with --model {out} --output NEW_DIR"
        )
