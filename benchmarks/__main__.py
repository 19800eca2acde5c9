"""python -m benchmarks: the benchmark suite against eager PyTorch, on whatever device is present.

    python -m benchmarks [--suite job|kernels|train|prior|generate|distributed|all] [--quick] [--device cpu|cuda]
                         [--out DIR]

Suites (one module each): job (bench_job: `dbfast train` end to end against a job run the way diffusers' DreamBooth
script runs it, cold and warm class-image cache; on Stable Diffusion with `python -m benchmarks.bench_job --family
sd`), kernels (bench_kernels: the fused ops alone), train (bench_train: the whole training step, IF and Stable
Diffusion), prior (bench_prior: class images per sampler, speed and judged quality, on the embedded toy model),
generate (bench_generate: UNet latency and end to end per backend), distributed (bench_distributed: many subjects
over 2 torchrun processes against one after the other). Each appends its rows to
DIR/<suite>.csv; every suite run is also logged to DIR/runs.csv (the command, the load average before and after,
versions). `python -m benchmarks.render` turns the latest results into BENCHMARKS.md and PNG plots. --quick: fewer
sizes and rounds (the job suite: class images / 5, steps / 10; the other suites in minutes on a 2-core CPU, the job
suite in about half an hour); --smoke: the tiniest sizes, one round (proves the suite runs; CI).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import bench_distributed, bench_generate, bench_job, bench_kernels, bench_prior, bench_train
from benchmarks.common import (
    RESULTS_DIR,
    add_threads_option,
    append_rows,
    default_device,
    load_average,
    run_info,
    set_threads,
)
from dreambooth_fast.toy.tiny_cascade import build_tiny_cascade

SUITES = ("job", "kernels", "train", "prior", "generate", "distributed")
MODULES = {"job": bench_job, "train": bench_train, "prior": bench_prior, "generate": bench_generate,
           "distributed": bench_distributed}
RUN_LOG = "runs.csv"


def run_suite(suite: str, device: str, *, quick: bool, smoke: bool, out_dir: Path, model_dir: Path | None,
              command: str) -> list[dict]:
    """Run one suite into out_dir/<suite>.csv and log the run to out_dir/runs.csv."""
    info, load_before, start = run_info(device), load_average(), time.perf_counter()
    out = out_dir / f"{suite}.csv"
    if suite == "kernels":
        rows = bench_kernels.run(device, quick=quick, smoke=smoke, out=out)
    elif suite == "prior":  # the embedded toy model, whose class images the toy world's judge can read
        rows = bench_prior.run(device, quick=quick, smoke=smoke, out=out, command=command)
    else:
        rows = MODULES[suite].run(device, quick=quick, smoke=smoke, out=out, model_dir=model_dir, command=command)
    load_after = load_average()
    append_rows(out_dir / RUN_LOG, [{
        **info, "suite": suite, "command": command, "quick": quick, "smoke": smoke, "rows": len(rows),
        "seconds": round(time.perf_counter() - start, 1),
        **{f"{key}_start": value for key, value in load_before.items()},
        **{f"{key}_end": value for key, value in load_after.items()},
    }])
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds")
    parser.add_argument("--smoke", action="store_true", help="the tiniest sizes, one round: proves it runs (CI)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch")
    set_threads(parser, args.threads)
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    suites = SUITES if args.suite == "all" else (args.suite,)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # One tiny cascade for every suite that runs one (the CPU sizes of train, prior, generate).
        tiny = set(suites) - {"kernels", "prior", "job", "distributed"}
        model_dir = build_tiny_cascade(Path(tmp) / "tiny") if tiny else None
        for suite in suites:
            print(f"\n== {suite} ==", flush=True)
            run_suite(suite, args.device, quick=args.quick, smoke=args.smoke, out_dir=args.out, model_dir=model_dir,
                      command=command)
    print(f"\n{', '.join(suites)}: {time.perf_counter() - start:.0f} s; results in {args.out}; "
          "render them with `python -m benchmarks.render`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
