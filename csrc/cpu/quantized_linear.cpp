// A linear layer with 8-bit or 4-bit weights: y = x dequantize(W)^T + b, for inference.
//
// The format (pyminigpt/quantize.py writes it, pyminigpt/ops/reference.py::dequantize defines it):
//
//   int8  qweight int8  (N, K):     w[n, k] = q[n, k] * scales[n, g]                     (symmetric)
//   int4  qweight uint8 (N, K / 2): w[n, k] = q[n, k] * scales[n, g] + offsets[n, g]      q in [0, 15]
//         in each run of 32 weights (16 bytes), byte i holds weight i (low nibble) and weight 16 + i
//         (high nibble): one mask and one shift unpack 16 bytes into two vectors of consecutive weights
//   scales, offsets: fp32 (N, G), g = k / (K / G): G groups of weights per row (G = 1: per output channel)
//
// The math, for each output n and row m of x:
//
//   y[m, n] = sum over groups g of ( scales[n, g] * sum_{k in g} q[n, k] x[m, k]
//                                    + offsets[n, g] * sum_{k in g} x[m, k] ) + b[n]
//
// so the inner loop is one multiply-add per weight (q widened to fp32), the scale is applied once per
// group, and the offsets' term needs only the per-group sums of x, computed once per call.
//
// Decoding (M <= kQuantizedLinearMaxRows rows): bound by reading the weights, so each weight byte is
// read once for all M rows, and threads split the N outputs (as csrc/cpu/linear.cpp does for fp32):
//
//   for each output n of the thread's columns:
//     for each group: for each run of 32 weights: widen the 32 weights to fp32 (int8: sign-extend;
//       int4: mask and shift, zero-extend), FMA them with each row of x into per-row accumulators
//       (several per row when there are few rows, to hide the FMA latency)
//     then fold the group's sums into the row's total times the group's scale
//
// Memory traffic per call: N * K bytes of int8 weights or N * K / 2 of int4, plus 4 (int8) or 8 (int4)
// bytes per group of scales and offsets, against 4 N K (fp32) or 2 N K (bf16) for the unquantized
// weight; x and y are M * (K + N) elements. The arithmetic stays fp32 whatever x's storage (float or
// bfloat16): the weights are widened, not the activations narrowed. (Int8 activations with VNNI dot
// products are not implemented here: weight-only keeps the reference's accuracy, and the CPUs this was
// measured on have no AVX512-VNNI.)
//
// Prefill (more rows): each weight is used M times, so the arithmetic dominates and a GEMM wins. Tiles
// of rows of W are dequantized to fp32 (a few hundred KiB, kept in L2) and multiplied by ATen's GEMM.
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace pyminigpt::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t W = fVec::size();
constexpr int64_t kRun = 32;      // weights widened at a time (one int4 packing run)
constexpr int kChunks = kRun / W;  // fp32 vectors per run: 2 with AVX-512, 4 with AVX2 and DEFAULT
constexpr int kVectorRegisters = W >= 16 ? 32 : 16;

// Accumulators per row of x: enough independent FMA chains to hide their latency with few rows, as
// many as the registers hold (M rows x A accumulators + the run's kChunks weights + x + a temporary).
constexpr int accumulators_per_row(int M) { return std::clamp((kVectorRegisters - kChunks - 2) / M, 1, kChunks); }

// The 32 weights at q as fp32, in kChunks vectors.
inline void widen_run(const int8_t* q, fVec (&w)[kChunks]) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  w[0] = fVec(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes))));
  w[1] = fVec(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1))));
#elif defined(CPU_CAPABILITY_AVX2)
  for (int j = 0; j < kChunks; ++j) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j * W));
    w[j] = fVec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
  }
#else
  float buffer[kRun];
  for (int i = 0; i < kRun; ++i) buffer[i] = static_cast<float>(q[i]);
  for (int j = 0; j < kChunks; ++j) w[j] = fVec::loadu(buffer + j * W);
#endif
}

// The 32 weights of one int4 run (16 bytes at q) as fp32, in kChunks vectors.
inline void widen_run(const uint8_t* q, fVec (&w)[kChunks]) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_and_si128(bytes, nibble);                        // weights 0..15
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);  // weights 16..31
#if defined(CPU_CAPABILITY_AVX512)
  w[0] = fVec(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(low)));
  w[1] = fVec(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(high)));
#else
  w[0] = fVec(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low)));
  w[1] = fVec(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(low, 8))));
  w[2] = fVec(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high)));
  w[3] = fVec(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(high, 8))));
#endif
#else
  float buffer[kRun];
  for (int i = 0; i < 16; ++i) {
    buffer[i] = static_cast<float>(q[i] & 15);
    buffer[16 + i] = static_cast<float>(q[i] >> 4);
  }
  for (int j = 0; j < kChunks; ++j) w[j] = fVec::loadu(buffer + j * W);
#endif
}

// Bytes per run of 32 weights, and per weight row.
template <typename qint_t>
constexpr int64_t run_bytes() {
  return std::is_same_v<qint_t, int8_t> ? kRun : kRun / 2;
}
template <typename qint_t>
int64_t row_bytes(int64_t K) {
  return std::is_same_v<qint_t, int8_t> ? K : K / 2;
}

