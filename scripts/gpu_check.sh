#!/usr/bin/env bash
# Everything that only a GPU can check, in one run of under 10 minutes on one H100/H200 (issue #22): build the
# extension for sm_90, the GPU tests, compute-sanitizer memcheck, the kernel benchmark (with copy bandwidth),
# TensorRT (install, `dbfast export --trt` of the tiny cascade, generate with it against torch) and the training-step
# benchmark at IF's sizes in bf16. Each step has its own time limit and the run goes on past a failure; the end is a
# PASS/FAIL/SKIP line per step, and the exit status is 1 when any step failed. docs/gpu-check.md says how to run it
# on a lent machine and what to do with the results.
#
#   scripts/gpu_check.sh            run every step (needs a CUDA GPU)
#   scripts/gpu_check.sh --dry-run  list the steps and check that every file and command they need is here
#
# Results (at most 8 files: what a lent machine sends back): $OUT if set, else gpu-check-results/ in the checkout:
# environment.txt (nvidia-smi, driver, versions), gpu-check.log (every step's output), summary.txt, and the
# benchmarks' kernels.csv, train.csv, runs.csv.
# Env: PYTHON (default python3), NVCC (default nvcc on PATH, else $CUDA_HOME/bin/nvcc), GPU_CHECK_BUDGET_S (default
# 570: steps that would start later are skipped so that the summary is written inside a 600 s call),
# GPU_CHECK_WORK (scratch folder, default /tmp/gpu-check). Python wheels in .whl/ (e.g. diffusers, tensorrt) are
# installed first with no index: the GPU machine has no network.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
export PYTHON="${PYTHON:-python3}"
export NVCC="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
export RESULTS="${OUT:-$root/gpu-check-results}"
export WORK="${GPU_CHECK_WORK:-/tmp/gpu-check}"
export PYTHONPATH="$WORK/site:$root${PYTHONPATH:+:$PYTHONPATH}"  # wheels from .whl/, then this checkout
export PATH="$PATH:$(dirname "$NVCC")"  # compute-sanitizer sits beside nvcc
export PYTHONUNBUFFERED=1
budget="${GPU_CHECK_BUDGET_S:-570}"
LOG="$RESULTS/gpu-check.log"

# name, time limit in seconds, what it does (the step's function is step_<name with - as _>).
STEPS=(
  "environment|30|nvidia-smi, driver, python, torch, CUDA and nvcc versions -> environment.txt"
  "wheels|90|install .whl/*.whl (no index) and check the imports the steps need"
  "build|240|TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace; the CUDA kernels are registered"
  "gpu-tests|150|pytest -m gpu tests/ (ops parity per dtype, repeatability, past 2^31 elements, host timestep check)"
  "memcheck|150|compute-sanitizer --tool memcheck on a small case of both ops (pytest -k memcheck)"
  "bench-kernels|120|python -m benchmarks --suite kernels --device cuda --quick (copy bandwidth included)"
  "trt-install|60|import tensorrt, else pip install tensorrt --extra-index-url https://pypi.nvidia.com"
  "trt-export|240|dbfast export --trt of the tiny cascade (engine parity: plain launches and CUDA graph replay)"
  "trt-generate|120|dbfast generate --backend trt against --backend torch, same seed: image differences"
  "bench-train|330|python -m benchmarks --suite train --device cuda --quick (IF-I-XL and IF-II-L UNets, bf16)"
)
SKIPPED=3  # a step's exit status for "skipped, and why" (printed by the step)

dbfast() {
  "$PYTHON" -c 'import sys; from dreambooth_fast.cli import main; sys.argv[0] = "dbfast"; main()' "$@"
}

trt_or_skip() {
  "$PYTHON" -c "import tensorrt" 2>/dev/null && return 0
  echo "SKIP: TensorRT cannot be imported (see the trt-install step)"
  exit "$SKIPPED"
}

step_environment() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    # A lent machine gets the working tree without .git: pass GPU_CHECK_COMMIT=$(git rev-parse HEAD) along.
    echo "commit: ${GPU_CHECK_COMMIT:-$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)}"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
      nvidia-smi
    else
      echo "nvidia-smi: not found"
    fi
    "$NVCC" --version | tail -n 2
    "$PYTHON" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA (torch) {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
assert torch.cuda.is_available(), "torch sees no CUDA device"
props = torch.cuda.get_device_properties(0)
print(f"device: {props.name}, compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
      f"{props.total_memory / 2**30:.1f} GiB")
EOF
  } 2>&1 | tee "$RESULTS/environment.txt"
}

