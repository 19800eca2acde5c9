"""Render the latest results of each suite into BENCHMARKS.md (tables) and PNG plots under benchmarks/results/.

"Latest" is per suite and device type: the rows of the most recent run (the latest date) on the CPU and, where
there are any, on a GPU. Every table names the device, versions, commit, date, the load average and the command
that produced it (from the rows, or from runs.csv for suites whose rows do not carry it).

    python -m benchmarks.render [--results DIR] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from benchmarks.common import RESULTS_DIR
from dreambooth_fast.fileio import atomic_write, atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("job", "train", "kernels", "prior", "generate", "distributed")
TITLES = {"job": "Whole job", "train": "Training step", "kernels": "Fused kernels", "prior": "Class-image generation",
          "generate": "Generation", "distributed": "Several processes"}


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def latest_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """{device type: the rows of its latest run}."""
    latest: dict[str, list[dict]] = {}
    for device in sorted({r["device"] for r in rows}):
        on_device = [r for r in rows if r["device"] == device]
        date = max(r["date"] for r in on_device)
        latest[device] = [r for r in on_device if r["date"] == date]
    return latest


# Suites whose commands may measure one part at a time (a full job run takes hours): each part keeps its latest run.
PART_KEYS = {"job": ("family", "config", "scaled", "cache"), "distributed": ("what",)}


def latest_part_runs(rows: list[dict], keys: tuple[str, ...]) -> dict[str, list[dict]]:
    """{device type: the rows of the latest run of each part (rows alike in `keys`)}."""
    latest: dict[str, list[dict]] = {}
    for device in sorted({r["device"] for r in rows}):
        for key in dict.fromkeys(tuple(r.get(k, "") for k in keys) for r in rows if r["device"] == device):
            same = [r for r in rows if r["device"] == device and tuple(r.get(k, "") for k in keys) == key]
            date = max(r["date"] for r in same)
            latest.setdefault(device, []).extend(r for r in same if r["date"] == date)
    return latest


def latest_profiles(rows: list[dict]) -> list[list[dict]]:
    """The rows of the latest profile of each (device, config, stage, implementation)."""
    keys = sorted({(r["device"], r["config"], r["stage"], r["impl"]) for r in rows})
    runs = []
    for key in keys:
        same = [r for r in rows if (r["device"], r["config"], r["stage"], r["impl"]) == key]
        date = max(r["date"] for r in same)
        runs.append([r for r in same if r["date"] == date])
    return runs


def run_of(rows: list[dict], suite: str, runs: list[dict]) -> dict:
    """The runs.csv entry of the run that made `rows`: the latest one of that suite and device started at or
    before the rows' date. Empty when the run was not logged (a suite module run directly)."""
    date, device = rows[0]["date"], rows[0]["device"]
    logged = [r for r in runs if r["suite"] == suite and r["device"] == device and r["date"] <= date]
    return max(logged, key=lambda r: r["date"]) if logged else {}


def num(value: str) -> float:
    return float(value)


def ms(r: dict, unit: str = "ms") -> str:
    return f"{num(r[f'median_{unit}']):.2f} ({num(r[f'min_{unit}']):.2f}-{num(r[f'max_{unit}']):.2f})"


def ratio(r: dict) -> str:
    if r.get("ratio_min", "") == "":
        return f"{num(r['ratio_vs_eager']):.2f}x"
    return f"{num(r['ratio_vs_eager']):.2f}x ({num(r['ratio_min']):.2f}-{num(r['ratio_max']):.2f})"


def verdict(r: dict) -> str:
    """Faster or slower only when every paired round agrees; otherwise no measurable difference."""
    if num(r["ratio_min"]) > 1:
        return "faster"
    if num(r["ratio_max"]) < 1:
        return "slower"
    return "no measurable difference"


def md_table(header: list[str], lines: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(cell) for cell in line) + " |" for line in lines]
    return "\n".join(out)


def header_lines(rows: list[dict], run: dict) -> list[str]:
    r = rows[0]
    versions = f"torch {r['torch']}"
    if r.get("diffusers") or run.get("diffusers"):
        versions += f", diffusers {r.get('diffusers') or run['diffusers']}, " \
                    f"onnxruntime {r.get('onnxruntime') or run['onnxruntime']}"
    loads = [num(x[k]) for x in rows for k in ("load_1m", "load_1m_end") if x.get(k)] or \
        [num(run[k]) for k in ("load_1m_start", "load_1m_end") if run.get(k)]
    load = f"{min(loads):.2f}-{max(loads):.2f}" if loads else "not recorded"
    # A suite whose parts were measured by separate commands (PART_KEYS) names each command with its commit and date.
    runs = list(dict.fromkeys((x.get("command") or run.get("command") or "not recorded", x["commit"], x["date"])
                              for x in rows))
    if len(runs) == 1:
        return [f"Device: **{r['device_name']}** ({r['device']}, torch threads: {r['threads']}); {versions}; commit "
                f"`{r['commit']}`; {r['date']}; load average (1 min) during the run: {load}.",
                f"Command: `{runs[0][0]}`"]
    return [f"Device: **{r['device_name']}** ({r['device']}, torch threads: {r['threads']}); {versions}; load "
            f"average (1 min) during the runs: {load}.",
            "Commands: " + "; ".join(f"`{command}` (commit `{commit}`, {date})" for command, commit, date in runs)]


