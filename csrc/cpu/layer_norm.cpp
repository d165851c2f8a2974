// Layer norm over the last dimension, forward and backward.
//
// Per row x of width C (weight w, bias b):
//   forward:  mean = sum_i x_i / C,  rstd = 1 / sqrt(sum_i (x_i - mean)^2 / C + eps)
//             y_i = (x_i - mean) * rstd * w_i + b_i
//   backward: xhat_i = (x_i - mean) * rstd,  g_i = dy_i * w_i
//             dx_i = rstd * (g_i - sum_j g_j / C - xhat_i * sum_j g_j * xhat_j / C)
//             dw = sum over rows of dy * xhat,  db = sum over rows of dy
//
// The forward is two-pass (mean, then the centred sum of squares: no cancellation) and
// writes y in a third pass; the later passes re-read the row from L1 (a 768-wide fp32
// row is 3 KiB). Memory traffic: forward reads x and writes y once; backward reads x and
// dy once and writes dx once (plus the saved fp32 mean and rstd, 8 bytes per row).
//
// dw and db are reduced in two stages: the rows are cut into a fixed number of blocks,
// each block accumulates fp32 partial sums, and the partials are added in block order.
// The block count does not depend on the number of threads, so the result is the same
// bits on any machine. Rows are split across threads with at::parallel_for; storage is
// float or bfloat16 (weight and bias may be fp32 for a bf16 x), arithmetic is fp32.
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <functional>

namespace pyminigpt::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t W = fVec::size();

// Row blocks of the backward's two-stage dw / db reduction.
constexpr int64_t kGradientBlocks = 32;

// The first n lanes of v, the rest zero.
fVec first_lanes(const fVec& v, int64_t n) { return n == W ? v : fVec::set(fVec(0.f), v, n); }

template <typename scalar_t>
void layer_norm_fwd_rows(const scalar_t* x, const float* w, const float* b, scalar_t* y, float* mean, float* rstd,
                         int64_t rows, int64_t C, float eps) {
  at::parallel_for(0, rows, rows_per_task(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * C;
      scalar_t* yr = y + r * C;
      fVec sum(0.f);
      for (int64_t i = 0; i < C; i += W) sum += load_float(xr + i, std::min(W, C - i));  // missing lanes are 0
      const float mu = reduce_sum(sum) / C;
      const fVec vmu(mu);
      fVec sum_sq(0.f);
      for (int64_t i = 0; i < C; i += W) {
        const int64_t n = std::min(W, C - i);
        const fVec d = first_lanes(load_float(xr + i, n) - vmu, n);
        sum_sq = at::vec::fmadd(d, d, sum_sq);
      }
      const float rs = 1.f / std::sqrt(reduce_sum(sum_sq) / C + eps);
      mean[r] = mu;
      rstd[r] = rs;
      const fVec vrs(rs);
      for (int64_t i = 0; i < C; i += W) {
        const int64_t n = std::min(W, C - i);
        const fVec xhat = (load_float(xr + i, n) - vmu) * vrs;
        store_float(at::vec::fmadd(xhat, fVec::loadu(w + i, n), fVec::loadu(b + i, n)), yr + i, n);
      }
    }
  });
}

// dx for every row; the dw / db partial sums of block k go to partial[k * 2C .. (k + 1) * 2C).
template <typename scalar_t>
void layer_norm_bwd_rows(const scalar_t* dy, const scalar_t* x, const float* w, const float* mean, const float* rstd,
                         scalar_t* dx, float* partial, int64_t blocks, int64_t rows, int64_t C) {
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t k = block_begin; k < block_end; ++k) {
      float* dw = partial + k * 2 * C;
      float* db = dw + C;
      std::fill(dw, dw + 2 * C, 0.f);
      for (int64_t r = rows * k / blocks; r < rows * (k + 1) / blocks; ++r) {
        const scalar_t* xr = x + r * C;
        const scalar_t* dyr = dy + r * C;
        const fVec vmu(mean[r]), vrs(rstd[r]);
        fVec sum_g(0.f), sum_g_xhat(0.f);
        for (int64_t i = 0; i < C; i += W) {
          const int64_t n = std::min(W, C - i);  // missing lanes of dy are 0, so they add nothing
          const fVec xhat = (load_float(xr + i, n) - vmu) * vrs;
          const fVec d = load_float(dyr + i, n);
          const fVec g = d * fVec::loadu(w + i, n);
          sum_g += g;
          sum_g_xhat = at::vec::fmadd(g, xhat, sum_g_xhat);
          at::vec::fmadd(d, xhat, fVec::loadu(dw + i, n)).store(dw + i, n);
          (d + fVec::loadu(db + i, n)).store(db + i, n);
        }
        const fVec mean_g(reduce_sum(sum_g) / C), mean_g_xhat(reduce_sum(sum_g_xhat) / C);
        scalar_t* dxr = dx + r * C;
        for (int64_t i = 0; i < C; i += W) {
          const int64_t n = std::min(W, C - i);
          const fVec xhat = (load_float(xr + i, n) - vmu) * vrs;
          const fVec g = load_float(dyr + i, n) * fVec::loadu(w + i, n);
          store_float((g - mean_g - xhat * mean_g_xhat) * vrs, dxr + i, n);
        }
      }
    }
  });
}

