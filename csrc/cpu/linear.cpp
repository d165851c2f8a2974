// A linear layer for a few rows at a time: decoding.
//
//   y[m, n] = sum_k x[m, k] * W[n, k] + b[n]      x (M, K), W (N, K) (nn.Linear's layout), b (N,)
//
// When a model decodes, each step multiplies one new position per sequence (M = batch rows)
// by every weight matrix: the step reads all the weights once and does 2 flops per weight
// and row. For a few rows that is bound by the weight bytes, not by arithmetic, so the
// kernel streams W exactly once for all M rows and keeps the M rows of x (a few KiB) in L1:
//
//   for each block of R rows of W (threads split the N outputs):
//     for k in steps of two Vectorized<float>:
//       load the R rows' weights (widened to fp32), then for each row of x, FMA them
//       into its R accumulators; the R x M accumulators stay in registers
//     reduce each accumulator across its lanes, add the bias
//
// Memory traffic: N * K weights read once (4 bytes fp32, 2 bytes bf16), M * (K + N) for x
// and y. bf16 weights halve the bytes; the arithmetic stays fp32 (widening bf16 is a shift).
// On CPUs with AVX512_BF16, bf16 skips the widening: VDPBF16PS multiplies 16 pairs of bf16 and
// adds both products of a pair to an fp32 lane, 32 multiply-adds in one instruction (see
// linear_columns_dot_bf16). Storage of x, W, b and y: all float, or all bfloat16.
//
// The weight may also come stored transposed: wt (K, N) contiguous, passed as wt.t() (a view with
// strides (1, N)); transformers' GPT-2 keeps its projections so (Conv1D: y = x wt + b). A row of
// wt then holds one input's weights for every output, so that kernel walks k instead:
//
//   threads split the rows of wt into blocks, each read front to back:
//     for each tile of output columns whose M rows of fp32 partial sums fit in L1:
//       for k in the block, R = 4 rows at a time: load the R rows' chunk of weights (widened
//         to fp32), then for each row of x, FMA them times x[m, k:k + R] into the tile's sums
//   y = the threads' partial sums, added in order, + b
//
// It reads wt once too. bf16 is widened there (VDPBF16PS would need pairs of rows interleaved),
// so with more rows of x the arithmetic shows (bench/linear_rows.py --transposed measures it
// against torch's matmul; bench/RESULTS.md). Any other layout of the weight is copied to (N, K) first.
// Inputs with more rows than kLinearMaxRows go to ATen's GEMM, which reuses each weight across
// the rows. Which row counts are worth sending here is the caller's choice
// (pyminigpt/ops/native.py, LINEAR_MAX_ROWS, with its measurements).
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The AVX512 variant of this file also has a VDPBF16PS kernel for bf16 (linear_columns_dot_bf16).
#if defined(CPU_CAPABILITY_AVX512) && (defined(__GNUC__) || defined(__clang__))
#define PYMINIGPT_LINEAR_DOT_BF16 1
#include <immintrin.h>
#endif

namespace pyminigpt::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t W = fVec::size();
// Vector registers: 32 with AVX-512, 16 with AVX2.
constexpr int kVectorRegisters = W >= 16 ? 32 : 16;
// Weight rows per block for M rows of x.
// - Up to 4 rows of x: one weight row at a time. W is then read as one sequential stream, which
//   the hardware prefetcher follows at full speed; R interleaved rows are R short streams of
//   1.5-3 KiB that it does not (pyminigpt/bench/test_bench_linear.py measures both; bench/RESULTS.md).
// - More rows: each weight is used M times, the arithmetic shows, and blocks of R rows reuse each
//   chunk of x from registers. At most 4: a block holds R x M accumulators, the R rows' weights
//   (2 vectors each), one row of x (2 vectors) and a few temporaries in registers.
constexpr int rows_per_block(int M) { return M <= 4 ? 1 : std::clamp((kVectorRegisters - 4) / (M + 2), 1, 4); }

// The k-th chunk of 2W weights of row w as two fp32 vectors; lanes past `count` are 0.
template <typename scalar_t>
inline void load_weights(const scalar_t* w, int64_t count, fVec& low, fVec& high) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    low = load_float(w, std::min<int64_t>(W, count));
    high = count > W ? load_float(w + W, count - W) : fVec(0.f);
  } else {
    using bVec = at::vec::Vectorized<scalar_t>;
    static_assert(bVec::size() == 2 * W);
    const bVec v = count == 2 * W ? bVec::loadu(w) : bVec::loadu(w, count);  // loadu(p, count) zero-fills
    std::tie(low, high) = at::vec::convert_to_float<scalar_t>(v);
  }
}

