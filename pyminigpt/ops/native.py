"""The `cpu` and `cuda` backends: the C++ / CUDA kernels behind `torch.ops.pyminigpt.*`.

Both backends call the same custom operators; PyTorch's dispatcher sends CPU tensors to
csrc/cpu/ and CUDA tensors to csrc/cuda/. An op is registered for a backend only when
the extension has a kernel for that dispatch key, and `supports` says which inputs each
kernel takes (anything else falls back to the reference).
"""

from __future__ import annotations

import torch

from . import dispatch
from .library import has_kernel, ops

# The dtypes each backend's kernels take, per op (anything else runs on the reference).
_FLOATS = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.float16, torch.bfloat16)}
_LOGITS = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


# The most rows of x sent to csrc/cpu/linear.cpp (all it is compiled for); more reuse each weight
# often enough for ATen's blocked GEMM to win. Measured with bench/linear_rows.py (2 cores, AVX-512
# with avx512_bf16, kernel against torch's matmul, members interleaved, two sweeps): from memory
# (768 -> 50257, as every weight is read when decoding) the kernel is 2.4-7.5x MKL for 1 to 8
# fp32 rows and 1.1-2.3x oneDNN for 1 to 8 bf16 rows; from the L3 cache (768 -> 3072) 2.2-4.8x
# fp32, and bf16 1.2-2.5x up to 4 rows but 0.77-1.18x at 6-8. Batch-8 bf16 decoding, which reads
# its weights from memory, went from 250 to 301 tokens/s when its 8 rows came here.
LINEAR_MAX_ROWS = 8


def _runs_on(device_type: str, dtypes: dict, x: torch.Tensor) -> bool:
    return x.device.type == device_type and x.dtype in dtypes[device_type]


def layer_norm(x, weight, bias, eps):
    shape = x.shape
    y, _mean, _rstd = ops.layer_norm_fwd(x.reshape(-1, shape[-1]), weight, bias, eps)
    return y.view(shape)


def softmax(x, temperature):
    return ops.softmax_fwd(x, temperature)


def top_k_top_p_filter(logits, top_k, top_p, min_tokens_to_keep):
    return ops.top_k_top_p_filter(logits, top_k, top_p, min_tokens_to_keep)


def sample(logits, temperature, top_k, top_p, uniform):
    return ops.sample(logits, temperature, top_k, top_p, uniform)


def causal_attention(q, k, v, scale):
    out, _lse = ops.causal_attention_fwd(q, k, v, scale)
    return out


def linear(x, weight, bias):
    shape = x.shape
    # more rows: the kernel would call torch's GEMM itself, after a custom op's overhead
    if x.numel() == 0 or x.numel() > LINEAR_MAX_ROWS * shape[-1]:
        return torch.nn.functional.linear(x, weight, bias)
    return ops.linear(x.reshape(-1, shape[-1]), weight, bias).view(*shape[:-1], weight.shape[0])


# csrc/cuda/causal_attention.cu launches one block per 64 keys along a grid dimension (<= 65535)
_CUDA_ATTENTION_MAX_KV_LEN = 65535 * 64


def _supports(op: str, device_type: str):
    """Which inputs the `device_type` kernel of `op` takes."""
    if op == "layer_norm":
        # weight and bias may stay fp32 while x is bf16 (autocast)
        return lambda x, weight, bias, eps: (
            _runs_on(device_type, _FLOATS, x)
            and weight.dtype == bias.dtype
            and (weight.dtype in (x.dtype, torch.float32))
        )
    if op == "linear":  # csrc/cpu/linear.cpp: x, weight and bias of one dtype, fp32 or bf16
        # under autocast, torch's matmul casts its inputs (a custom op would not)
        return lambda x, weight, bias: (
            not torch.is_autocast_enabled(device_type)
            and _runs_on(device_type, _FLOATS, x)
            and weight.dtype == x.dtype
            and weight.device == x.device
            and (bias is None or (bias.dtype == x.dtype and bias.device == x.device))
        )
    if op in ("top_k_top_p_filter", "sample"):
        return lambda logits, *rest: _runs_on(device_type, _LOGITS, logits)
    if op == "causal_attention":
        if device_type == "cuda":  # csrc/cuda/causal_attention.cu: fp16/bf16 tensor cores, head dim 64 or 128
            return lambda q, k, v, scale: (
                q.device.type == "cuda"
                and q.dtype in (torch.float16, torch.bfloat16)
                and q.shape[-1] in (64, 128)
                and q.numel() > 0
                and k.shape[-2] <= _CUDA_ATTENTION_MAX_KV_LEN
            )
        return lambda q, k, v, scale: _runs_on(device_type, _FLOATS, q)
    return lambda x, *rest: _runs_on(device_type, _FLOATS, x)


# op -> (wrapper with the public signature, the C++ ops it needs)
_OPS = {
    "layer_norm": (layer_norm, ("layer_norm_fwd", "layer_norm_bwd")),
    "softmax": (softmax, ("softmax_fwd", "softmax_bwd")),
    "top_k_top_p_filter": (top_k_top_p_filter, ("top_k_top_p_filter",)),
    "sample": (sample, ("sample",)),
    "causal_attention": (causal_attention, ("causal_attention_fwd", "causal_attention_bwd")),
    "linear": (linear, ("linear",)),
}


def _register(backend: str, dispatch_key: str) -> None:
    for op, (fn, cpp_ops) in _OPS.items():
        if all(has_kernel(name, dispatch_key) for name in cpp_ops):
            dispatch.register(op, backend, fn, _supports(op, backend))


_register("cpu", "CPU")
if not has_kernel("softmax_fwd", "CUDA"):
    dispatch.mark_unavailable("cuda", "pyminigpt._C was built without CUDA kernels (CPU-only torch or no CUDA toolkit)")
elif not torch.cuda.is_available():
    dispatch.mark_unavailable("cuda", "no CUDA device is visible")
else:
    _register("cuda", "CUDA")
