"""Many subjects in one command: `dbfast train --subjects subjects.toml`, a queue over the processes it is given.

The subjects file: its top-level keys are training options shared by every subject (the long option names, as in
`--config`); each `[[subject]]` table is one subject, with its `images`, `class` and `output` and any option it
overrides, plus an optional `name` for the summary. Options given on the command line are defaults under the
file's. Relative paths in the file are relative to the file's folder. The whole file is checked before anything
runs (a mistake is one `error:` line, exit code 2).

The queue: one process trains the subjects one after the other. Under torchrun (WORLD_SIZE > 1) every rank takes
the next subject from a counter in the process group's store, one at a time, so a rank whose subject failed at once
or finished early takes the next. Each subject is an ordinary single-process run (`train.train`) on the rank's own
device. Subjects of one class share its class images through the cache (prior.py: ranks that need them at the same
time share the drawing batch by batch, and no image is drawn twice).

A subject that fails is recorded with its one-line error and the queue goes on; Ctrl-C stops the queue. At the end
rank 0 gathers every rank's results, prints one table and writes it as JSON (`--summary`); every rank exits with
the same code: 0 when every subject is done, 3 when some failed (the table says which).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import itertools
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch
import torch.distributed as dist

from . import distributed
from .checkpoint import read_latest
from .config import TrainConfig, options_from_toml, read_toml
from .errors import Interrupted, UserError
from .fileio import atomic_write_json
from .models import resolve_device
from .rundir import CHECKPOINTS, check_can_create, check_resume_config, overlaps, read_run
from .toy.default_model import default_model_dir
from .train import train

PARTIAL_FAILURE = 3  # the exit code when some subjects failed (2: a user mistake, nothing ran)
# The ranks meet only to share out subjects (the store, no timeout) and at the end: a rank that is done waits there
# for the others' last subjects, which may take hours.
QUEUE_TIMEOUT_S = 7 * 24 * 3600
PATH_FIELDS = ("images", "model", "sr_model", "output", "class_images_dir", "class_export_dir")
INPUT_FIELDS = {"--images": "images", "--model": "model", "--sr-model": "sr_model",
                "--class-images-dir": "class_images_dir"}
OWN_FIELDS = ("images", "output")  # every subject's own: never shared
ERROR = "error: "


@dataclass
class Subject:
    index: int  # 1-based, the order in the file
    name: str
    output: str  # as written in the file (the table shows it)
    cfg: TrainConfig


@dataclass
class Result:
    index: int
    name: str
    class_noun: str
    output: str
    rank: int
    status: str  # "done", "done (already)" (--resume found it finished) or "failed"
    seconds: float
    final_loss: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # the one-line error of a failed subject
    traceback: str | None = None  # for an unexpected exception (not a UserError): in the JSON only


def default_summary_path(subjects_file: str | Path) -> Path:
    path = Path(subjects_file)
    return path.with_name(f"{path.stem}-summary.json")


def read_subjects(path: str | Path, defaults: dict) -> list[Subject]:
    """The subjects of `path`, each a checked TrainConfig: `defaults` (TrainConfig fields: the command line's
    options) under the file's top-level options under the subject's own. Any mistake: UserError."""
    path = Path(path)
    where = f"--subjects {path}"
    misplaced = [f"--{key}" for key in OWN_FIELDS if defaults.get(key)]
    if misplaced:
        raise UserError(f"{' and '.join(misplaced)} with --subjects: every subject's own goes in its [[subject]] "
                        f"table of {path}")
    data = read_toml(path, "--subjects")
    tables = data.pop("subject", None)
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UserError(f"{where} holds no subjects: add a [[subject]] table (images, class, output) per subject")
    misplaced = [key for key in OWN_FIELDS if key in data]
    if misplaced:
        raise UserError(f"{where}: {' and '.join(misplaced)} at the top: every subject's own goes in its "
                        "[[subject]] table")
    folder = path.resolve().parent
    shared = _resolve_paths(options_from_toml(data, where), folder)
    subjects = []
    for index, table in enumerate(tables, 1):
        table = dict(table)
        name = table.pop("name", None)
        here = f"{where}, subject {index}" + (f" ({name})" if isinstance(name, str) else "")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise UserError(f"{here}: name must be a non-empty string, got {name!r}")
        own = options_from_toml(table, here)
        values = {**defaults, **shared, **_resolve_paths(own, folder)}
        missing = [key for key in ("images", "class_noun", "output") if not values.get(key)]
        if missing:
            names = ", ".join("class" if key == "class_noun" else key for key in missing)
            raise UserError(f"{here} has no {names}: every subject needs images, class and output")
        try:
            cfg = TrainConfig(**values).validate()
            if cfg.fsdp:
                raise UserError("--fsdp shards one run over the processes, and with --subjects each subject is a "
                                "run of one process: drop fsdp")
        except UserError as err:
            raise UserError(f"{here}: {err}") from None
        output = str(own["output"])
        subjects.append(Subject(index, name or Path(output).name, output, cfg))
    _check_outputs(subjects, where)
    return subjects


def _resolve_paths(values: dict, folder: Path) -> dict:
    """A relative path in the subjects file is relative to the file's folder (absolute: the same from any cwd)."""
    return {key: str(folder / value) if key in PATH_FIELDS and isinstance(value, str) and value else value
            for key, value in values.items()}


