// A CPU emulator for the CUDA kernels of csrc/cuda/: it compiles their own source with g++
// and runs every CUDA thread of a block as a fiber on one host thread.
//
// The execution model, and what it checks:
//   * A block's threads run one at a time, each until it reaches a __syncthreads or a
//     warp-wide instruction (shuffle, ballot, ldmatrix, mma). A __syncthreads releases
//     when every live thread of the block has arrived; a warp instruction when every lane
//     of its mask has arrived at the same instruction. Anything else is reported as a
//     failure instead of hanging: a lane that exited or waits elsewhere, a deadlock.
//   * Between two such points a thread's code runs alone, as the independent thread
//     scheduling of sm_70+ allows. One warp runs as far as it can (to a __syncthreads or
//     its end) before the next one starts, so warps drift apart as far as the barriers
//     let them: a missing barrier lets a warp read or overwrite shared memory too early.
//     Warps and lanes run in ascending or, to catch the other direction, descending
//     order (emu_configure).
//   * cp.async copies land at the issuing thread's cp.async.wait, not before; shared
//     memory, static and dynamic, starts as NaN bytes (0xff) in every block.
//   * Dynamic shared memory, and every buffer the tests pass (guarded() in
//     test_emulated_kernels.py), ends at an unmapped page, or starts at one (emu_configure):
//     an access past the end, or before the start, fails the launch with the thread and
//     the address.
//   * Launches are checked like the driver checks them: block size, grid size, dynamic
//     shared memory above 48 KiB only after cudaFuncSetAttribute opted in. cp.async and
//     ldmatrix addresses must be aligned as the hardware requires.
//
// What it does not model: the memory model beyond barriers, timing, and the hardware's
// rounding inside an mma (the emulated product sums in fp32, in k order).
//
// Included before everything else (g++ -include), so that the real cuda_fp16.h and
// cuda_bf16.h provide the 16-bit types and this file then turns CUDA's keywords into C++.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__  // build_emulator.py rewrites every use (a use left over fails to compile)
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace emu {

// ---- The running thread --------------------------------------------------------------

const uint3& thread_idx();
extern uint3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;
int lane_id();

// ---- Synchronisation points ----------------------------------------------------------

// Blocks the calling thread until the whole block has arrived; returns whether any
// thread passed a nonzero predicate.
int block_barrier(const char* name, int predicate);

// One lane's part in a warp-wide instruction. The lane fills `in` and blocks; `resolve`
// runs once every lane of `mask` has arrived at an instruction of the same `name`, reads
// all lanes' `in` and writes each lane's `out`.
struct WarpOp {
  const char* name;
  unsigned mask;
  const void* in;
  void* out;
  void (*resolve)(WarpOp* const* lanes, unsigned mask);
};
void warp_op(WarpOp& op);

// Reports a kernel bug found inside a warp instruction; the launch fails with `message`.
void fail(const char* message);

// ---- cp.async ------------------------------------------------------------------------

void queue_async_copy(void* dst, const void* src, int bytes, int src_bytes);
void wait_async_copies();

// ---- Launches ------------------------------------------------------------------------

void set_max_dynamic_smem(const void* kernel, int bytes);
unsigned char* dynamic_shared_memory();

// `__shared__ T name;` is rewritten to `auto& name = static_shared<T>([] {});` (build_emulator.py):
// the lambda's type is unique to the declaration (and to each instantiation of a template
// kernel), so each gets one object, shared by the block's fibers. Its bytes are NaN (0xff)
// at the start of every block, as no C++ static would be.
void track_static_shared(unsigned char* storage, size_t bytes);  // fills it now and before each block
template <typename T, typename Declaration>
T& static_shared(Declaration) {
  static_assert(std::is_trivially_default_constructible_v<T>, "__shared__ variables have no constructor");
  alignas(alignof(T) > 16 ? alignof(T) : 16) static unsigned char storage[sizeof(T)];
  static const bool tracked = (track_static_shared(storage, sizeof storage), true);
  (void)tracked;
  return *reinterpret_cast<T*>(storage);
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);

// The test's controls: warps and lanes in descending order, dynamic shared memory starting
// at its guard page instead of ending at it, the SM count the device reports; and the
// report of the last failed launch ("" if none).
void configure(bool reverse_order, bool guard_before, int sm_count);
const char* last_failure();
void clear_failure();

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to this call (build_emulator.py).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t, Args&&... args) {
  const std::tuple<Params...> params(std::forward<Args>(args)...);  // converted as a call would
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem, [&] { std::apply(kernel, params); });
}

// ---- Shuffles ------------------------------------------------------------------------

template <typename T>
struct ShuffleIn {
  T value;
  int src;  // the lane to read, or -1 for this lane's own value
};

template <typename T>
void resolve_shuffle(WarpOp* const* lanes, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const auto& in = *static_cast<const ShuffleIn<T>*>(lanes[l]->in);
    if (in.src >= 0 && !(mask >> in.src & 1u)) fail("a shuffle reads a lane outside its mask");
    const int src = in.src < 0 ? l : in.src;
    *static_cast<T*>(lanes[l]->out) = static_cast<const ShuffleIn<T>*>(lanes[src]->in)->value;
  }
}

template <typename T>
T shuffle(const char* name, unsigned mask, T value, int src) {
  const ShuffleIn<T> in{value, src};
  T out{};
  WarpOp op{name, mask, &in, &out, resolve_shuffle<T>};
  warp_op(op);
  return out;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { ::emu::block_barrier("__syncthreads", 0); }
inline int __syncthreads_or(int predicate) { return ::emu::block_barrier("__syncthreads_or", predicate); }

// Lanes outside [segment, segment + width) read their own value, as on the GPU.
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  const int segment = ::emu::lane_id() / width * width;
  return ::emu::shuffle("__shfl_sync", mask, value, segment + src_lane % width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  const int lane = ::emu::lane_id(), src = lane ^ lane_mask;
  return ::emu::shuffle("__shfl_xor_sync", mask, value, src / width == lane / width ? src : -1);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const int lane = ::emu::lane_id(), src = lane - static_cast<int>(delta);
  return ::emu::shuffle("__shfl_up_sync", mask, value, src >= lane / width * width ? src : -1);
}

unsigned __ballot_sync(unsigned mask, int predicate);

// One host thread runs everything, and never in the middle of these: plain updates are atomic.
template <typename T, typename U>
T atomicAdd(T* address, U value) {
  const T old = *address;
  *address = old + static_cast<T>(value);
  return old;
}
template <typename T, typename U>
T atomicMin(T* address, U value) {
  const T old = *address;
  if (static_cast<T>(value) < old) *address = static_cast<T>(value);
  return old;
}
template <typename T, typename U>
T atomicMax(T* address, U value) {
  const T old = *address;
  if (static_cast<T>(value) > old) *address = static_cast<T>(value);
  return old;
}

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
