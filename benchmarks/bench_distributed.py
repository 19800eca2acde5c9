"""Scale-out benchmarks: the same work over several processes (torchrun) against one process.

measure_class_images: the class-image phase of `dbfast train` (the embedded default model, "a heart", class guidance
2, N images drawn B per batch; --steps 1) in one process and under torchrun with 2 processes, which split the
batches between them (prior.py's per-batch claims), each run from an empty class-image cache, alternating, 1 torch
thread per process. Timed: the "class_images" phase the run records in dreambooth.json (under torchrun from the
first rank's start of the phase to the last rank's end); images/s = N / that; speed-up per round, median (min-max).
Also the CPU seconds of the phase per rank (dreambooth.json "class_images_cpu_s"): on free cores, one per process,
the phase would take its busiest rank's CPU time, so cpu_speedup = one process's CPU seconds / the busiest rank's
is the speed-up 2 free cores give (duplicated work and waiting for a claim included), measurable on a loaded machine.

measure_subjects: 2 subjects trained by `dbfast train --subjects` in one process (one after the other) and under
torchrun with 2 processes (a queue: one subject per rank), each command a process tree of its own, alternating, the
order flipping every round, 1 torch thread per process (OMP_NUM_THREADS=1). Both subjects are the embedded default
model's base stage (`--stages base`) on examples/subject, class "heart", seed 0, the same options, each into an
output of its own. Their class images are drawn before the timed runs by an untimed run into a cache every run
reads, so the runs time process start, model load, training and writing, not class images. Per run: wall time
from the command's start to its exit; subjects/hour = 2 * 3600 / wall; speed-up = sequential wall / torchrun wall
per round, median (min-max). The 1-minute load average is read before every run: 2 processes need 2 free cores.

    python -m benchmarks --suite distributed [--quick] [--smoke]
    python -m benchmarks.bench_distributed [--rounds N] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.bench_job import CLASS_NOUN, PHOTOS, ROOT, run_process
from benchmarks.common import RESULTS_DIR, append_rows, format_table, load_average, ratio_spread, run_info
from benchmarks.render import distributed_rate
from dreambooth_fast.toy.default_model import DEFAULT_MODEL

SUBJECTS = 2
IMPLS = ("sequential", "torchrun")
SIZES = {"full": (300, 20, 3), "quick": (100, 20, 2), "smoke": (2, 2, 1)}  # steps, class images, rounds
MEASUREMENTS = ("class_images", "subjects")
CLASS_IMAGE_SIZES = {"full": (64, 4, 3), "quick": (32, 4, 2), "smoke": (2, 1, 1)}  # images, per batch, rounds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_subjects(folder: Path, steps: int, class_images: int, device: str, count: int = SUBJECTS) -> Path:
    """A subjects file of `count` subjects of the same photos and options, outputs in folder/runs/."""
    folder.mkdir(parents=True)
    path = folder / "subjects.toml"
    path.write_text(f'model = "{DEFAULT_MODEL}"\nstages = "base"\nsteps = {steps}\nnum-class-images = {class_images}\n'
                    f'seed = 0\ndevice = "{device}"\n'
                    + "".join(f'\n[[subject]]\nimages = "{PHOTOS}"\nclass = "{CLASS_NOUN}"\noutput = "runs/{i}"\n'
                              for i in range(count)))
    return path


def subjects_command(impl: str, path: Path) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(SUBJECTS), "--master_port", str(free_port())]
    return [sys.executable, *(launcher if impl == "torchrun" else []), "-m", "dreambooth_fast", "train",
            "--subjects", str(path)]


def measure_subjects(device: str, *, steps: int, class_images: int, rounds: int, tmp: Path,
                     threads: int = 1) -> list[dict]:
    """One row per implementation (sequential, torchrun) with wall seconds, subjects/hour and, for torchrun, the
    speed-up over sequential; see the module's docstring."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "XDG_CACHE_HOME": str(tmp / "cache")}
    warm = tmp / "warm-up"
    run_process(subjects_command("sequential", write_subjects(warm, 1, class_images, device, count=1)), env,
                tmp / "warm-up.log")  # draws the class images (untimed)
    start_load = load_average()

    def timed(impl: str, r: int) -> float:
        work = tmp / f"{impl}-{r}"
        return run_process(subjects_command(impl, write_subjects(work, steps, class_images, device)), env,
                           work / "run.log")[0]

    walls, loads = alternating("subjects", rounds, timed)
    return speedup_rows("subjects", walls, loads, start_load, threads, lambda impl, median: {
        "subjects": SUBJECTS, "model": "default model", "stage": "base", "steps": steps,
        "class_images": f"{class_images} (cached before the timed runs)",
        "subjects_per_hour": round(SUBJECTS * 3600 / median, 1)})


