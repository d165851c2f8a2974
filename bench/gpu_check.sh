#!/usr/bin/env bash
# Build, test and benchmark pyminigpt on a GPU machine in one go.
#
#   bench/gpu_check.sh [RESULTS_DIR]          (default: bench/results/<date>-<device>/)
#   STAGES="test bench-gpu" bench/gpu_check.sh
#
# Stages, in this order (STAGES picks any of them; default all but bench-ops):
#   build      the CUDA extension against the installed torch (pip install -e ., CUDA forced)
#   roofline   the measured copy bandwidth and matmul rates (roofline.json)
#   test       the whole suite on the GPU, with the cpu, cuda and triton backends required
#   bench-gpu  pyminigpt/bench/test_bench_gpu.py: every kernel against eager and the peers, with the
#              issues' targets (triton_gpu.md, cuda_gpu.md)
#   bench-e2e  pyminigpt/bench/test_bench_e2e.py: generate and the training step against transformers
#   bench-ops  the pytest-benchmark op suites (pyminigpt/bench/test_bench_<op>.py), short rounds
#   sanitize   compute-sanitizer memcheck, then racecheck, over the op tests of the cuda
#              backend, checking only pyminigpt's kernels (SANITIZER_FILTER; empty: all) with
#              PyTorch's caching allocator off, so that memcheck sees each tensor's own bounds
# Each stage runs under a time limit (TIMEOUT_<STAGE>, seconds) and even when an earlier one
# failed, except that nothing runs on a failed build; the exit status is the first failure's.
# Every log lands in RESULTS_DIR. With $OUT set (the lent-device tool), the default
# RESULTS_DIR is under /tmp and only summary.md and results.tar.gz are copied to $OUT (the tool
# brings back at most 8 files). The summary (stage results, failed tests, the target rows of
# the kernel tables) is printed last.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-build roofline test bench-gpu bench-e2e}
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

device=$($PYTHON -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))") || {
    echo "gpu_check.sh: no CUDA device visible to torch" >&2
    exit 1
}
default_root=bench/results
[ -n "${OUT:-}" ] && default_root=/tmp/gpu_check
results=${1:-$default_root/$(date +%Y%m%d-%H%M)-$device}
mkdir -p "$results"
results=$(cd "$results" && pwd)
export PYMINIGPT_RESULTS_DIR=$results

source .ci/cuda_home.sh  # CUDA_HOME from nvcc when unset

status=0
summary=()
stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a limit, log it, remember the first failure
    local name=$1 limit=$2
    shift 2
    local log="$results/$name.log"
    echo "== $name (limit ${limit}s) -> $log"
    timeout "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local line="$name: exit $rc$([ $rc -eq 124 ] && echo ' (time limit)'), $(grep -v '^[[:space:]]*$' "$log" | tail -n 1)"
    echo "   $line"
    summary+=("$line")
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    return $rc
}
wants() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }

{
    nvidia-smi
    $PYTHON -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
    $PYTHON -c "import setuptools, transformers; print('setuptools', setuptools.__version__, '| transformers', transformers.__version__)"
    echo "nvcc: $(command -v nvcc) | CUDA_HOME=${CUDA_HOME:-unset} | $(nvcc --version 2>/dev/null | tail -n 1)"
    echo "gcc: $(gcc -dumpfullversion 2>/dev/null) | ninja: $(ninja --version 2>/dev/null || echo missing) | $(nproc) CPUs"
    git log -1 --format='commit %H %s' 2>/dev/null
} >"$results/environment.txt" 2>&1

built=1
if wants build; then
    stage build "${TIMEOUT_BUILD:-300}" env PYMINIGPT_BUILD_CUDA=1 \
        bash -c "$PYTHON -m pip install --no-build-isolation --no-deps --no-index -e . && $PYTHON -m pyminigpt info" || built=0
fi
if [ $built -eq 0 ]; then
    summary+=("the build failed: no other stage ran")
else
    if wants roofline; then
        stage roofline "${TIMEOUT_ROOFLINE:-120}" $PYTHON -m pyminigpt.bench.gpu_roofline --out "$results/roofline.json"
    fi
    if wants test; then
        # xdist spreads the suite (mostly Triton compiles) over the CPUs when it is installed;
        # the CUDA emulator is left out: it runs the kernels on the CPU, which CI already does
        workers=$($PYTHON -c "import xdist" 2>/dev/null && echo "-n ${PYTEST_WORKERS:-8}")
        stage test "${TIMEOUT_TEST:-480}" env PYMINIGPT_REQUIRE_BACKENDS=cpu,cuda,triton \
            $PYTHON -m pytest tests --ignore=tests/cuda_emulator -q -rs $workers --junitxml="$results/tests.xml"
    fi
    bench() {  # bench NAME SECONDS FILES... [pytest options]: one pytest-benchmark run
        local name=$1 limit=$2
        shift 2
        stage "$name" "$limit" $PYTHON -m pytest "$@" -q --benchmark-group-by=group \
            --benchmark-columns=median,iqr,rounds --benchmark-json="$results/$name.json"
    }
    suites=pyminigpt/bench
    wants bench-gpu && bench bench-gpu "${TIMEOUT_BENCH_GPU:-360}" $suites/test_bench_gpu.py
    wants bench-e2e && bench bench-e2e "${TIMEOUT_BENCH_E2E:-300}" $suites/test_bench_e2e.py
    # every op suite (the suites but gpu and e2e), picked by name
    wants bench-ops && bench bench-ops "${TIMEOUT_BENCH_OPS:-300}" $suites/test_bench_*.py \
        --ignore=$suites/test_bench_gpu.py --ignore=$suites/test_bench_e2e.py --benchmark-max-time=0.1
    if wants sanitize; then
        op_tests=(tests/ops/test_op_*.py)  # every op's tests, picked by name
        for tool in memcheck racecheck; do
            stage "$tool" "${TIMEOUT_SANITIZE:-240}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
                compute-sanitizer --tool "$tool" --error-exitcode 99 ${SANITIZER_FILTER---kernel-name kns=pyminigpt} \
                $PYTHON -m pytest "${op_tests[@]}" -q -x -p no:xdist -p no:cacheprovider -k "cuda and not triton"
        done
    fi
fi

{
    echo "# gpu_check on $device ($(date -u +%Y-%m-%dT%H:%MZ), exit $status)"
    echo
    printf -- '- %s\n' "${summary[@]}"
    if [ -f "$results/test.log" ]; then
        echo
        echo "## failed tests"
        grep -E '^(FAILED|ERROR)' "$results/test.log" | head -n 40
    fi
    [ -f "$results/roofline.json" ] && { echo; echo "## roofline"; cat "$results/roofline.json"; echo; }
    for table in triton_gpu.md cuda_gpu.md; do
        [ -f "$results/$table" ] || continue
        echo
        echo "## $table: rows with a target"
        grep -E '\| (yes|NO) \|$' "$results/$table"
    done
} >"$results/summary.md"

if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/results.tar.gz" -C "$results" .
    cp "$results/summary.md" "$OUT/summary.md"
fi
echo
cat "$results/summary.md"
echo "results in $results (exit $status)"
exit $status
