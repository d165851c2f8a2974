// Stands in for CUDA's cuda_runtime.h: the runtime API's types and declarations come from
// the real cuda_runtime_api.h (the emulator defines the few functions the kernels call);
// this adds the template overload of cudaFuncSetAttribute that takes a kernel.
#pragma once

#include <cuda_runtime_api.h>

#include "emulator.h"

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attribute, value);
}