def alternating(what: str, rounds: int, timed: Callable[[str, int], float]) -> tuple[dict[str, list[float]],
                                                                                    list[float]]:
    """Seconds of `timed(impl, round)` for each implementation, alternating, the order flipping every round, and
    the 1-minute load average before each run."""
    seconds: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    loads: list[float] = []
    for r in range(rounds):
        for impl in IMPLS if r % 2 == 0 else reversed(IMPLS):
            loads.append(load_average()["load_1m"])
            seconds[impl].append(timed(impl, r))
            print(f"  {what} round {r + 1}/{rounds} {impl}: {seconds[impl][-1]:.1f} s (load before {loads[-1]:.2f})",
                  flush=True)
    return seconds, loads


def speedup_rows(what: str, seconds: dict[str, list[float]], loads: list[float], start_load: dict, threads: int,
                 columns: Callable[[str, float], dict]) -> list[dict]:
    """One row per implementation: seconds (median, min-max), `columns(impl, median)` and, for torchrun, the
    speed-up over one process per round, median (min-max)."""
    end_load = load_average()
    speedup = ratio_spread(seconds["sequential"], seconds["torchrun"])
    rows = []
    for impl in IMPLS:
        median = statistics.median(seconds[impl])
        rows.append({
            "what": what, "impl": impl, "processes": SUBJECTS if impl == "torchrun" else 1, **columns(impl, median),
            "threads": threads, "median_s": round(median, 2), "min_s": round(min(seconds[impl]), 2),
            "max_s": round(max(seconds[impl]), 2),
            "speedup": round(speedup[0], 3) if impl == "torchrun" else "",
            "speedup_min": round(speedup[1], 3) if impl == "torchrun" else "",
            "speedup_max": round(speedup[2], 3) if impl == "torchrun" else "",
            "rounds": len(seconds[impl]), "load_1m": start_load["load_1m"], "load_1m_end": end_load["load_1m"],
            "load_1m_runs": f"{min(loads):.2f}-{max(loads):.2f}",
        })
    return rows


def class_images_command(impl: str, out: Path, images: int, batch: int, device: str) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(SUBJECTS), "--master_port", str(free_port())]
    return [sys.executable, *(launcher if impl == "torchrun" else []), "-m", "dreambooth_fast", "train",
            "--model", str(DEFAULT_MODEL), "--images", str(PHOTOS), "--class", CLASS_NOUN, "--output", str(out),
            "--stages", "base", "--steps", "1", "--num-class-images", str(images), "--class-batch-size", str(batch),
            "--class-guidance-scale", "2", "--seed", "0", "--device", device]


