// Registers the CUDA kernels (csrc/cuda/) for the CUDA dispatch key of the pyminigpt ops.
//
// Compiled only in CUDA builds. Each wrapper checks devices, dtypes and shapes (errors name
// the argument and its value), makes the inputs contiguous with a 16-byte-aligned start
// (the kernels' vector loads need it; attention reads strided inputs in place when their
// rows are so aligned), allocates outputs and scratch through PyTorch's caching allocator,
// and queues the torch-free launcher on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
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

// A tensor that pairs with `like` element for element (a gradient, a saved output):
// same device, dtype and shape.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  check_cuda(t, name, like);
  check_same_dtype(t, name, like);
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have ", like_name, "'s shape ", like.sizes(), ", got ",
              t.sizes());
}

// An fp32 tensor of shape `sizes` on `like`'s device (lse, the uniforms of a draw).
void check_float32(const at::Tensor& t, const char* name, const at::Tensor& like, at::IntArrayRef sizes) {
  check_cuda(t, name, like);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.sizes() == sizes, name, " must be float32 of shape ", sizes, ", got ",
              t.scalar_type(), " ", t.sizes());
}

// Per-row fp32 statistics saved by the layer norm forward (mean, rstd): `rows` elements.
void check_row_stats(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t rows) {
  check_cuda(t, name, like);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == rows, name, " must be float32 with ", rows,
              " elements, got ", t.scalar_type(), " ", t.sizes());
}

void check_supported(const char* reason) { TORCH_CHECK(reason == nullptr, reason); }

// Makes `device` current, queues `launcher(stream)` on its current stream and raises with
// the CUDA error, naming `op`, if the launch failed. What a launcher sizes from the current
// device (the attention decode split, hence its workspace) is computed inside `launcher`.
template <typename Launcher>
void launch(const char* op, const at::Device& device, Launcher&& launcher) {
  const c10::cuda::CUDAGuard guard(device);
  const cudaError_t err = launcher(c10::cuda::getCurrentCUDAStream().stream());
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

// The main input of a row-wise op (softmax, layer norm, the filter): a CUDA tensor of a
// kernel dtype viewed as (rows, last dim), made dense.
struct RowInput {
  at::Tensor data;
  DType dtype;
  int64_t rows, cols;
};

RowInput row_input(const at::Tensor& t, const char* name) {
  check_cuda(t, name, t);
  const DType dtype = dtype_of(t, name);
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dimension, got shape ", t.sizes());
  const int64_t cols = t.size(-1);
  return {dense(t), dtype, cols == 0 ? 0 : t.numel() / cols, cols};
}

// ---- softmax --------------------------------------------------------------------------

// Checked before the empty-input return, so that an empty x still gets the error.
void check_softmax_temperature(double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "softmax: temperature must be a finite number > 0, got ",
              temperature);
}

at::Tensor softmax_fwd(const at::Tensor& x_in, double temperature) {
  const RowInput x = row_input(x_in, "x");
  check_softmax_temperature(temperature);
  at::Tensor y = at::empty_like(x.data);
  if (y.numel() == 0) return y;
  const auto t = static_cast<float>(temperature);
  check_supported(kernels::softmax_unsupported(x.rows, x.cols, t));
  launch("softmax_fwd", y.device(), [&](cudaStream_t stream) {
    return kernels::softmax_fwd(x.data.data_ptr(), y.data_ptr(), x.rows, x.cols, t, x.dtype, stream);
  });
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& y_in, const at::Tensor& grad_y_in, double temperature) {
  const RowInput y = row_input(y_in, "y");
  check_like(grad_y_in, "grad_y", y_in, "y");
  check_softmax_temperature(temperature);
  const at::Tensor grad_y = dense(grad_y_in);
  at::Tensor grad_x = at::empty_like(y.data);
  if (grad_x.numel() == 0) return grad_x;
  const auto t = static_cast<float>(temperature);
  check_supported(kernels::softmax_unsupported(y.rows, y.cols, t));
  launch("softmax_bwd", grad_x.device(), [&](cudaStream_t stream) {
    return kernels::softmax_bwd(y.data.data_ptr(), grad_y.data_ptr(), grad_x.data_ptr(), y.rows, y.cols, t, y.dtype,
                                stream);
  });
  return grad_x;
}

// ---- layer norm -----------------------------------------------------------------------

