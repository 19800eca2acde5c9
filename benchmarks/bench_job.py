"""Whole-job benchmark: `dbfast train` from command to output (class images, training, writing) against the same
job run the way diffusers' examples/dreambooth/train_dreambooth.py runs it (benchmarks/baseline_job.py), each a
process of its own, alternating in one run, with the class-image cache empty (cold) and filled (warm).

Both train the embedded default model (dreambooth_fast/default_model), base stage only (`--stages base`: the
diffusers script trains one stage), on examples/subject with the class "heart", fp32, seed 0, 1 subject + 1 prior
row per step, the same steps, learning rate and schedule, the same number of torch threads (OMP_NUM_THREADS).

- ours: `python -m dreambooth_fast train ...` at its own class-image defaults (whatever TrainConfig holds when it
  runs: the settings used are read back from the class-image cache's key.json into the row), its own Adam,
  checkpoints every --checkpoint-every (its default), its own output (hard-linked model, tuned UNet, loss plot).
- baseline: `python -m benchmarks.baseline_job ...`: class images with diffusers' IFPipeline at its defaults
  (stage I: 100 steps, guidance 7, 4 prompts per call: the script has no option for either), the eager step of
  benchmarks/diffusers_step.py, per-parameter AdamW (weight decay 1e-2, as the script), a checkpoint every 500
  steps (the script's default), `pipeline.save_pretrained` at the end. See that module for every detail.
- predictions (with --prior-modes images,predictions): ours again with `--prior-mode predictions`, a third job in
  the same rounds: no class images (cold or warm alike), the frozen model's prediction as the prior target; its
  step (one more forward pass of the frozen UNet) is compared with the class-image prior step's, per round.
- cold: XDG_CACHE_HOME (ours) and the class folder (baseline) empty; warm: both filled by an earlier run of the
  same job (the first cold round fills them; with warm alone an untimed run does).

Per run: wall time from process start to exit (the parent's clock), the phases each process times itself (ours:
dreambooth.json "timings"; baseline: its --timings file): class images, load (models, prompts, optimizer), train,
write (the output), pictures (ours only: its loss plot); startup = wall - those (interpreter, imports,
argument parsing); ours: the median of its steps' times (logs/metrics.csv).
Peak RSS: ru_maxrss of the child from os.wait4. Per configuration and cache state: medians over the rounds with
min-max; speed-up = baseline time / our time per round (paired), median (min-max).

Stable Diffusion (--family sd): the same jobs on a tiny random Stable Diffusion 1.x-style model (dreambooth_fast/
toy/tiny_sd.py at 64 px: PNDM, epsilon, 4x VAE, CLIP text encoder), built once per run into a temporary folder both
jobs read with `--model`. Ours encodes the photos and class images with the VAE once, before its loop; the baseline
draws class images with StableDiffusionPipeline at its defaults (the model's PNDM scheduler, 50 steps, guidance
7.5, 4 prompts per call) and encodes each step's batch with the VAE (a posterior sample), as the script does. The
rows say `family` sd and `model` tiny-sd.

Configurations, in the order they run: short (20 class images, 100 steps: the issue's target job), paper (100 class
images, 1000 steps, our default lr and schedule), demo (the README demo: 50 class images, class guidance 2 for ours,
3000 steps, lr 3e-4 cosine, min-SNR 5, captions). --quick: class images / 5 and steps / 10 (the rows say so), 2
rounds; --smoke: 2 class images, 2 steps, short only, one round.

    python -m benchmarks --suite job [--quick] [--threads N]
    python -m benchmarks.bench_job [--configs short,paper,demo] [--cache cold,warm] [--rounds N] [--quick]
                                   [--prior-modes images,predictions] [--family if|sd] [--threads N]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS_DIR,
    add_threads_option,
    append_rows,
    format_table,
    load_average,
    ratio_spread,
    run_info,
    set_threads,
)
from dreambooth_fast.config import TrainConfig
from dreambooth_fast.toy.default_model import DEFAULT_MODEL
from dreambooth_fast.toy.tiny_sd import build_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "subject"
CLASS_NOUN = "heart"
OURS, BASELINE = "dreambooth_fast", "diffusers_way"
PREDICTIONS = "dreambooth_fast_predictions"  # ours with --prior-mode predictions (--prior-modes images,predictions)
PRIOR_MODES = {"images": OURS, "predictions": PREDICTIONS}
CACHES = ("cold", "warm")
PHASES = ("startup", "load", "class_images", "train", "write", "pictures")
QUICK_DIVISORS = (5, 10)  # --quick: class images / 5, steps / 10
FAMILIES = ("if", "sd")
TINY_SD_IMAGE = 64  # px of the tiny Stable Diffusion model --family sd trains (16x16 latents)
CLASS_SETTINGS = {"if": "IFPipeline defaults: 100 steps, guidance 7, 4 prompts per call",
                  "sd": "StableDiffusionPipeline defaults: PNDM 50 steps, guidance 7.5, 4 prompts per call"}
LOG_TAIL = 2000


@dataclass(frozen=True)
class JobConfig:
    name: str
    class_images: int
    steps: int
    learning_rate: float = TrainConfig.learning_rate
    lr_schedule: str = TrainConfig.lr_schedule
    min_snr_gamma: float | None = None
    captions: bool = False
    class_guidance_scale: float | None = None  # ours only; None: our default. The script has no such option.
    scaled: str = ""  # how --quick or --smoke shrank it


CONFIGS = {
    "short": JobConfig("short", 20, 100),
    "paper": JobConfig("paper", 100, 1000),
    "demo": JobConfig("demo", 50, 3000, 3e-4, "cosine", 5.0, True, 2.0),
}


def scaled(config: JobConfig, *, quick: bool, smoke: bool) -> JobConfig:
    if smoke:
        return replace(config, class_images=2, steps=2, scaled="smoke: 2 class images, 2 steps")
    if quick:
        images, steps = QUICK_DIVISORS
        return replace(config, class_images=max(4, config.class_images // images), steps=max(10, config.steps // steps),
                       scaled=f"quick: class images / {images}, steps / {steps}")
    return config


@dataclass(frozen=True)
class Model:
    """What both jobs train: the embedded default model (IF layout; ours without --model, as a user runs it) or
    a tiny Stable Diffusion model the benchmark built."""

    family: str
    path: Path
    name: str


DEFAULT = Model("if", DEFAULT_MODEL, "default")


def ours_command(config: JobConfig, out: Path, device: str, prior_mode: str = "images",
                 model: Model = DEFAULT) -> list[str]:
    command = [sys.executable, "-m", "dreambooth_fast", "train", "--images", str(PHOTOS), "--class", CLASS_NOUN,
               "--output", str(out), "--stages", "base", "--num-class-images", str(config.class_images),
               "--steps", str(config.steps), "--batch-size", "1", "--seed", "0", "--precision", "fp32",
               "--lr", str(config.learning_rate), "--lr-schedule", config.lr_schedule, "--device", device]
    if config.min_snr_gamma is not None:
        command += ["--min-snr-gamma", str(config.min_snr_gamma)]
    if config.class_guidance_scale is not None:
        command += ["--class-guidance-scale", str(config.class_guidance_scale)]
    if prior_mode != "images":
        command += ["--prior-mode", prior_mode]
    if model != DEFAULT:
        command += ["--model", str(model.path)]
    return command + (["--captions"] if config.captions else [])


def baseline_command(config: JobConfig, out: Path, class_dir: Path, timings: Path, device: str,
                     model: Model = DEFAULT) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.baseline_job", "--model", str(model.path), "--images",
               str(PHOTOS), "--class-noun", CLASS_NOUN, "--class-dir", str(class_dir), "--output", str(out),
               "--num-class-images", str(config.class_images), "--steps", str(config.steps), "--batch-size", "1",
               "--seed", "0", "--learning-rate", str(config.learning_rate), "--lr-schedule", config.lr_schedule,
               "--timings", str(timings), "--device", device]
    if config.min_snr_gamma is not None:
        command += ["--min-snr-gamma", str(config.min_snr_gamma)]
    return command + (["--captions"] if config.captions else [])


def run_process(command: list[str], env: dict, log: Path) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds) of one child process; its output goes to `log`. CPU seconds (user +
    system) do not depend on how much of a shared machine the process got, as its wall time does."""
    start = time.perf_counter()
    with log.open("w") as f:
        # A session of its own: with the kernel's autogroup scheduling (sched_autogroup_enabled, on here) the CPU
        # is shared between sessions first; torchrun starts its processes in sessions of their own, so a child
        # left in ours would share one session's share with whatever else runs in it.
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed (exit {proc.returncode}):\n{log.read_text()[-LOG_TAIL:]}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss is in KiB on Linux


