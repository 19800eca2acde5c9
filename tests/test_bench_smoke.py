"""The kernel benchmark runs end to end, the way a user runs it, and records its rows (smoke size, one call per
measurement). Speed is never judged here."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN_FIELDS = ["date", "commit", "torch", "device", "device_name", "threads"]
RESULT_FIELDS = ["suite", "stage", "op", "direction", "impl", "dtype", "shape", "median_us", "min_us", "max_us",
                 "q1_us", "q3_us", "samples", "speedup_vs_eager", "gbps", "copy_gbps", "pct_copy", "native"]


def run_smoke(device: str, out: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_kernels", "--device", device, "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def check_rows(rows: list[dict], device: str) -> None:
    measured = {(r["op"], r["direction"], r["impl"], r["dtype"]) for r in rows}
    for dtype in ("fp32", "bf16"):
        for impl in ("fused", "eager"):
            assert ("add_noise", "fwd", impl, dtype) in measured
            for direction in ("fwd", "bwd", "fwd+bwd"):
                assert ("dreambooth_loss", direction, impl, dtype) in measured
                assert ("group_norm_act", direction, impl, dtype) in measured
    for row in rows:
        for field in RUN_FIELDS + RESULT_FIELDS:
            assert field in row, field
        assert row["device"] == device and row["device_name"] and row["torch"] == torch.__version__ and row["commit"]
        assert row["shape"] == ("2x8x4x4" if row["op"] == "group_norm_act" else "2x3x8x8")
        assert float(row["median_us"]) > 0 and float(row["min_us"]) <= float(row["max_us"])
        assert float(row["copy_gbps"]) > 0
        whole_op = (row["op"], row["direction"]) in {("add_noise", "fwd"), ("dreambooth_loss", "fwd+bwd"),
                                                     ("group_norm_act", "fwd+bwd")}
        assert (row["gbps"] != "") == whole_op


def test_smoke_runs_append_rows_with_every_field(tmp_path):
    out = tmp_path / "results" / "kernels.csv"
    stdout = run_smoke("cpu", out)
    assert "speedup" in stdout and "copy bandwidth" in stdout
    first = read_rows(out)
    check_rows(first, "cpu")

    run_smoke("cpu", out)
    rows = read_rows(out)
    assert len(rows) == 2 * len(first)
    assert rows[: len(first)] == first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_run_on_gpu(tmp_path):
    out = tmp_path / "kernels.csv"
    run_smoke("cuda", out)
    check_rows(read_rows(out), "cuda")