def measure_class_images(device: str, *, images: int, batch: int, rounds: int, tmp: Path,
                         threads: int = 1) -> list[dict]:
    """One row per implementation (one process, torchrun) with the class-image phase's seconds, images/s and, for
    torchrun, the speed-up; see the module's docstring."""
    start_load = load_average()

    def timed(impl: str, r: int) -> float:
        work = tmp / f"{impl}-{r}"
        work.mkdir(parents=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads), "XDG_CACHE_HOME": str(work / "cache")}
        run_process(class_images_command(impl, work / "out", images, batch, device), env, work / "run.log")
        run = json.loads((work / "out" / "dreambooth.json").read_text())
        print(f"  class images drawn per rank: {run['class_images_drawn']}, CPU s {run['class_images_cpu_s']}",
              flush=True)
        busiest[impl].append(max(run["class_images_cpu_s"]))
        return run["timings"]["class_images"]

    busiest: dict[str, list[float]] = {impl: [] for impl in IMPLS}  # the busiest rank's CPU seconds, per round
    seconds, loads = alternating("class images", rounds, timed)
    cpu_speedup = ratio_spread(busiest["sequential"], busiest["torchrun"])
    return speedup_rows("class_images", seconds, loads, start_load, threads, lambda impl, median: {
        "images": images, "batch": batch, "model": "default model", "stage": "base",
        "images_per_s": round(images / median, 3), "busiest_cpu_s": round(statistics.median(busiest[impl]), 2),
        # On free cores (one each) the phase takes its busiest rank's CPU time: one process's CPU seconds over
        # that is the speed-up those cores would give, whatever share of a loaded machine the runs got.
        "cpu_speedup": round(cpu_speedup[0], 3) if impl == "torchrun" else "",
        "cpu_speedup_min": round(cpu_speedup[1], 3) if impl == "torchrun" else "",
        "cpu_speedup_max": round(cpu_speedup[2], 3) if impl == "torchrun" else ""})


def run(device: str, *, quick: bool = False, smoke: bool = False, out: Path = RESULTS_DIR / "distributed.csv",
        model_dir: Path | None = None, command: str = "", rounds: int | None = None,
        steps: int | None = None, measurements: tuple[str, ...] = MEASUREMENTS) -> list[dict]:
    """The suite: the `measurements` (class_images, subjects), rows appended to `out`. `model_dir` is not used:
    both run the embedded default model."""
    size_steps, class_images, size_rounds = SIZES["smoke" if smoke else "quick" if quick else "full"]
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < SUBJECTS:
            print(f"  distributed: skipped, {SUBJECTS} CUDA devices needed", flush=True)
            return []
    info = {**run_info(device), "suite": "distributed", "command": command}
    images, batch, image_rounds = CLASS_IMAGE_SIZES["smoke" if smoke else "quick" if quick else "full"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "class_images" in measurements:
            rows += measure_class_images(device, images=images, batch=batch, rounds=rounds or image_rounds,
                                         tmp=Path(tmp) / "class-images")
        if "subjects" in measurements:
                rows += measure_subjects(device, steps=steps or size_steps, class_images=class_images,
                                     rounds=rounds or size_rounds, tmp=Path(tmp) / "subjects")
    rows = [{**info, **row} for row in rows]  # the processes' thread count, not this one's
    append_rows(out, rows)
    print(format_table(["what", "impl", "processes", "median s", "min-max s", "rate", "speed-up"],
                       [[r["what"], r["impl"], r["processes"], r["median_s"], f"{r['min_s']}-{r['max_s']}",
                         distributed_rate(r), f"{r['speedup']} ({r['speedup_min']}-{r['speedup_max']})"
                         if r["speedup"] != "" else "-"] for r in rows]))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_distributed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="alternating rounds (default: 3, --quick 2)")
    parser.add_argument("--steps", type=int, help="training steps per subject (default: 300, --quick 100)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=MEASUREMENTS, help="one measurement (default: both)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "distributed.csv")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    run(args.device, quick=args.quick, out=args.out, command=shlex.join(["python", "-m", "benchmarks.bench_distributed",
                                                                        *argv]), rounds=args.rounds, steps=args.steps,
        measurements=(args.only,) if args.only else MEASUREMENTS)
    print(f"{time.perf_counter() - started:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
