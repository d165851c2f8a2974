"""The `cpu` and `cuda` backends: the C++ / CUDA kernels behind `torch.ops.pyminigpt.*`.

Both backends call the same custom operators; PyTorch's dispatcher sends CPU tensors to
csrc/cpu/ and CUDA tensors to csrc/cuda/. An op is registered for a backend only when
the extension has a kernel for that dispatch key; which inputs each kernel takes is its
entry in `rules.RULES` (anything else falls back to the reference).
"""

from __future__ import annotations

import torch

import pyminigpt._C

from . import dispatch, rules
from .autograd import below_autograd, wants_grad
from .library import has_kernel, ops

# The most rows of x sent to csrc/cpu/linear.cpp, set by the C++ side (csrc/cpu/kernels.h): all it
# is compiled for. More rows reuse each weight often enough for ATen's blocked GEMM to win
# (bench/linear_rows.py measures where).
LINEAR_MAX_ROWS = pyminigpt._C.LINEAR_MAX_ROWS

rules.LIMITS["linear_max_rows"] = LINEAR_MAX_ROWS
# csrc/cuda/causal_attention.cu launches one block per 64 keys along a grid dimension (<= 65535)
rules.LIMITS["cuda_attention_max_kv_len"] = 65535 * 64


def layer_norm(x, weight, bias, eps):
    if x.dim() == 2:
        return below_autograd(ops.layer_norm_fwd.default, x, weight, bias, eps)[0]
    y, _mean, _rstd = below_autograd(ops.layer_norm_fwd.default, x.reshape(-1, x.shape[-1]), weight, bias, eps)
    return y.view_as(x)  # view_as: view(torch.Size) parses the size slowly


def softmax(x, temperature):
    return below_autograd(ops.softmax_fwd.default, x, temperature)


def top_k_top_p_filter(logits, top_k, top_p, min_tokens_to_keep):
    return ops.top_k_top_p_filter.default(logits, top_k, top_p, min_tokens_to_keep)


def sample(logits, temperature, top_k, top_p, uniform):
    return ops.sample.default(logits, temperature, top_k, top_p, uniform)


def causal_attention(q, k, v, scale):
    out, _lse = below_autograd(ops.causal_attention_fwd.default, q, k, v, scale)
    return out


def linear(x, weight, bias):
    shape = x.shape
    # more rows: the kernel would call torch's GEMM itself, after a custom op's overhead
    if x.numel() == 0 or x.numel() > LINEAR_MAX_ROWS * shape[-1]:
        return torch.nn.functional.linear(x, weight, bias)
    if x.dim() == 2:
        return below_autograd(ops.linear.default, x, weight, bias)
    return below_autograd(ops.linear.default, x.reshape(-1, shape[-1]), weight, bias).view(*shape[:-1], weight.shape[0])


def quantized_linear(x, qweight, scales, offsets, bias):
    if x.dim() == 2:
        return ops.quantized_linear.default(x, qweight, scales, offsets, bias)
    y = ops.quantized_linear.default(x.reshape(-1, x.shape[-1]), qweight, scales, offsets, bias)
    return y.view(*x.shape[:-1], qweight.shape[0])


# ---- linear cross entropy ---------------------------------------------------------------

# Rows per chunk of csrc/cpu/linear_cross_entropy.cpp: about 256 MiB of fp32 logits (1335 rows of
# GPT-2's 50257 words). Fewer, larger chunks run faster (bench/linear_cross_entropy.py --chunks, 2048
# rows x K=64: 16 rows 23.5 s, 64 rows 6.3 s, 166 rows 3.9 s, 512 rows 2.9 s on a loaded 2-core
# EPYC): each chunk is three GEMMs and a parallel row pass, and their start-up costs add up.
CPU_CHUNK_BYTES = 256 << 20


def linear_cross_entropy(x, weight, labels, bias, ignore_index, reduction, chunk_rows):
    chunk_rows = chunk_rows or max(1, CPU_CHUNK_BYTES // (4 * weight.shape[0]))
    compute_grad = wants_grad(x, weight, bias)
    args = (x, weight, bias, labels, ignore_index, reduction == "sum", compute_grad, chunk_rows)
    return below_autograd(ops.linear_cross_entropy_fwd.default, *args)[0]


# op -> (wrapper with the public signature, the C++ ops it needs)
_OPS = {
    "layer_norm": (layer_norm, ("layer_norm_fwd", "layer_norm_bwd")),
    "softmax": (softmax, ("softmax_fwd", "softmax_bwd")),
    "top_k_top_p_filter": (top_k_top_p_filter, ("top_k_top_p_filter",)),
    "sample": (sample, ("sample",)),
    "causal_attention": (causal_attention, ("causal_attention_fwd", "causal_attention_bwd")),
    "linear": (linear, ("linear",)),
    "quantized_linear": (quantized_linear, ("quantized_linear",)),
    "linear_cross_entropy": (linear_cross_entropy, ("linear_cross_entropy_fwd",)),
}


def _register(backend: str, dispatch_key: str) -> None:
    for op, (fn, cpp_ops) in _OPS.items():
        if all(has_kernel(name, dispatch_key) for name in cpp_ops):
            dispatch.register(op, backend, fn)


_register("cpu", "CPU")
if not has_kernel("softmax_fwd", "CUDA"):
    dispatch.mark_unavailable("cuda", "pyminigpt._C was built without CUDA kernels (CPU-only torch or no CUDA toolkit)")
elif not torch.cuda.is_available():
    dispatch.mark_unavailable("cuda", "no CUDA device is visible")
else:
    _register("cuda", "CUDA")
