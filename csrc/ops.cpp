// The schemas of pyminigpt's custom operators, defined once for every device.
//
// Kernels register implementations for a dispatch key elsewhere: cpu_ops.cpp (CPU),
// cuda_ops.cpp (CUDA, in CUDA builds only). Fake (meta) functions and autograd
// formulas are registered from Python, in pyminigpt/ops/library.py.
#include <torch/library.h>

TORCH_LIBRARY(pyminigpt, m) {
  // y = softmax(x / temperature) over the last dim; backward dx = y * (dy - sum(dy * y)) / temperature.
  m.def("softmax_fwd(Tensor x, float temperature) -> Tensor");
  m.def("softmax_bwd(Tensor y, Tensor grad_y, float temperature) -> Tensor");
  // y = (x - mean) * rstd * weight + bias over the last dim; mean and rstd are fp32 (N,).
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
  // transformers' top-k then top-p warpers: removed logits become -inf.
  m.def("top_k_top_p_filter(Tensor logits, int top_k, float top_p, int min_tokens_to_keep) -> Tensor");
  // temperature, top-k, top-p and one draw per row from a uniform in [0, 1): (B,) int64.
  m.def("sample(Tensor logits, float temperature, int top_k, float top_p, Tensor uniform) -> Tensor");
  // softmax(q k^T * scale, causal) v with query i seeing keys <= i + Tk - Tq; lse fp32 (B, H, Tq).
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def(
      "causal_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale)"
      " -> (Tensor, Tensor, Tensor)");
  // y = x weight^T + bias for x (M, K), weight (N, K); a few rows (decoding) read the weights once.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // y = x dequantize(qweight, scales, offsets)^T + bias: int8 (N, K) or int4 packed in uint8 (N, K / 2) weights,
  // fp32 scales / offsets (N, groups); the format is pyminigpt/quantize.py's (inference only: no backward).
  m.def("quantized_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, Tensor? bias) -> Tensor");

  // The LM head and the cross entropy in chunks of rows (csrc/cpu/linear_cross_entropy.cpp):
  // loss of x weight^T + bias against labels (ignore_index rows count for nothing), mean or sum;
  // with compute_grad, also d loss / d (x, weight, bias), else those three are empty.
  m.def(
      "linear_cross_entropy_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor labels, int ignore_index,"
      " bool reduce_sum, bool compute_grad, int chunk_rows) -> (Tensor, Tensor, Tensor, Tensor)");
}

// pyminigpt._C is imported from Python for the side effect above (registering the operators).
// It exports no functions, only the kernels' limits that the Python side routes by
// (pyminigpt/ops/rules.py), so that each is set in one place.
#include <Python.h>

#include "cpu/kernels.h"

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pyminigpt's C++/CUDA operators (torch.ops.pyminigpt)", -1,
                               nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr &&
      (PyModule_AddIntConstant(m, "LINEAR_MAX_ROWS", pyminigpt::cpu::kLinearMaxRows) < 0 ||
       PyModule_AddIntConstant(m, "QUANTIZED_LINEAR_MAX_ROWS", pyminigpt::cpu::kQuantizedLinearMaxRows) < 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
