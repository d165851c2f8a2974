// Softmax with temperature over the last dim, forward and backward.
//
//   forward:  z = x / T,  y = exp(z - max z) / sum exp(z - max z)
//   backward: dx = y * (dy - sum(dy * y)) / T
//
// Memory traffic per row of C elements (b bytes each): forward reads x twice (the
// second read is served by L1/L2 for all but the widest rows) and writes y: 2Cb from
// DRAM at best; backward reads y and dy twice and writes dx: 3Cb.
//
// One group of threads per row: a warp for short rows, up to 1024 threads for a
// vocabulary-wide row (50257). The forward keeps an *online* maximum and sum, so one
// read of the row yields both statistics: each thread folds a 16-byte pack into
// (max, sum) by rescaling its running sum once per pack, then the group combines the
// per-thread states with warp shuffles and, across warps, shared memory. The maximum is
// kept in logit units and the exponent is (x - max) / T: x - max is exact or nearly so
// for the entries that carry the mass, where x / T - max / T would round twice. The second
// pass writes y with 16-byte stores. Triton's softmax tutorial does the same with one
// program per row; here the warp/shared-memory steps that `tl.max`/`tl.sum` hide are
// spelled out.
#include <cfloat>

#include "common.cuh"

namespace pyminigpt::cuda {
namespace {

constexpr int kMinBlockThreads = 128;

// Online softmax statistics of logits x at temperature T: the running max m of x and
// the sum s of exp((x - m) / T). Two partial states combine as (max(m1, m2),
// s1 exp((m1 - m) / T) + s2 exp((m2 - m) / T)); a -inf maximum contributes nothing.
struct MaxSum {
  float max;
  float sum;
};

struct CombineMaxSum {
  float inv_temperature;
  __device__ __forceinline__ MaxSum operator()(MaxSum a, MaxSum b) const {
    const float m = fmaxf(a.max, b.max);
    if (m == -INFINITY) return {m, 0.f};
    return {m, a.sum * expf((a.max - m) * inv_temperature) + b.sum * expf((b.max - m) * inv_temperature)};
  }
};

struct WarpCombineMaxSum {
  CombineMaxSum combine;
  __device__ __forceinline__ MaxSum operator()(MaxSum x) const {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const MaxSum other{__shfl_xor_sync(0xffffffffu, x.max, offset), __shfl_xor_sync(0xffffffffu, x.sum, offset)};
      x = combine(x, other);
    }
    return x;
  }
};

// Threads per row: a power of two from 32 to 1024, about 4 packs per thread.
int softmax_threads_per_row(int64_t n_cols, int elem_bytes) {
  const int64_t packs = (n_cols * elem_bytes + 15) / 16;
  int threads = 32;
  while (threads < 1024 && threads * 4 < packs) threads *= 2;
  return threads;
}

template <typename T, bool kVec>
__global__ void softmax_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n_rows, int64_t n_cols,
                                   float inv_temperature, int threads_per_row) {
  __shared__ MaxSum scratch[32];
  const int tid = threadIdx.x % threads_per_row;
  const int64_t row = int64_t{blockIdx.x} * (blockDim.x / threads_per_row) + threadIdx.x / threads_per_row;
  const bool active = row < n_rows;  // inactive threads still join the block reductions
  const T* x_row = x + (active ? row : 0) * n_cols;
  T* y_row = y + (active ? row : 0) * n_cols;

  MaxSum state{-INFINITY, 0.f};
  if (active) {
    for_each_pack<kVec>(x_row, n_cols, tid, threads_per_row, [&](int64_t, auto pack) {
      constexpr int N = pack_size<decltype(pack)>;
      float x[N];
      float pack_max = -INFINITY;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        x[e] = to_float(pack.v[e]);
        pack_max = fmaxf(pack_max, x[e]);
      }
      const float m = fmaxf(state.max, pack_max);
      if (m == -INFINITY) return;  // everything so far is -inf: nothing to add
      float s = state.sum * expf((state.max - m) * inv_temperature);
#pragma unroll
      for (int e = 0; e < N; ++e) s += expf((x[e] - m) * inv_temperature);
      state = {m, s};
    });
  }
  const CombineMaxSum combine{inv_temperature};
  state = group_reduce(state, threads_per_row / 32, scratch, WarpCombineMaxSum{combine}, combine);
  if (!active) return;

  const float row_max = state.max;
  const float inv_sum = 1.f / state.sum;  // a row of -inf gives 0 * inf = NaN, like torch.softmax
  for_each_pack<kVec>(x_row, n_cols, tid, threads_per_row, [&](int64_t i, auto pack) {
    constexpr int N = pack_size<decltype(pack)>;
    Pack<T, N> out;
#pragma unroll
    for (int e = 0; e < N; ++e)
      out.v[e] = from_float<T>(expf((to_float(pack.v[e]) - row_max) * inv_temperature) * inv_sum);
    store_pack(y_row + i, out);
  });
}

