"""Which inputs each kernel takes: the one table of input rules, read by dispatch and the tests.

The rules of an op live in three layers, each written once:

- What every backend accepts (the public contract): floating tensors of `FLOAT_DTYPES`, the
  shapes and scalars that `validate.py` checks before dispatch, with a TypeError / ValueError
  that names the argument.
- What each kernel takes beyond that, per (op, backend): `RULES`. A `Rule` names the device
  types and dtypes of the op's first tensor, which `dispatch` caches its choice by, and a
  `check` of the rest (shapes, the other tensors, autocast), asked on every call. An input a
  kernel does not take runs on the reference (or raises, in strict mode).
- The kernels' own limits (the rows csrc/cpu/linear.cpp is compiled for, the widest row of the
  Triton layer norm, ...) are set next to the kernel and published into `LIMITS` by the backend
  module that loads it (native.py from `pyminigpt._C`, triton.py from kernels/), before it
  registers any kernel. The C++ and Triton launchers still check their inputs themselves
  (TORCH_CHECK, kernels' `_check`): a direct call of `torch.ops.pyminigpt.*` skips this table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

# What the public ops accept, on every backend (validate.py raises for anything else).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The dtypes each backend's kernels are compiled for.
CPU_DTYPES = (torch.float32, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# csrc/cuda/causal_attention.cu runs on tensor cores only.
CUDA_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
CUDA_ATTENTION_HEAD_DIMS = (64, 128)

# Triton runs CPU tensors only in its interpreter (the same variable kernels/ reads).
TRITON_DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)

# Limits set by the kernels, filled in by the backend modules as they load:
#   linear_max_rows                 csrc/cpu/kernels.h (pyminigpt._C.LINEAR_MAX_ROWS)
#   cuda_attention_max_kv_len       csrc/cuda/causal_attention.cu: one block per 64 keys on a grid axis of 65535
#   triton_layer_norm_max_cols      kernels/layer_norm.py MAX_COLS
#   triton_attention_max_head_dim   kernels/causal_attention.py MAX_HEAD_DIM
#   triton_attention_max_batch_heads  kernels/causal_attention.py MAX_BATCH_HEADS
LIMITS: dict[str, int] = {}


@dataclass(frozen=True)
class Rule:
    """The inputs one backend's kernel of one op takes (beyond what validate.py already checked)."""

    devices: tuple[str, ...]  # device types of the op's first tensor
    dtypes: tuple[torch.dtype, ...]  # dtypes of the op's first tensor
    check: Callable[..., bool] | None = None  # the rest, on the op's dispatch arguments; None: nothing else
    limit: str = ""  # the limits beyond device and dtype, in words

    def takes_device_and_dtype(self, device_type: str, dtype: torch.dtype) -> bool:
        return device_type in self.devices and dtype in self.dtypes


def _norm_params(x, weight, bias, eps) -> bool:
    # weight and bias may stay fp32 while x is bf16/fp16 (autocast)
    return weight.dtype == bias.dtype and weight.dtype in (x.dtype, torch.float32)


def _cpu_linear(x, weight, bias) -> bool:
    # under autocast torch's matmul casts its inputs, a custom op would not
    return (
        not torch.is_autocast_enabled("cpu")
        and weight.dtype == x.dtype
        and weight.device == x.device
        and (bias is None or (bias.dtype == x.dtype and bias.device == x.device))
    )


def _cpu_quantized_linear(x, qweight, scales, offsets, bias) -> bool:
    return bias is None or bias.dtype == x.dtype


def _triton_quantized_linear(x, qweight, scales, offsets, bias) -> bool:
    return _on_triton_device(x) and (bias is None or bias.dtype == x.dtype)


def _cuda_attention(q, k, v, scale) -> bool:
    return (
        q.shape[-1] in CUDA_ATTENTION_HEAD_DIMS and q.numel() > 0 and k.shape[-2] <= LIMITS["cuda_attention_max_kv_len"]
    )


def _on_triton_device(t: torch.Tensor) -> bool:
    """A Triton launch uses the current CUDA device and its stream: a CUDA tensor must be there."""
    return t.device.type != "cuda" or t.device.index is None or t.device.index == torch.cuda.current_device()


def _triton_layer_norm(x, weight, bias, eps) -> bool:
    return (
        _on_triton_device(x)
        and _norm_params(x, weight, bias, eps)
        and 0 < x.shape[-1] <= LIMITS["triton_layer_norm_max_cols"]
    )


