#!/usr/bin/env bash
# Compiles every CUDA kernel file (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90, the way
# CI checks them on a machine without a GPU. Prints the compiler's warnings and the
# per-kernel resource report (registers, shared memory, spills); exits non-zero on any
# error or warning.
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
out_dir="$(mktemp -d)"
trap 'rm -rf "$out_dir"' EXIT

status=0
for source in csrc/cuda/*.cu; do
  name="$(basename "$source" .cu)"
  log="$out_dir/$name.log"
  if "$NVCC" -c "$source" -o "$out_dir/$name.o" \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -O3 -std=c++17 --expt-relaxed-constexpr -Xcompiler -Wall -Xptxas -v -Werror all-warnings \
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
exit "$status"