// acc[r][m] += W[n + r, k : k + count] . x[m, k : k + count] for one chunk of count <= 2W
// weights. Inlined with count = 2W for the full chunks, so their loads need no masks.
template <int M, int R, typename scalar_t>
C10_ALWAYS_INLINE void accumulate_chunk(fVec (&acc)[R][M], const float* xf, const scalar_t* w, int64_t K, int64_t N,
                                        int64_t n, int64_t k, int64_t count) {
  fVec w_low[R], w_high[R];
  for (int r = 0; r < R; ++r) {
    load_weights(w + (n + r) * K + k, count, w_low[r], w_high[r]);
    if constexpr (R > 1) {
      // the same chunk of the next block's rows: R interleaved rows are too short streams for
      // the hardware prefetcher (one sequential stream, R = 1, needs no help; there this costs)
      __builtin_prefetch(w + std::min<int64_t>(n + R + r, N - 1) * K + k);
    }
  }
  for (int m = 0; m < M; ++m) {  // x rows come from L1, one at a time
    const fVec x_low = load_float(xf + m * K + k, std::min<int64_t>(W, count));
    const fVec x_high = count > W ? load_float(xf + m * K + k + W, count - W) : fVec(0.f);
    for (int r = 0; r < R; ++r) {
      acc[r][m] = at::vec::fmadd(w_high[r], x_high, at::vec::fmadd(w_low[r], x_low, acc[r][m]));
    }
  }
}

// y[:, n:n + R] for M rows; M and R are known at compile time, so the R x M accumulators
// live in registers. xf: x widened to fp32, (M, K) contiguous.
template <int M, int R, typename scalar_t>
void linear_block(const float* xf, const scalar_t* w, const scalar_t* bias, scalar_t* y, int64_t K, int64_t N,
                  int64_t n) {
  fVec acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = fVec(0.f);
  int64_t k = 0;
  for (; k + 2 * W <= K; k += 2 * W) accumulate_chunk<M, R>(acc, xf, w, K, N, n, k, 2 * W);
  if (k < K) accumulate_chunk<M, R>(acc, xf, w, K, N, n, k, K - k);  // the last, partial chunk
  for (int r = 0; r < R; ++r) {
    const float b = bias == nullptr ? 0.f : static_cast<float>(bias[n + r]);
    for (int m = 0; m < M; ++m) {
      y[m * N + n + r] = static_cast<scalar_t>(reduce_sum(acc[r][m]) + b);
    }
  }
}

// y[:, n0:n1] for M rows: blocks of R weight rows, then single rows for the remainder.
template <int M, typename scalar_t>
void linear_columns(const float* xf, const scalar_t* w, const scalar_t* bias, scalar_t* y, int64_t K, int64_t N,
                    int64_t n0, int64_t n1) {
  constexpr int R = rows_per_block(M);
  int64_t n = n0;
  for (; n + R <= n1; n += R) linear_block<M, R>(xf, w, bias, y, K, N, n);
  for (; n < n1; ++n) linear_block<M, 1>(xf, w, bias, y, K, N, n);
}

// Whether bf16 runs on linear_columns_dot_bf16: compiled into the AVX512 variant only, and run
// only on a CPU with AVX512_BF16 (Intel from Cooper Lake, AMD from Zen 4).
bool use_dot_bf16() {
#ifdef PYMINIGPT_LINEAR_DOT_BF16
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

#ifdef PYMINIGPT_LINEAR_DOT_BF16

// y[:, n0:n1] for M rows of bf16 x against bf16 weights, with VDPBF16PS (AVX512_BF16):
//
//   acc[m].lane[i] += W[n, k + 2i] * x[m, k + 2i] + W[n, k + 2i + 1] * x[m, k + 2i + 1]
//
// for 32 weights of row n at a time, read once for all M rows. The product of two bf16 is
// exact in fp32, so this is the widening kernel's arithmetic (in another summation order),
// except that the instruction treats denormal inputs and results as zero. One weight row at a
// time, as for few rows above; here M <= 8 accumulators and one chunk of weights fit in
// registers whatever M. The function is compiled for AVX512_BF16 on its own and only called
// when the CPU has it.
template <int M>
__attribute__((target("avx512bf16"))) void linear_columns_dot_bf16(const at::BFloat16* x, const at::BFloat16* w,
                                                                   const at::BFloat16* bias, at::BFloat16* y, int64_t K,
                                                                   int64_t N, int64_t n0, int64_t n1) {
  constexpr int64_t kChunk = 32;  // bf16 per 512-bit register
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (K % kChunk)) - 1);  // the last, partial chunk
  for (int64_t n = n0; n < n1; ++n) {
    const at::BFloat16* w_row = w + n * K;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + kChunk <= K; k += kChunk) {
      const __m512bh weights = (__m512bh)_mm512_loadu_si512(w_row + k);
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm512_dpbf16_ps(acc[m], weights, (__m512bh)_mm512_loadu_si512(x + m * K + k));
      }
    }
    if (k < K) {  // masked loads zero the lanes past K, which then add nothing
      const __m512bh weights = (__m512bh)_mm512_maskz_loadu_epi16(tail, w_row + k);
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm512_dpbf16_ps(acc[m], weights, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + k));
      }
    }
    const float b = bias == nullptr ? 0.f : static_cast<float>(bias[n]);
    for (int m = 0; m < M; ++m) y[m * N + n] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[m]) + b);
  }
}
#endif

