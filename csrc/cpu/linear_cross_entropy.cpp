// The LM head and the cross entropy together ("linear cross entropy"), in chunks of rows,
// with the gradients computed in the forward (the loss is a scalar: its backward only scales them).
//
//   z = x W^T + b                          x (N, K), W (V, K), b (V,) or none, labels y (N,)
//   lse_r = log sum_j exp(z_rj)
//   loss_r = lse_r - z_r,y_r                (0 for a row whose label is ignore_index)
//   loss = sum_r loss_r / count              count = rows not ignored (NaN when 0, as F.cross_entropy); or the sum
//   G_rj = scale * (softmax(z_r)_j - [j == y_r])   (0 on ignored rows), scale = 1 / count (or 1)
//   dx = G W,  dW = G^T x,  db = sum_r G_r
//
// Nothing of size N x V is kept: for each chunk of C rows (chunk_rows, chosen by the caller) the
// chunk's logits (C, V) fp32 are written by ATen's GEMM into one reused buffer, turned into G in
// place by the row pass below, and consumed by the two gradient GEMMs before the next chunk.
// Peak memory beyond the inputs: C * V * 4 bytes of logits, dx (N, K) and dW (V, K) in fp32.
//
// The row pass (per row of V logits, threads split the rows of the chunk), as softmax.cpp's
// forward: pass 1 reads z once in blocks of 1024 that stay in L1, takes each block's max m_b,
// writes e_j = exp(z_j - m_b) in place and folds the block into the row's running max m and sum
// s; pass 2 (the row, 196 KiB for V = 50257, is still in L2) writes
// G_j = e_j * exp(m_b - m) / s * scale, and subtracts scale at the label. Memory traffic per row:
// V floats read twice and written twice, mostly from cache; the GEMMs read the chunk three times
// more (dx, dW) and W twice per chunk. An ignored row skips both passes (its G row is zeroed).
// The arithmetic is fp32; bf16 inputs are widened once to fp32 copies of x and W.
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace pyminigpt::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t W = fVec::size();
constexpr int64_t BLOCK = 1024;  // elements per block of the online softmax (4 KiB)
constexpr float LOWEST = std::numeric_limits<float>::lowest();

float block_max(const float* z, int64_t n) {
  fVec lanes(LOWEST);
  int64_t i = 0;
  for (; i + W <= n; i += W) lanes = at::vec::maximum(lanes, fVec::loadu(z + i));
  float m = reduce_max(lanes);
  for (; i < n; ++i) m = std::max(m, z[i]);
  return m;
}

// z_j <- exp(z_j - m) for j < n; returns their sum.
float exp_in_place(float* z, int64_t n, float m) {
  const fVec vm(m);
  fVec lanes(0.f);
  for (int64_t i = 0; i < n; i += W) {
    const int64_t count = std::min(W, n - i);
    const fVec e = fVec::set(fVec(0.f), (fVec::loadu(z + i, count) - vm).exp_u20(), count);
    e.store(z + i, count);
    lanes = lanes + e;
  }
  return reduce_sum(lanes);
}

