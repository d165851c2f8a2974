"""Fake (meta) functions and autograd formulas for the C++ operators `torch.ops.pyminigpt.*`.

The schemas live in csrc/ops.cpp and the kernels register per device (csrc/cpu_ops.cpp,
csrc/cuda_ops.cpp). Here we add what PyTorch needs to trace them (`register_fake`, for
torch.compile and meta tensors) and to differentiate them (autograd.py), once for every
device.
"""

from __future__ import annotations

import torch

import pyminigpt._C  # noqa: F401  (registers the torch.ops.pyminigpt operators)

from . import autograd

ops = torch.ops.pyminigpt


def _dense_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh row-major tensor of t's shape: the kernels make their inputs contiguous, so
    their outputs are contiguous even for a transposed input (empty_like would copy its strides)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel for pyminigpt::op_name on this dispatch key."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyminigpt::{op_name}", dispatch_key)


# ---- softmax --------------------------------------------------------------------------


@torch.library.register_fake("pyminigpt::softmax_fwd")
def _(x, temperature):
    return _dense_like(x)


@torch.library.register_fake("pyminigpt::softmax_bwd")
def _(y, grad_y, temperature):
    return _dense_like(y)


# ---- layer norm -----------------------------------------------------------------------


@torch.library.register_fake("pyminigpt::layer_norm_fwd")
def _(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats = x.new_empty((rows,), dtype=torch.float32)
    return _dense_like(x), stats, torch.empty_like(stats)


@torch.library.register_fake("pyminigpt::layer_norm_bwd")
def _(grad_y, x, weight, mean, rstd):
    return _dense_like(x), _dense_like(weight), _dense_like(weight)


# ---- top-k / top-p filter and sampling (not differentiable) ----------------------------


@torch.library.register_fake("pyminigpt::top_k_top_p_filter")
def _(logits, top_k, top_p, min_tokens_to_keep):
    return _dense_like(logits)


@torch.library.register_fake("pyminigpt::sample")
def _(logits, temperature, top_k, top_p, uniform):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


# ---- causal attention -----------------------------------------------------------------


@torch.library.register_fake("pyminigpt::causal_attention_fwd")
def _(q, k, v, scale):
    b, h, tq, _ = q.shape
    return _dense_like(q), q.new_empty((b, h, tq), dtype=torch.float32)


@torch.library.register_fake("pyminigpt::causal_attention_bwd")
def _(grad_out, q, k, v, out, lse, scale):
    return _dense_like(q), _dense_like(k), _dense_like(v)


# ---- linear (CPU only) ------------------------------------------------------------------


@torch.library.register_fake("pyminigpt::linear")
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_y):
    """dx = dy W, dW = dy^T x, db = sum over rows of dy (torch's matmuls: no kernel of ours)."""
    x, weight = ctx.saved_tensors
    grad_bias = grad_y.sum(0) if ctx.has_bias else None
    return grad_y @ weight, grad_y.t() @ x, grad_bias


torch.library.register_autograd("pyminigpt::linear", _linear_backward, setup_context=_linear_setup)

# ---- quantized linear (inference only: no autograd formula) ------------------------------


@torch.library.register_fake("pyminigpt::quantized_linear")
def _(x, qweight, scales, offsets, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


autograd.register(
    "pyminigpt",
    {"softmax": ops.softmax_bwd, "layer_norm": ops.layer_norm_bwd, "causal_attention": ops.causal_attention_bwd},
)


# ---- linear cross entropy (CPU) ---------------------------------------------------------


@torch.library.register_fake("pyminigpt::linear_cross_entropy_fwd")
def _(x, weight, bias, labels, ignore_index, reduce_sum, compute_grad, chunk_rows):
    rows, vocab = (x.shape[0], weight.shape[0]) if compute_grad else (0, 0)
    grad_bias = x.new_empty((vocab if bias is not None else 0,))
    return (
        x.new_empty((), dtype=torch.float32),
        x.new_empty((rows, x.shape[1])),
        weight.new_empty((vocab, x.shape[1])),
        grad_bias,
    )


autograd.register_linear_cross_entropy("pyminigpt")