def _check_outputs(subjects: list[Subject], where: str) -> None:
    """No two subjects write to one output (or one inside the other), and no output is or holds an input of any
    subject (its --overwrite would delete it)."""
    for a in subjects:
        out = Path(a.cfg.output)
        for b in subjects:
            if b.index > a.index and overlaps(out, Path(b.cfg.output)):
                raise UserError(f"{where}: subjects {a.index} and {b.index} write to the same output "
                                f"({a.output}, {b.output}): give each subject its own")
            for option, name in INPUT_FIELDS.items():
                folder = getattr(b.cfg, name)
                if folder and overlaps(out, Path(folder)):
                    whose = "its own" if a is b else f"subject {b.index}'s"
                    raise UserError(f"{where}: subject {a.index}'s output {a.output} overlaps {whose} {option} "
                                    f"{folder}: a run never writes into or around an input; choose another output")


def finished(out: Path) -> dict | None:
    """The run file of a finished run in `out` (every stage it trains done), else None."""
    run = read_run(out)
    if not run or not run.get("stages"):
        return None
    latest = read_latest(out / CHECKPOINTS)
    return run if latest and set(run["stages"]) <= set(latest["completed_stages"]) else None


def run_subject(subject: Subject, rank: int, *, resume: bool, overwrite: bool,
                echo: Callable[[str], object]) -> Result:
    """Train one subject in this process; its failure is its result (Ctrl-C is not: it stops the queue)."""
    cfg = dataclasses.replace(subject.cfg)
    result = Result(subject.index, subject.name, cfg.class_noun, subject.output, rank, "failed", 0.0)
    start = time.perf_counter()
    try:
        cfg.device = str(distributed.process_device(resolve_device(cfg.device)))
        out = Path(cfg.output)
        done = finished(out) if resume else None
        if done:
            cfg.model = cfg.model or str(default_model_dir())
            check_resume_config(cfg, done["config"])  # a finished run of other options is not this subject
            result.status, result.final_loss = "done (already)", done.get("final_loss", {})
        else:
            echo(f"subject {subject.index} ({subject.name}): training on {cfg.device}")
            train(cfg, resume=resume and read_run(out) is not None, overwrite=overwrite)
            result.status, result.final_loss = "done", read_run(out).get("final_loss", {})
    except (Interrupted, KeyboardInterrupt):
        raise
    except UserError as err:
        result.error = str(err)
    except Exception as err:  # anything else fails this subject alone; its traceback goes to the JSON
        result.error = f"{type(err).__name__}: {err}"
        result.traceback = traceback.format_exc()
    result.seconds = round(time.perf_counter() - start, 1)
    if result.error:
        result.error = (result.error.strip().splitlines() or ["(no message)"])[0]
        echo(f"{ERROR}subject {subject.index} ({subject.name}): {result.error}")
    else:
        echo(f"subject {subject.index} ({subject.name}): {result.status} in {result.seconds:.1f} s")
    gc.collect()  # the next subject starts with this one's model freed (a failed one's frames included)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def run_queue(subjects: list[Subject], rank: int, next_index: Callable[[], int], *, resume: bool, overwrite: bool,
              echo: Callable[[str], object]) -> list[Result]:
    """Take subjects by `next_index` (shared by all ranks) until none is left; this rank's results."""
    results = []
    while (i := next_index()) < len(subjects):
        results.append(run_subject(subjects[i], rank, resume=resume, overwrite=overwrite, echo=echo))
    return results


