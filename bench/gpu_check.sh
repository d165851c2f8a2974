#!/usr/bin/env bash
# Build, test and benchmark pyminigpt on a GPU machine in one go.
#
#   bench/gpu_check.sh [RESULTS_DIR]        (default: bench/results/<date>-<device>/)
#   STAGES="test bench" bench/gpu_check.sh  (any of: build roofline test bench; default all)
#
# Writes into RESULTS_DIR: environment.txt (GPU, driver, versions), build.log,
# roofline.json (measured copy bandwidth and matmul rates), tests.log + tests.xml (the whole
# suite, unchanged, on the GPU), bench.log + bench.json (pytest-benchmark, every bench/
# file), triton_gpu.md and cuda_gpu.md (each kernel backend against eager and the peers, with
# the issues' targets; from bench/test_bench_gpu.py).
# Each stage runs even when an earlier one failed; the exit status is the first failure's.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-build roofline test bench}

device=$($PYTHON -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))") || {
    echo "gpu_check.sh: no CUDA device visible to torch" >&2
    exit 1
}
results=${1:-bench/results/$(date +%Y%m%d-%H%M)-$device}
mkdir -p "$results"
results=$(cd "$results" && pwd)
export PYMINIGPT_RESULTS_DIR=$results PYTHONUNBUFFERED=1
status=0

stage() {  # stage NAME LOG COMMAND...: run COMMAND, log to LOG, remember the first failure
    local name=$1 log=$2
    shift 2
    echo "== $name -> $log"
    "$@" >"$log" 2>&1
    local rc=$?
    echo "   exit $rc, $(tail -n 1 "$log")"
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    return 0
}

{
    nvidia-smi
    $PYTHON -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
    git log -1 --format='commit %H %s' 2>/dev/null
} >"$results/environment.txt" 2>&1

case " $STAGES " in *" build "*)
    # the CUDA extension against the installed torch; the Triton kernels need no build
    stage build "$results/build.log" $PYTHON -m pip install --no-build-isolation --no-deps -e . ;;
esac
case " $STAGES " in *" roofline "*)
    stage roofline "$results/roofline.log" $PYTHON bench/gpu_roofline.py --out "$results/roofline.json" ;;
esac
case " $STAGES " in *" test "*)
    stage test "$results/tests.log" $PYTHON -m pytest tests -q -rs --junitxml="$results/tests.xml" ;;
esac
case " $STAGES " in *" bench "*)
    stage bench "$results/bench.log" $PYTHON -m pytest bench -q --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-json="$results/bench.json" ;;
esac

[ -f "$results/roofline.log" ] && cat "$results/roofline.log"
for table in triton_gpu.md cuda_gpu.md; do
    [ -f "$results/$table" ] && cat "$results/$table"
done
echo "results in $results (exit $status)"
exit $status