# -- per-suite tables -------------------------------------------------------------------------------------

JOB_PHASES = ("startup", "load", "class_images", "train", "write", "pictures")


def job_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(ours, baseline) rows per configuration and cache state; ours with class images, and with --prior-mode
    predictions where that was measured."""
    by_key = {(family(r), r["config"], r["scaled"], r["cache"], r["impl"]): r for r in rows}
    return [(r, by_key[(family(r), r["config"], r["scaled"], r["cache"], "diffusers_way")]) for r in rows
            if r["impl"] in ("dreambooth_fast", "dreambooth_fast_predictions")]


def family(r: dict) -> str:
    """The model family a job row trained ("if" for rows from before the column existed)."""
    return r.get("family") or "if"


def job_config(r: dict) -> str:
    predictions = " predictions" if r["impl"] == "dreambooth_fast_predictions" else ""
    sd = "SD " if family(r) == "sd" else ""
    return f"{sd}{r['config']}{' (' + r['scaled'].split(':')[0] + ')' if r['scaled'] else ''}{predictions}"


def cpu_cell(r: dict, b: dict) -> str:
    """CPU seconds (user + system) of both jobs and the speed-up they give, where the run recorded them: unlike
    wall time, they do not depend on how much of a shared machine each process got."""
    if not r.get("cpu_speedup"):
        return "-"
    return (f"{num(r['cpu_s']):.1f} / {num(b['cpu_s']):.1f}: {num(r['cpu_speedup']):.2f}x "
            f"({num(r['cpu_speedup_min']):.2f}-{num(r['cpu_speedup_max']):.2f})")


def step_cell(r: dict) -> str:
    """Our median step ms (min-max over the runs' medians), and for --prior-mode predictions its time against the
    class-image prior step's in the same rounds."""
    if not r.get("step_ms"):
        return "-"
    cell = f"{num(r['step_ms']):.0f} ({num(r['step_min_ms']):.0f}-{num(r['step_max_ms']):.0f})"
    if r.get("step_vs_images"):
        cell += (f"; {num(r['step_vs_images']):.2f}x ({num(r['step_vs_images_min']):.2f}-"
                 f"{num(r['step_vs_images_max']):.2f}) the class-image step's time")
    return cell


def speedup(r: dict) -> str:
    return f"{num(r['speedup']):.2f}x ({num(r['speedup_min']):.2f}-{num(r['speedup_max']):.2f})"


def job_section(rows: list[dict]) -> str:
    """The IF jobs (the embedded default model), then the Stable Diffusion ones (--family sd) where measured."""
    sections = []
    for name in [f for f in ("if", "sd") if any(family(r) == f for r in rows)]:
        text = job_family_section([r for r in rows if family(r) == name], name)
        sections.append(text if name == "if" else "**Stable Diffusion** (`python -m benchmarks.bench_job --family sd`):"
                        "\n\n" + text)
    return "\n\n".join(sections)


JOB_MODELS = {
    "if": "the embedded default model's base stage (`--stages base`)",
    "sd": "a tiny random Stable Diffusion 1.x-style model the benchmark builds once per run "
          "(dreambooth_fast/toy/tiny_sd.py at 64 px: 16x16 latents behind a 4x VAE, CLIP text encoder, PNDM, epsilon)",
}


def job_family_section(rows: list[dict], name: str) -> str:
    lines = []
    for r, b in job_pairs(rows):
        faster = "faster" if num(r["speedup_min"]) > 1 else "slower" if num(r["speedup_max"]) < 1 else \
            "no measurable difference"
        phase_ratio = [f"{num(r[k]):.2f}x" if r.get(k) and (r["cache"] == "cold" or k == "train_speedup") else "-"
                       for k in ("class_images_speedup", "train_speedup")]
        lines.append([job_config(r), r["cache"], f"{r['class_images']} / {r['steps']}", ms(r, "s"), ms(b, "s"),
                      speedup(r), faster, cpu_cell(r, b), " / ".join(phase_ratio),
                      " / ".join(f"{num(r[p + '_s']):.1f}" for p in JOB_PHASES),
                      " / ".join(f"{num(b[p + '_s']):.1f}" for p in JOB_PHASES), step_cell(r),
                      f"{num(r['peak_rss_mib']):.0f} / {num(b['peak_rss_mib']):.0f}", r["rounds"]])
    text = md_table(["config", "cache", "class images / steps", "ours s (min-max)", "baseline s (min-max)",
                     "speed-up (min-max)", "whole job", "CPU s ours / baseline: speed-up (min-max)",
                     "speed-up class images / train",
                     "ours s: startup / load / class images / train / write / pictures", "baseline s (same phases)",
                     "ours step ms (min-max)", "peak RSS MiB ours / baseline", "rounds"], lines)
    pairs = job_pairs(rows)
    r, b = next((pair for pair in pairs if pair[0]["impl"] == "dreambooth_fast"), pairs[0])
    scaled = sorted({x["scaled"] for x in rows if x["scaled"]})
    text += (f"\n\nBoth jobs train {JOB_MODELS[name]} on examples/subject, class "
             f"\"heart\", {r['dtype']}, seed 0, {r['subject_rows']} subject + {r['prior_rows']} prior row per step, "
             "each a process of its own, alternating; cold = empty class-image cache, warm = filled. Speed-up = "
             "baseline time / our time per paired round, median (min-max); \"whole job\" says faster or slower only "
             "when every round agrees. Phases are medians each process timed itself; startup = wall time minus them "
             "(interpreter, imports). Our step: the median step_time_s of logs/metrics.csv per run, median "
             "(min-max) over the runs. CPU s: user + system seconds of each process (os.wait4), median; the "
             "speed-up they give does not depend on how much of the shared CPU each process got. Peak RSS: "
             "ru_maxrss of each process (os.wait4), median.\n\n"
             f"- ours: `dbfast train` at its defaults for the class images ({r['class_settings']}); "
             f"{r['optimizer']}"
             + ("; the photos and class images encoded by the VAE once, before the loop (the posterior's mean)"
                if name == "sd" else "") + ".\n")
    if any(x["impl"] == "dreambooth_fast_predictions" for x in rows):
        text += ("- predictions: the same `dbfast train` with `--prior-mode predictions`: no class images; the prior "
                 "rows are the subject rows' noisy inputs with the class prompt, their target the frozen model's "
                 "prediction (one more forward pass, of a frozen copy of the UNet, per step).\n")
    vae = "the VAE encode of every step's batch (a posterior sample), " if name == "sd" else ""
    text += (f"- baseline (benchmarks/baseline_job.py, the way diffusers' train_dreambooth.py runs): class images with "
             f"{b['class_settings']}; {vae}eager UNet, `DDPMScheduler.add_noise`, chunked F.mse_loss; "
             f"{b['optimizer']}; a checkpoint every 500 steps; `pipeline.save_pretrained`.\n")
    options = sorted({f"{x['config']}: lr {x['learning_rate']} {x['lr_schedule']}"
                      + (f", min-SNR {x['min_snr_gamma']}" if x["min_snr_gamma"] else "")
                      + (", captions" if x["captions"] == "True" else "") for x in rows})
    text += "- options: " + "; ".join(options) + ".\n"
    if scaled:
        text += f"- scaled down from the named configuration ({'; '.join(scaled)}).\n"
    return text.rstrip("\n")



# Our steps in the training-step table: the default options, and with --compile (a suffix to the model's name).
OURS_IMPLS = {"dreambooth_fast": "", "dreambooth_fast_compile": " --compile",
              "dreambooth_fast_fused_norm": " --fused-norm"}


def train_key(r: dict) -> tuple[str, str, str]:
    """A training-step case: model, stage, shape (two models can share a stage and a shape)."""
    return r["model"], r["stage"], r["shape"]


def vae_ratio(r: dict) -> str:
    return (f"{num(r['ratio_vs_eager_vae']):.2f}x ({num(r['ratio_vs_eager_vae_min']):.2f}-"
            f"{num(r['ratio_vs_eager_vae_max']):.2f})")


def train_section(rows: list[dict]) -> str:
    by_key = {(*train_key(r), r["what"], r["impl"]): r for r in rows if r["impl"] != "skipped"}
    lines, ops_lines, vae_lines = [], [], []
    for (model, stage, shape, what, impl), r in by_key.items():
        if what == "step" and impl in OURS_IMPLS:
            case = (model, stage, shape)
            e = by_key[(*case, "step", "diffusers_eager")]
            fused, eager_ops = by_key[(*case, "ops", "fused_ops")], by_key[(*case, "ops", "eager_ops")]
            lines.append([r["model"] + OURS_IMPLS[impl], stage, shape, r["dtype"], ms(r), ms(e), ratio(r), verdict(r),
                          f"{num(r['peak_step_mb']):.1f} / {num(e['peak_step_mb']):.1f}",
                          f"{num(fused['share_of_step_pct']):.2g}% / {num(eager_ops['share_of_step_pct']):.2g}%",
                          f"{num(r['ops_bound_ratio']):.3f}x" if r.get("ops_bound_ratio") else ""])
            if impl != "dreambooth_fast":
                continue
            ops_lines.append([r["model"], stage, shape, r["dtype"], ms(fused), ms(eager_ops), ratio(fused)])
            if r.get("ratio_vs_eager_vae"):
                v = by_key[(*case, "step", "diffusers_eager_vae")]
                vae_lines.append([r["model"], r.get("prediction", ""), shape, r["dtype"], ms(r), ms(v), vae_ratio(r),
                                  f"{num(r['peak_step_mb']):.1f} / {num(v['peak_step_mb']):.1f}"])
    skipped = [[r["model"], r["stage"], r["shape"], r.get("note", "")] for r in rows if r["impl"] == "skipped"]
    text = md_table(["model", "stage", "rows (subject+prior)", "dtype", "ours ms (min-max)", "eager ms (min-max)",
                     "step ratio (min-max)", "whole step", "peak step MB ours / eager",
                     "ops share of step ours / eager", "ops-bound ratio"], lines)
    text += ("\n\nRatio = eager time / our time, per paired round (>1: ours faster); \"whole step\" says faster or "
             "slower only when every round agrees. Ops share = the noise + loss work alone (forward and backward) "
             "as a share of the step; ops-bound ratio = the step ratio if the fused ops were the only difference "
             "(the most they can give). The fused ops alone, at the step's shapes:\n\n")
    text += md_table(["model", "stage", "rows", "dtype", "fused ops ms (min-max)", "eager ops ms (min-max)",
                      "ops ratio (min-max)"], ops_lines)
    if vae_lines:
        text += ("\n\nStable Diffusion (latent) rows: both steps above train on the same latents, encoded once "
                 "before the loop (dbfast: `sd.latent_rows`, the VAE posterior's mean; not timed), so the step "
                 "ratio compares the same work. diffusers' train_dreambooth.py instead encodes every batch with the "
                 "VAE at every step (a posterior sample); that step, as the script runs it, against ours (the rows "
                 "are latents; the eager step's batch is their pixels, 4x the side for the tiny VAE, 8x for SD's):"
                 "\n\n")
        text += md_table(["model", "prediction", "rows", "dtype", "ours ms (min-max)",
                          "eager + VAE encode ms (min-max)", "ratio (min-max)", "peak step MB ours / eager + VAE"],
                         vae_lines)
    if skipped:
        text += "\n\nNot measured:\n\n" + md_table(["model", "stage", "rows", "why"], skipped)
    memory = rows[0].get("mem_method", "")
    if memory:
        text += f"\n\nPeak step memory: {memory}."
    return text


def kernels_section(rows: list[dict]) -> str:
    eager = {(r["stage"], r["shape"], r["dtype"], r["op"], r["direction"]): r for r in rows if r["impl"] == "eager"}
    lines = []
    for r in rows:
        if r["impl"] != "fused":
            continue
        e = eager[(r["stage"], r["shape"], r["dtype"], r["op"], r["direction"])]
        gbps = f"{num(r['gbps']):.1f} ({num(r['pct_copy']):.0f}% of copy)" if r["gbps"] else ""
        if r["gbps"] and num(r["pct_copy"]) > 100:
            gbps += ", in cache"
        lines.append([r["stage"], r["shape"], r["dtype"], r["op"], r["direction"], ms(r, "us"), ms(e, "us"),
                      f"{num(r['speedup_vs_eager']):.2f}x", gbps])
    text = md_table(["stage", "shape", "dtype", "op", "direction", "fused us (min-max)", "eager us (min-max)",
                     "speedup (medians)", "fused GB/s"], lines)
    text += (f"\n\nCopy bandwidth measured in the same run: {num(rows[0]['copy_gbps']):.1f} GB/s; native kernels: "
             f"{rows[0]['native']}. These are the ops alone: see the training-step table for what they do to a step.")
    return text


def prior_section(rows: list[dict]) -> str:
    lines = [[r["candidate"], r["sampler"], r["steps"], r["batch_size"], r["images_per_call"],
              f"{num(r['images_per_s']):.2f} ({num(r['images_per_s_min']):.2f}-{num(r['images_per_s_max']):.2f})",
              f"{num(r['vs_diffusers']):.2f}x ({num(r['vs_diffusers_min']):.2f}-{num(r['vs_diffusers_max']):.2f})"
              if r.get("vs_diffusers") else "-", f"{num(r['vs_before']):.2f}x" if r.get("vs_before") else "-",
              r["judged"] or "-", r["class_share"] or "-", r["div"] or "-"] for r in rows]
    first = rows[0]
    return (md_table(["candidate", "sampler", "steps", "batch", "images per call", "images/s (min-max)",
                      "vs diffusers (min-max)", "vs before", "judged", "drawn as the class", "DIV"], lines)
            + f"\n\nModel: {first['model']}, stage I at {first['size']} px, {first['dtype']}, guidance "
              f"{first['guidance']}; {first['rounds']} alternating rounds. 'diffusers': the pipeline's defaults as "
              "diffusers' DreamBooth script draws class images (DDPM 100 steps, 4 per call); 'before': this "
              "project's defaults until session 9 (DDPM 50, 4 per call); 'default': `dbfast train`'s now.")


def generate_section(rows: list[dict]) -> str:
    lines, skipped = [], []
    for r in rows:
        if r["what"] == "skipped":
            skipped.append([r["backend"], r["note"]])
            continue
        diff = f"{num(r['max_abs_diff_vs_eager']):.2g}" if r.get("max_abs_diff_vs_eager") else ""
        lines.append([r["what"], r["stage"], r["backend"], r["dtype"], r["shape"], ms(r), ratio(r),
                      f"{num(r['prepare_s']):.1f}", diff, r.get("note", "")])
    text = md_table(["what", "stage", "backend", "dtype", "shape", "ms (min-max)", "vs eager (min-max)",
                     "prepare s (once)", "max pixel diff vs eager", "note"], lines)
    text += ("\n\nvs eager = eager time / backend time per paired round (>1: faster than eager). prepare s = what "
             "the backend costs once (compile, ONNX export with its parity check, engine build) plus its first "
             "call; excluded from the timings.")
    if skipped:
        text += "\n\nNot measured:\n\n" + md_table(["backend", "why"], skipped)
    return text


def profile_title(r: dict) -> str:
    return (f"### {r['device']}: {r['config']} {r['stage']} ({r['params_m']} M parameters, {r['shape']}, "
            f"{r['dtype']}), {r['impl']}\n")


def profile_section(rows: list[dict]) -> str:
    """One profiled step: the groups' self time and share, then the top ops."""
    title = f"{num(rows[0]['step_ms']):.1f} ms self time per profiled step.\n\n"
    groups = [[x["group"], f"{num(x['self_ms']):.2f}", f"{num(x['share_pct']):.1f}%"] for x in rows
              if x["what"] == "group"]
    ops = [[f"`{x['op']}`", x["group"], f"{num(x['self_ms']):.2f}", f"{num(x['share_pct']):.1f}%"] for x in rows
           if x["what"] == "op"]
    return (title + md_table(["group", "self ms per step", "share"], groups) + "\n\nTop ops:\n\n"
            + md_table(["op", "group", "self ms per step", "share"], ops))


PROFILE_INTRO = """Where one step's time goes: `python -m benchmarks.profile_step` (torch.profiler, self time, so the
groups add up to the step; the profiler's own overhead is in it). Groups: conv, attention (SDPA, bmm, softmax),
linear (matmuls: attention projections, time and text embeddings), norm+activation (GroupNorm, LayerNorm, GELU,
SiLU), optimizer (Optimizer.step and zero_grad, gradient clipping), the fused ops, copies, other (elementwise
adds and muls of the scale-shift and residuals, their backward sums, and the rest).
"""


def distributed_section(rows: list[dict]) -> str:
    lines = [[r["what"].replace("_", " "), r["impl"], r["processes"], _distributed_work(r), ms(r, "s"),
              distributed_rate(r),
              f"{num(r['speedup']):.2f}x ({num(r['speedup_min']):.2f}-{num(r['speedup_max']):.2f})"
              if r.get("speedup") else "-", r["load_1m_runs"], r["rounds"]] for r in rows]
    notes = []
    images = next((r for r in rows if r["what"] == "class_images"), None)
    if images:
        notes.append(f"class images: the class-image phase of `dbfast train` (the embedded default model, \"a heart\", "
                     f"class guidance 2, {images['images']} images drawn {images['batch']} per batch, from an empty "
                     f"cache) in one process against torchrun with 2 processes, which split the batches; the phase's "
                     f"seconds from dreambooth.json (from the first rank's start to the last one's end); alternating, "
                     f"{images['threads']} torch thread per process. On free cores (one per process) the phase takes "
                     "its busiest rank's CPU seconds: one process's CPU seconds over those (the summary's \"on free "
                     "cores\" figure) is the speed-up 2 free cores give, whatever share of a loaded machine the "
                     "runs got.")
    subjects = next((r for r in rows if r["what"] == "subjects"), None)
    if subjects:
        notes.append(f"subjects: `dbfast train --subjects` with {subjects['subjects']} subjects (the embedded default "
                     f"model's base stage, examples/subject, class \"heart\", the same options, outputs of their own; "
                     f"class images: {subjects['class_images']}), one process (one subject after the other) against "
                     f"torchrun with {subjects['subjects']} processes (one subject per rank), each command a process "
                     f"tree of its own, alternating, {subjects['threads']} torch thread per process. Wall time from "
                     "the command's start to its exit (interpreter, torchrun, model load, training, writing).")
    return (md_table(["what", "how", "processes", "work", "seconds (min-max)", "rate", "speed-up (min-max)",
                      "load (1 min) before the runs", "rounds"], lines)
            + "\n\n" + "\n\n".join(notes)
            + "\n\nSpeed-up = one process's seconds / torchrun's per round, median (min-max). Two processes can only "
              "be 2x as fast with 2 free cores: read the load column.")


def _distributed_work(r: dict) -> str:
    if r["what"] == "subjects":
        return f"{r['subjects']} subjects x {r['steps']} steps"
    return f"{r['images']} class images, {r['batch']} per batch"


def distributed_rate(r: dict) -> str:
    """What a row's work gets done at: subjects/hour or class images/s."""
    return f"{r['subjects_per_hour']} subjects/h" if r["what"] == "subjects" else f"{r['images_per_s']} images/s"


SECTIONS = {"job": job_section, "train": train_section, "kernels": kernels_section, "prior": prior_section,
            "generate": generate_section, "distributed": distributed_section}


# -- one line per finding, for the summary at the top ---------------------------------------------------------


def job_summary(rows: list[dict]) -> list[str]:
    lines = []
    for r, b in job_pairs(rows):
        phases = ", ".join(f"{name} {num(r[k]):.2f}x" for name, k in (("class images", "class_images_speedup"),
                                                                      ("training", "train_speedup"))
                          if r.get(k) and (r["cache"] == "cold" or k == "train_speedup"))
        predictions = r["impl"] == "dreambooth_fast_predictions"
        if predictions and r.get("step_vs_images"):
            phases += (f"{', ' if phases else ''}its step {num(r['step_vs_images']):.2f}x "
                       f"({num(r['step_vs_images_min']):.2f}-{num(r['step_vs_images_max']):.2f}) the time of the "
                       "class-image prior step")
        if r.get("cpu_speedup"):
            phases += f"{', ' if phases else ''}in CPU time {num(r['cpu_speedup']):.2f}x"
        images = "no class images (--prior-mode predictions)" if predictions else f"{r['class_images']} class images"
        lines.append(f"**whole job**, {job_config(r)} ({images}, {r['steps']} steps), "
                     f"{r['cache']}: **{speedup(r)}** the diffusers-way job's speed ({num(r['median_s']):.1f} s "
                     f"against {num(b['median_s']):.1f} s{'; ' + phases if phases else ''}); peak RSS "
                     f"{num(r['peak_rss_mib']):.0f} against {num(b['peak_rss_mib']):.0f} MiB")
    return lines


def train_summary(rows: list[dict]) -> list[str]:
    by_key = {(*train_key(r), r["what"], r["impl"]): r for r in rows}
    lines = []
    for (model, stage, shape, what, impl), r in by_key.items():
        if what != "step" or impl not in OURS_IMPLS:
            continue
        fused = by_key[(model, stage, shape, "ops", "fused_ops")]
        if impl != "dreambooth_fast":
            against_ours = ""
            if r.get("ratio_vs_ours"):
                against_ours = (f"; {num(r['ratio_vs_ours']):.2f}x ({num(r['ratio_vs_ours_min']):.2f}-"
                                f"{num(r['ratio_vs_ours_max']):.2f}) our step without{OURS_IMPLS[impl]}")
            lines.append(f"training step, {r['model']}{OURS_IMPLS[impl]} {stage} ({shape}, {r['dtype']}): "
                         f"{ratio(r)} eager's speed, **{verdict(r)}**{against_ours}")
            continue
        lines.append(f"training step, {r['model']} {stage} ({shape}, {r['dtype']}): {ratio(r)} eager's speed, "
                     f"**{verdict(r)}**; the fused ops alone run {ratio(fused)} eager's speed but are "
                     f"{num(fused['share_of_step_pct']):.2g}% of the step, so they can give the step at most "
                     f"{num(r['ops_bound_ratio']):.3f}x"
                     + (f"; against the script's step with its VAE encode every step: {vae_ratio(r)}"
                        if r.get("ratio_vs_eager_vae") else ""))
    lines += [f"training step, {r['model']} {r['stage']} ({r['shape']}): not measured, {r['note']}"
              for r in rows if r["impl"] == "skipped"]
    return lines


# What a training step runs of each op: add_noise forward only, the loss forward and backward.
WHOLE_OPS = {("add_noise", "fwd"), ("dreambooth_loss", "fwd+bwd")}


def kernels_summary(rows: list[dict]) -> list[str]:
    whole = [r for r in rows if r["impl"] == "fused" and (r["op"], r["direction"]) in WHOLE_OPS]
    speedups = [num(r["speedup_vs_eager"]) for r in whole]
    lines = [f"fused kernels alone, whole ops (add_noise forward, dreambooth_loss forward + backward): "
             f"{min(speedups):.2f}x to {max(speedups):.2f}x eager PyTorch's speed over {len(speedups)} "
             "shape/dtype cases (medians)"]
    cached = [r for r in whole if r["pct_copy"] and num(r["pct_copy"]) > 100]
    if cached:
        lines.append(f"{len(cached)} of those cases move data faster than the measured copy bandwidth: their "
                     "tensors sat in cache, so that GB/s is not memory bandwidth")
    norm = [r for r in rows if r["impl"] == "fused" and r["op"] == "group_norm_act" and r["direction"] == "fwd+bwd"]
    if norm:
        cells = ", ".join(f"{r['stage']} {r['dtype']} {num(r['speedup_vs_eager']):.2f}x" for r in norm)
        lines.append(f"fused GroupNorm + scale-shift + GELU (group_norm_act) forward + backward against the eager "
                     f"chain: {cells}")
    return lines


def prior_summary(rows: list[dict]) -> list[str]:
    default = [r for r in rows if r["candidate"] == "default" and r.get("vs_diffusers")]
    return [f"class images at the default settings ({r['sampler']}, {r['steps']} steps, batch {r['batch_size']}): "
            f"{num(r['vs_diffusers']):.2f}x the images/s of diffusers' way, {num(r['vs_before']):.2f}x this "
            f"project's before; judged as the class {r['class_share'] or '-'} (diffusers' way: "
            f"{next((x['class_share'] for x in rows if x['candidate'] == 'diffusers'), '-') or '-'})"
            for r in default]


def generate_summary(rows: list[dict]) -> list[str]:
    cascade = [r for r in rows if r["what"] == "cascade" and r["backend"] != "torch"]
    skipped = [r["backend"] for r in rows if r["what"] == "skipped"]
    line = "generation end to end (one prompt, base + SR): " + ", ".join(
        f"{r['backend']} {ratio(r)} eager's speed" for r in cascade)
    return [line + (f"; not measured here: {', '.join(skipped)}" if skipped else "")]


def distributed_summary(rows: list[dict]) -> list[str]:
    return [f"{_distributed_work(r)} on {r['processes']} torchrun processes: {num(r['speedup']):.2f}x "
            f"({num(r['speedup_min']):.2f}-{num(r['speedup_max']):.2f}) the {distributed_rate(r).split(' ', 1)[1]} of "
            f"one process, at load {r['load_1m_runs']}"
            + (f"; {num(r['cpu_speedup']):.2f}x ({num(r['cpu_speedup_min']):.2f}-{num(r['cpu_speedup_max']):.2f}) on "
               "free cores, from the busiest rank's CPU seconds" if r.get("cpu_speedup") else "")
            for r in rows if r.get("speedup")]


SUMMARIES = {"job": job_summary, "train": train_summary, "kernels": kernels_summary, "prior": prior_summary,
             "generate": generate_summary, "distributed": distributed_summary}


# -- plots ------------------------------------------------------------------------------------------------


def _bars(ax, labels: list[str], series: dict[str, list[tuple[float, float, float]]], ylabel: str,
          ratios: bool = False) -> None:
    """Grouped medians with min-max error bars; series: {name: [(median, min, max) per label]}. Times as bars;
    ratios as points on a log axis with a line at 1 (a ratio's spread is multiplicative)."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        med = [v[0] for v in values]
        err = [[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]]
        if ratios:
            ax.errorbar(xs, med, yerr=err, fmt="o", capsize=3, label=name)
        else:
            ax.bar(xs, med, width, yerr=err, capsize=3, label=name)
    if ratios:
        ax.set_yscale("log")
        ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def _triple(r: dict, unit: str) -> tuple[float, float, float]:
    return num(r[f"median_{unit}"]), num(r[f"min_{unit}"]), num(r[f"max_{unit}"])


def _ratio_triple(r: dict) -> tuple[float, float, float]:
    mid = num(r["ratio_vs_eager"])
    return (mid, num(r["ratio_min"]), num(r["ratio_max"])) if r.get("ratio_min") else (mid, mid, mid)


def plot(suite: str, rows: list[dict], path: Path) -> bool:
    """Write the suite's figure to `path`; False (nothing written) when the run measured nothing."""
    measured = [r for r in rows if r.get("impl") != "skipped" and r.get("what") != "skipped"]
    if not measured:
        return False
    rows = measured
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if suite == "job":
        pairs = job_pairs(rows)
        bars = [(f"{job_config(x)} {x['cache']} {who}", x) for r, b in pairs for who, x in (("ours", r), ("base", b))]
        left = [0.0] * len(bars)
        for phase in JOB_PHASES:
            widths = [num(x[f"{phase}_s"]) for _, x in bars]
            axes[0].barh(range(len(bars)), widths, left=left, label=phase.replace("_", " "))
            left = [a + w for a, w in zip(left, widths)]
        axes[0].set_yticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
        axes[0].invert_yaxis()
        axes[0].set_xlabel("seconds (median per phase)")
        axes[0].legend(fontsize=7)
        _bars(axes[1], [f"{job_config(r)} {r['cache']}" for r, _ in pairs],
              {"whole job": [(num(r["speedup"]), num(r["speedup_min"]), num(r["speedup_max"])) for r, _ in pairs]},
              "baseline / ours (>1: ours faster)", ratios=True)
    elif suite == "train":
        mine = [r for r in rows if r["what"] == "step" and r["impl"] == "dreambooth_fast"]
        eager = {train_key(r): r for r in rows if r["what"] == "step" and r["impl"] == "diffusers_eager"}
        labels = [f"{r['model']} {r['stage']} {r['shape']}" for r in mine]
        _bars(axes[0], labels, {"dreambooth_fast": [_triple(r, "ms") for r in mine],
                                "diffusers eager": [_triple(eager[train_key(r)], "ms") for r in mine]},
              "step ms (median, min-max)")
        _bars(axes[1], labels, {"whole step": [_ratio_triple(r) for r in mine],
                                "fused ops alone": [_ratio_triple(o) for r in mine for o in rows
                                                    if o["impl"] == "fused_ops" and train_key(o) == train_key(r)]},
              "eager / ours (>1: ours faster)", ratios=True)
    elif suite == "kernels":
        fused = [r for r in rows if r["impl"] == "fused"]
        labels = [f"{r['op'].replace('dreambooth_', '')} {r['direction']} {r['shape']} {r['dtype']}" for r in fused]
        axes[0].barh(range(len(fused)), [num(r["speedup_vs_eager"]) for r in fused])
        axes[0].set_yticks(range(len(fused)), labels, fontsize=6)
        axes[0].axvline(1, color="k", lw=0.8)
        axes[0].set_xlabel("speedup vs eager (medians)")
        whole = [r for r in fused if r["gbps"]]
        axes[1].barh(range(len(whole)), [num(r["pct_copy"]) for r in whole])
        axes[1].set_yticks(range(len(whole)),
                           [f"{r['op'].replace('dreambooth_', '')} {r['shape']} {r['dtype']}" for r in whole],
                           fontsize=6)
        axes[1].set_xlabel("fused GB/s, % of copy bandwidth")
    elif suite == "prior":
        labels = [f"{r['candidate']} ({r['sampler']} {r['steps']}, batch {r['batch_size']})" for r in rows]
        _bars(axes[0], labels, {"images/s": [(num(r["images_per_s"]), num(r["images_per_s_min"]),
                                              num(r["images_per_s_max"])) for r in rows]}, "images/s")
        _bars(axes[1], labels, {"drawn as the class": [(num(r["class_share"] or 0),) * 3 for r in rows]},
              "share of images judged to show the class")
    elif suite == "distributed":
        labels = [f"{r['what']}: {r['impl']} ({r['processes']} process{'es' if r['processes'] != '1' else ''})"
                  for r in rows]
        _bars(axes[0], labels, {"wall": [_triple(r, "s") for r in rows]}, "seconds (median, min-max)")
        timed = [r for r in rows if r.get("speedup")]
        _bars(axes[1], [f"{r['what']}: {r['impl']}" for r in timed],
              {"speed-up": [(num(r["speedup"]), num(r["speedup_min"]), num(r["speedup_max"])) for r in timed]},
              "sequential / torchrun (>1: faster)", ratios=True)
    else:
        done = [r for r in rows if r["what"] != "skipped"]
        groups = list(dict.fromkeys(f"{r['what']} {r['stage']}" for r in done))
        backends = list(dict.fromkeys(r["backend"] for r in done))
        cell = {(f"{r['what']} {r['stage']}", r["backend"]): r for r in done}
        _bars(axes[0], groups, {b: [_triple(cell[(g, b)], "ms") for g in groups] for b in backends},
              "ms (median, min-max)")
        axes[0].set_yscale("log")
        _bars(axes[1], groups, {b: [_ratio_triple(cell[(g, b)]) for g in groups] for b in backends},
              "eager / backend (>1: faster)", ratios=True)
    r = rows[0]
    fig.suptitle(f"{TITLES[suite]}: {r['device_name']} ({r['device']}), commit {r['commit']}, {r['date']}",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


# -- the document ----------------------------------------------------------------------------------------

INTRO = """# Benchmarks

dreambooth-fast against eager PyTorch: the whole job (`dbfast train` from command to output against a job run the
way diffusers' DreamBooth script runs it), the fused kernels alone, the whole DreamBooth training step, class-image
generation, generation per backend, and many subjects over several processes against one after the other.
Generated by `python -m benchmarks.render` from `benchmarks/results/*.csv` (every run of `python -m benchmarks`
appends there; this page shows the latest run of each suite per device).

How to read it: the implementations compared are measured in one run, alternating, after warm-up; times are
medians with min-max; ratios are computed per paired round, median (min-max). A kernel ratio is not a
training-step ratio: both are reported, and the step table says when the fused ops do not make the step faster.
The CPU figures come from a shared 2-core machine: absolute CPU times are only indicative (the load average is
recorded with every table); absolute times mean something only on a GPU.
"""


def render(results: Path, out: Path) -> Path:
    runs = read_csv(results / "runs.csv")
    summary, sections = [], []
    for suite in SUITES:
        rows = read_csv(results / f"{suite}.csv")
        sections.append(f"## {TITLES[suite]}\n")
        if not rows:
            sections.append(f"No results yet: run `python -m benchmarks --suite {suite}`.\n")
            continue
        for device, latest in (latest_part_runs(rows, PART_KEYS[suite]) if suite in PART_KEYS
                               else latest_runs(rows)).items():
            summary += [f"- {device}: {line}" for line in SUMMARIES[suite](latest)]
            png = results / f"{suite}-{device}.png"
            sections.append(f"### {device}\n")
            # The job suite's configurations may come from separate runs: one header and table per run.
            for run_rows in ([[r for r in latest if r["date"] == d] for d in sorted({r["date"] for r in latest})]
                             if suite == "job" else [latest]):
                sections.append("\n\n".join(header_lines(run_rows, run_of(run_rows, suite, runs))) + "\n")
                sections.append(SECTIONS[suite](run_rows) + "\n")
            if plot(suite, latest, png):
                sections.append(f"![{TITLES[suite]} on {device}]({os.path.relpath(png, out.parent)})\n")
    profiles = read_csv(results / "profile.csv")
    sections.append("## Step profile\n")
    sections.append(PROFILE_INTRO)
    for rows in latest_profiles(profiles):
        sections.append(profile_title(rows[0]))
        sections.append("\n\n".join(header_lines(rows, {})) + "\n")
        sections.append(profile_section(rows) + "\n")
    if not profiles:
        sections.append("No profiles yet: run `python -m benchmarks.profile_step`.\n")
    parts = [INTRO, "## Summary\n", "\n".join(summary) + "\n", *sections]
    atomic_write_bytes(out, "\n".join(parts).encode())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="results folder (benchmarks/results)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="the Markdown file to write")
    args = parser.parse_args(argv)
    print(f"wrote {render(args.results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
