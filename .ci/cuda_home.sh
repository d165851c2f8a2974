# Sourced by bench/gpu_check.sh and .ci/device_stack.sh: exports CUDA_HOME when it is unset.
# torch finds the toolkit through CUDA_HOME or nvcc's folder; where nvcc is a wrapper script
# (e.g. /usr/local/bin/nvcc) that guess is wrong, so ask nvcc where its toolkit is.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    [ -n "$top" ] && [ -f "$top/include/cuda_runtime_api.h" ] && export CUDA_HOME=$top
fi
