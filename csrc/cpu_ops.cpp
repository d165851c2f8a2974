// Registers the CPU kernels (csrc/cpu/) for the CPU dispatch key of the pyminigpt ops.
//
// Each kernel exists three times, compiled for DEFAULT, AVX2 and AVX512; the variant for
// this machine is chosen once, at load time, from ATen's CPU capability (which honours
// the ATEN_CPU_CAPABILITY environment variable, so a slower variant can be forced).
#include "cpu/kernels.h"

#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

namespace {

// at::get_cpu_capability() is what torch.backends.cpu.get_cpu_capability() reports:
// "DEFAULT", "AVX2" or "AVX512" on x86-64 (other names on other CPUs mean DEFAULT here).
template <typename Fn>
Fn for_this_cpu(Fn default_fn, Fn avx2_fn, Fn avx512_fn) {
  static const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return avx512_fn;
  if (capability == "AVX2") return avx2_fn;
  return default_fn;
}

}  // namespace

#define PYMINIGPT_CPU_KERNEL(name) \
  for_this_cpu(&pyminigpt::cpu::DEFAULT::name, &pyminigpt::cpu::AVX2::name, &pyminigpt::cpu::AVX512::name)

TORCH_LIBRARY_IMPL(pyminigpt, CPU, m) {
  // softmax.cpp
  m.impl("softmax_fwd", PYMINIGPT_CPU_KERNEL(softmax_fwd));
  m.impl("softmax_bwd", PYMINIGPT_CPU_KERNEL(softmax_bwd));
  // layer_norm.cpp
  m.impl("layer_norm_fwd", PYMINIGPT_CPU_KERNEL(layer_norm_fwd));
  m.impl("layer_norm_bwd", PYMINIGPT_CPU_KERNEL(layer_norm_bwd));
  // sampling.cpp
  m.impl("top_k_top_p_filter", PYMINIGPT_CPU_KERNEL(top_k_top_p_filter));
  m.impl("sample", PYMINIGPT_CPU_KERNEL(sample));
  // causal_attention.cpp
  m.impl("causal_attention_fwd", PYMINIGPT_CPU_KERNEL(causal_attention_fwd));
  m.impl("causal_attention_bwd", PYMINIGPT_CPU_KERNEL(causal_attention_bwd));
  // linear.cpp (CPU only: on a GPU, cuBLAS already streams the weights at full bandwidth)
  m.impl("linear", PYMINIGPT_CPU_KERNEL(linear));
  // quantized_linear.cpp (int8 / int4 weights; CUDA tensors go to the Triton kernel)
  m.impl("quantized_linear", PYMINIGPT_CPU_KERNEL(quantized_linear));
  // linear_cross_entropy.cpp
  m.impl("linear_cross_entropy_fwd", PYMINIGPT_CPU_KERNEL(linear_cross_entropy_fwd));
}
