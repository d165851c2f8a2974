// Softmax with temperature over the last dimension, forward and backward.
//
//   forward:  y_i  = exp((x_i - m) / T) / s,   m = max_j x_j,   s = sum_j exp((x_j - m) / T)
//   backward: dx_i = y_i * (dy_i - sum_j dy_j * y_j) / T
//
// Subtracting the max before scaling keeps the rounding of the exponent's argument
// proportional to |x_i - m| / T, small exactly for the large probabilities.
//
// The forward reads x ONCE, in blocks of 1024 elements that stay in L1 (the online
// softmax at block granularity): per block b it takes the block max m_b, writes
// e_i = exp((x_i - m_b) / T) into the output row (an fp32 row buffer for bf16 output) and
// sums them into s_b; the row's running max m and sum s absorb each block, s rescaled by
// exp((m_old - m) / T) when m grows. A second pass over the row (196 KiB for a 50257-wide
// fp32 row: it stays in L2) scales it in place: y_i = e_i * exp((m_b - m) / T) / s.
// Memory traffic per row of C elements: read x once, write y once. Eager
// `torch.softmax(x / T)` also writes and rereads the temporary x / T.
//
// The exponential is at::vec's exp_u20 (a polynomial, <= 20 ulp, the one PyTorch's CPU
// flash attention uses), not Sleef's 1-ulp exp: that one is slower (bench/RESULTS.md) for
// an error gain far below the fp32 rounding of x / T that the tests allow.
//
// Rows are split across threads with at::parallel_for. Storage is float or bfloat16;
// the arithmetic is always fp32.
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <limits>
#include <vector>

namespace pyminigpt::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t W = fVec::size();

constexpr int64_t BLOCK = 1024;  // elements per block of the online softmax (4 KiB of fp32)
// The lanes start at the lowest finite value, not -inf, so that a block of -inf logits
// gives exp(-inf - lowest) = 0 instead of exp(-inf + inf) = NaN.
constexpr float LOWEST = std::numeric_limits<float>::lowest();

template <typename scalar_t>
float block_max(const scalar_t* x, int64_t n) {
  fVec lanes(LOWEST);
  int64_t i = 0;
  for (; i + W <= n; i += W) lanes = at::vec::maximum(lanes, load_float(x + i));
  float m = reduce_max(lanes);
  for (; i < n; ++i) m = std::max(m, static_cast<float>(x[i]));
  return m;
}

// e_i = exp((x_i - m) / T) for i < n, written to e; returns their sum.
template <typename scalar_t>
float exp_and_sum(const scalar_t* x, float* e, int64_t n, float m, float inv_t) {
  const fVec vm(m), vinv_t(inv_t);
  fVec lanes(0.f);
  for (int64_t i = 0; i < n; i += W) {
    const int64_t count = std::min(W, n - i);
    const fVec v = fVec::set(fVec(0.f), ((load_float(x + i, count) - vm) * vinv_t).exp_u20(), count);
    v.store(e + i, count);
    lanes = lanes + v;
  }
  return reduce_sum(lanes);
}

template <typename scalar_t>
void softmax_fwd_rows(const scalar_t* x, scalar_t* y, int64_t rows, int64_t C, float inv_t) {
  const int64_t blocks = (C + BLOCK - 1) / BLOCK;
  at::parallel_for(0, rows, rows_per_task(C), [&](int64_t begin, int64_t end) {
    // fp32 output rows hold e themselves; bf16 rows need an fp32 buffer
    std::vector<float> buffer(std::is_same_v<scalar_t, float> ? 0 : C), block_maxes(blocks);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * C;
      scalar_t* yr = y + r * C;
      float* e = buffer.empty() ? reinterpret_cast<float*>(yr) : buffer.data();
      // pass 1: x -> e, the running max and sum
      float m = LOWEST, s = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * BLOCK, n = std::min(BLOCK, C - start);
        const float mb = block_max(xr + start, n);
        const float sb = exp_and_sum(xr + start, e + start, n, mb, inv_t);
        if (mb > m) {
          s = s * std::exp((m - mb) * inv_t) + sb;
          m = mb;
        } else {
          s += sb * std::exp((mb - m) * inv_t);
        }
        block_maxes[b] = mb;
      }
      // pass 2: e -> y, each block rescaled to the row's max and normalised
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * BLOCK, n = std::min(BLOCK, C - start);
        const fVec scale(std::exp((block_maxes[b] - m) * inv_t) / s);
        for (int64_t i = start; i < start + n; i += W) {
          const int64_t count = std::min(W, start + n - i);
          store_float(fVec::loadu(e + i, count) * scale, yr + i, count);
        }
      }
    }
  });
}

template <typename scalar_t>
void softmax_bwd_rows(const scalar_t* y, const scalar_t* dy, scalar_t* dx, int64_t rows, int64_t C, float inv_t) {
  at::parallel_for(0, rows, rows_per_task(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* yr = y + r * C;
      const scalar_t* dyr = dy + r * C;
      scalar_t* dxr = dx + r * C;
      fVec acc(0.f);
      for (int64_t i = 0; i < C; i += W) {
        const int64_t n = std::min(W, C - i);  // missing lanes load as 0 and add nothing
        acc = at::vec::fmadd(load_float(yr + i, n), load_float(dyr + i, n), acc);
      }
      const fVec vdot(reduce_sum(acc)), vinv_t(inv_t);
      for (int64_t i = 0; i < C; i += W) {
        const int64_t n = std::min(W, C - i);
        store_float(load_float(yr + i, n) * (load_float(dyr + i, n) - vdot) * vinv_t, dxr + i, n);
      }
    }
  });
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "softmax: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "softmax: ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, "softmax: ", name, " must have at least one dimension");
}

}  // namespace

at::Tensor softmax_fwd(const at::Tensor& x, double temperature) {
  check_input(x, "x");
  TORCH_CHECK(temperature > 0, "softmax: temperature must be > 0, got ", temperature);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t C = xc.size(-1);
  if (xc.numel() == 0) return y;
  PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(xc.scalar_type(), "softmax_fwd", [&] {
    softmax_fwd_rows(xc.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), xc.numel() / C, C,
                     static_cast<float>(1.0 / temperature));
  });
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& y, const at::Tensor& grad_y, double temperature) {
  check_input(y, "y");
  check_input(grad_y, "grad_y");
  TORCH_CHECK(y.sizes() == grad_y.sizes() && y.scalar_type() == grad_y.scalar_type(),
              "softmax_bwd: grad_y must match y, got ", grad_y.sizes(), " ", grad_y.scalar_type(), " and ", y.sizes(),
              " ", y.scalar_type());
  const at::Tensor yc = y.contiguous(), dyc = grad_y.contiguous();
  at::Tensor dx = at::empty_like(yc);
  const int64_t C = yc.size(-1);
  if (yc.numel() == 0) return dx;
  PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(yc.scalar_type(), "softmax_bwd", [&] {
    softmax_bwd_rows(yc.const_data_ptr<scalar_t>(), dyc.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                     yc.numel() / C, C, static_cast<float>(1.0 / temperature));
  });
  return dx;
}

}  // namespace pyminigpt::cpu::CPU_CAPABILITY
