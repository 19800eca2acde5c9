"""scripts/gpu_check.sh, the prepared check for a lent GPU machine, as far as it runs without one: `--dry-run` lists
every step of issue #22 and finds every file and command they need (nvcc too: the build step compiles CUDA)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
STEPS = ["environment", "wheels", "build", "gpu-tests", "memcheck", "bench-kernels", "trt-install", "trt-export",
         "trt-generate", "bench-train"]


def dry_run(**env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], env={**os.environ, "PYTHON": sys.executable, **env},
                          capture_output=True, text=True, timeout=120)


def _nvcc() -> str | None:
    cuda_home_nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    found = os.environ.get("NVCC") or shutil.which("nvcc") or str(cuda_home_nvcc)
    return found if os.access(found, os.X_OK) else None


def test_dry_run_lists_every_step_and_finds_what_they_need():
    done = dry_run()
    assert re.findall(r"^  step (\S+)", done.stdout, re.MULTILINE) == STEPS
    if _nvcc() is None:  # a machine without the CUDA compiler cannot run the build step: the dry run says so
        assert done.returncode == 1 and "MISSING" in done.stdout and "nvcc" in done.stdout, done.stdout
    else:
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.rstrip().endswith("dry run: all present")


def test_dry_run_fails_naming_what_is_missing():
    done = dry_run(PYTHON="/nonexistent/python3")
    assert done.returncode == 1
    assert "MISSING  /nonexistent/python3" in done.stdout
    assert done.stdout.rstrip().endswith("dry run: something the steps need is missing")


def test_unknown_argument_is_a_usage_error():
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: scripts/gpu_check.sh [--dry-run]" in done.stderr
