// The entry points of the CPU kernels, one block per operation.
//
// Every csrc/cpu/<op>.cpp is compiled once per instruction set, with CPU_CAPABILITY set
// to DEFAULT, AVX2 or AVX512 (and the matching compiler flags), and defines its entry
// points in namespace pyminigpt::cpu::CPU_CAPABILITY. This header declares them for all
// three; cpu_ops.cpp picks one per op at run time from ATen's CPU capability.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace pyminigpt::cpu {
// The most rows of x that linear.cpp is compiled for; more fall back to at::linear. Exported to
// Python as pyminigpt._C.LINEAR_MAX_ROWS (csrc/ops.cpp), which pyminigpt/ops/native.py reads.
constexpr int kLinearMaxRows = 8;
// The most rows of x that quantized_linear.cpp's decode kernel is compiled for; more rows dequantize tiles
// of the weight for ATen's GEMM. Exported as pyminigpt._C.QUANTIZED_LINEAR_MAX_ROWS.
constexpr int kQuantizedLinearMaxRows = 8;
}  // namespace pyminigpt::cpu

#define PYMINIGPT_DECLARE_CPU_KERNELS(CAPABILITY)                                                                      \
  namespace pyminigpt::cpu::CAPABILITY {                                                                               \
  /* softmax.cpp */                                                                                                    \
  at::Tensor softmax_fwd(const at::Tensor& x, double temperature);                                                     \
  at::Tensor softmax_bwd(const at::Tensor& y, const at::Tensor& grad_y, double temperature);                           \
  /* layer_norm.cpp */                                                                                                 \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,         \
                                                                const at::Tensor& bias, double eps);                   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,         \
                                                                const at::Tensor& weight, const at::Tensor& mean,      \
                                                                const at::Tensor& rstd);                               \
  /* sampling.cpp */                                                                                                   \
  at::Tensor top_k_top_p_filter(const at::Tensor& logits, int64_t top_k, double top_p, int64_t min_tokens_to_keep);    \
  at::Tensor sample(const at::Tensor& logits, double temperature, int64_t top_k, double top_p,                         \
                    const at::Tensor& uniform);                                                                        \
  /* causal_attention.cpp */                                                                                           \
  std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q, const at::Tensor& k,                    \
                                                          const at::Tensor& v, double scale);                          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q, \
                                                                      const at::Tensor& k, const at::Tensor& v,        \
                                                                      const at::Tensor& out, const at::Tensor& lse,    \
                                                                      double scale);                                   \
  /* linear.cpp */                                                                                                     \
  at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);             \
  /* quantized_linear.cpp */                                                                                           \
  at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,                \
                              const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias);        \
  /* linear_cross_entropy.cpp */                                                                                       \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(                                 \
      const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels,  \
      int64_t ignore_index, bool reduce_sum, bool compute_grad, int64_t chunk_rows);                                   \
  }

PYMINIGPT_DECLARE_CPU_KERNELS(DEFAULT)
PYMINIGPT_DECLARE_CPU_KERNELS(AVX2)
PYMINIGPT_DECLARE_CPU_KERNELS(AVX512)