// y[:, n0:n1] for M rows. xf: x widened to fp32 (M, K); xsum: x's per-group sums (M, G), for the offsets.
template <int M, typename qint_t, typename scalar_t>
void quantized_columns(const float* xf, const float* xsum, const qint_t* q, const float* scales, const float* offsets,
                       const scalar_t* bias, scalar_t* y, int64_t K, int64_t N, int64_t G, int64_t n0, int64_t n1) {
  constexpr int A = accumulators_per_row(M);
  const int64_t group = K / G;
  const int64_t runs = group / kRun;  // whole runs per group; int8 per channel may leave a tail
  for (int64_t n = n0; n < n1; ++n) {
    const qint_t* q_row = q + n * row_bytes<qint_t>(K);
    fVec total[M];
    float tail[M] = {};
    for (int m = 0; m < M; ++m) total[m] = fVec(0.f);
    for (int64_t g = 0; g < G; ++g) {
      fVec part[M][A];
      for (int m = 0; m < M; ++m)
        for (int a = 0; a < A; ++a) part[m][a] = fVec(0.f);
      const int64_t k0 = g * group;
      for (int64_t r = 0; r < runs; ++r) {
        const int64_t k = k0 + r * kRun;
        fVec w[kChunks];
        widen_run(q_row + k / kRun * run_bytes<qint_t>(), w);
        for (int m = 0; m < M; ++m) {
          const float* x_m = xf + m * K + k;
          for (int j = 0; j < kChunks; ++j)
            part[m][j % A] = at::vec::fmadd(w[j], fVec::loadu(x_m + j * W), part[m][j % A]);
        }
      }
      const fVec scale(scales[n * G + g]);
      for (int m = 0; m < M; ++m) {
        fVec sum = part[m][0];
        for (int a = 1; a < A; ++a) sum = sum + part[m][a];
        total[m] = at::vec::fmadd(sum, scale, total[m]);
      }
      if constexpr (std::is_same_v<qint_t, int8_t>) {  // int8 per channel: K need not be whole runs
        for (int64_t k = k0 + runs * kRun; k < k0 + group; ++k) {
          const float wk = static_cast<float>(q_row[k]) * scales[n * G + g];
          for (int m = 0; m < M; ++m) tail[m] += wk * xf[m * K + k];
        }
      }
    }
    const float b = bias == nullptr ? 0.f : static_cast<float>(bias[n]);
    for (int m = 0; m < M; ++m) {
      float offset_term = 0.f;
      if (offsets != nullptr) {
        for (int64_t g = 0; g < G; ++g) offset_term += offsets[n * G + g] * xsum[m * G + g];
      }
      y[m * N + n] = static_cast<scalar_t>(reduce_sum(total[m]) + tail[m] + offset_term + b);
    }
  }
}

template <int M, typename qint_t, typename scalar_t>
void quantized_rows(const float* xf, const float* xsum, const qint_t* q, const float* scales, const float* offsets,
                    const scalar_t* bias, scalar_t* y, int64_t K, int64_t N, int64_t G) {
  // ~64 KiB of weights per task: enough to amortise it
  const int64_t grain = std::max<int64_t>(1, 65536 / row_bytes<qint_t>(K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    quantized_columns<M>(xf, xsum, q, scales, offsets, bias, y, K, N, G, n0, n1);
  });
}

template <typename qint_t, typename scalar_t, int... Ms>
void quantized_dispatch(int64_t M, std::integer_sequence<int, Ms...>, const float* xf, const float* xsum,
                        const qint_t* q, const float* scales, const float* offsets, const scalar_t* bias, scalar_t* y,
                        int64_t K, int64_t N, int64_t G) {
  ((M == Ms + 1 ? quantized_rows<Ms + 1>(xf, xsum, q, scales, offsets, bias, y, K, N, G) : void()), ...);
}

// Rows n0..n1 of the weight dequantized to fp32, into out ((n1 - n0), K).
template <typename qint_t>
void dequantize_rows(const qint_t* q, const float* scales, const float* offsets, float* out, int64_t K, int64_t G,
                     int64_t n0, int64_t n1) {
  const int64_t group = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const qint_t* q_row = q + n * row_bytes<qint_t>(K);
    float* o = out + (n - n0) * K;
    for (int64_t g = 0; g < G; ++g) {
      const fVec scale(scales[n * G + g]);
      const fVec offset(offsets == nullptr ? 0.f : offsets[n * G + g]);
      int64_t k = g * group;
      for (; k + kRun <= (g + 1) * group; k += kRun) {
        fVec w[kChunks];
        widen_run(q_row + k / kRun * run_bytes<qint_t>(), w);
        for (int j = 0; j < kChunks; ++j) at::vec::fmadd(w[j], scale, offset).store(o + k + j * W);
      }
      if constexpr (std::is_same_v<qint_t, int8_t>) {
        for (; k < (g + 1) * group; ++k) o[k] = static_cast<float>(q_row[k]) * scales[n * G + g];
      }
    }
  }
}

