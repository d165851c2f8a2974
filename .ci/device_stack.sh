#!/usr/bin/env bash
# The GPU machine's software stack, rehearsed on a CPU machine before a GPU session spends its
# minutes: torch 2.11 (a CUDA 13.0 build, which runs on the CPU too), triton 3.6 and
# transformers 5.17, the versions `bench/gpu_check.sh` meets there (/work/.library/device/
# KINDS.md). In a throwaway venv it builds pyminigpt with the CUDA kernels, with the venv's
# own (old) setuptools and --no-build-isolation, as the GPU machine does, then runs the test
# suite, the Triton kernels under the interpreter and the Triton compile check (sm_80/sm_90).
# It tests the committed HEAD, in a clone (an editable build writes into its source tree).
# Not part of `make test`: it downloads a ~3 GB torch and takes ~8 minutes on 2 cores.
#
#   bash .ci/device_stack.sh            (VENV=/tmp/device-stack by default; kept for reruns)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

VENV=${VENV:-/tmp/device-stack}
PY=$VENV/bin/python
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"  # numpy < 2.4: the Triton interpreter fails on newer ones, as in the Makefile
  "$PY" -m pip install --quiet "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" "numpy<2.4" \
    tokenizers safetensors tqdm matplotlib pytest pytest-benchmark pytest-xdist expecttest ninja
fi
"$PY" -c "import torch, triton, transformers, setuptools; print('torch', torch.__version__, '| triton', \
triton.__version__, '| transformers', transformers.__version__, '| setuptools', setuptools.__version__)"

source "$repo/.ci/cuda_home.sh"  # CUDA_HOME from nvcc when unset, as gpu_check.sh
rm -rf "$VENV/src" && git clone --quiet "$repo" "$VENV/src" && cd "$VENV/src"
PYMINIGPT_BUILD_CUDA=1 MAX_JOBS=2 "$PY" -m pip install --quiet --no-build-isolation --no-deps --no-index -e .
"$PY" -m pyminigpt info

cd tests
PYMINIGPT_REQUIRE_BACKENDS=cpu "$PY" -m pytest -q -p no:cacheprovider -n 2 .
TRITON_INTERPRET=1 PYMINIGPT_REQUIRE_BACKENDS=triton "$PY" -m pytest -q -p no:cacheprovider -n 2 \
  ops/test_op_*.py ops/test_triton_kernels.py  # the Makefile's TRITON_TESTS
cd ..
"$PY" .ci/compile_triton.py | tail -n 1
