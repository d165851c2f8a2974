// Registers the CUDA kernels (csrc/cuda/) for the CUDA dispatch key of the pyminigpt ops.
//
// Compiled only in CUDA builds. Each wrapper checks devices, dtypes and shapes (errors name
// the argument and its value), makes the inputs contiguous with a 16-byte-aligned start
// (the kernels' vector loads need it), allocates outputs and scratch through PyTorch's
// caching allocator, and queues the torch-free launcher on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cuda/launchers.h"

namespace {

namespace kernels = pyminigpt::cuda;
using kernels::DType;

DType dtype_of(const at::Tensor& t, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", type);
  return type == at::kFloat ? DType::kFloat32 : type == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
}

void check_supported(const char* reason) { TORCH_CHECK(reason == nullptr, reason); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "pyminigpt CUDA kernel ", op, " failed: ", cudaGetErrorString(err));
}

// Contiguous and starting on a 16-byte boundary.
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// Rows and columns of a tensor viewed as (rows, last dim).
std::pair<int64_t, int64_t> rows_cols(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 1, name, " must have at least one dimension, got shape ", x.sizes());
  const int64_t cols = x.size(-1);
  return {cols == 0 ? 0 : x.numel() / cols, cols};
}

// ---- softmax --------------------------------------------------------------------------

at::Tensor softmax_fwd(const at::Tensor& x_in, double temperature) {
  check_cuda(x_in, "x", x_in);
  const DType dtype = dtype_of(x_in, "x");
  const auto [rows, cols] = rows_cols(x_in, "x");
  const at::Tensor x = dense(x_in);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  check_supported(kernels::softmax_unsupported(rows, cols, static_cast<float>(temperature)));
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(kernels::softmax_fwd(x.data_ptr(), y.data_ptr(), rows, cols, static_cast<float>(temperature), dtype,
                                    c10::cuda::getCurrentCUDAStream()),
               "softmax_fwd");
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& y_in, const at::Tensor& grad_y_in, double temperature) {
  check_cuda(y_in, "y", y_in);
  check_cuda(grad_y_in, "grad_y", y_in);
  check_same_dtype(grad_y_in, "grad_y", y_in);
  TORCH_CHECK(grad_y_in.sizes() == y_in.sizes(), "grad_y must have y's shape ", y_in.sizes(), ", got ",
              grad_y_in.sizes());
  const DType dtype = dtype_of(y_in, "y");
  const auto [rows, cols] = rows_cols(y_in, "y");
  const at::Tensor y = dense(y_in);
  const at::Tensor grad_y = dense(grad_y_in);
  at::Tensor grad_x = at::empty_like(y);
  if (y.numel() == 0) return grad_x;
  check_supported(kernels::softmax_unsupported(rows, cols, static_cast<float>(temperature)));
  const c10::cuda::CUDAGuard guard(y.device());
  check_launch(kernels::softmax_bwd(y.data_ptr(), grad_y.data_ptr(), grad_x.data_ptr(), rows, cols,
                                    static_cast<float>(temperature), dtype, c10::cuda::getCurrentCUDAStream()),
               "softmax_bwd");
  return grad_x;
}

// ---- layer norm -----------------------------------------------------------------------

