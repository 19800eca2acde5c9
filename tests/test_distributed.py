"""One run over several processes (issue 18): DDP and FSDP2 on the gloo backend, 2 CPU processes started by
torchrun from the tests, against one process with the same global batch."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from runs import FAST, assert_refused, train, unet_weights

from dreambooth_fast.distributed import SINGLE, Dist
from dreambooth_fast.train import rank_rows

REPO = Path(__file__).resolve().parents[1]
# 4 class images drawn one per batch: 2 batches for each rank.
CLASS_IMAGES = ["--num-class-images", "4", "--class-batch-size", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cache),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def dbfast_command(nproc: int, *args, logs: Path | None = None) -> list[str]:
    """`dbfast ...` in one process (nproc 0: no launcher) or under torchrun with `nproc` processes; `logs`: each
    worker's stdout and stderr into files there (torchrun --log-dir)."""
    if nproc == 0:
        return [sys.executable, "-m", "dreambooth_fast", *map(str, args)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    if logs is not None:
        launcher += ["--log-dir", str(logs), "--redirects", "3"]
    return [*launcher, "-m", "dreambooth_fast", *map(str, args)]


def run_dbfast(nproc: int, *args, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(dbfast_command(nproc, *args), env=_env(cache), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def train_args(model: Path, images: Path, out: Path, *extra) -> list:
    return ["train", "--model", model, "--images", images, "--class", "dog", "--output", out, "--stages", "base",
            *FAST, *extra]


def _metrics(out: Path) -> list[dict[str, float]]:
    with open(out / "logs" / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if k != "stage"} for row in csv.DictReader(f)]


def worker_log(logs: Path, rank: int, stream: str = "stderr") -> str:
    return next(logs.rglob(f"attempt_*/{rank}/{stream}.log")).read_text()


# -- the global batch ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("parts", [1, 2])
def test_the_ranks_rows_split_the_global_batch_without_overlap(world_size, parts):
    batch = 2
    rows = [rank_rows(batch, Dist(r, world_size, r, "gloo"), parts).tolist() for r in range(world_size)]
    assert sorted(sum(rows, [])) == list(range(parts * batch * world_size))
    for r, mine in enumerate(rows):  # the same subject rows and prior rows as one process's rows r*batch...
        assert mine == [p * batch * world_size + r * batch + i for p in range(parts) for i in range(batch)]
    assert rank_rows(batch, SINGLE, parts).tolist() == list(range(parts * batch))


# -- DDP against one process ---------------------------------------------------------------------------------------
def one_process_and_two_ranks(model, subject_dir, tmp_path):
    """The same run as 1 process x batch 2 (tmp_path/one) and as 2 ranks x batch 1 (tmp_path/two), checked to
    train the same: each step's losses and gradient norm agree to fp32 rounding, the weights to well under one
    learning-rate step, and the 2 ranks draw the single process's class images byte for byte, each once. Returns
    the 2-rank process and its dreambooth.json."""
    one = run_dbfast(0, *train_args(model, subject_dir, tmp_path / "one", "--batch-size", "2", *CLASS_IMAGES),
                     cache=tmp_path / "cache-one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_dbfast(2, *train_args(model, subject_dir, tmp_path / "two", "--batch-size", "1", *CLASS_IMAGES),
                     cache=tmp_path / "cache-two")
    assert two.returncode == 0, two.stderr[-3000:]

    # Adam turns a near-zero gradient into a step of up to the learning rate, so a rounding difference there can
    # move a weight by a share of it: the weights agree to well under one learning-rate step (1e-5), not bit for bit.
    logs = [_metrics(tmp_path / run) for run in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 2
    for row_one, row_two in zip(*logs):
        for column in ("loss", "subject_loss", "prior_loss", "grad_norm"):
            assert row_two[column] == pytest.approx(row_one[column], rel=1e-5)
    a, b = unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")
    assert any(not torch.equal(a[k], w) for k, w in unet_weights(model).items())  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

    run = json.loads((tmp_path / "two" / "dreambooth.json").read_text())
    assert sum(run["class_images_drawn"]) == 4 and len(run["class_images_drawn"]) == 2
    folders = [Path(json.loads((tmp_path / r / "dreambooth.json").read_text())["class_images"]) / "base"
               for r in ("one", "two")]
    assert sorted(p.name for p in folders[1].glob("*.png")) == [f"{i:04d}.png" for i in range(4)]
    for i in range(4):
        assert (folders[0] / f"{i:04d}.png").read_bytes() == (folders[1] / f"{i:04d}.png").read_bytes()
    return two, run


def test_two_ranks_train_what_one_process_trains_on_the_same_global_batch(tiny_cascade, subject_dir, tmp_path):
    """2 ranks x batch 1 give the weights 1 process x batch 2 gives (up to fp32 reduction order); the class
    images are the single process's, byte for byte, each drawn once; only rank 0 writes."""
    two, run = one_process_and_two_ranks(tiny_cascade, subject_dir, tmp_path)
    assert run["distributed"] | {} == {"world_size": 2, "backend": "gloo", "sharding": "ddp", "batch_per_process": 1,
                                       "gradient_accumulation": 1, "global_batch": 2}
    assert len(run["class_images_cpu_s"]) == 2 and min(run["class_images_cpu_s"]) > 0
    # Rank 0 alone wrote: one row per step in the log (above), no other process's temporary files, one "done".
    assert not [p for p in (tmp_path / "two").rglob(".*tmp*")]
    assert two.stdout.count("done: ") == 1 and "global batch 2 = 1 per process x 2 processes" in two.stdout


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains_on_stable_diffusion(tiny_sd, subject_dir, tmp_path):
    """The same on the tiny Stable Diffusion model (latents behind a VAE, CLIP text, PNDM). About 2 minutes on the
    shared CPU (the IF test above keeps the path in the fast suite)."""
    two, run = one_process_and_two_ranks(tiny_sd, subject_dir, tmp_path)
    assert two.stdout.count("done: ") == 1


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains(tiny_cascade, subject_dir, tmp_path):
    """FSDP2 (shards per UNet block) gives DDP's weights, and its output loads like any other."""
    from diffusers import IFPipeline

    outs = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        extra = ["--fsdp"] if mode == "fsdp" else []
        result = run_dbfast(2, *train_args(tiny_cascade, subject_dir, out, "--steps", "3", *extra),
                            cache=tmp_path / "cache")
        assert result.returncode == 0, result.stderr[-3000:]
        outs[mode] = unet_weights(out)
    assert max(float((outs["ddp"][k] - outs["fsdp"][k]).abs().max()) for k in outs["ddp"]) < 1e-5  # see above
    for row_ddp, row_fsdp in zip(_metrics(tmp_path / "ddp"), _metrics(tmp_path / "fsdp"), strict=True):
        assert row_fsdp["loss"] == pytest.approx(row_ddp["loss"], rel=1e-5)
        assert row_fsdp["grad_norm"] == pytest.approx(row_ddp["grad_norm"], rel=1e-5)
    run = json.loads((tmp_path / "fsdp" / "dreambooth.json").read_text())
    assert run["distributed"]["sharding"] == "fsdp"
    IFPipeline.from_pretrained(tmp_path / "fsdp", safety_checker=None, watermarker=None, feature_extractor=None)


@pytest.mark.slow
def test_accelerate_launch_starts_the_same_distributed_run(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "dreambooth_fast",
               *map(str, train_args(tiny_cascade, subject_dir, out, "--no-prior"))]
    result = subprocess.run(command, env=_env(tmp_path / "cache"), capture_output=True, text=True, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "dreambooth.json").read_text())
    assert run["distributed"]["world_size"] == 2 and run["distributed"]["global_batch"] == 2


# -- the finite-weights check before a checkpoint -----------------------------------------------------------------
# (nan on rank, fsdp): under DDP the ranks' weights are the same, so rank 0 alone counts and tells the others;
# under FSDP each rank holds a shard and counts its own.
FINITE_CASES = [(1, False), (0, False), (1, True)]


def _check_finite_on_rank(rank: int, port: int, results) -> None:
    import types

    import torch.distributed as dist

    from dreambooth_fast.errors import UserError
    from dreambooth_fast.train import StageTrainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for nan_rank, fsdp in FINITE_CASES:
            weights = torch.zeros(4)
            if rank == nan_rank:
                weights[:2] = float("nan")
            trainer = types.SimpleNamespace(params=[weights], cfg=types.SimpleNamespace(fsdp=fsdp), stage="base",
                                            step=2, last_checkpoint=None, dist=Dist(rank, 2, rank, "gloo"))
            try:
                StageTrainer.check_finite(trainer)
                results.put((rank, nan_rank, fsdp, "ok"))
            except UserError as err:
                results.put((rank, nan_rank, fsdp, str(err)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_only_rank_0_checks_the_weights_under_ddp_and_every_rank_its_shard_under_fsdp():
    """Two gloo processes, spawned: about a minute on the shared CPU (imports)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results, port = context.Queue(), _free_port()
    ranks = [context.Process(target=_check_finite_on_rank, args=(rank, port, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    found = {}
    for _ in range(2 * len(FINITE_CASES)):
        rank, nan_rank, fsdp, outcome = results.get(timeout=120)
        found[(rank, nan_rank, fsdp)] = outcome
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    # DDP: rank 1's weights are not read (they are rank 0's under DDP); rank 0's count stops both ranks.
    assert found[(0, 1, False)] == found[(1, 1, False)] == "ok"
    # Rank 0's weights under DDP, rank 1's shard under FSDP: both ranks stop with the same line.
    for nan_rank, fsdp in FINITE_CASES[1:]:
        assert found[(0, nan_rank, fsdp)] == found[(1, nan_rank, fsdp)]
        assert found[(0, nan_rank, fsdp)].startswith("stage base: 2 weights are not finite after step 2")


# -- a rank that dies ----------------------------------------------------------------------------------------------
def _kill_rank_after_checkpoint(launcher: subprocess.Popen, out: Path, rank: int, step: int) -> None:
    """SIGKILL the worker of `rank` once the run's checkpoint of `step` (or later) is written."""
    deadline = time.monotonic() + 300
    latest = out / "checkpoints" / "latest.json"
    while time.monotonic() < deadline:
        if latest.is_file() and json.loads(latest.read_text()).get("step", 0) >= step:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                if child.environ().get("RANK") == str(rank):
                    child.send_signal(signal.SIGKILL)
                    return
        assert launcher.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_with_one_line_and_resume_finishes_the_same_run(
    tiny_cascade, subject_dir, tmp_path
):
    args = ["--steps", "30", "--checkpoint-every", "3", "--no-prior"]
    straight = run_dbfast(2, *train_args(tiny_cascade, subject_dir, tmp_path / "straight", *args),
                          cache=tmp_path / "cache")
    assert straight.returncode == 0, straight.stderr[-3000:]

    out, logs = tmp_path / "cut", tmp_path / "logs"
    launcher = subprocess.Popen(dbfast_command(2, *train_args(tiny_cascade, subject_dir, out, *args), logs=logs),
                                env=_env(tmp_path / "cache"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=REPO)
    _kill_rank_after_checkpoint(launcher, out, rank=1, step=3)
    assert launcher.wait(timeout=120) != 0  # the survivor stopped (no hang)
    survivor = worker_log(logs, 0)
    errors = [line for line in survivor.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in survivor, survivor[-2000:]
    assert errors[0].startswith("error: [rank 0] ") and "--resume" in errors[0], errors[0]
    assert "lost contact with another rank" in errors[0] or "the launcher stopped this rank" in errors[0]

    resumed = run_dbfast(2, *train_args(tiny_cascade, subject_dir, out, *args, "--resume"), cache=tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = unet_weights(tmp_path / "straight"), unet_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_with_another_number_of_processes_is_refused_once(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "out"
    assert train(tiny_cascade, subject_dir, out, "--no-prior", "--stages", "base").exit_code == 0
    result = run_dbfast(2, *train_args(tiny_cascade, subject_dir, out, "--no-prior", "--steps", "4", "--resume"),
                        cache=tmp_path / "cache")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "trained on 1 process(es), this is 2" in errors[0], result.stderr[-2000:]


# -- options ------------------------------------------------------------------------------------------------------
def test_fsdp_without_a_launcher_says_how_to_start_one(tiny_cascade, subject_dir, tmp_path):
    assert_refused(train(tiny_cascade, subject_dir, tmp_path / "out", "--fsdp"), "--fsdp", "torchrun",
                   out=tmp_path / "out")


def test_fsdp_with_lora_is_refused(tiny_cascade, subject_dir, tmp_path):
    assert_refused(train(tiny_cascade, subject_dir, tmp_path / "out", "--fsdp", "--lora-rank", "4"), "--fsdp", "LoRA",
                   out=tmp_path / "out")


def test_a_bad_option_under_torchrun_is_printed_once(tiny_cascade, subject_dir, tmp_path):
    result = run_dbfast(2, *train_args(tiny_cascade, subject_dir, tmp_path / "out", "--steps", "0"),
                        cache=tmp_path / "cache")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: [rank 0] --steps must be at least 1, got 0"], result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_doctor_names_the_rank_and_backend_under_a_launcher(monkeypatch):
    from runs import dbfast

    assert "not launched (gloo" in dbfast("doctor").output
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert "distributed     launched: rank 1 of 2, backend gloo" in dbfast("doctor").output


@pytest.mark.slow
def test_nproc_per_node_starts_the_run_itself_and_passes_the_exit_code_on(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "out"
    result = run_dbfast(0, *train_args(tiny_cascade, subject_dir, out, "--no-prior", "--nproc-per-node", "2"),
                        cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "dreambooth.json").read_text())["distributed"]["world_size"] == 2

    bad = run_dbfast(0, *train_args(tiny_cascade, subject_dir, tmp_path / "bad", "--steps", "0", "--nproc-per-node",
                                    "2"), cache=tmp_path / "cache")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert [line for line in bad.stderr.splitlines() if line.strip()] == [
        "error: [rank 0] --steps must be at least 1, got 0"]