step_wheels() {
  shopt -s nullglob
  local wheels=("$root"/.whl/*.whl)
  if ((${#wheels[@]})); then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "${wheels[@]}" || return 1
    echo "installed ${#wheels[@]} wheels from .whl/ into $WORK/site"
  else
    echo "no .whl/ folder: nothing to install"
  fi
  "$PYTHON" - <<'EOF'
import importlib
needed = ["torch", "pytest", "numpy", "click", "diffusers", "transformers", "sentencepiece", "safetensors",
          "accelerate", "PIL", "onnx", "onnxruntime", "onnxscript"]
missing = []
for name in needed:
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')}")
    except ImportError as err:
        missing.append(f"{name} ({err})")
if missing:
    raise SystemExit("missing, carry them as wheels in .whl/ (docs/gpu-check.md): " + ", ".join(missing))
EOF
}

step_build() {
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace >"$WORK/build.log" 2>&1
  local status=$?
  tail -n 5 "$WORK/build.log"
  ((status == 0)) || { grep -n -m 20 "error" "$WORK/build.log"; return "$status"; }
  "$PYTHON" -c "from dreambooth_fast import ops; s = ops.native_status(); print(s); assert s['cuda'], s"
}

step_gpu_tests() {
  # Without a GPU every one of these tests skips: that is a failure here, not a pass.
  "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" || return 1
  "$PYTHON" -m pytest -q -rs -m gpu -k "not memcheck" -p no:cacheprovider tests/
}

step_memcheck() {
  local out
  out="$("$PYTHON" -m pytest -q -rs -m gpu -k memcheck -p no:cacheprovider tests/test_gpu_ops.py 2>&1)"
  local status=$?
  echo "$out"
  ((status == 0)) || return "$status"
  if grep -q "1 skipped" <<<"$out"; then
    echo "SKIP: $(grep -m 1 "SKIPPED" <<<"$out")"
    return "$SKIPPED"
  fi
}

step_bench_kernels() {
  "$PYTHON" -m benchmarks --suite kernels --device cuda --quick --out "$RESULTS"
}

step_trt_install() {
  if ! "$PYTHON" -c "import tensorrt" 2>/dev/null; then
    echo "TensorRT is not importable; trying pip (the lent GPU machines have no network: carry the wheels in .whl/)"
    "$PYTHON" -m pip install -q --retries 0 --timeout 10 tensorrt --extra-index-url https://pypi.nvidia.com
  fi
  if ! "$PYTHON" -c "import tensorrt" 2>/dev/null; then
    echo "SKIP: TensorRT cannot be imported (no network here and no tensorrt wheels in .whl/): the TensorRT steps"
    echo "      trt-export and trt-generate are skipped"
    return "$SKIPPED"
  fi
  "$PYTHON" -c "import tensorrt; print(f'TensorRT {tensorrt.__version__}')" | tee -a "$RESULTS/environment.txt"
}

step_trt_export() {
  trt_or_skip
  rm -rf "$WORK/tiny" "$WORK/export"
  "$PYTHON" -m dreambooth_fast.toy.tiny_cascade "$WORK/tiny" || return 1
  dbfast export --model "$WORK/tiny" --trt --out "$WORK/export" || return 1
  "$PYTHON" - "$WORK/export" <<'EOF'
import json, sys
from pathlib import Path
for manifest in sorted(Path(sys.argv[1]).glob("*/unet.*.engine.json")):
    data = json.loads(manifest.read_text())
    print(manifest.parent.name, "parity", data["parity"], "graph replay", data["graph_parity"])
EOF
}

step_trt_generate() {
  trt_or_skip
  [[ -d "$WORK/export" ]] || { echo "no engines: the trt-export step did not run"; return 1; }
  local args=("a red star on a blue background" --model "$WORK/tiny" -n 2 --steps 10 --sr-steps 5 --device cuda)
  dbfast generate "${args[@]}" --backend torch --out "$WORK/gen-torch" || return 1
  dbfast generate "${args[@]}" --backend trt --export-dir "$WORK/export" --out "$WORK/gen-trt" || return 1
  # fp16 engines against the fp32 torch UNets: a few grey levels on average is the expected size of the difference.
  "$PYTHON" - "$WORK/gen-torch" "$WORK/gen-trt" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
torch_dir, trt_dir = map(Path, sys.argv[1:])
worst = 0.0
for path in sorted(torch_dir.glob("*.png")):
    a = np.asarray(Image.open(path), dtype=float)
    b = np.asarray(Image.open(trt_dir / path.name), dtype=float)
    mean, peak = np.abs(a - b).mean(), np.abs(a - b).max()
    worst = max(worst, mean)
    print(f"{path.name}: mean abs difference {mean:.2f} grey levels, max {peak:.0f}")
assert worst <= 3.0, f"trt images differ from torch by {worst:.2f} grey levels on average (limit 3)"
EOF
}

step_bench_train() {
  "$PYTHON" -m benchmarks --suite train --device cuda --quick --out "$RESULTS"
}

step_function() {
  echo "step_${1//-/_}"
}

dry_run() {
  local missing=0
  echo "gpu_check.sh --dry-run: the steps, then what they need"
  for entry in "${STEPS[@]}"; do
    IFS='|' read -r name limit what <<<"$entry"
    printf '  step %-14s %4ss  %s\n' "$name" "$limit" "$what"
    declare -F "$(step_function "$name")" >/dev/null || { echo "MISSING function $(step_function "$name")"; missing=1; }
  done
  for file in setup.py csrc/ops.cpp csrc/cuda/add_noise.cu csrc/cuda/dreambooth_loss.cu tests/test_ops.py \
      tests/test_gpu_ops.py benchmarks/__main__.py benchmarks/bench_kernels.py benchmarks/bench_train.py \
      dreambooth_fast/cli.py dreambooth_fast/toy/tiny_cascade.py; do
    if [[ -f "$file" ]]; then echo "  ok       $file"; else echo "  MISSING  $file"; missing=1; fi
  done
  for command in "$PYTHON" "$NVCC" timeout; do
    if command -v "$command" >/dev/null; then echo "  ok       $command"; else echo "  MISSING  $command"; missing=1; fi
  done
  if "$PYTHON" -c "import torch, pytest" 2>/dev/null; then
    echo "  ok       $PYTHON imports torch and pytest"
  else
    echo "  MISSING  torch or pytest for $PYTHON"
    missing=1
  fi
  for command in nvidia-smi compute-sanitizer git; do  # without them a step records less or skips
    if command -v "$command" >/dev/null; then echo "  ok       $command"; else echo "  absent   $command (fine here)"; fi
  done
  if ((missing)); then echo "dry run: something the steps need is missing"; else echo "dry run: all present"; fi
  return "$missing"
}

case "${1:-}" in
  --dry-run) dry_run; exit ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