void check_layer_norm_params(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_cuda(weight, "weight", x);
  check_cuda(bias, "bias", x);
  check_same_dtype(bias, "bias", weight);
  const int64_t cols = x.dim() >= 1 ? x.size(-1) : 0;
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == cols, "weight must have shape (", cols, ",), got ",
              weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == cols, "bias must have shape (", cols, ",), got ", bias.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                              const at::Tensor& bias_in, double eps) {
  check_cuda(x_in, "x", x_in);
  const auto [rows, cols] = rows_cols(x_in, "x");
  check_layer_norm_params(x_in, weight_in, bias_in);
  const DType dtype = dtype_of(x_in, "x");
  const DType weight_dtype = dtype_of(weight_in, "weight");
  check_supported(kernels::layer_norm_unsupported(rows, cols, dtype, weight_dtype));
  const at::Tensor x = dense(x_in);
  const at::Tensor weight = dense(weight_in);
  const at::Tensor bias = dense(bias_in);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, mean, rstd};
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(kernels::layer_norm_fwd(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                       mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, cols,
                                       static_cast<float>(eps), dtype, weight_dtype, c10::cuda::getCurrentCUDAStream()),
               "layer_norm_fwd");
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                              const at::Tensor& weight_in, const at::Tensor& mean_in,
                                                              const at::Tensor& rstd_in) {
  check_cuda(x_in, "x", x_in);
  check_cuda(grad_y_in, "grad_y", x_in);
  check_cuda(weight_in, "weight", x_in);
  check_cuda(mean_in, "mean", x_in);
  check_cuda(rstd_in, "rstd", x_in);
  check_same_dtype(grad_y_in, "grad_y", x_in);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), "grad_y must have x's shape ", x_in.sizes(), ", got ",
              grad_y_in.sizes());
  const auto [rows, cols] = rows_cols(x_in, "x");
  TORCH_CHECK(weight_in.dim() == 1 && weight_in.size(0) == cols, "weight must have shape (", cols, ",), got ",
              weight_in.sizes());
  TORCH_CHECK(mean_in.scalar_type() == at::kFloat && mean_in.numel() == rows, "mean must be float32 with ", rows,
              " elements, got ", mean_in.scalar_type(), " ", mean_in.sizes());
  TORCH_CHECK(rstd_in.scalar_type() == at::kFloat && rstd_in.numel() == rows, "rstd must be float32 with ", rows,
              " elements, got ", rstd_in.scalar_type(), " ", rstd_in.sizes());
  const DType dtype = dtype_of(x_in, "x");
  const DType weight_dtype = dtype_of(weight_in, "weight");
  check_supported(kernels::layer_norm_unsupported(rows, cols, dtype, weight_dtype));
  const at::Tensor grad_y = dense(grad_y_in);
  const at::Tensor x = dense(x_in);
  const at::Tensor weight = dense(weight_in);
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_bias = at::empty_like(weight);
  if (cols == 0) return {grad_x, grad_weight, grad_bias};
  const at::Tensor scratch = workspace(kernels::layer_norm_bwd_workspace_bytes(rows, cols), x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(kernels::layer_norm_bwd(grad_y.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr<float>(),
                                       rstd.data_ptr<float>(), grad_x.data_ptr(), grad_weight.data_ptr(),
                                       grad_bias.data_ptr(), scratch.data_ptr(), rows, cols, dtype, weight_dtype,
                                       c10::cuda::getCurrentCUDAStream()),
               "layer_norm_bwd");
  return {grad_x, grad_weight, grad_bias};
}

// ---- top-k / top-p filter and sampling ------------------------------------------------

at::Tensor top_k_top_p_filter(const at::Tensor& logits_in, int64_t top_k, double top_p, int64_t min_tokens_to_keep) {
  check_cuda(logits_in, "logits", logits_in);
  const DType dtype = dtype_of(logits_in, "logits");
  const auto [rows, vocab] = rows_cols(logits_in, "logits");
  const at::Tensor logits = dense(logits_in);
  at::Tensor out = at::empty_like(logits);
  if (logits.numel() == 0) return out;
  check_supported(
      kernels::sampling_unsupported(rows, vocab, top_k, static_cast<float>(top_p), min_tokens_to_keep));
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(kernels::top_k_top_p_filter(logits.data_ptr(), out.data_ptr(), rows, vocab, top_k,
                                           static_cast<float>(top_p), min_tokens_to_keep, dtype,
                                           c10::cuda::getCurrentCUDAStream()),
               "top_k_top_p_filter");
  return out;
}

at::Tensor sample(const at::Tensor& logits_in, double temperature, int64_t top_k, double top_p,
                  const at::Tensor& uniform_in) {
  check_cuda(logits_in, "logits", logits_in);
  check_cuda(uniform_in, "uniform", logits_in);
  TORCH_CHECK(logits_in.dim() == 2, "logits must have shape (batch, vocab), got ", logits_in.sizes());
  TORCH_CHECK(uniform_in.scalar_type() == at::kFloat && uniform_in.dim() == 1 &&
                  uniform_in.size(0) == logits_in.size(0),
              "uniform must be float32 of shape (", logits_in.size(0), ",), got ", uniform_in.scalar_type(), " ",
              uniform_in.sizes());
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const DType dtype = dtype_of(logits_in, "logits");
  const int64_t rows = logits_in.size(0), vocab = logits_in.size(1);
  at::Tensor tokens = at::empty({rows}, logits_in.options().dtype(at::kLong));
  if (rows == 0) return tokens;
  check_supported(kernels::sampling_unsupported(rows, vocab, top_k, static_cast<float>(top_p), 1));
  const at::Tensor logits = dense(logits_in);
  const at::Tensor uniform = uniform_in.contiguous();
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(kernels::sample(logits.data_ptr(), uniform.data_ptr<float>(), tokens.data_ptr<int64_t>(), rows, vocab,
                               static_cast<float>(temperature), top_k, static_cast<float>(top_p), dtype,
                               c10::cuda::getCurrentCUDAStream()),
               "sample");
  return tokens;
}