@dataclass
class Sample:
    """One run of one job: wall seconds, phase seconds, peak RSS, what its class images were drawn with, CPU seconds,
    the median seconds of its training steps (ours: logs/metrics.csv; None for the baseline, which logs none)."""

    wall: float
    phases: dict[str, float]
    peak_rss_mib: float
    class_settings: str
    cpu_s: float
    step_s: float | None = None


def phases_of(timings: dict[str, float], wall: float) -> dict[str, float]:
    """The common phases from a process's own timings; startup is the wall time they do not cover."""
    phases = {"load": timings.get("load", 0.0), "class_images": timings.get("class_images", 0.0),
              "train": sum(v for k, v in timings.items() if k.startswith("train_")),
              "write": timings.get("write", 0.0), "pictures": timings.get("pictures", 0.0)}
    return {"startup": wall - sum(phases.values()), **phases}


# Class-image cache key entries that are not settings: the model's content hashes (Stable Diffusion's also name the
# scheduler and VAE), the prompt, the seed.
KEY_IDENTITY = ("base_unet", "sr_unet", "text_encoder", "scheduler", "vae", "prompt", "seed", "with_sr")


def class_settings(key: dict) -> str:
    """What our class images were drawn with, from the cache's key.json, in words."""
    return "; ".join(f"{k} {v}" for k, v in key.items()
                     if k not in KEY_IDENTITY and not (k.startswith("sr_") and not key.get("with_sr")))


