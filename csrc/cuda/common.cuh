// Small device helpers shared by the CUDA kernels: dtype conversion, warp and block
// reductions, 16-byte vector loads and stores, launch-error checking and the shared-memory
// opt-in.
//
// Everything here is torch-free so that `nvcc -c` can compile the kernels on a machine
// whose torch has no CUDA headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "launchers.h"

namespace pyminigpt::cuda {

// Return from the enclosing launcher with the first CUDA error (launch or API).
#define PYMINIGPT_CUDA_RETURN_IF_ERROR(expr) \
  do {                                       \
    cudaError_t pyminigpt_err_ = (expr);     \
    if (pyminigpt_err_ != cudaSuccess) {     \
      return pyminigpt_err_;                 \
    }                                        \
  } while (0)

// Lets `kernel` be launched with `bytes` of dynamic shared memory: above 48 KB a kernel
// must opt in, up to the device's limit (227 KB on H100, 163 KB on A100).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// ---------------------------------------------------------------------------------------
// dtype conversion: every kernel computes in fp32.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Calls `body.template operator()<T>()` with T the element type named by `dtype`.
template <typename Body>
cudaError_t dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::kFloat32:
      return body(float{});
    case DType::kFloat16:
      return body(__half{});
    case DType::kBFloat16:
      return body(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// The DType of an element type.
template <typename T>
constexpr DType dtype_of = DType::kFloat32;
template <>
constexpr DType dtype_of<__half> = DType::kFloat16;
template <>
constexpr DType dtype_of<__nv_bfloat16> = DType::kBFloat16;

// ---------------------------------------------------------------------------------------
// Reductions. A warp reduces with butterfly shuffles (every lane ends with the result);
// a block reduces per warp, then through one float per warp in shared memory.

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Reduces `value` over the `group_warps` consecutive warps that share a row. `scratch`
// holds one T per warp of the block; every thread of the group gets the result. All
// threads of the block must call this (it synchronises the block twice).
template <typename T, typename WarpReduce, typename Combine>
__device__ __forceinline__ T group_reduce(T value, int group_warps, T* scratch, WarpReduce warp_reduce,
                                          Combine combine_fn) {
  value = warp_reduce(value);
  if (group_warps == 1) return value;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  const int first = warp - warp % group_warps;
  T total = scratch[first];
  for (int w = 1; w < group_warps; ++w) total = combine_fn(total, scratch[first + w]);
  return total;
}

// ---------------------------------------------------------------------------------------
// 16-byte vectors. A Pack<T, N> is N elements loaded or stored in one instruction when
// N * sizeof(T) == 16 (and the address is 16-byte aligned), or one element when N == 1.

template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {  // wider packs load as several 16-byte pieces
  T v[N];
};

template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Number of elements in a Pack type, for generic visitors: pack_size<decltype(pack)>.
template <typename P>
constexpr int pack_size = sizeof(P::v) / sizeof(P::v[0]);

// Visits the n elements of a row with 16-byte loads where the row allows: a scalar head
// up to the first 16-byte boundary, a vector body, a scalar tail (kVec = false: all
// scalar). Threads tid, tid + nthreads, ... take consecutive pieces, so every load of a
// warp is coalesced. `visit(index, pack)` gets the index of the pack's first element and
// the pack (N = 1 for the head and tail, N = kVecWidth<T> for the body). Other arrays
// read or written at the same indices must share the row's misalignment modulo 16 bytes.
template <bool kVec, typename T, typename Visit>
__device__ __forceinline__ void for_each_pack(const T* row, int64_t n, int tid, int nthreads, Visit&& visit) {
  constexpr int W = kVec ? kVecWidth<T> : 1;
  const int64_t misalign = (reinterpret_cast<uintptr_t>(row) % 16) / sizeof(T);
  const int64_t head = (!kVec || misalign == 0) ? 0 : (W - misalign < n ? W - misalign : n);
  const int64_t body = (n - head) / W;
  if (tid < head) visit(int64_t{tid}, load_pack<T, 1>(row + tid));
  for (int64_t v = tid; v < body; v += nthreads) {
    const int64_t i = head + v * W;
    visit(i, load_pack<T, W>(row + i));
  }
  for (int64_t i = head + body * W + tid; i < n; i += nthreads) visit(i, load_pack<T, 1>(row + i));
}

// True when all pointers have the same address modulo 16 bytes: rows of contiguous
// arrays of one dtype then line up, and one head/body/tail split serves all of them.
template <typename... Ptrs>
inline bool same_alignment(const void* first, Ptrs... rest) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(first) % 16;
  return ((reinterpret_cast<uintptr_t>(static_cast<const void*>(rest)) % 16 == a) && ...);
}

}  // namespace pyminigpt::cuda