// dw[c] = sum_k partial[k][0][c], db[c] = sum_k partial[k][1][c], added in block order.
template <typename weight_t>
void reduce_partials(const float* partial, int64_t blocks, int64_t C, weight_t* dw, weight_t* db) {
  at::parallel_for(0, 2 * C, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += W) {
      const int64_t n = std::min(W, end - i);
      fVec acc(0.f);
      for (int64_t k = 0; k < blocks; ++k) acc += fVec::loadu(partial + k * 2 * C + i, n);
      if (i + n <= C) {
        store_float(acc, dw + i, n);
      } else if (i >= C) {
        store_float(acc, db + i - C, n);
      } else {  // the vector straddles the dw / db boundary
        float lanes[W];
        acc.store(lanes);
        for (int64_t l = 0; l < n; ++l) (i + l < C ? dw[i + l] : db[i + l - C]) = static_cast<weight_t>(lanes[l]);
      }
    }
  });
}

void check_storage(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "layer_norm: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "layer_norm: ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

// weight (and bias) must be (C,) of x's dtype or float32.
void check_parameter(const at::Tensor& p, const char* name, const at::Tensor& x) {
  check_storage(p, name);
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(-1), "layer_norm: ", name, " must have shape (", x.size(-1),
              ",), got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, "layer_norm: ", name,
              " must be float32 or x's dtype ", x.scalar_type(), ", got ", p.scalar_type());
}

void check_x(const at::Tensor& x, const char* name) {
  check_storage(x, name);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "layer_norm: ", name, " must have a non-empty last dimension, got ",
              x.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps) {
  check_x(x, "x");
  check_parameter(weight, "weight", x);
  check_parameter(bias, "bias", x);
  TORCH_CHECK(eps >= 0, "layer_norm: eps must be >= 0, got ", eps);
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
  const int64_t C = xc.size(-1), rows = xc.numel() / C;
  at::Tensor y = at::empty_like(xc);
  at::Tensor mean = at::empty({rows}, xc.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, xc.options().dtype(at::kFloat));
  if (rows == 0) return {y, mean, rstd};
  PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(xc.scalar_type(), "layer_norm_fwd", [&] {
    layer_norm_fwd_rows(xc.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
                        y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(),
                        rows, C, static_cast<float>(eps));
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd) {
  check_x(x, "x");
  check_x(grad_y, "grad_y");
  check_parameter(weight, "weight", x);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "layer_norm_bwd: grad_y must match x ", x.sizes(), " ", x.scalar_type(), ", got ", grad_y.sizes(), " ",
              grad_y.scalar_type());
  const int64_t C = x.size(-1), rows = x.numel() / C;
  for (const auto& [stat, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK(stat->scalar_type() == at::kFloat && stat->numel() == rows, "layer_norm_bwd: ", name,
                " must be float32 with ", rows, " elements, got ", stat->scalar_type(), " ", stat->sizes());
  }
  const at::Tensor xc = x.contiguous(), dyc = grad_y.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor dx = at::empty_like(xc);
  at::Tensor dweight = at::empty({C}, weight.options());
  at::Tensor dbias = at::empty({C}, weight.options());
  const int64_t blocks = std::min(rows, kGradientBlocks);
  if (rows == 0) return {dx, dweight.zero_(), dbias.zero_()};
  at::Tensor partial = at::empty({blocks, 2, C}, xc.options().dtype(at::kFloat));
  PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(xc.scalar_type(), "layer_norm_bwd", [&] {
    layer_norm_bwd_rows(dyc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
                        mc.const_data_ptr<float>(), rc.const_data_ptr<float>(), dx.mutable_data_ptr<scalar_t>(),
                        partial.mutable_data_ptr<float>(), blocks, rows, C);
  });
  PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(weight.scalar_type(), "layer_norm_bwd", [&] {
    reduce_partials(partial.const_data_ptr<float>(), blocks, C, dweight.mutable_data_ptr<scalar_t>(),
                    dbias.mutable_data_ptr<scalar_t>());
  });
  return {dx, dweight, dbias};
}

}  // namespace pyminigpt::cpu::CPU_CAPABILITY