// One chunk of rows: logits (rows, V) -> G in place (when write_grad), loss_rows[r] = lse_r - z_r,y_r.
void cross_entropy_rows(float* logits, const int64_t* labels, float* loss_rows, int64_t rows, int64_t V,
                        int64_t ignore_index, float scale, bool write_grad) {
  const int64_t blocks = (V + BLOCK - 1) / BLOCK;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> block_maxes(blocks);
    for (int64_t r = begin; r < end; ++r) {
      float* z = logits + r * V;
      const int64_t label = labels[r];
      if (label == ignore_index) {
        loss_rows[r] = 0.f;
        if (write_grad) std::fill(z, z + V, 0.f);
        continue;
      }
      const float z_label = z[label];
      // pass 1: z -> e in place, the running max and sum
      float m = LOWEST, s = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * BLOCK, n = std::min(BLOCK, V - start);
        const float mb = block_max(z + start, n);
        const float sb = exp_in_place(z + start, n, mb);
        if (mb > m) {
          s = s * std::exp(m - mb) + sb;
          m = mb;
        } else {
          s += sb * std::exp(mb - m);
        }
        block_maxes[b] = mb;
      }
      loss_rows[r] = m + std::log(s) - z_label;
      if (!write_grad) continue;
      // pass 2: e -> G = softmax * scale, minus scale at the label
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * BLOCK, n = std::min(BLOCK, V - start);
        const fVec factor(std::exp(block_maxes[b] - m) / s * scale);
        for (int64_t i = start; i < start + n; i += W) {
          const int64_t count = std::min(W, start + n - i);
          (fVec::loadu(z + i, count) * factor).store(z + i, count);
        }
      }
      z[label] -= scale;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
    int64_t ignore_index, bool reduce_sum, bool compute_grad, int64_t chunk_rows) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(),
              "linear_cross_entropy: x, weight and labels must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear_cross_entropy: x must be (N, K) and weight (V, K), got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "linear_cross_entropy: x and weight must both be float32 or both bfloat16, got ", x.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == x.size(0),
              "linear_cross_entropy: labels must be int64 (N,) with N = ", x.size(0), ", got ", labels.scalar_type(),
              " ", labels.sizes());
  TORCH_CHECK(chunk_rows >= 1, "linear_cross_entropy: chunk_rows must be >= 1, got ", chunk_rows);
  const int64_t N = x.size(0), K = x.size(1), V = weight.size(0);
  TORCH_CHECK(V >= 1, "linear_cross_entropy: weight must have at least one row (the vocabulary)");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == V,
                "linear_cross_entropy: bias must be (V,) = (", V, ",) of x's dtype, got ", bias->sizes(), " ",
                bias->scalar_type());
  }
  const at::Tensor y = labels.contiguous();
  const int64_t* y_data = y.const_data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t r = 0; r < N; ++r) {
    if (y_data[r] == ignore_index) continue;
    TORCH_CHECK(0 <= y_data[r] && y_data[r] < V, "linear_cross_entropy: labels must be in [0, ", V, ") or ",
                ignore_index, ", got ", y_data[r], " at row ", r);
    ++count;
  }
  const float scale = reduce_sum ? 1.f : (count > 0 ? 1.f / static_cast<float>(count) : 0.f);

  const auto f32 = x.options().dtype(at::kFloat);
  const at::Tensor xf = x.contiguous().to(at::kFloat), wf = weight.contiguous().to(at::kFloat);
  const at::Tensor bf = has_bias ? bias->contiguous().to(at::kFloat) : at::Tensor();
  at::Tensor grad_x = at::empty({compute_grad ? N : 0, K}, f32);
  at::Tensor grad_w = at::zeros({compute_grad ? V : 0, K}, f32);
  at::Tensor grad_b = at::zeros({compute_grad && has_bias ? V : 0}, f32);
  std::vector<float> loss_rows(N);
  const int64_t rows = std::min(chunk_rows, std::max<int64_t>(N, 1));
  at::Tensor buffer = at::empty({rows, V}, f32);
  for (int64_t start = 0; start < N; start += rows) {
    const int64_t n = std::min(rows, N - start);
    at::Tensor logits = buffer.narrow(0, 0, n);
    const at::Tensor xs = xf.narrow(0, start, n);
    if (has_bias) {
      at::addmm_out(logits, bf, xs, wf.t());
    } else {
      at::mm_out(logits, xs, wf.t());
    }
    cross_entropy_rows(logits.data_ptr<float>(), y_data + start, loss_rows.data() + start, n, V, ignore_index, scale,
                       compute_grad);
    if (compute_grad) {
      at::Tensor gx = grad_x.narrow(0, start, n);
      at::mm_out(gx, logits, wf);
      grad_w.addmm_(logits.t(), xs);
      if (has_bias) grad_b.add_(logits.sum(0));
    }
  }
  double total = 0.0;  // in row order: the same bits whatever the threads
  for (const float l : loss_rows) total += l;
  const double loss = reduce_sum ? total : total / static_cast<double>(count);  // 0 / 0 = NaN, as F.cross_entropy
  return {at::scalar_tensor(loss, f32), grad_x.to(x.scalar_type()), grad_w.to(weight.scalar_type()),
          grad_b.to(x.scalar_type())};
}

}  // namespace pyminigpt::cpu::CPU_CAPABILITY
