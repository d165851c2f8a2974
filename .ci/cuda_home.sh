# Sourced by bench/gpu_check.sh, .ci/device_stack.sh, .ci/compile_cuda.sh and the Makefile's
# test-cuda-emulated: exports CUDA_HOME when it is unset (nvcc is $NVCC, default nvcc).
# torch finds the toolkit through CUDA_HOME or nvcc's folder; where nvcc is a wrapper script
# (e.g. /usr/local/bin/nvcc) that guess is wrong, so ask nvcc where its toolkit is.
if [ -z "${CUDA_HOME:-}" ] && command -v "${NVCC:-nvcc}" >/dev/null; then
    top=$("${NVCC:-nvcc}" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    [ -n "$top" ] && [ -f "$top/include/cuda_runtime_api.h" ] && export CUDA_HOME=$top
fi