// weight (and bias) of shape (C,) on x's device; x has at least one dimension.
void check_layer_norm_param(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_cuda(t, name, x);
  const int64_t cols = x.size(-1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == cols, name, " must have shape (", cols, ",), got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                              const at::Tensor& bias_in, double eps) {
  const RowInput x = row_input(x_in, "x");
  check_layer_norm_param(weight_in, "weight", x_in);
  check_layer_norm_param(bias_in, "bias", x_in);
  check_same_dtype(bias_in, "bias", weight_in);
  TORCH_CHECK(eps >= 0, "layer_norm: eps must be >= 0, got ", eps);
  const DType weight_dtype = dtype_of(weight_in, "weight");
  check_supported(kernels::layer_norm_unsupported(x.rows, x.cols, x.dtype, weight_dtype));
  const at::Tensor weight = dense(weight_in);
  const at::Tensor bias = dense(bias_in);
  at::Tensor y = at::empty_like(x.data);
  at::Tensor mean = at::empty({x.rows}, y.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({x.rows}, y.options().dtype(at::kFloat));
  if (x.rows == 0) return {y, mean, rstd};
  launch("layer_norm_fwd", y.device(), [&](cudaStream_t stream) {
    return kernels::layer_norm_fwd(x.data.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                   mean.data_ptr<float>(), rstd.data_ptr<float>(), x.rows, x.cols,
                                   static_cast<float>(eps), x.dtype, weight_dtype, stream);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                              const at::Tensor& weight_in, const at::Tensor& mean_in,
                                                              const at::Tensor& rstd_in) {
  const RowInput x = row_input(x_in, "x");
  check_like(grad_y_in, "grad_y", x_in, "x");
  check_layer_norm_param(weight_in, "weight", x_in);
  check_row_stats(mean_in, "mean", x_in, x.rows);
  check_row_stats(rstd_in, "rstd", x_in, x.rows);
  const DType weight_dtype = dtype_of(weight_in, "weight");
  check_supported(kernels::layer_norm_unsupported(x.rows, x.cols, x.dtype, weight_dtype));
  const at::Tensor grad_y = dense(grad_y_in);
  const at::Tensor weight = dense(weight_in);
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  at::Tensor grad_x = at::empty_like(x.data);
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_bias = at::empty_like(weight);
  const at::Tensor scratch = workspace(kernels::layer_norm_bwd_workspace_bytes(x.rows, x.cols), grad_x);
  launch("layer_norm_bwd", grad_x.device(), [&](cudaStream_t stream) {
    return kernels::layer_norm_bwd(grad_y.data_ptr(), x.data.data_ptr(), weight.data_ptr(), mean.data_ptr<float>(),
                                   rstd.data_ptr<float>(), grad_x.data_ptr(), grad_weight.data_ptr(),
                                   grad_bias.data_ptr(), scratch.data_ptr(), x.rows, x.cols, x.dtype, weight_dtype,
                                   stream);
  });
  return {grad_x, grad_weight, grad_bias};
}

// ---- top-k / top-p filter and sampling ------------------------------------------------

at::Tensor top_k_top_p_filter(const at::Tensor& logits_in, int64_t top_k, double top_p, int64_t min_tokens_to_keep) {
  const RowInput logits = row_input(logits_in, "logits");
  at::Tensor out = at::empty_like(logits.data);
  if (out.numel() == 0) return out;
  const auto p = static_cast<float>(top_p);
  check_supported(kernels::sampling_unsupported(logits.rows, logits.cols, top_k, p, min_tokens_to_keep));
  launch("top_k_top_p_filter", out.device(), [&](cudaStream_t stream) {
    return kernels::top_k_top_p_filter(logits.data.data_ptr(), out.data_ptr(), logits.rows, logits.cols, top_k, p,
                                       min_tokens_to_keep, logits.dtype, stream);
  });
  return out;
}

at::Tensor sample(const at::Tensor& logits_in, double temperature, int64_t top_k, double top_p,
                  const at::Tensor& uniform_in) {
  check_cuda(logits_in, "logits", logits_in);
  TORCH_CHECK(logits_in.dim() == 2, "logits must have shape (batch, vocab), got ", logits_in.sizes());
  check_float32(uniform_in, "uniform", logits_in, {logits_in.size(0)});
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be finite and > 0, got ", temperature);
  const DType dtype = dtype_of(logits_in, "logits");
  const int64_t rows = logits_in.size(0), vocab = logits_in.size(1);
  at::Tensor tokens = at::empty({rows}, logits_in.options().dtype(at::kLong));
  if (rows == 0) return tokens;
  const auto p = static_cast<float>(top_p);
  check_supported(kernels::sampling_unsupported(rows, vocab, top_k, p, 1));
  const at::Tensor logits = dense(logits_in);
  const at::Tensor uniform = uniform_in.contiguous();
  launch("sample", logits.device(), [&](cudaStream_t stream) {
    return kernels::sample(logits.data_ptr(), uniform.data_ptr<float>(), tokens.data_ptr<int64_t>(), rows, vocab,
                           static_cast<float>(temperature), top_k, p, dtype, stream);
  });
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
  check_supported(
      kernels::causal_attention_unsupported(s.batch, s.heads, s.q_len, s.kv_len, s.head_dim, dtype_of(q, "q")));
  return s;
}

// The stride of `dim` as the attention kernels use it: that of a size-1 dim only ever
// multiplies index 0, and torch leaves it arbitrary (even in a contiguous tensor), so 0.
int64_t used_stride(const at::Tensor& t, int64_t dim) { return t.size(dim) == 1 ? 0 : t.stride(dim); }

kernels::Heads heads_of(const at::Tensor& t) {
  return {t.data_ptr(), used_stride(t, 0), used_stride(t, 1), used_stride(t, 2)};
}

// An attention input as the kernels read it: in place when head_dim is contiguous and the
// launchers' rule allows (kernels::heads_readable: the q, k, v views of a fused qkv
// projection, a slice of a KV cache), else a dense copy.
at::Tensor readable_heads(const at::Tensor& t) {
  const bool in_place = t.stride(3) == 1 && kernels::heads_readable(heads_of(t), dtype_of(t, "q"));
  return in_place ? t : dense(t);
}

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, double scale) {
  const AttentionShape s = check_attention(q_in, k_in, v_in);
  const at::Tensor q = readable_heads(q_in);
  const at::Tensor k = readable_heads(k_in);
  const at::Tensor v = readable_heads(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({s.batch, s.heads, s.q_len}, q.options().dtype(at::kFloat));
  launch("causal_attention_fwd", q.device(), [&](cudaStream_t stream) {
    // Sized under the device guard: the decode split follows the device's SM count.
    const at::Tensor scratch =
        workspace(kernels::causal_attention_fwd_workspace_bytes(s.batch, s.heads, s.q_len, s.kv_len, s.head_dim), q);
    return kernels::causal_attention_fwd(heads_of(q), heads_of(k), heads_of(v), out.data_ptr(), lse.data_ptr<float>(),
                                         scratch.data_ptr(), s.batch, s.heads, s.q_len, s.kv_len, s.head_dim,
                                         static_cast<float>(scale), dtype_of(q, "q"), stream);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(const at::Tensor& grad_out_in,
                                                                    const at::Tensor& q_in, const at::Tensor& k_in,
                                                                    const at::Tensor& v_in, const at::Tensor& out_in,
                                                                    const at::Tensor& lse_in, double scale) {
  const AttentionShape s = check_attention(q_in, k_in, v_in);
  check_like(grad_out_in, "grad_out", q_in, "q");
  check_like(out_in, "out", q_in, "q");
  check_float32(lse_in, "lse", q_in, {s.batch, s.heads, s.q_len});
  const at::Tensor grad_out = readable_heads(grad_out_in);
  const at::Tensor q = readable_heads(q_in);
  const at::Tensor k = readable_heads(k_in);
  const at::Tensor v = readable_heads(v_in);
  const at::Tensor out = dense(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  const at::Tensor scratch =
      workspace(kernels::causal_attention_bwd_workspace_bytes(s.batch, s.heads, s.q_len, s.head_dim), q);
  launch("causal_attention_bwd", q.device(), [&](cudaStream_t stream) {
    return kernels::causal_attention_bwd(heads_of(grad_out), heads_of(q), heads_of(k), heads_of(v), out.data_ptr(),
                                         lse.data_ptr<float>(), grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(),
                                         scratch.data_ptr(), s.batch, s.heads, s.q_len, s.kv_len, s.head_dim,
                                         static_cast<float>(scale), dtype_of(q, "q"), stream);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyminigpt, CUDA, m) {
  // cuda/softmax.cu
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
  // cuda/layer_norm.cu
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  // cuda/sampling.cu
  m.impl("top_k_top_p_filter", &top_k_top_p_filter);
  m.impl("sample", &sample);
  // cuda/causal_attention.cu
  m.impl("causal_attention_fwd", &causal_attention_fwd);
  m.impl("causal_attention_bwd", &causal_attention_bwd);
}