def run_ours(config: JobConfig, work: Path, xdg: Path, env: dict, device: str, prior_mode: str = "images",
             model: Model = DEFAULT) -> Sample:
    out = work / "ours-out"
    wall, rss, cpu = run_process(ours_command(config, out, device, prior_mode, model),
                                 {**env, "XDG_CACHE_HOME": str(xdg)}, work / "ours.log")
    run = json.loads((out / "dreambooth.json").read_text())
    settings = "none (the frozen model's predictions are the prior targets)"
    if run["class_images"]:
        settings = class_settings(json.loads((Path(run["class_images"]) / "key.json").read_text()))
    with (out / "logs" / "metrics.csv").open(newline="") as f:
        step_s = statistics.median(float(row["step_time_s"]) for row in csv.DictReader(f))
    return Sample(wall, phases_of(run["timings"], wall), rss, settings, cpu, step_s)


def run_baseline(config: JobConfig, work: Path, class_dir: Path, env: dict, device: str,
                 model: Model = DEFAULT) -> Sample:
    out, timings = work / "baseline-out", work / "baseline-timings.json"
    wall, rss, cpu = run_process(baseline_command(config, out, class_dir, timings, device, model), env,
                                 work / "baseline.log")
    return Sample(wall, phases_of(json.loads(timings.read_text()), wall), rss, CLASS_SETTINGS[model.family], cpu)