mkdir -p "$RESULTS" "$WORK"
: >"$LOG"
export -f dbfast trt_or_skip $(compgen -A function step_)
export SKIPPED root
declare -A result
names=()
for entry in "${STEPS[@]}"; do
  IFS='|' read -r name limit what <<<"$entry"
  names+=("$name")
  left=$((budget - SECONDS - 20))  # 20 s for the summary
  if ((left < 15)); then
    result[$name]="SKIP (out of the ${budget} s budget)"
    continue
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s): $what" | tee -a "$LOG"
  step_log="$WORK/$name.log"
  start=$SECONDS
  timeout --kill-after=10 "$limit" bash -c "set -o pipefail; $(step_function "$name")" >"$step_log" 2>&1
  status=$?
  took=$((SECONDS - start))
  cat "$step_log" >>"$LOG"
  case $status in
    0) result[$name]="PASS (${took} s)" ;;
    "$SKIPPED") result[$name]="SKIP (${took} s): $(grep -m 1 "^SKIP: " "$step_log" | cut -c7-)" ;;
    124 | 137) result[$name]="FAIL (timed out after ${limit} s)" ;;
    *) result[$name]="FAIL (exit status $status, ${took} s)" ;;
  esac
  echo "   ${result[$name]}"
  if [[ ${result[$name]} == FAIL* ]]; then tail -n 15 "$step_log" | sed 's/^/   | /'; fi
done

failed=0
for name in "${names[@]}"; do
  [[ ${result[$name]} == FAIL* ]] && failed=1
done
{
  echo "gpu_check.sh summary: ${SECONDS} s, $( ((failed)) && echo "FAILED" || echo "all passed or skipped"); \
results in $RESULTS"
  for name in "${names[@]}"; do
    printf '  %-14s %s\n' "$name" "${result[$name]}"
  done
} | tee "$RESULTS/summary.txt"
exit "$failed"