template <typename T, bool kVec>
__global__ void softmax_bwd_kernel(const T* __restrict__ y, const T* __restrict__ grad_y, T* __restrict__ grad_x,
                                   int64_t n_rows, int64_t n_cols, float inv_temperature, int threads_per_row) {
  __shared__ float scratch[32];
  const int tid = threadIdx.x % threads_per_row;
  const int64_t row = int64_t{blockIdx.x} * (blockDim.x / threads_per_row) + threadIdx.x / threads_per_row;
  const bool active = row < n_rows;
  const int64_t offset = (active ? row : 0) * n_cols;

  float dot = 0.f;  // sum(dy * y) over the row
  if (active) {
    for_each_pack<kVec>(y + offset, n_cols, tid, threads_per_row, [&](int64_t i, auto pack) {
      constexpr int N = pack_size<decltype(pack)>;
      const Pack<T, N> dy = load_pack<T, N>(grad_y + offset + i);
#pragma unroll
      for (int e = 0; e < N; ++e) dot += to_float(pack.v[e]) * to_float(dy.v[e]);
    });
  }
  dot = group_reduce(dot, threads_per_row / 32, scratch, warp_sum, [](float a, float b) { return a + b; });
  if (!active) return;

  for_each_pack<kVec>(y + offset, n_cols, tid, threads_per_row, [&](int64_t i, auto pack) {
    constexpr int N = pack_size<decltype(pack)>;
    const Pack<T, N> dy = load_pack<T, N>(grad_y + offset + i);
    Pack<T, N> dx;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float yv = to_float(pack.v[e]);
      dx.v[e] = from_float<T>(yv * (to_float(dy.v[e]) - dot) * inv_temperature);
    }
    store_pack(grad_x + offset + i, dx);
  });
}

struct RowLaunch {
  int threads_per_row;
  int block;
  unsigned grid;
};

RowLaunch row_launch(int64_t n_rows, int64_t n_cols, int elem_bytes) {
  const int threads_per_row = softmax_threads_per_row(n_cols, elem_bytes);
  const int block = threads_per_row > kMinBlockThreads ? threads_per_row : kMinBlockThreads;
  const int64_t rows_per_block = block / threads_per_row;
  return {threads_per_row, block, static_cast<unsigned>((n_rows + rows_per_block - 1) / rows_per_block)};
}

// Checks the arguments of a softmax launcher; then, unless there are no rows, calls
// `launch_kernel(T{}, RowLaunch)` for the element type T of `dtype` to queue the kernel
// and returns the launch error.
template <typename LaunchKernel>
cudaError_t launch_rows(int64_t n_rows, int64_t n_cols, float temperature, DType dtype, LaunchKernel&& launch_kernel) {
  if (softmax_unsupported(n_rows, n_cols, temperature) != nullptr) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    launch_kernel(tag, row_launch(n_rows, n_cols, sizeof(tag)));
    return cudaGetLastError();
  });
}

}  // namespace

const char* softmax_unsupported(int64_t n_rows, int64_t n_cols, float temperature) {
  if (n_rows < 0 || n_cols < 1) return "softmax: x must have at least one column and a non-negative row count";
  if (n_rows > int64_t{INT32_MAX}) return "softmax: more than 2^31 - 1 rows";
  if (!(temperature > 0.f) || temperature == INFINITY) return "softmax: temperature must be finite and > 0";
  return nullptr;
}

cudaError_t softmax_fwd(const void* x, void* y, int64_t n_rows, int64_t n_cols, float temperature, DType dtype,
                        cudaStream_t stream) {
  return launch_rows(n_rows, n_cols, temperature, dtype, [&](auto tag, const RowLaunch& launch) {
    using T = decltype(tag);
    auto kernel = same_alignment(x, y) ? softmax_fwd_kernel<T, true> : softmax_fwd_kernel<T, false>;
    kernel<<<launch.grid, launch.block, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), n_rows, n_cols,
                                                     1.f / temperature, launch.threads_per_row);
  });
}

cudaError_t softmax_bwd(const void* y, const void* grad_y, void* grad_x, int64_t n_rows, int64_t n_cols,
                        float temperature, DType dtype, cudaStream_t stream) {
  return launch_rows(n_rows, n_cols, temperature, dtype, [&](auto tag, const RowLaunch& launch) {
    using T = decltype(tag);
    auto kernel = same_alignment(y, grad_y, grad_x) ? softmax_bwd_kernel<T, true> : softmax_bwd_kernel<T, false>;
    kernel<<<launch.grid, launch.block, 0, stream>>>(static_cast<const T*>(y), static_cast<const T*>(grad_y),
                                                     static_cast<T*>(grad_x), n_rows, n_cols, 1.f / temperature,
                                                     launch.threads_per_row);
  });
}

}  // namespace pyminigpt::cuda