def format_summary(results: list[Result]) -> str:
    """The table of every subject: what ran where, how it ended, its final losses or its error."""
    header = ["#", "subject", "class", "output", "rank", "status", "seconds", "final loss / error"]
    rows = [[str(r.index), r.name, r.class_noun, r.output, str(r.rank), r.status, f"{r.seconds:.1f}",
             r.error or ", ".join(f"{stage} {loss:.4g}" for stage, loss in r.final_loss.items())]
            for r in results]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in [header, *rows]]
    failed = sum(r.status == "failed" for r in results)
    lines.append(f"{len(results) - failed} of {len(results)} subjects done" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)


class _RankPrefix(io.TextIOBase):
    """A text stream that writes every whole line to `stream` as '[rank N] line'. Of a line that a progress bar
    redrew with carriage returns only its last state is kept: several ranks' bars would garble one terminal, so
    under torchrun each bar shows once, as it ends."""

    def __init__(self, stream, rank: int) -> None:
        self.stream, self.prefix, self.pending = stream, f"[rank {rank}] ", ""

    @property
    def encoding(self) -> str:
        return self.stream.encoding

    @property
    def errors(self) -> str | None:
        return self.stream.errors

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1]
            if line.startswith(ERROR):  # error lines still start with 'error: ', as the CLI's own
                self.stream.write(ERROR + self.prefix + line[len(ERROR):] + "\n")
            elif line.strip():
                self.stream.write(self.prefix + line + "\n")
        if lines:
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def _prefixed_output(rank: int) -> Iterator[None]:
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _RankPrefix(stdout, rank), _RankPrefix(stderr, rank)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def train_subjects(subjects_file: str | Path, defaults: dict, *, resume: bool = False, overwrite: bool = False,
                   summary: str | Path | None = None) -> int:
    """`dbfast train --subjects FILE`: check the file, run the queue (over the ranks torchrun started, else in this
    process), print the summary on rank 0 and write it as JSON; return the exit code (0, or 3: some failed)."""
    summary = Path(summary) if summary else default_summary_path(subjects_file)
    try:
        if resume and overwrite:
            raise UserError("--resume or --overwrite, not both: --resume continues each subject's run, "
                            "--overwrite starts each one again")
        subjects = read_subjects(subjects_file, defaults)
        check_can_create(summary.parent, "--summary")
    except UserError as err:
        raise distributed.reported_once(err) from None  # every rank read the same file: rank 0 says what is wrong
    # The ranks only share out subjects and results: gloo (CPU) whatever the devices train on.
    group = distributed.init_from_env(torch.device("cpu"), timeout_s=QUEUE_TIMEOUT_S)
    if group.is_distributed:
        store = dist.PrefixStore("dbfast-subjects/", dist.distributed_c10d._get_default_store())
        next_index = lambda: store.add("next", 1) - 1  # noqa: E731
    else:
        next_index = itertools.count().__next__
    echo = lambda line: click.echo(line, err=line.startswith(ERROR))  # noqa: E731
    with _prefixed_output(group.rank) if group.is_distributed else contextlib.nullcontext():
        if group.is_main:
            echo(f"{len(subjects)} subjects, {group.world_size} at a time")
        results = run_queue(subjects, group.rank, next_index, resume=resume, overwrite=overwrite, echo=echo)
    results = sorted((r for part in distributed.gather(group, results) for r in part), key=lambda r: r.index)
    code = PARTIAL_FAILURE if any(r.status == "failed" for r in results) else 0
    if group.is_main:
        click.echo(format_summary(results))
        atomic_write_json(summary, {"subjects_file": str(subjects_file), "world_size": group.world_size,
                                    "exit_code": code, "subjects": [dataclasses.asdict(r) for r in results]})
        click.echo(f"summary: {summary}")
    # torchrun stops every rank once one exits with an error: none leaves before rank 0 has written the summary.
    distributed.barrier(group)
    distributed.shutdown()
    return code