// Output columns per task: ~64 KiB of weights, enough to amortise the task, and at least one
// block of `block` weight rows.
template <typename scalar_t>
int64_t columns_per_task(int64_t K, int64_t block) {
  return std::max<int64_t>(block, 65536 / (K * static_cast<int64_t>(sizeof(scalar_t))));
}

// x: the M rows as stored (read by the VDPBF16PS kernel), xf: widened to fp32 (read by the others).
template <int M, typename scalar_t>
void linear_rows(const scalar_t* x, const float* xf, const scalar_t* w, const scalar_t* bias, scalar_t* y, int64_t K,
                 int64_t N) {
#ifdef PYMINIGPT_LINEAR_DOT_BF16
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (use_dot_bf16()) {
      at::parallel_for(0, N, columns_per_task<scalar_t>(K, 1),
                       [&](int64_t n0, int64_t n1) { linear_columns_dot_bf16<M>(x, w, bias, y, K, N, n0, n1); });
      return;
    }
  }
#endif
  at::parallel_for(0, N, columns_per_task<scalar_t>(K, rows_per_block(M)),
                   [&](int64_t n0, int64_t n1) { linear_columns<M>(xf, w, bias, y, K, N, n0, n1); });
}

template <typename scalar_t, int... Ms>
void linear_dispatch(int64_t M, std::integer_sequence<int, Ms...>, const scalar_t* x, const float* xf,
                     const scalar_t* w, const scalar_t* bias, scalar_t* y, int64_t K, int64_t N) {
  ((M == Ms + 1 ? linear_rows<Ms + 1>(x, xf, w, bias, y, K, N) : void()), ...);
}

// ---- the weight stored transposed: wt (K, N) ------------------------------------------------

constexpr int64_t kWtTileFloats = 4096;  // M rows of sums for one tile of columns: 16 KiB, in L1
constexpr int kWtRowsPerStep = 4;        // rows of wt added per pass over a tile

// acc[m * acc_stride + 0:cols] += sum over r < R of x[m, k + r] * wt[k + r, n:n + cols], 2W columns
// at a time: R chunks of weights, then each row's sums loaded, updated and stored (in L1). R rows
// at once load and store the sums R times less often than one row at a time.
template <int M, int R, typename scalar_t>
C10_ALWAYS_INLINE void accumulate_wt_rows(float* acc, int64_t acc_stride, const float* xf, const scalar_t* wt,
                                          int64_t K, int64_t N, int64_t n, int64_t cols, int64_t k) {
  for (int64_t v = 0; v < cols; v += 2 * W) {
    fVec low[R], high[R];
    const int64_t count = std::min<int64_t>(2 * W, cols - v);
    for (int r = 0; r < R; ++r) load_weights(wt + (k + r) * N + n + v, count, low[r], high[r]);
    for (int m = 0; m < M; ++m) {
      float* a = acc + m * acc_stride + v;
      fVec a_low = fVec::loadu(a), a_high = fVec::loadu(a + W);
      for (int r = 0; r < R; ++r) {
        const fVec x_mk(xf[m * K + k + r]);
        a_low = at::vec::fmadd(low[r], x_mk, a_low);
        a_high = at::vec::fmadd(high[r], x_mk, a_high);
      }
      a_low.store(a);  // lanes past cols land in the padding of the row (see linear_wt)
      a_high.store(a + W);
    }
  }
}

