// Host entry points of the CUDA kernels: torch-free, raw device pointers and sizes.
//
// Every tensor is contiguous in the layout written beside it ((N, C) means row-major),
// except the attention inputs, which are strided `Heads`.
// Each launcher checks its arguments first and returns cudaErrorInvalidValue for an
// input it does not support (the matching *_unsupported() function says why, in words,
// so the torch binding can report it), then returns the first launch error, if any.
// Launchers never synchronise: the work is queued on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pyminigpt::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- layer_norm.cu -----------------------------------------------------------------------
// x, y, grad_y, grad_x: (n_rows, n_cols) of `dtype`; weight, bias, grad_weight, grad_bias:
// (n_cols,) of `weight_dtype`, which is `dtype` or fp32 (autocast keeps parameters in fp32).
// mean, rstd: fp32 (n_rows,).
const char* layer_norm_unsupported(int64_t n_rows, int64_t n_cols, DType dtype, DType weight_dtype);
cudaError_t layer_norm_fwd(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                           int64_t n_rows, int64_t n_cols, float eps, DType dtype, DType weight_dtype,
                           cudaStream_t stream);
// Bytes of scratch that layer_norm_bwd needs (the per-chunk partial sums of dweight, dbias).
size_t layer_norm_bwd_workspace_bytes(int64_t n_rows, int64_t n_cols);
cudaError_t layer_norm_bwd(const void* grad_y, const void* x, const void* weight, const float* mean, const float* rstd,
                           void* grad_x, void* grad_weight, void* grad_bias, void* workspace, int64_t n_rows,
                           int64_t n_cols, DType dtype, DType weight_dtype, cudaStream_t stream);

// ---- softmax.cu --------------------------------------------------------------------------
// x, y, grad_y, grad_x: (n_rows, n_cols) of `dtype`; y = softmax(x / temperature) per row.
const char* softmax_unsupported(int64_t n_rows, int64_t n_cols, float temperature);
cudaError_t softmax_fwd(const void* x, void* y, int64_t n_rows, int64_t n_cols, float temperature, DType dtype,
                        cudaStream_t stream);
cudaError_t softmax_bwd(const void* y, const void* grad_y, void* grad_x, int64_t n_rows, int64_t n_cols,
                        float temperature, DType dtype, cudaStream_t stream);

// ---- sampling.cu -------------------------------------------------------------------------
// logits, out: (n_rows, vocab) of `dtype`; uniform: fp32 (n_rows,) in [0, 1); tokens: int64 (n_rows,).
// top_k == 0 or >= vocab disables top-k; top_p >= 1 disables top-p.
const char* sampling_unsupported(int64_t n_rows, int64_t vocab, int64_t top_k, float top_p, int64_t min_tokens_to_keep);
cudaError_t top_k_top_p_filter(const void* logits, void* out, int64_t n_rows, int64_t vocab, int64_t top_k, float top_p,
                               int64_t min_tokens_to_keep, DType dtype, cudaStream_t stream);
cudaError_t sample(const void* logits, const float* uniform, int64_t* tokens, int64_t n_rows, int64_t vocab,
                   float temperature, int64_t top_k, float top_p, DType dtype, cudaStream_t stream);

// ---- causal_attention.cu -----------------------------------------------------------------
// An attention input of shape (batch, heads, len, head_dim) whose rows need not be packed:
// element (b, h, i, d) is at data[b * batch_stride + h * head_stride + i * row_stride + d]
// (strides in elements; the q, k, v views of a fused qkv projection are such tensors). The
// kernels copy rows with 16-byte loads, so `data` and each stride times the element size
// must be multiples of 16 bytes, and row_stride must be < 2^31; a launcher returns
// cudaErrorInvalidValue otherwise.
struct Heads {
  const void* data;
  int64_t batch_stride, head_stride, row_stride;
};
// Whether the attention kernels can read `t` (of `dtype`) in place: the rule above.
bool heads_readable(const Heads& t, DType dtype);

// q, grad_out: Heads (batch, heads, q_len, head_dim); k, v: Heads (batch, heads, kv_len,
// head_dim); all fp16 or bf16. Outputs are contiguous: out and grad_q (batch, heads, q_len,
// head_dim), grad_k and grad_v (batch, heads, kv_len, head_dim), lse fp32 (batch, heads,
// q_len), natural log; the backward takes `out` as the forward wrote it. Query i sees keys
// j <= i + kv_len - q_len.
const char* causal_attention_unsupported(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len, int64_t head_dim,
                                         DType dtype);
// Bytes of scratch the forward needs (split-K partial results of the decode path; 0 otherwise).
size_t causal_attention_fwd_workspace_bytes(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                                            int64_t head_dim);
cudaError_t causal_attention_fwd(Heads q, Heads k, Heads v, void* out, float* lse, void* workspace, int64_t batch,
                                 int64_t heads, int64_t q_len, int64_t kv_len, int64_t head_dim, float scale,
                                 DType dtype, cudaStream_t stream);
// Bytes of scratch the backward needs (fp32 dq accumulator and the row sums of dO * O).
size_t causal_attention_bwd_workspace_bytes(int64_t batch, int64_t heads, int64_t q_len, int64_t head_dim);
cudaError_t causal_attention_bwd(Heads grad_out, Heads q, Heads k, Heads v, const void* out, const float* lse,
                                 void* grad_q, void* grad_k, void* grad_v, void* workspace, int64_t batch,
                                 int64_t heads, int64_t q_len, int64_t kv_len, int64_t head_dim, float scale,
                                 DType dtype, cudaStream_t stream);

}  // namespace pyminigpt::cuda
