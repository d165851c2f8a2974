// Layer norm over the last dim, forward and backward.
//
//   forward:  mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)
//             xhat = (x - mean) * rstd,  y = xhat * weight + bias
//   backward: g = dy * weight
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//             dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
//
// Memory traffic for N rows of C elements (b bytes each): the forward reads x and writes
// y (2NCb, plus 8N for mean/rstd); the dx kernel reads x, dy and writes dx (3NCb); the
// dweight/dbias kernel reads x and dy once more (2NCb) and writes a small partial sum.
//
// Forward and dx: one warp per row, 16-byte loads (8 bf16 or 4 fp32 per lane) when the
// rows are 16-byte aligned, sums reduced by warp shuffles only - no shared memory, no
// __syncthreads. The row is read two or three times; repeats hit L1. Statistics in fp32.
//
// dweight/dbias is a column reduction over N rows, done in two stages so that it is both
// coalesced and parallel: stage 1 gives each (column tile, chunk of rows) block a 32 x 8
// thread tile - lanes along columns, so a warp reads 32 consecutive elements of one row -
// accumulates down its rows in registers, reduces the 8 row-slices in shared memory and
// writes one fp32 partial per (chunk, column); stage 2 sums the partials of each column.
// No atomics, so the result is deterministic.
#include <initializer_list>

#include "common.cuh"

namespace pyminigpt::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block in the row kernels
constexpr int kColTile = 32;      // stage 1: columns per block (one per lane)
constexpr int kRowSlices = 8;     // stage 1: warps per block, each striding over the chunk's rows
constexpr int64_t kMinRowsPerChunk = 64;
constexpr int64_t kMaxChunks = 512;

template <typename T, typename W, bool kVec>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ weight, const W* __restrict__ bias,
                                      T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                      int64_t n_rows, int64_t n_cols, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / 32;
  if (row >= n_rows) return;  // whole warps leave together: no block-level sync below
  const T* x_row = x + row * n_cols;
  T* y_row = y + row * n_cols;
  const float inv_cols = 1.f / static_cast<float>(n_cols);

  float sum = 0.f;
  for_each_pack<kVec>(x_row, n_cols, lane, 32, [&](int64_t, auto pack) {
#pragma unroll
    for (int e = 0; e < pack_size<decltype(pack)>; ++e) sum += to_float(pack.v[e]);
  });
  const float mean = warp_sum(sum) * inv_cols;

  float sq = 0.f;  // two-pass variance: no cancellation when |mean| >> std
  for_each_pack<kVec>(x_row, n_cols, lane, 32, [&](int64_t, auto pack) {
#pragma unroll
    for (int e = 0; e < pack_size<decltype(pack)>; ++e) {
      const float d = to_float(pack.v[e]) - mean;
      sq += d * d;
    }
  });
  const float rstd = rsqrtf(warp_sum(sq) * inv_cols + eps);

  for_each_pack<kVec>(x_row, n_cols, lane, 32, [&](int64_t i, auto pack) {
    constexpr int N = pack_size<decltype(pack)>;
    const Pack<W, N> w = load_pack<W, N>(weight + i);
    const Pack<W, N> b = load_pack<W, N>(bias + i);
    Pack<T, N> out;
#pragma unroll
    for (int e = 0; e < N; ++e)
      out.v[e] = from_float<T>((to_float(pack.v[e]) - mean) * rstd * to_float(w.v[e]) + to_float(b.v[e]));
    store_pack(y_row + i, out);
  });
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, typename W, bool kVec>
__global__ void layer_norm_bwd_dx_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                         const W* __restrict__ weight, const float* __restrict__ mean,
                                         const float* __restrict__ rstd, T* __restrict__ grad_x, int64_t n_rows,
                                         int64_t n_cols) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / 32;
  if (row >= n_rows) return;
  const int64_t offset = row * n_cols;
  const float mu = mean[row];
  const float rs = rstd[row];
  const float inv_cols = 1.f / static_cast<float>(n_cols);

  float sum_g = 0.f, sum_g_xhat = 0.f;
  for_each_pack<kVec>(x + offset, n_cols, lane, 32, [&](int64_t i, auto pack) {
    constexpr int N = pack_size<decltype(pack)>;
    const Pack<T, N> dy = load_pack<T, N>(grad_y + offset + i);
    const Pack<W, N> w = load_pack<W, N>(weight + i);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float g = to_float(dy.v[e]) * to_float(w.v[e]);
      sum_g += g;
      sum_g_xhat += g * (to_float(pack.v[e]) - mu) * rs;
    }
  });
  const float mean_g = warp_sum(sum_g) * inv_cols;
  const float mean_g_xhat = warp_sum(sum_g_xhat) * inv_cols;

  for_each_pack<kVec>(x + offset, n_cols, lane, 32, [&](int64_t i, auto pack) {
    constexpr int N = pack_size<decltype(pack)>;
    const Pack<T, N> dy = load_pack<T, N>(grad_y + offset + i);
    const Pack<W, N> w = load_pack<W, N>(weight + i);
    Pack<T, N> dx;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float g = to_float(dy.v[e]) * to_float(w.v[e]);
      const float xhat = (to_float(pack.v[e]) - mu) * rs;
      dx.v[e] = from_float<T>(rs * (g - mean_g - xhat * mean_g_xhat));
    }
    store_pack(grad_x + offset + i, dx);
  });
}