// partial[m, :] += x[m, k0:k1] wt[k0:k1, :], in tiles of columns whose M rows of sums stay in L1
// (one tile for a single row of x and N <= 4096: then wt[k0:k1] is read front to back).
template <int M, typename scalar_t>
void accumulate_wt(float* partial, int64_t partial_stride, const float* xf, const scalar_t* wt, int64_t K, int64_t N,
                   int64_t k0, int64_t k1) {
  constexpr int64_t kTile = kWtTileFloats / M / (2 * W) * (2 * W);
  for (int64_t n = 0; n < N; n += kTile) {
    const int64_t cols = std::min(kTile, N - n);
    int64_t k = k0;
    for (; k + kWtRowsPerStep <= k1; k += kWtRowsPerStep)
      accumulate_wt_rows<M, kWtRowsPerStep>(partial + n, partial_stride, xf, wt, K, N, n, cols, k);
    for (; k < k1; ++k) accumulate_wt_rows<M, 1>(partial + n, partial_stride, xf, wt, K, N, n, cols, k);
  }
}

// y = x wt + b. Each thread takes a block of wt's rows, which it reads from start to end, and
// sums into its own fp32 partial product (M rows of N, padded to whole chunks); the partials
// are then added in order, with the bias. (So the order of the sum over k depends on the
// number of threads, as in MKL's GEMM.)
template <int M, typename scalar_t>
void linear_wt(const float* xf, const scalar_t* wt, const scalar_t* bias, scalar_t* y, int64_t K, int64_t N) {
  const int64_t parts = std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(K / 64, 1));  // >= 64 rows each
  const int64_t stride = (N + 2 * W - 1) / (2 * W) * (2 * W);
  std::vector<float> partials(static_cast<size_t>(parts * M * stride), 0.f);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      accumulate_wt<M>(partials.data() + p * M * stride, stride, xf, wt, K, N, K * p / parts, K * (p + 1) / parts);
  });
  for (int m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; n += W) {
      const int64_t lanes = std::min<int64_t>(W, N - n);
      fVec sum = bias == nullptr ? fVec(0.f) : load_float(bias + n, lanes);
      for (int64_t p = 0; p < parts; ++p) sum = sum + fVec::loadu(partials.data() + (p * M + m) * stride + n);
      store_float(sum, y + m * N + n, lanes);
    }
  }
}

template <typename scalar_t, int... Ms>
void linear_wt_dispatch(int64_t M, std::integer_sequence<int, Ms...>, const float* xf, const scalar_t* wt,
                        const scalar_t* bias, scalar_t* y, int64_t K, int64_t N) {
  ((M == Ms + 1 ? linear_wt<Ms + 1>(xf, wt, bias, y, K, N) : void()), ...);
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear: x and weight must be CPU tensors, got ",
              x.device(), " and ", weight.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "linear: weight must have x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1),
              "linear: x must be (M, K) and weight (N, K), got ", x.sizes(), " and ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == N,
                "linear: bias must be a ", x.scalar_type(), " CPU tensor of shape (", N, ",), got ",
                bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  }
  // weight = wt.t() for a contiguous wt (K, N): read in place by the wt kernel
  const bool transposed = !weight.is_contiguous() && weight.stride(0) == 1 && weight.stride(1) == N;
  if (M == 0 || M > kLinearMaxRows || K == 0) return at::linear(x, weight, bias);
  at::Tensor y = at::empty({M, N}, x.options());
  if (N == 0) return y;
  const at::Tensor xc = x.contiguous();
  const bool widen_x = transposed || !(x.scalar_type() == at::kBFloat16 && use_dot_bf16());
  const at::Tensor xf = widen_x ? xc.to(at::kFloat) : at::Tensor();  // M * K floats: a few KiB, kept in L1
  const at::Tensor w = transposed ? weight : weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(x.scalar_type(), "linear", [&] {
    const scalar_t* b_data = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    if (transposed) {
      linear_wt_dispatch(M, std::make_integer_sequence<int, kLinearMaxRows>{}, xf.const_data_ptr<float>(),
                         w.const_data_ptr<scalar_t>(), b_data, y.mutable_data_ptr<scalar_t>(), K, N);
    } else {
      linear_dispatch(M, std::make_integer_sequence<int, kLinearMaxRows>{}, xc.const_data_ptr<scalar_t>(),
                      widen_x ? xf.const_data_ptr<float>() : nullptr, w.const_data_ptr<scalar_t>(), b_data,
                      y.mutable_data_ptr<scalar_t>(), K, N);
    }
  });
  return y;
}

}  // namespace pyminigpt::cpu::CPU_CAPABILITY