// Many rows: y[:, tile] = x tile^T + b for tiles of weight rows dequantized to fp32 (~512 KiB each).
template <typename qint_t>
at::Tensor quantized_prefill(const at::Tensor& x, const qint_t* q, const float* scales, const float* offsets,
                             const at::Tensor& bias, int64_t K, int64_t N, int64_t G) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor bf = bias.defined() ? bias.to(at::kFloat) : at::Tensor();
  at::Tensor y = at::empty({x.size(0), N}, xf.options());
  const int64_t tile = std::max<int64_t>(64, 131072 / K / 16 * 16);
  at::Tensor w = at::empty({std::min(tile, N), K}, xf.options());
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t rows = std::min(tile, N - n0);
    float* w_data = w.mutable_data_ptr<float>();
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      dequantize_rows(q, scales, offsets, w_data + r0 * K, K, G, n0 + r0, n0 + r1);
    });
    const at::Tensor w_tile = w.narrow(0, 0, rows);
    y.narrow(1, n0, rows)
        .copy_(at::linear(xf, w_tile, bf.defined() ? std::optional<at::Tensor>(bf.narrow(0, n0, rows)) : std::nullopt));
  }
  return y.to(x.scalar_type());
}

}  // namespace

at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu(),
              "quantized_linear: x, qweight and scales must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quantized_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "quantized_linear: x must be (M, K), got ", x.sizes());
  const bool int4 = qweight.scalar_type() == at::kByte;
  TORCH_CHECK(int4 || qweight.scalar_type() == at::kChar, "quantized_linear: qweight must be int8 (int8 weights) or ",
              "uint8 (int4 weights, two per byte), got ", qweight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == (int4 ? K / 2 : K) && (!int4 || K % kRun == 0),
              "quantized_linear: x ", x.sizes(), " needs qweight (N, ", int4 ? K / 2 : K, ")",
              int4 ? " and K a multiple of 32" : "", ", got ", qweight.sizes());
  const int64_t N = qweight.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == N && scales.size(1) > 0 &&
                  K % scales.size(1) == 0,
              "quantized_linear: scales must be float32 (N, G) with N = ", N, " and G dividing K = ", K, ", got ",
              scales.scalar_type(), " ", scales.sizes());
  const int64_t G = scales.size(1);
  TORCH_CHECK(G == 1 || (K / G) % kRun == 0, "quantized_linear: groups of ", K / G,
              " weights: a group must be the whole row or a multiple of 32");
  TORCH_CHECK(offsets.has_value() == int4, "quantized_linear: int4 weights need offsets and int8 weights take none");
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->device().is_cpu() && offsets->scalar_type() == at::kFloat &&
                    offsets->sizes() == scales.sizes(),
                "quantized_linear: offsets must be a float32 CPU tensor of scales' shape ", scales.sizes(), ", got ",
                offsets->scalar_type(), " ", offsets->sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == N,
                "quantized_linear: bias must be a ", x.scalar_type(), " CPU tensor of shape (", N, ",), got ",
                bias->scalar_type(), " ", bias->sizes());
  }
  const at::Tensor qc = qweight.contiguous(), sc = scales.contiguous();
  const at::Tensor oc = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* s_data = sc.const_data_ptr<float>();
  const float* o_data = oc.defined() ? oc.const_data_ptr<float>() : nullptr;
  if (M == 0 || N == 0 || K == 0) {  // nothing to multiply: y = b
    at::Tensor y = at::zeros({M, N}, x.options());
    return b.defined() ? y.add_(b) : y;
  }
  if (M > kQuantizedLinearMaxRows) {
    return int4 ? quantized_prefill(x, qc.const_data_ptr<uint8_t>(), s_data, o_data, b, K, N, G)
                : quantized_prefill(x, qc.const_data_ptr<int8_t>(), s_data, o_data, b, K, N, G);
  }
  const at::Tensor xf = x.contiguous().to(at::kFloat);  // M * K floats: a few KiB, kept in L1
  // the per-group sums of x, for the offsets' term (int4)
  const at::Tensor xsum = int4 ? xf.view({M, G, K / G}).sum(-1).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(x.scalar_type(), "quantized_linear", [&] {
    const scalar_t* b_data = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const float* xsum_data = int4 ? xsum.const_data_ptr<float>() : nullptr;
    constexpr auto rows = std::make_integer_sequence<int, kQuantizedLinearMaxRows>{};
    if (int4) {
      quantized_dispatch(M, rows, xf.const_data_ptr<float>(), xsum_data, qc.const_data_ptr<uint8_t>(), s_data, o_data,
                         b_data, y.mutable_data_ptr<scalar_t>(), K, N, G);
    } else {
      quantized_dispatch(M, rows, xf.const_data_ptr<float>(), xsum_data, qc.const_data_ptr<int8_t>(), s_data, o_data,
                         b_data, y.mutable_data_ptr<scalar_t>(), K, N, G);
    }
  });
  return y;
}

}  // namespace pyminigpt::cpu::CPU_CAPABILITY