def bench_config(config: JobConfig, caches: tuple[str, ...], rounds: int, device: str, env: dict,
                 tmp: Path, impls: tuple[str, ...] = (OURS, BASELINE),
                 model: Model = DEFAULT) -> dict[tuple[str, str], list[Sample]]:
    """{(cache, impl): one Sample per round}; the jobs alternate, the order rotating every run."""
    warm = {OURS: tmp / "warm-xdg", PREDICTIONS: tmp / "warm-xdg", BASELINE: tmp / "warm-class-images"}
    filled: set[str] = set()
    samples: dict[tuple[str, str], list[Sample]] = {(c, i): [] for c in caches for i in impls}
    turn = 0

    def run(impl: str, cache_dir: Path, work: Path) -> Sample:
        work.mkdir(parents=True)
        if impl == BASELINE:
            return run_baseline(config, work, cache_dir, env, device, model)
        return run_ours(config, work, cache_dir, env, device, "predictions" if impl == PREDICTIONS else "images",
                        model)

    for r in range(rounds):
        for cache in caches:
            order = impls[turn % len(impls):] + impls[:turn % len(impls)]
            turn += 1
            for impl in order:
                work = tmp / f"{config.name}-{cache}-{impl}-{r}"
                if impl == PREDICTIONS:  # it draws no class images: no cache to fill; warm, it shares ours' (fonts)
                    cache_dir = warm[impl] if cache == "warm" else work / "cache"
                elif cache == "warm":
                    if impl not in filled:  # fill the cache with an untimed run of the same job
                        run(impl, warm[impl], work.with_name(work.name + "-fill"))
                        filled.add(impl)
                    cache_dir = warm[impl]
                elif "warm" in caches and impl not in filled:
                    cache_dir = warm[impl]  # empty now: round 0's cold run fills the warm runs' cache
                    filled.add(impl)
                else:
                    cache_dir = work / "cache"
                sample = run(impl, cache_dir, work)
                samples[(cache, impl)].append(sample)
                print(f"  {config.name} {cache} round {r + 1}/{rounds} {impl}: {sample.wall:.1f} s "
                      f"(class images {sample.phases['class_images']:.1f} s, train {sample.phases['train']:.1f} s), "
                      f"peak RSS {sample.peak_rss_mib:.0f} MiB", flush=True)
    return samples


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def config_rows(config: JobConfig, samples: dict[tuple[str, str], list[Sample]], common: dict,
                model: Model = DEFAULT) -> list[dict]:
    rows = []
    for (cache, impl), runs in samples.items():
        if not runs:
            continue
        wall = spread([s.wall for s in runs])
        row = {
            **common, "suite": "job", "config": config.name, "cache": cache, "impl": impl, "scaled": config.scaled,
            "class_images": config.class_images, "steps": config.steps, "subject_rows": 1, "prior_rows": 1,
            "learning_rate": config.learning_rate, "lr_schedule": config.lr_schedule,
            "min_snr_gamma": config.min_snr_gamma if config.min_snr_gamma is not None else "",
            "captions": config.captions, "stages": "base", "dtype": "fp32", "model": model.name,
            "family": model.family,
            "class_settings": runs[0].class_settings,
            "prior_mode": "predictions" if impl == PREDICTIONS else "images",
            "optimizer": "AdamW per parameter, weight decay 1e-2" if impl == BASELINE else "Adam as dbfast chooses it",
            "rounds": len(runs), "median_s": round(wall[0], 2), "min_s": round(wall[1], 2), "max_s": round(wall[2], 2),
            "samples_s": ";".join(f"{s.wall:.2f}" for s in runs),
            **{f"{phase}_s": round(statistics.median(s.phases[phase] for s in runs), 2) for phase in PHASES},
            "peak_rss_mib": round(statistics.median(s.peak_rss_mib for s in runs), 1),
            "peak_rss_max_mib": round(max(s.peak_rss_mib for s in runs), 1),
            "cpu_s": round(statistics.median(s.cpu_s for s in runs), 2),
        }
        if impl != BASELINE:
            step = spread([s.step_s for s in runs])
            row |= {"step_ms": round(1e3 * step[0], 1), "step_min_ms": round(1e3 * step[1], 1),
                    "step_max_ms": round(1e3 * step[2], 1)}
        if impl == PREDICTIONS and (cache, OURS) in samples:
            ours = samples[(cache, OURS)]
            # What the frozen forward costs: this step's time over the class-image prior step's, per paired round.
            step_ratio = ratio_spread([s.step_s for s in runs], [s.step_s for s in ours])
            row |= {"step_vs_images": round(step_ratio[0], 3), "step_vs_images_min": round(step_ratio[1], 3),
                    "step_vs_images_max": round(step_ratio[2], 3)}
        if impl != BASELINE:
            base = samples[(cache, BASELINE)]
            ratio = ratio_spread([s.wall for s in base], [s.wall for s in runs])
            row |= {"speedup": round(ratio[0], 3), "speedup_min": round(ratio[1], 3), "speedup_max": round(ratio[2], 3)}
            cpu_ratio = ratio_spread([s.cpu_s for s in base], [s.cpu_s for s in runs])
            row |= {"cpu_speedup": round(cpu_ratio[0], 3), "cpu_speedup_min": round(cpu_ratio[1], 3),
                    "cpu_speedup_max": round(cpu_ratio[2], 3)}
            for phase in ("class_images", "train") if cache == "cold" else ("train",):
                if all(s.phases[phase] > 0 for s in runs):
                    row[f"{phase}_speedup"] = round(ratio_spread([s.phases[phase] for s in base],
                                                                 [s.phases[phase] for s in runs])[0], 3)
        rows.append(row)
    return rows