// ---- causal attention -----------------------------------------------------------------

struct AttentionShape {
  int64_t batch, heads, q_len, kv_len, head_dim;
};

AttentionShape check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cuda(q, "q", q);
  check_cuda(k, "k", q);
  check_cuda(v, "v", q);
  check_same_dtype(k, "k", q);
  check_same_dtype(v, "v", q);
  TORCH_CHECK(q.dim() == 4, "q must have shape (batch, heads, q_len, head_dim), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k must have shape (", q.size(0), ", ", q.size(1), ", kv_len, ", q.size(3), "), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const AttentionShape s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  check_supported(kernels::causal_attention_unsupported(s.batch, s.heads, s.q_len, s.kv_len, s.head_dim,
                                                        dtype_of(q, "q")));
  return s;
}

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, double scale) {
  const AttentionShape s = check_attention(q_in, k_in, v_in);
  const at::Tensor q = dense(q_in);
  const at::Tensor k = dense(k_in);
  const at::Tensor v = dense(v_in);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({s.batch, s.heads, s.q_len}, q.options().dtype(at::kFloat));
  const at::Tensor scratch =
      workspace(kernels::causal_attention_fwd_workspace_bytes(s.batch, s.heads, s.q_len, s.kv_len, s.head_dim), q);
  const c10::cuda::CUDAGuard guard(q.device());
  check_launch(kernels::causal_attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                             lse.data_ptr<float>(), scratch.data_ptr(), s.batch, s.heads, s.q_len,
                                             s.kv_len, s.head_dim, static_cast<float>(scale), dtype_of(q, "q"),
                                             c10::cuda::getCurrentCUDAStream()),
               "causal_attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(const at::Tensor& grad_out_in,
                                                                    const at::Tensor& q_in, const at::Tensor& k_in,
                                                                    const at::Tensor& v_in, const at::Tensor& out_in,
                                                                    const at::Tensor& lse_in, double scale) {
  const AttentionShape s = check_attention(q_in, k_in, v_in);
  check_cuda(grad_out_in, "grad_out", q_in);
  check_cuda(out_in, "out", q_in);
  check_cuda(lse_in, "lse", q_in);
  check_same_dtype(grad_out_in, "grad_out", q_in);
  check_same_dtype(out_in, "out", q_in);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(), "grad_out must have q's shape ", q_in.sizes(), ", got ",
              grad_out_in.sizes());
  TORCH_CHECK(out_in.sizes() == q_in.sizes(), "out must have q's shape ", q_in.sizes(), ", got ", out_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == s.batch &&
                  lse_in.size(1) == s.heads && lse_in.size(2) == s.q_len,
              "lse must be float32 of shape (", s.batch, ", ", s.heads, ", ", s.q_len, "), got ",
              lse_in.scalar_type(), " ", lse_in.sizes());
  const at::Tensor grad_out = dense(grad_out_in);
  const at::Tensor q = dense(q_in);
  const at::Tensor k = dense(k_in);
  const at::Tensor v = dense(v_in);
  const at::Tensor out = dense(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  const at::Tensor scratch =
      workspace(kernels::causal_attention_bwd_workspace_bytes(s.batch, s.heads, s.q_len, s.head_dim), q);
  const c10::cuda::CUDAGuard guard(q.device());
  check_launch(kernels::causal_attention_bwd(grad_out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                             out.data_ptr(), lse.data_ptr<float>(), grad_q.data_ptr(),
                                             grad_k.data_ptr(), grad_v.data_ptr(), scratch.data_ptr(), s.batch,
                                             s.heads, s.q_len, s.kv_len, s.head_dim, static_cast<float>(scale),
                                             dtype_of(q, "q"), c10::cuda::getCurrentCUDAStream()),
               "causal_attention_bwd");
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyminigpt, CUDA, m) {
  // cuda/softmax.cu
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
  // cuda/layernorm.cu
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  // cuda/sampling.cu
  m.impl("top_k_top_p_filter", &top_k_top_p_filter);
  m.impl("sample", &sample);
  // cuda/attention.cu
  m.impl("causal_attention_fwd", &causal_attention_fwd);
  m.impl("causal_attention_bwd", &causal_attention_bwd);
}
