// Softmax with temperature over the last dimension, forward and backward.
//
//   forward:  y_i  = exp((x_i - m) / T) / s,   m = max_j x_j,   s = sum_j exp((x_j - m) / T)
//   backward: dx_i = y_i * (dy_i - sum_j dy_j * y_j) / T
//
// Subtracting the max before scaling keeps the rounding of the exponent's argument
// proportional to |x_i - m| / T, small exactly for the large probabilities.
//
// The forward finds m and s in ONE pass over the row (the online softmax: when the
// running max grows from m to m', the running sum is rescaled by exp(m - m')), then
// writes y in a second pass. Memory traffic per row of C elements: read x twice (the
// second read usually hits L2: a 50257-wide fp32 row is 196 KiB), write y once. Eager
// `torch.softmax(x / T)` also writes and rereads the temporary x / T.
//
// Each lane of a Vectorized<float> keeps its own running max and sum; the lanes are
// merged at the end of the pass. Rows are split across threads with at::parallel_for.
// Storage is float or bfloat16; the arithmetic is always fp32.
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <limits>

namespace pyminigpt::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t W = fVec::size();

// Rows per parallel task: enough elements (~32k) to amortise the task overhead.
int64_t rows_per_task(int64_t row_width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_width, 1)); }

struct MaxAndSum {
  float max;  // max_j x_j
  float sum;  // sum_j exp((x_j - max) / T)
};

// One pass of the online softmax over a row.
template <typename scalar_t>
MaxAndSum online_max_and_sum(const scalar_t* x, int64_t C, float inv_t) {
  // Start the lanes at the lowest finite value, not -inf, so that a lane that has only
  // seen -inf logits rescales by exp(0) * 0 instead of producing exp(-inf + inf) = NaN.
  constexpr float lowest = std::numeric_limits<float>::lowest();
  fVec lane_max(lowest), lane_sum(0.f);
  const fVec vinv_t(inv_t);
  int64_t i = 0;
  for (; i + W <= C; i += W) {
    fVec v = load_float(x + i);
    fVec new_max = at::vec::maximum(lane_max, v);
    lane_sum = lane_sum * ((lane_max - new_max) * vinv_t).exp() + ((v - new_max) * vinv_t).exp();
    lane_max = new_max;
  }
  float maxes[W], sums[W];
  lane_max.store(maxes);
  lane_sum.store(sums);
  float m = lowest;
  for (int64_t l = 0; l < W; ++l) m = std::max(m, maxes[l]);
  for (; i < C; ++i) m = std::max(m, static_cast<float>(x[i]));
  float s = 0.f;
  for (int64_t l = 0; l < W; ++l) s += sums[l] * std::exp((maxes[l] - m) * inv_t);
  for (i = C - C % W; i < C; ++i) s += std::exp((static_cast<float>(x[i]) - m) * inv_t);
  return {m, s};
}

template <typename scalar_t>
void softmax_fwd_rows(const scalar_t* x, scalar_t* y, int64_t rows, int64_t C, float inv_t) {
  at::parallel_for(0, rows, rows_per_task(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * C;
      scalar_t* yr = y + r * C;
      const MaxAndSum ms = online_max_and_sum(xr, C, inv_t);
      const fVec vmax(ms.max), vinv_t(inv_t), vinv_sum(1.f / ms.sum);
      for (int64_t i = 0; i < C; i += W) {
        const int64_t n = std::min(W, C - i);
        store_float(((load_float(xr + i, n) - vmax) * vinv_t).exp() * vinv_sum, yr + i, n);
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
      const fVec vdot(at::vec::vec_reduce_all<float>(std::plus<fVec>(), acc)), vinv_t(inv_t);
      for (int64_t i = 0; i < C; i += W) {
        const int64_t n = std::min(W, C - i);
        store_float(load_float(yr + i, n) * (load_float(dyr + i, n) - vdot) * vinv_t, dxr + i, n);
      }
    }
  });
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "softmax: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "softmax: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
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
              "softmax_bwd: grad_y must match y, got ", grad_y.sizes(), " ", grad_y.scalar_type(), " and ",
              y.sizes(), " ", y.scalar_type());
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