def run(device: str, *, quick: bool = False, smoke: bool = False, out: Path | None = None,
        model_dir: Path | None = None, command: str = "", configs: tuple[str, ...] | None = None,
        caches: tuple[str, ...] = CACHES, rounds: int | None = None,
        prior_modes: tuple[str, ...] = ("images",), family: str = "if") -> list[dict]:
    """Runs the whole-job benchmark, appends its rows to `out` (default benchmarks/results/job.csv), prints a table
    and returns the rows. `model_dir` is unused (both jobs train the embedded default model, or with family "sd" a
    tiny Stable Diffusion model built here). `prior_modes`: ours with class images ("images") and/or with
    --prior-mode predictions, each a job of its own beside the baseline."""
    out = Path(out) if out is not None else RESULTS_DIR / "job.csv"
    configs = configs or (("short",) if smoke else tuple(CONFIGS))
    rounds = rounds or (1 if smoke else 2 if quick else 3)
    threads = torch.get_num_threads()
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    info = run_info(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-job-model-") as models:
        model = DEFAULT
        if family == "sd":  # built once, before any timing; the same weights every run (seed 0)
            model = Model("sd", build_tiny_sd(Path(models) / "tiny-sd", image_size=TINY_SD_IMAGE), "tiny-sd")
        for name in configs:
            config = scaled(CONFIGS[name], quick=quick, smoke=smoke)
            load_before = load_average()
            with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
                samples = bench_config(config, caches, rounds, device, env, Path(tmp),
                                       (*(PRIOR_MODES[m] for m in prior_modes), BASELINE), model)
            load_after = load_average()
            common = {**info, "command": command, **load_before,
                      **{f"{key}_end": value for key, value in load_after.items()}}
            config_rows_ = config_rows(config, samples, common, model)
            append_rows(out, config_rows_)  # each configuration as it finishes: a long run keeps what it measured
            rows += config_rows_
    print(f"{info['device_name']} ({device}), torch {info['torch']}, diffusers {info['diffusers']}, "
          f"commit {info['commit']}, {threads} threads")
    print(table(rows))
    print(f"appended {len(rows)} rows to {out}")
    return rows


def phase_cells(r: dict) -> str:
    return " / ".join(f"{r[f'{phase}_s']:.1f}" for phase in PHASES)


def table(rows: list[dict]) -> str:
    """One line per configuration, cache state and prior mode of ours: both totals, the speed-up, the phases, our
    median step, peak RSS."""
    by_key = {(r["config"], r["cache"], r["impl"]): r for r in rows}
    lines = []
    for (name, cache, impl), r in by_key.items():
        if impl == BASELINE:
            continue
        b = by_key[(name, cache, BASELINE)]
        label = name + (" (scaled)" if r["scaled"] else "") + (" predictions" if impl == PREDICTIONS else "")
        lines.append([label, cache, f"{r['class_images']} / {r['steps']}",
                      f"{r['median_s']:.1f} ({r['min_s']:.1f}-{r['max_s']:.1f})",
                      f"{b['median_s']:.1f} ({b['min_s']:.1f}-{b['max_s']:.1f})",
                      f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})",
                      phase_cells(r), phase_cells(b),
                      f"{r['step_ms']:.0f} ({r['step_min_ms']:.0f}-{r['step_max_ms']:.0f})",
                      f"{r['peak_rss_mib']:.0f} / {b['peak_rss_mib']:.0f}"])
    header = ["config", "cache", "class images / steps", "ours s (min-max)", "baseline s (min-max)",
              "speed-up (min-max)", "ours startup/load/class/train/write/pictures", "baseline (same phases)",
              "ours step ms (min-max)", "peak RSS MiB ours / baseline"]
    return format_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=None,
                        help=f"comma list of {', '.join(CONFIGS)} (default: all; --smoke: short)")
    parser.add_argument("--cache", default=",".join(CACHES), help="comma list of cold, warm")
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 (--quick 2, --smoke 1)")
    parser.add_argument("--prior-modes", default="images",
                        help="comma list of images, predictions: ours with class images and/or with --prior-mode "
                             "predictions, each a job beside the baseline (default: images)")
    parser.add_argument("--quick", action="store_true", help="class images / 5, steps / 10, 2 rounds")
    parser.add_argument("--smoke", action="store_true", help="2 class images, 2 steps, one round")
    parser.add_argument("--family", choices=FAMILIES, default="if",
                        help="if: the embedded default model (IF layout); sd: a tiny Stable Diffusion model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    add_threads_option(parser, help="torch threads of both jobs (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "job.csv")
    args = parser.parse_args(argv)
    configs = tuple(c.strip() for c in (args.configs or ",".join(CONFIGS)).split(",") if c.strip())
    configs = ("short",) if args.smoke and args.configs is None else configs
    caches = tuple(c.strip() for c in args.cache.split(",") if c.strip())
    if not configs or set(configs) - set(CONFIGS):
        parser.error(f"--configs takes a comma list of {', '.join(CONFIGS)}")
    if not caches or set(caches) - set(CACHES):
        parser.error("--cache takes a comma list of cold, warm")
    prior_modes = tuple(m.strip() for m in args.prior_modes.split(",") if m.strip())
    if not prior_modes or set(prior_modes) - set(PRIOR_MODES):
        parser.error("--prior-modes takes a comma list of images, predictions")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    set_threads(parser, args.threads)
    run(args.device, quick=args.quick, smoke=args.smoke, out=args.out, configs=configs, caches=caches,
        rounds=args.rounds, prior_modes=prior_modes, family=args.family,
        command=shlex.join(["python", "-m", "benchmarks.bench_job", *(argv or sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
