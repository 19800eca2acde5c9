"""The kernel benchmark runs end to end and records its rows (smoke size, one repeat; speed is not judged)."""

import csv

from benchmarks import bench_kernels

RUN_FIELDS = ["date", "commit", "torch", "device", "device_name", "threads"]
RESULT_FIELDS = ["suite", "stage", "op", "direction", "impl", "dtype", "shape", "median_us", "min_us", "max_us",
                 "samples", "speedup_vs_eager", "gbps", "copy_gbps", "pct_copy", "native"]


def read_rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_appends_rows_with_every_field(tmp_path, capsys):
    out = tmp_path / "results" / "kernels.csv"
    assert bench_kernels.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0

    rows = read_rows(out)
    measured = {(r["op"], r["direction"], r["impl"], r["dtype"]) for r in rows}
    for dtype in ("fp32", "bf16"):
        for impl in ("fused", "eager"):
            assert ("add_noise", "fwd", impl, dtype) in measured
            for direction in ("fwd", "bwd", "fwd+bwd"):
                assert ("dreambooth_loss", direction, impl, dtype) in measured
    for row in rows:
        for field in RUN_FIELDS + RESULT_FIELDS:
            assert field in row, field
        assert row["device"] == "cpu" and row["device_name"] and row["torch"] and row["commit"]
        assert row["shape"] == "2x3x8x8"
        assert float(row["median_us"]) > 0 and float(row["min_us"]) <= float(row["max_us"])
        assert float(row["copy_gbps"]) > 0
        whole_op = (row["op"], row["direction"]) in {("add_noise", "fwd"), ("dreambooth_loss", "fwd+bwd")}
        assert (row["gbps"] != "") == whole_op
    assert "speedup" in capsys.readouterr().out


def test_second_run_appends_to_the_same_file(tmp_path):
    out = tmp_path / "kernels.csv"
    bench_kernels.main(["--device", "cpu", "--smoke", "--out", str(out)])
    first = read_rows(out)
    bench_kernels.main(["--device", "cpu", "--smoke", "--out", str(out)])
    rows = read_rows(out)
    assert len(rows) == 2 * len(first)
    assert rows[: len(first)] == first
