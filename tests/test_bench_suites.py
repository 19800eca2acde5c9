"""Every benchmark suite runs end to end at its tiniest size (one round) and records complete rows; the renderer
turns them into BENCHMARKS.md tables and PNG plots. Speed is never judged here."""

import contextlib
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_distributed, bench_generate, bench_job, bench_kernels, bench_prior, bench_train, render

ROOT = Path(__file__).resolve().parents[1]

RUN_FIELDS = ["date", "commit", "torch", "diffusers", "onnxruntime", "device", "device_name", "threads", "load_1m"]


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def check_run_fields(rows: list[dict], device: str = "cpu") -> None:
    for row in rows:
        for field in RUN_FIELDS:
            assert row.get(field, "") != "", field
        assert row["device"] == device and row["torch"] == torch.__version__


@contextlib.contextmanager
def one_thread():
    """A shared machine: torch's OpenMP threads waiting on each other make these runs up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results(tiny_cascade, tmp_path_factory) -> Path:
    """Smoke runs of every suite into one results folder (generate: eager, plus TensorRT, which says why it
    cannot run on a CPU; the other backends are in the slow test below)."""
    folder = tmp_path_factory.mktemp("results")
    with one_thread():
        bench_kernels.run("cpu", smoke=True, out=folder / "kernels.csv")
        bench_train.run("cpu", smoke=True, out=folder / "train.csv", model_dir=tiny_cascade, command="test")
        bench_prior.run("cpu", smoke=True, out=folder / "prior.csv", model_dir=tiny_cascade, command="test")
        bench_generate.run("cpu", smoke=True, out=folder / "generate.csv", model_dir=tiny_cascade, command="test",
                           backends=("torch", "trt"))
    return folder


def test_train_rows_compare_both_steps_and_both_op_sets_per_stage(results):
    rows = read_rows(results / "train.csv")
    check_run_fields(rows)
    measured = {(r["stage"], r["what"], r["impl"]) for r in rows}
    for stage in ("base", "sr"):
        assert {(stage, "step", "dreambooth_fast"), (stage, "step", "diffusers_eager"),
                (stage, "ops", "fused_ops"), (stage, "ops", "eager_ops")} <= measured
    for r in rows:
        assert float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["max_ms"])
        assert int(r["subject_rows"]) == int(r["prior_rows"]) >= 1 and r["dtype"] == "fp32"
        assert r["model"] in ("tiny", "tiny-sd") and r["family"] == ("sd" if r["model"] == "tiny-sd" else "if")
        if r["what"] == "step":
            assert float(r["peak_step_mb"]) > 0 and r["mem_method"]
        else:
            assert float(r["share_of_step_pct"]) > 0
    ours = [r for r in rows if r["impl"] == "dreambooth_fast"]
    assert all(r["ratio_min"] and r["ops_bound_ratio"] for r in ours)
    # The base stage also steps with --fused-norm, against eager and against our default step.
    fused_norm = [r for r in rows if r["impl"] == "dreambooth_fast_fused_norm"]
    assert [r["model"] for r in fused_norm] == ["tiny"] and fused_norm[0]["ratio_vs_ours"]


def test_train_rows_on_stable_diffusion_are_latents_with_the_scripts_vae_step_beside(results):
    """The tiny SD model: both steps on the same latents (4 channels), and the script's step that encodes its batch
    with the VAE every step, compared with ours on its own."""
    sd = [r for r in read_rows(results / "train.csv") if r["model"] == "tiny-sd"]
    steps = {r["impl"]: r for r in sd if r["what"] == "step"}
    assert set(steps) == {"dreambooth_fast", "diffusers_eager", "diffusers_eager_vae"}
    assert {r["shape"] for r in sd} == {"2x4x8x8"} and {r["prediction"] for r in sd} == {"epsilon"}
    assert steps["diffusers_eager_vae"]["vae"].startswith("VAE encode of the batch every step")
    assert steps["dreambooth_fast"]["vae"] == steps["diffusers_eager"]["vae"] == (
        "latents encoded once before the loop (not timed)")
    ours = steps["dreambooth_fast"]
    assert float(ours["ratio_vs_eager_vae_min"]) <= float(ours["ratio_vs_eager_vae"]) <= float(
        ours["ratio_vs_eager_vae_max"])
    assert {r["impl"] for r in sd if r["what"] == "ops"} == {"fused_ops", "eager_ops"}
    text = render.render(results, results / "BENCHMARKS.md").read_text()
    assert "| tiny-sd | epsilon | 2x4x8x8 | fp32 |" in text and "eager + VAE encode" in text


def test_prior_rows_compare_the_default_with_diffusers_way_side_by_side(results):
    rows = read_rows(results / "prior.csv")
    check_run_fields(rows)
    assert [r["candidate"] for r in rows] == ["diffusers", "before", "default"]
    for r in rows:
        assert float(r["images_per_s"]) > 0 and float(r["vs_diffusers"]) > 0 and r["size"] == "32"
        assert r["judged"] == ""  # the tiny random cascade is not the toy world's: nothing to judge


def test_prior_candidates_include_diffusers_way_and_the_train_defaults():
    from dreambooth_fast.config import TrainConfig

    cfg = TrainConfig()
    named = {c.name: c for c in bench_prior.candidates()}
    assert (named["diffusers"].sampler, named["diffusers"].steps, named["diffusers"].batch) == ("ddpm", 100, 4)
    default = named["default"]
    assert (default.sampler, default.steps, default.batch) == (cfg.class_sampler, cfg.class_sample_steps,
                                                               cfg.class_batch_size)


def test_generate_rows_per_stage_and_end_to_end_and_a_reason_for_a_missing_backend(results):
    rows = read_rows(results / "generate.csv")
    check_run_fields(rows)
    done = {(r["what"], r["stage"]) for r in rows if r["backend"] == "torch"}
    assert done == {("unet_step", "base"), ("unet_step", "sr"), ("cascade", "base+sr")}
    for r in rows:
        if r["backend"] == "torch":
            assert float(r["ratio_vs_eager"]) == 1.0 and float(r["median_ms"]) > 0
    (trt,) = [r for r in rows if r["backend"] == "trt"]
    assert trt["what"] == "skipped" and "CUDA" in trt["note"]


def test_render_writes_a_table_and_a_plot_per_suite(results, tmp_path):
    out = render.render(results, tmp_path / "BENCHMARKS.md")
    text = out.read_text()
    for title in render.TITLES.values():
        assert f"## {title}" in text
    assert text.count("### cpu") == 4 and "Command: `test`" in text
    assert read_rows(results / "train.csv")[0]["device_name"] in text
    assert any(verdict in text for verdict in ("| faster |", "| slower |", "| no measurable difference |"))
    # The job and distributed suites' smoke runs are the slow tests below.
    assert "No results yet: run `python -m benchmarks --suite job`" in text
    assert "No results yet: run `python -m benchmarks --suite distributed`" in text
    for suite in set(render.SUITES) - {"job", "distributed"}:
        assert (results / f"{suite}-cpu.png").stat().st_size > 0


def test_command_line_runs_a_suite_and_logs_the_run(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "--suite", "kernels", "--smoke", "--threads", "1", "--out",
               str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (run,) = read_rows(tmp_path / "runs.csv")
    assert run["suite"] == "kernels" and run["command"].startswith("python -m benchmarks --suite kernels")
    assert read_rows(tmp_path / "kernels.csv") and run["load_1m_start"] != ""


def test_job_commands_share_every_setting_and_leave_our_class_image_defaults_alone(tmp_path):
    config = bench_job.scaled(bench_job.CONFIGS["demo"], quick=True, smoke=False)
    assert (config.class_images, config.steps) == (10, 300) and config.scaled.startswith("quick")
    ours = bench_job.ours_command(config, tmp_path / "ours", "cpu")
    base = bench_job.baseline_command(config, tmp_path / "base", tmp_path / "class", tmp_path / "t.json", "cpu")
    for option in ("--num-class-images", "--steps", "--seed", "--batch-size", "--lr-schedule", "--min-snr-gamma",
                   "--device"):
        assert ours[ours.index(option) + 1] == base[base.index(option) + 1], option
    assert ours[ours.index("--lr") + 1] == base[base.index("--learning-rate") + 1] == "0.0003"
    assert "--captions" in ours and "--captions" in base and ours[ours.index("--stages") + 1] == "base"
    # Our class images are drawn at whatever dbfast's defaults are when the benchmark runs.
    assert not [arg for arg in ours if arg.startswith(("--class-sample", "--sr-sample"))]
    assert "--prior-mode" not in ours
    predictions = bench_job.ours_command(config, tmp_path / "ours", "cpu", "predictions")
    assert predictions == [*ours[:-1], "--prior-mode", "predictions", "--captions"]


def test_job_on_stable_diffusion_gives_both_jobs_the_same_model(tmp_path):
    config = bench_job.scaled(bench_job.CONFIGS["short"], quick=True, smoke=False)
    model = bench_job.Model("sd", tmp_path / "tiny-sd", "tiny-sd")
    ours = bench_job.ours_command(config, tmp_path / "ours", "cpu", model=model)
    base = bench_job.baseline_command(config, tmp_path / "base", tmp_path / "class", tmp_path / "t.json", "cpu",
                                      model=model)
    assert ours[ours.index("--model") + 1] == base[base.index("--model") + 1] == str(model.path)
    assert "--model" not in bench_job.ours_command(config, tmp_path / "ours", "cpu")  # IF: the embedded default


@pytest.mark.slow
def test_job_smoke_on_stable_diffusion_runs_both_jobs_and_renders(tmp_path):
    """The tiny SD model built once, ours and the diffusers-way job (StableDiffusionPipeline class images, the VAE
    encode every step), cold, one round: about a minute and a half on the shared CPU."""
    with one_thread():
        rows = bench_job.run("cpu", smoke=True, out=tmp_path / "job.csv", command="test", caches=("cold",),
                             family="sd")
    assert [(r["impl"], r["family"], r["model"]) for r in rows] == [
        ("dreambooth_fast", "sd", "tiny-sd"), ("diffusers_way", "sd", "tiny-sd")]
    check_run_fields(rows)
    ours, base = rows
    assert base["class_settings"].startswith("StableDiffusionPipeline defaults: PNDM 50 steps, guidance 7.5")
    for r in rows:
        assert r["class_images_s"] > 0 and r["train_s"] > 0 and r["write_s"] > 0 and r["cpu_s"] > 0
    assert ours["speedup_min"] <= ours["speedup"] <= ours["speedup_max"] and ours["step_ms"] > 0
    text = render.render(tmp_path, tmp_path / "BENCHMARKS.md").read_text()
    assert "**Stable Diffusion** (`python -m benchmarks.bench_job --family sd`)" in text
    assert "| SD short (smoke) | cold |" in text and "the VAE encode of every step's batch" in text


@pytest.mark.slow
def test_job_smoke_runs_both_jobs_cold_and_warm_and_renders(tmp_path):
    """Six processes (ours with class images and with --prior-mode predictions, the diffusers-way job; cold and
    warm), a few minutes on the shared CPU."""
    with one_thread():
        rows = bench_job.run("cpu", smoke=True, out=tmp_path / "job.csv", command="test",
                             prior_modes=("images", "predictions"))
    assert len(read_rows(tmp_path / "job.csv")) == len(rows) == 6
    check_run_fields(rows)
    runs = {(r["config"], r["cache"], r["impl"]): r for r in rows}
    assert set(runs) == {("short", cache, impl) for cache in ("cold", "warm")
                         for impl in ("dreambooth_fast", "dreambooth_fast_predictions", "diffusers_way")}
    for cache in ("cold", "warm"):
        predicted = runs.pop(("short", cache, "dreambooth_fast_predictions"))  # checked here, the rest below
        ours = runs[("short", cache, "dreambooth_fast")]
        assert predicted["prior_mode"] == "predictions" and predicted["class_settings"].startswith("none")
        assert predicted["class_images_s"] < 0.5 and predicted["step_ms"] > 0 and ours["step_ms"] > 0
        assert predicted["step_vs_images_min"] <= predicted["step_vs_images"] <= predicted["step_vs_images_max"]
    for (_, cache, impl), r in runs.items():
        assert r["scaled"].startswith("smoke") and r["rounds"] == 1 and r["threads"] == 1
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["peak_rss_mib"] > 0
        assert r["startup_s"] > 0 and r["load_s"] > 0 and r["train_s"] > 0 and r["write_s"] > 0
        # Cold draws the class images; warm finds them (the two class images take seconds, finding them does not).
        assert r["class_images_s"] > runs[("short", "warm", impl)]["class_images_s"] or cache == "warm"
        assert r["cpu_s"] > 0
        if impl == "dreambooth_fast":
            assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
            assert r["cpu_speedup_min"] <= r["cpu_speedup"] <= r["cpu_speedup_max"]
            assert "base_steps" in r["class_settings"]  # read back from the run's class-image cache key
    assert runs[("short", "cold", "dreambooth_fast")]["class_images_speedup"] > 0
    text = render.render(tmp_path, tmp_path / "BENCHMARKS.md").read_text()
    assert "## Whole job" in text and "**whole job**, short (smoke)" in text and "| short (smoke) | warm |" in text
    assert "| short (smoke) predictions | warm |" in text and "the time of the class-image prior step" in text
    assert (tmp_path / "job-cpu.png").stat().st_size > 0


@pytest.mark.slow
def test_generate_measures_every_backend_there_is(tiny_cascade, tmp_path):
    with one_thread():
        rows = bench_generate.run("cpu", smoke=True, out=tmp_path / "generate.csv", model_dir=tiny_cascade)
    ran = {r["backend"] for r in rows if r["what"] == "cascade"}
    assert {"torch", "compile", "onnx", bench_generate.ORT_DEFAULTS} <= ran
    for r in rows:
        if r["what"] == "cascade":
            # Same seed, same weights: every backend draws the same image as eager, to float tolerance.
            assert float(r["max_abs_diff_vs_eager"]) < 1e-2
        if r["backend"] == "onnx" and r["what"] != "skipped":
            assert "onnxruntime" in r["note"] and "1 intra-op threads (torch's)" in r["note"]
        if r["backend"] == bench_generate.ORT_DEFAULTS:
            assert "ORT's default options" in r["note"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_smoke_on_gpu(tiny_cascade, tmp_path):
    rows = bench_train.run("cuda", smoke=True, out=tmp_path / "train.csv", model_dir=tiny_cascade)
    check_run_fields(rows, "cuda")
    assert all(float(r["peak_step_mb"]) > 0 for r in rows if r["what"] == "step")


@pytest.mark.parametrize("eager", [False, True])
def test_step_profile_groups_every_op_of_a_step_and_renders(tiny_cascade, tmp_path, eager):
    from benchmarks import profile_step

    out = tmp_path / "profile.csv"
    with one_thread():
        profile_step.run("tiny", "base", "cpu", steps=1, warmup=1, eager=eager, out=out, tiny_dir=tiny_cascade)
    rows = read_rows(out)
    check_run_fields(rows)
    groups = {r["group"]: float(r["share_pct"]) for r in rows if r["what"] == "group"}
    assert list(groups) == list(profile_step.GROUPS)
    assert sum(groups.values()) == pytest.approx(100, abs=0.1)
    for group in ("conv", "attention", "norm+activation", "optimizer"):
        assert groups[group] > 0, group
    # Ours runs the fused noise and loss ops; the diffusers-style step never does.
    assert (groups["fused ops"] > 0) != eager
    ops = {r["op"]: r["group"] for r in rows if r["what"] == "op"}
    assert ops.get("aten::convolution_backward", "conv") == "conv"
    text = render.render(tmp_path, tmp_path / "BENCHMARKS.md").read_text()
    assert "## Step profile" in text and "tiny base" in text and "| optimizer |" in text


@pytest.mark.slow
def test_distributed_smoke_runs_class_images_and_two_subjects_both_ways_and_renders(tmp_path):
    """The class-image phase and `dbfast train --subjects` with 2 subjects, in one process and on 2 torchrun ranks:
    a few minutes."""
    rows = bench_distributed.run("cpu", smoke=True, out=tmp_path / "distributed.csv", command="test")
    assert len(read_rows(tmp_path / "distributed.csv")) == len(rows) == 4
    check_run_fields(rows)
    assert [(r["what"], r["impl"], r["processes"]) for r in rows] == [
        ("class_images", "sequential", 1), ("class_images", "torchrun", 2),
        ("subjects", "sequential", 1), ("subjects", "torchrun", 2)]
    for r in rows:
        assert r["threads"] == 1 and r["rounds"] == 1 and r["min_s"] <= r["median_s"] <= r["max_s"]
    for sequential, torchrun in (rows[:2], rows[2:]):  # one round: its ratio (of the seconds before rounding)
        assert torchrun["speedup"] == pytest.approx(sequential["median_s"] / torchrun["median_s"], rel=0.01)
    assert rows[0]["images_per_s"] == round(2 / rows[0]["median_s"], 3)
    assert rows[1]["cpu_speedup"] == pytest.approx(rows[0]["busiest_cpu_s"] / rows[1]["busiest_cpu_s"], rel=0.01)
    text = render.render(tmp_path, tmp_path / "BENCHMARKS.md").read_text()
    assert "## Several processes" in text and "| subjects | torchrun | 2 |" in text
    assert "| class images | torchrun | 2 | 2 class images, 1 per batch |" in text
    assert (tmp_path / "distributed-cpu.png").stat().st_size > 0