def _triton_softmax(x, temperature) -> bool:
    return _on_triton_device(x) and x.shape[-1] > 0


def _triton_logits(logits, *args) -> bool:
    return _on_triton_device(logits)


def _triton_attention(q, k, v, scale) -> bool:
    return (
        _on_triton_device(q)
        and 1 <= q.shape[-1] <= LIMITS["triton_attention_max_head_dim"]
        and q.shape[0] * q.shape[1] <= LIMITS["triton_attention_max_batch_heads"]
    )


def _linear_cross_entropy_operands(x, weight, labels, bias, *_) -> bool:
    # one dtype for x, weight and bias (the public op applies autocast's casts), one device for all
    return (
        weight.dtype == x.dtype
        and weight.device == x.device
        and labels.device == x.device
        and (bias is None or (bias.dtype == x.dtype and bias.device == x.device))
    )


def _triton_linear_cross_entropy(x, weight, labels, bias, *rest) -> bool:
    return _on_triton_device(x) and _linear_cross_entropy_operands(x, weight, labels, bias)


# (op, backend) -> what its kernel takes. A backend registers a kernel only for an entry here.
RULES: dict[tuple[str, str], Rule] = {
    ("layer_norm", "cpu"): Rule(("cpu",), CPU_DTYPES, _norm_params, "weight and bias of one dtype, x's or fp32"),
    ("softmax", "cpu"): Rule(("cpu",), CPU_DTYPES),
    ("top_k_top_p_filter", "cpu"): Rule(("cpu",), CPU_DTYPES),
    ("sample", "cpu"): Rule(("cpu",), CPU_DTYPES),
    ("causal_attention", "cpu"): Rule(("cpu",), CPU_DTYPES),
    ("linear", "cpu"): Rule(("cpu",), CPU_DTYPES, _cpu_linear, "x, weight and bias of one dtype, no autocast"),
    ("quantized_linear", "cpu"): Rule(("cpu",), CPU_DTYPES, _cpu_quantized_linear, "bias of x's dtype"),
    ("layer_norm", "cuda"): Rule(("cuda",), CUDA_DTYPES, _norm_params, "weight and bias of one dtype, x's or fp32"),
    ("softmax", "cuda"): Rule(("cuda",), CUDA_DTYPES),
    ("top_k_top_p_filter", "cuda"): Rule(("cuda",), CUDA_DTYPES),
    ("sample", "cuda"): Rule(("cuda",), CUDA_DTYPES),
    ("causal_attention", "cuda"): Rule(
        ("cuda",),
        CUDA_ATTENTION_DTYPES,
        _cuda_attention,
        "csrc/cuda/causal_attention.cu takes fp16/bf16, head dim 64 or 128, non-empty q",
    ),
    ("layer_norm", "triton"): Rule(
        TRITON_DEVICES,
        TRITON_DTYPES,
        _triton_layer_norm,
        "kernels/layer_norm.py takes rows of at most MAX_COLS (16384) columns",
    ),
    ("softmax", "triton"): Rule(TRITON_DEVICES, TRITON_DTYPES, _triton_softmax, "non-empty rows"),
    ("top_k_top_p_filter", "triton"): Rule(TRITON_DEVICES, TRITON_DTYPES, _triton_logits),
    ("sample", "triton"): Rule(TRITON_DEVICES, TRITON_DTYPES, _triton_logits),
    ("causal_attention", "triton"): Rule(
        TRITON_DEVICES,
        TRITON_DTYPES,
        _triton_attention,
        "kernels/causal_attention.py takes head dims up to MAX_HEAD_DIM (128) and batch * heads up to 65535",
    ),
    ("quantized_linear", "triton"): Rule(TRITON_DEVICES, TRITON_DTYPES, _triton_quantized_linear, "bias of x's dtype"),
}
RULES |= {
    ("linear_cross_entropy", "cpu"): Rule(
        ("cpu",), CPU_DTYPES, _linear_cross_entropy_operands, "x, weight and bias of one dtype, all on x's device"
    ),
    ("linear_cross_entropy", "triton"): Rule(
        TRITON_DEVICES,
        TRITON_DTYPES,
        _triton_linear_cross_entropy,
        "x, weight and bias of one dtype, all on x's device",
    ),
}