// Stage 1: partial[chunk][col] = sum over the chunk's rows (dweight and dbias).
template <typename T>
__global__ void layer_norm_bwd_partial_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                              const float* __restrict__ mean, const float* __restrict__ rstd,
                                              float* __restrict__ partial_dw, float* __restrict__ partial_db,
                                              int64_t n_rows, int64_t n_cols, int64_t rows_per_chunk) {
  __shared__ float tile_dw[kRowSlices][kColTile + 1];  // +1: no bank conflicts on the column read
  __shared__ float tile_db[kRowSlices][kColTile + 1];
  const int64_t col = int64_t{blockIdx.x} * kColTile + threadIdx.x;
  const int64_t row_begin = int64_t{blockIdx.y} * rows_per_chunk;
  const int64_t row_end = row_begin + rows_per_chunk < n_rows ? row_begin + rows_per_chunk : n_rows;

  float dw = 0.f, db = 0.f;
  if (col < n_cols) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kRowSlices) {
      const float dy = to_float(grad_y[row * n_cols + col]);
      dw += dy * (to_float(x[row * n_cols + col]) - mean[row]) * rstd[row];
      db += dy;
    }
  }
  tile_dw[threadIdx.y][threadIdx.x] = dw;
  tile_db[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < n_cols) {
#pragma unroll
    for (int s = 1; s < kRowSlices; ++s) {
      dw += tile_dw[s][threadIdx.x];
      db += tile_db[s][threadIdx.x];
    }
    partial_dw[blockIdx.y * n_cols + col] = dw;
    partial_db[blockIdx.y * n_cols + col] = db;
  }
}

// Stage 2: dweight[col] = sum over chunks of partial_dw[chunk][col] (and dbias).
template <typename W>
__global__ void layer_norm_bwd_final_kernel(const float* __restrict__ partial_dw, const float* __restrict__ partial_db,
                                            W* __restrict__ grad_weight, W* __restrict__ grad_bias, int64_t n_chunks,
                                            int64_t n_cols) {
  const int64_t col = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (col >= n_cols) return;
  float dw = 0.f, db = 0.f;
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    dw += partial_dw[chunk * n_cols + col];
    db += partial_db[chunk * n_cols + col];
  }
  grad_weight[col] = from_float<W>(dw);
  grad_bias[col] = from_float<W>(db);
}

int64_t rows_per_chunk(int64_t n_rows) {
  const int64_t spread = (n_rows + kMaxChunks - 1) / kMaxChunks;
  return spread > kMinRowsPerChunk ? spread : kMinRowsPerChunk;
}

int64_t n_chunks(int64_t n_rows) {
  const int64_t per_chunk = rows_per_chunk(n_rows);
  return (n_rows + per_chunk - 1) / per_chunk;
}

// Calls body(W{}) with W the weight element type: T itself or fp32.
template <typename T, typename Body>
cudaError_t dispatch_weight_type(DType weight_dtype, Body&& body) {
  if (weight_dtype == dtype_of<T>) return body(T{});
  if (weight_dtype == DType::kFloat32) return body(float{});
  return cudaErrorInvalidValue;
}

// The 16-byte path needs every row and every pointer 16-byte aligned.
template <typename T>
bool rows_aligned(int64_t n_cols, std::initializer_list<const void*> ptrs) {
  if (n_cols % kVecWidth<T> != 0) return false;
  for (const void* p : ptrs)
    if (!is_aligned16(p)) return false;
  return true;
}

