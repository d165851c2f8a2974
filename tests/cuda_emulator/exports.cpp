// C entry points for ctypes: the launchers of csrc/cuda/launchers.h with the dtype as an
// int (attention's Heads pass by value, as ctypes Structures), plus the emulator's controls. Host memory stands in for device memory.
#include <cuda_runtime.h>

#include "launchers.h"

namespace k = pyminigpt::cuda;
using k::DType;

extern "C" {

void emu_configure(int reverse_order, int guard_before, int sm_count) {
  emu::configure(reverse_order != 0, guard_before != 0, sm_count);
}
const char* emu_last_failure() { return emu::last_failure(); }
void emu_clear_failure() { emu::clear_failure(); }

const char* layer_norm_unsupported(int64_t n_rows, int64_t n_cols, int dtype, int weight_dtype) {
  return k::layer_norm_unsupported(n_rows, n_cols, DType(dtype), DType(weight_dtype));
}
int layer_norm_fwd(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                   int64_t n_rows, int64_t n_cols, float eps, int dtype, int weight_dtype) {
  return k::layer_norm_fwd(x, weight, bias, y, mean, rstd, n_rows, n_cols, eps, DType(dtype), DType(weight_dtype),
                           nullptr);
}
size_t layer_norm_bwd_workspace_bytes(int64_t n_rows, int64_t n_cols) {
  return k::layer_norm_bwd_workspace_bytes(n_rows, n_cols);
}
int layer_norm_bwd(const void* grad_y, const void* x, const void* weight, const float* mean, const float* rstd,
                   void* grad_x, void* grad_weight, void* grad_bias, void* workspace, int64_t n_rows, int64_t n_cols,
                   int dtype, int weight_dtype) {
  return k::layer_norm_bwd(grad_y, x, weight, mean, rstd, grad_x, grad_weight, grad_bias, workspace, n_rows, n_cols,
                           DType(dtype), DType(weight_dtype), nullptr);
}

const char* softmax_unsupported(int64_t n_rows, int64_t n_cols, float temperature) {
  return k::softmax_unsupported(n_rows, n_cols, temperature);
}
int softmax_fwd(const void* x, void* y, int64_t n_rows, int64_t n_cols, float temperature, int dtype) {
  return k::softmax_fwd(x, y, n_rows, n_cols, temperature, DType(dtype), nullptr);
}
int softmax_bwd(const void* y, const void* grad_y, void* grad_x, int64_t n_rows, int64_t n_cols, float temperature,
                int dtype) {
  return k::softmax_bwd(y, grad_y, grad_x, n_rows, n_cols, temperature, DType(dtype), nullptr);
}

const char* sampling_unsupported(int64_t n_rows, int64_t vocab, int64_t top_k, float top_p,
                                 int64_t min_tokens_to_keep) {
  return k::sampling_unsupported(n_rows, vocab, top_k, top_p, min_tokens_to_keep);
}
int top_k_top_p_filter(const void* logits, void* out, int64_t n_rows, int64_t vocab, int64_t top_k, float top_p,
                       int64_t min_tokens_to_keep, int dtype) {
  return k::top_k_top_p_filter(logits, out, n_rows, vocab, top_k, top_p, min_tokens_to_keep, DType(dtype), nullptr);
}
int sample(const void* logits, const float* uniform, int64_t* tokens, int64_t n_rows, int64_t vocab, float temperature,
           int64_t top_k, float top_p, int dtype) {
  return k::sample(logits, uniform, tokens, n_rows, vocab, temperature, top_k, top_p, DType(dtype), nullptr);
}

const char* causal_attention_unsupported(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len, int64_t head_dim,
                                         int dtype) {
  return k::causal_attention_unsupported(batch, heads, q_len, kv_len, head_dim, DType(dtype));
}
size_t causal_attention_fwd_workspace_bytes(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                                            int64_t head_dim) {
  return k::causal_attention_fwd_workspace_bytes(batch, heads, q_len, kv_len, head_dim);
}
int causal_attention_fwd(k::Heads q, k::Heads kk, k::Heads v, void* out, float* lse, void* workspace, int64_t batch,
                         int64_t heads, int64_t q_len, int64_t kv_len, int64_t head_dim, float scale, int dtype) {
  return k::causal_attention_fwd(q, kk, v, out, lse, workspace, batch, heads, q_len, kv_len, head_dim, scale,
                                 DType(dtype), nullptr);
}
size_t causal_attention_bwd_workspace_bytes(int64_t batch, int64_t heads, int64_t q_len, int64_t head_dim) {
  return k::causal_attention_bwd_workspace_bytes(batch, heads, q_len, head_dim);
}
int causal_attention_bwd(k::Heads grad_out, k::Heads q, k::Heads kk, k::Heads v, const void* out, const float* lse,
                         void* grad_q, void* grad_k, void* grad_v, void* workspace, int64_t batch, int64_t heads,
                         int64_t q_len, int64_t kv_len, int64_t head_dim, float scale, int dtype) {
  return k::causal_attention_bwd(grad_out, q, kk, v, out, lse, grad_q, grad_k, grad_v, workspace, batch, heads, q_len,
                                 kv_len, head_dim, scale, DType(dtype), nullptr);
}

}  // extern "C"
