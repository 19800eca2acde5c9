"""The run's metrics, one row per optimizer step: OUTPUT/logs/metrics.csv, appended as training goes, and with
--report-to tensorboard the same values as TensorBoard scalars (OUTPUT/logs/tensorboard/, tags `<stage>/<column>`).

A resumed run continues the log from its checkpoint: the rows of finished stages and of the current stage up to
the checkpoint's step are kept, later rows (steps the resumed run trains again) are dropped, so every step has
exactly one row. The TensorBoard files are rebuilt from the kept rows for the same reason.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .fileio import atomic_write, atomic_write_dir

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class StepMetrics:
    stage: str
    step: int
    loss: float  # the loss of the update, averaged over gradient-accumulation micro-batches like the parts
    subject_loss: float
    prior_loss: float  # prior_weight included: subject_loss + prior_loss = loss
    lr: float  # the learning rate of this update
    grad_norm: float  # before clipping
    step_time_s: float  # wall clock of the whole optimizer step
    skipped_steps: int  # fp16 overflows so far in this stage


COLUMNS = tuple(f.name for f in dataclasses.fields(StepMetrics))
_TYPES = {f.name: {"str": str, "int": int, "float": float}[f.type] for f in dataclasses.fields(StepMetrics)}


def _parse(row: dict) -> StepMetrics | None:
    """A row of metrics.csv, or None for a line that is not one (a half-written last line after a crash)."""
    try:
        return StepMetrics(**{name: _TYPES[name](row[name]) for name in COLUMNS})
    except (KeyError, TypeError, ValueError):
        return None


def read_metrics(path: Path) -> list[StepMetrics]:
    """The rows of a metrics.csv in file order ([] when there is none)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [m for m in map(_parse, csv.DictReader(f)) if m is not None]


def _format(m: StepMetrics) -> list[str]:
    return [str(v) for v in dataclasses.astuple(m)]  # str(float) reads back as the same float


def _write_csv(path: Path, rows: list[StepMetrics]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(_format(m) for m in rows)

    atomic_write(path, write)


def _add_scalars(writer, m: StepMetrics) -> None:
    for name in COLUMNS[2:]:
        value = getattr(m, name)
        writer.add_scalar(f"{m.stage}/{name}", value, m.step)


def _tensorboard_writer(folder: Path):
    from torch.utils.tensorboard import SummaryWriter  # tensorboard: checked by TrainConfig.validate

    return SummaryWriter(log_dir=str(folder))


class MetricsLog:
    """Appends one row per step to metrics.csv (flushed at once: the file is whole up to the last finished step)
    and, with TensorBoard on, to the event files. Use as a context manager."""

    def __init__(self, logs: Path, report_to: str, keep: list[StepMetrics]):
        self.path = logs / METRICS_FILE
        _write_csv(self.path, keep)
        self.tensorboard = None
        if report_to == "tensorboard":
            folder = logs / TENSORBOARD_DIR

            def replay(tmp: Path) -> None:
                with _tensorboard_writer(tmp) as writer:
                    for m in keep:
                        _add_scalars(writer, m)

            atomic_write_dir(folder, replay)
            self.tensorboard = _tensorboard_writer(folder)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.writer(self.file)

    def write(self, m: StepMetrics) -> None:
        self.writer.writerow(_format(m))
        self.file.flush()
        if self.tensorboard is not None:
            _add_scalars(self.tensorboard, m)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_metrics_log(logs: Path, report_to: str, completed: list[str], stage: str, step: int) -> MetricsLog:
    """The metrics log of `stage` starting after `step` (0, or the step of the checkpoint it resumes from): the rows
    of the `completed` stages and of `stage` up to `step` are kept, any others dropped."""
    keep = [m for m in read_metrics(logs / METRICS_FILE)
            if m.stage in completed or (m.stage == stage and m.step <= step)]
    return MetricsLog(logs, report_to, keep)