unsigned row_blocks(int64_t n_rows) { return static_cast<unsigned>((n_rows + kRowsPerBlock - 1) / kRowsPerBlock); }

}  // namespace

const char* layer_norm_unsupported(int64_t n_rows, int64_t n_cols, DType dtype, DType weight_dtype) {
  if (weight_dtype != dtype && weight_dtype != DType::kFloat32)
    return "layer_norm: weight and bias must have x's dtype or fp32";
  if (n_rows < 0 || n_cols < 1) return "layer_norm: x must have at least one column and a non-negative row count";
  if (n_rows > int64_t{INT32_MAX} * kRowsPerBlock) return "layer_norm: too many rows for one launch";
  return nullptr;
}

cudaError_t layer_norm_fwd(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                           int64_t n_rows, int64_t n_cols, float eps, DType dtype, DType weight_dtype,
                           cudaStream_t stream) {
  if (layer_norm_unsupported(n_rows, n_cols, dtype, weight_dtype) != nullptr) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto x_tag) {
    using T = decltype(x_tag);
    return dispatch_weight_type<T>(weight_dtype, [&](auto w_tag) {
      using W = decltype(w_tag);
      auto kernel = rows_aligned<T>(n_cols, {x, weight, bias, y}) ? layer_norm_fwd_kernel<T, W, true>
                                                                  : layer_norm_fwd_kernel<T, W, false>;
      kernel<<<row_blocks(n_rows), kRowsPerBlock * 32, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const W*>(weight), static_cast<const W*>(bias), static_cast<T*>(y),
          mean, rstd, n_rows, n_cols, eps);
      return cudaGetLastError();
    });
  });
}

size_t layer_norm_bwd_workspace_bytes(int64_t n_rows, int64_t n_cols) {
  return 2 * sizeof(float) * static_cast<size_t>(n_chunks(n_rows)) * static_cast<size_t>(n_cols);
}

cudaError_t layer_norm_bwd(const void* grad_y, const void* x, const void* weight, const float* mean, const float* rstd,
                           void* grad_x, void* grad_weight, void* grad_bias, void* workspace, int64_t n_rows,
                           int64_t n_cols, DType dtype, DType weight_dtype, cudaStream_t stream) {
  if (layer_norm_unsupported(n_rows, n_cols, dtype, weight_dtype) != nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto x_tag) {
    using T = decltype(x_tag);
    return dispatch_weight_type<T>(weight_dtype, [&](auto w_tag) -> cudaError_t {
      using W = decltype(w_tag);
      const auto* dy = static_cast<const T*>(grad_y);
      const auto* xt = static_cast<const T*>(x);
      if (n_rows == 0) {  // empty sums: zero gradients for weight and bias
        PYMINIGPT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(grad_weight, 0, n_cols * sizeof(W), stream));
        return cudaMemsetAsync(grad_bias, 0, n_cols * sizeof(W), stream);
      }
      auto dx_kernel = rows_aligned<T>(n_cols, {grad_y, x, weight, grad_x}) ? layer_norm_bwd_dx_kernel<T, W, true>
                                                                            : layer_norm_bwd_dx_kernel<T, W, false>;
      dx_kernel<<<row_blocks(n_rows), kRowsPerBlock * 32, 0, stream>>>(dy, xt, static_cast<const W*>(weight), mean,
                                                                       rstd, static_cast<T*>(grad_x), n_rows, n_cols);
      PYMINIGPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());

      const int64_t chunks = n_chunks(n_rows);
      float* partial_dw = static_cast<float*>(workspace);
      float* partial_db = partial_dw + chunks * n_cols;
      const dim3 partial_grid(static_cast<unsigned>((n_cols + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
      layer_norm_bwd_partial_kernel<T><<<partial_grid, dim3(kColTile, kRowSlices), 0, stream>>>(
          dy, xt, mean, rstd, partial_dw, partial_db, n_rows, n_cols, rows_per_chunk(n_rows));
      PYMINIGPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());

      constexpr int kFinalThreads = 256;
      layer_norm_bwd_final_kernel<W>
          <<<static_cast<unsigned>((n_cols + kFinalThreads - 1) / kFinalThreads), kFinalThreads, 0, stream>>>(
              partial_dw, partial_db, static_cast<W*>(grad_weight), static_cast<W*>(grad_bias), chunks, n_cols);
      return cudaGetLastError();
    });
  });
}

}  // namespace pyminigpt::cuda
