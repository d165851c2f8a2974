#!/usr/bin/env bash
# Compiles every CUDA kernel file (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90, the way
# CI checks them on a machine without a GPU, and syntax-checks the torch binding
# csrc/cuda_ops.cpp against the installed torch headers. Prints the compiler's warnings
# and any register spills (VERBOSE=1: the whole resource report); exits non-zero on any
# error or warning.
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
out_dir="$(mktemp -d)"
trap 'rm -rf "$out_dir"' EXIT

# The flags torch's BuildExtension adds to every nvcc call of a CUDA build (setup.py), so that
# the kernels are checked as the extension compiles them (no implicit half/bf16 conversions).
TORCH_NVCC_FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)

status=0
for source in csrc/cuda/*.cu; do
  name="$(basename "$source" .cu)"
  log="$out_dir/$name.log"
  if "$NVCC" -c "$source" -o "$out_dir/$name.o" \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -O3 -std=c++17 -Xcompiler -Wall -Xptxas -v -Werror all-warnings "${TORCH_NVCC_FLAGS[@]}" \
      >"$log" 2>&1; then
    spills="$(grep -E 'bytes spill (stores|loads)' "$log" | grep -vE ' 0 bytes spill stores, 0 bytes spill loads' || true)"
    echo "ok    $source"
    if [ -n "$spills" ]; then
      echo "$spills" | sed 's/^/      /'
    fi
  else
    echo "FAIL  $source"
    grep -vE '^ptxas info' "$log" | sed 's/^/      /'
    status=1
  fi
  if [ "${VERBOSE:-0}" = 1 ]; then sed 's/^/      /' "$log"; fi
done

# csrc/cuda_ops.cpp: a CPU-only torch ships the c10/cuda headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in lets g++ check the file.
PYTHON="${PYTHON:-python3}"
torch_include="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null || true)"
source .ci/cuda_home.sh  # CUDA_HOME from nvcc when unset
cuda_include="${CUDA_HOME:-}/include"
if [ -n "$torch_include" ] && [ -f "$cuda_include/cuda_runtime_api.h" ]; then
  mkdir -p "$out_dir/stub/c10/cuda/impl"
  if [ ! -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$out_dir/stub/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  if "${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -isystem "$out_dir/stub" -isystem "$torch_include" \
      -isystem "$torch_include/torch/csrc/api/include" -isystem "$cuda_include" -Icsrc csrc/cuda_ops.cpp \
      >"$out_dir/cuda_ops.log" 2>&1; then
    echo "ok    csrc/cuda_ops.cpp (syntax)"
  else
    echo "FAIL  csrc/cuda_ops.cpp (syntax)"
    sed 's/^/      /' "$out_dir/cuda_ops.log"
    status=1
  fi
else
  echo "skip  csrc/cuda_ops.cpp (no torch or no CUDA headers found)"
fi
exit "$status"
