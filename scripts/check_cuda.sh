#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc -c, with the flags torch's CUDAExtension passes, against the
# installed torch's headers (a CPU build of torch ships them too). Needs no GPU. Exits non-zero on failure.
# Env: NVCC (default: nvcc on PATH, else ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc), PYTHON (default: python),
# CUDA_STD (default c++20: what torch 2.13's BuildExtension passes to nvcc; under c++17 its headers warn about
# C++20 features but still compile: CUDA_STD=c++17 for an older torch).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
nvcc="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
std="${CUDA_STD:-c++20}"
[[ -x "$nvcc" ]] || { echo "check_cuda: nvcc not found (set NVCC=/path/to/nvcc)" >&2; exit 1; }

# Include dirs and torch's common nvcc flags, read from the installed torch so they stay in step with it.
flags="$("$python" - <<'EOF'
import os
import sysconfig

from torch.utils import cpp_extension

for path in cpp_extension.include_paths():
    print(f"-I{path}")
print(f"-I{sysconfig.get_paths()['include']}")
for flag in cpp_extension.COMMON_NVCC_FLAGS:
    print(flag)
# A CPU build of torch lacks this generated header (C10_CUDA_BUILD_SHARED_LIBS, which only matters for Windows
# DLL exports, and version numbers no header uses); c10/cuda/CUDAMacros.h skips it when told to.
torch_include = cpp_extension.include_paths()[0]
if not os.path.exists(os.path.join(torch_include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
    print("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
EOF
)"
mapfile -t torch_flags <<< "$flags"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
shopt -s nullglob
sources=("$root"/csrc/cuda/*.cu)
[[ ${#sources[@]} -gt 0 ]] || { echo "check_cuda: no csrc/cuda/*.cu found" >&2; exit 1; }

"$nvcc" --version | tail -n 1
failed=0
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  if "$nvcc" -c "$src" -o "$tmp/$name.o" -std="$std" -O3 -I"$root/csrc" "${torch_flags[@]}" \
      -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C --compiler-options -fPIC \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90; then
    echo "ok      csrc/cuda/$name.cu"
  else
    echo "FAILED  csrc/cuda/$name.cu" >&2
    failed=1
  fi
done
exit "$failed"
