"""Timing and recording helpers shared by the benchmark suites.

Rules every suite follows: warm-up excluded; the implementations being compared are measured alternating in one
run; medians with min-max and quartiles over the timed calls; each result row names the device, dtype, shape,
versions, commit and date, and is appended to a CSV under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth_fast.fileio import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Timed:
    """One thing to time: `body` is timed; `setup`, when given, runs untimed before every call of `body`."""

    body: Callable[[], object]
    setup: Callable[[], object] | None = None


@dataclass(frozen=True)
class Stats:
    """Seconds per call over every timed call (`rounds` alternating rounds of `samples / rounds` calls)."""

    median: float
    minimum: float
    maximum: float
    q1: float
    q3: float
    samples: int
    rounds: int


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_threads_option(parser: argparse.ArgumentParser, help: str = "torch CPU threads (default: torch's)") -> None:
    parser.add_argument("--threads", type=int, default=None, help=help)


def set_threads(parser: argparse.ArgumentParser, threads: int | None) -> None:
    """Checks --threads and gives torch that many CPU threads (None: torch's default). On a shared machine use 1:
    torch's OpenMP workers spin against each other and the other jobs (README, Performance)."""
    if threads is None:
        return
    if threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(threads)


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def environment(device: str) -> dict[str, str | int]:
    """The columns every result row starts with."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "device": device,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
    }


def _time_calls(timed: Timed, device: str, calls: int) -> list[float]:
    """Seconds of each of `calls` calls of timed.body, timed one by one (CUDA events on a GPU) so that a stall of
    the process (a busy shared machine) spoils one sample, not a whole round."""
    if device.startswith("cuda"):
        events = []
        for _ in range(calls):
            if timed.setup is not None:
                timed.setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            timed.body()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(calls):
        if timed.setup is not None:
            timed.setup()
        t0 = time.perf_counter()
        timed.body()
        times.append(time.perf_counter() - t0)
    return times


def measure(
    candidates: dict[str, Timed], device: str, *, rounds: int, warmup: int = 3, min_round_s: float = 0.02
) -> dict[str, Stats]:
    """Times every candidate in one run, alternating between them round by round (the order flips every round
    so neither always runs first). Warm-up calls are not timed; a round makes enough calls of each candidate to
    last about `min_round_s`. Statistics are over all timed calls."""
    calls = {}
    for name, timed in candidates.items():
        _time_calls(timed, device, warmup)
        once = statistics.median(_time_calls(timed, device, 3))
        calls[name] = max(1, min(1000, math.ceil(min_round_s / max(once, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name] += _time_calls(candidates[name], device, calls[name])
    return {name: _stats(samples[name], rounds) for name in names}


def _stats(samples: list[float], rounds: int) -> Stats:
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return Stats(statistics.median(samples), min(samples), max(samples), q1, q3, len(samples), rounds)


def copy_bandwidth(device: str, nbytes: int, *, rounds: int = 5) -> float:
    """Measured bytes per second of `dst.copy_(src)` on a `nbytes` tensor (read once, write once: 2 * nbytes
    moved): the memory-bound ceiling the kernels are compared with."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    stats = measure({"copy": Timed(lambda: dst.copy_(src))}, device, rounds=rounds, warmup=1, min_round_s=0.0)
    return 2 * src.numel() * 4 / stats["copy"].median


def append_rows(path: Path, rows: list[dict]) -> None:
    """Appends rows to the CSV at `path` (created with a header if missing; columns are the union of the old
    header and the new rows'), rewriting it atomically so an interrupted run never leaves it half written."""
    path = Path(path)
    old_rows: list[dict] = []
    fields: list[str] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            old_rows = list(reader)
    for row in rows:
        fields += [key for key in row if key not in fields]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(old_rows + rows)

    atomic_write(path, write)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).rjust(w) for cell, w in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- helpers of the whole-step suites (train, prior, generate) -------------------------------------------------


def run_info(device: str) -> dict[str, str | int]:
    """environment() plus the versions of the other libraries the whole-step suites run (diffusers,
    onnxruntime: "absent" when not installed)."""
    import diffusers

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "absent"
    return {**environment(device), "diffusers": diffusers.__version__, "onnxruntime": ort_version}


def load_average() -> dict[str, float]:
    """The machine's load averages now (a shared machine: a figure taken under load says so)."""
    one, five, fifteen = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2)}


def measure_paired(
    candidates: dict[str, Timed], device: str, *, rounds: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds of one call of each candidate per round, alternating (the order flips every round), after
    `warmup` untimed calls of each. For work of tens of milliseconds or more (a training step, a sampling loop):
    the i-th samples of two candidates ran side by side, so their ratio has a spread round by round
    (`ratio_spread`). Returns the per-round samples of every candidate."""
    for timed in candidates.values():
        _time_calls(timed, device, warmup)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name] += _time_calls(candidates[name], device, 1)
    return samples


def summarize(samples: list[float], rounds: int) -> Stats:
    """Stats of a list of seconds (median, min-max, quartiles)."""
    return _stats(samples, rounds)


def ratio_spread(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the round-by-round ratios numerator[i] / denominator[i] (paired samples)."""
    ratios = [n / d for n, d in zip(numerator, denominator)]
    return statistics.median(ratios), min(ratios), max(ratios)
