"""The five operations of pyminigpt, dispatched to the fastest available backend.

    layer_norm(x, weight, bias, eps=1e-5)                       x (..., C) -> (..., C)
    softmax(x, temperature=1.0)                                 x (..., V) -> (..., V)
    top_k_top_p_filter(logits, top_k=0, top_p=1.0, min_tokens_to_keep=1)   (B, V) -> (B, V)
    sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None)     (B, V) -> (B,) int64
    causal_attention(q, k, v, scale=None)                       (B, H, Tq, D) -> (B, H, Tq, D)

and nn.Linear's op, for the model's decoding steps (a `cpu` kernel only):

    linear(x, weight, bias=None)                                x (..., K), weight (N, K) -> (..., N)

and its 8-bit / 4-bit weight form (`pyminigpt.quantize` has the format; `cpu` and `triton` kernels):

    quantized_linear(x, qweight, scales, offsets=None, bias=None)   x (..., K) -> (..., N)

and the LM head with the loss, for training (`cpu` and `triton` kernels):

    linear_cross_entropy(x, weight, labels, bias=None, ignore_index=-100, reduction="mean", chunk_rows=None)
                                                                x (..., K), weight (V, K), labels (...) -> ()

Backends: 'reference' (plain PyTorch, the oracle), 'cpu' (C++ kernels), 'triton',
'cuda' (CUDA C++ kernels). See `dispatch` for how one is chosen.
"""

from __future__ import annotations

import math

import torch

from . import dispatch, reference, validate
from .dispatch import available_backends, backend_status, use_backend

__all__ = [
    "available_backends",
    "backend_status",
    "causal_attention",
    "layer_norm",
    "linear",
    "linear_cross_entropy",
    "quantized_linear",
    "reference",
    "sample",
    "softmax",
    "top_k_top_p_filter",
    "use_backend",
]


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Layer norm over the last dim of x (..., C) with weight and bias (C,)."""
    validate.tensor("x", x, min_ndim=1)
    validate.tensor("weight", weight, ndim=1)
    validate.tensor("bias", bias, ndim=1)
    device, cols = x.device, x.shape[-1]
    if weight.device != device or bias.device != device:
        raise ValueError(f"weight ({weight.device}) and bias ({bias.device}) must be on x's device {device}")
    if weight.shape[0] != cols or bias.shape[0] != cols:
        raise ValueError(
            f"weight and bias must have shape ({cols},) to match x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    eps = validate.positive_float("eps", eps)
    return dispatch.call("layer_norm", x, weight, bias, eps)


def softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(x / temperature) over the last dim of x (..., V), in one pass."""
    validate.tensor("x", x, min_ndim=1)
    temperature = validate.positive_float("temperature", temperature)
    return dispatch.call("softmax", x, temperature)


def top_k_top_p_filter(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_tokens_to_keep: int = 1
) -> torch.Tensor:
    """Logits (B, V) with the entries transformers' top-k then top-p warpers remove set to -inf.

    top_k=0 (or >= V) disables top-k, top_p=1.0 disables top-p; NaN counts as -inf.
    """
    validate.logits(logits)
    top_k = validate.top_k(top_k)
    top_p = validate.top_p(top_p)
    min_tokens_to_keep = validate.min_tokens_to_keep(min_tokens_to_keep)
    return dispatch.call("top_k_top_p_filter", logits, top_k, top_p, min_tokens_to_keep)


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of logits (B, V) after temperature, top-k and top-p. Returns (B,) int64.

    Raises ValueError for a row with no finite logit (nothing to draw from).
    """
    validate.logits(logits)
    temperature = validate.positive_float("temperature", temperature)
    top_k = validate.top_k(top_k)
    top_p = validate.top_p(top_p)
    validate.generator(generator, logits.device)
    if not bool(torch.isfinite(logits).any(dim=-1).all()):
        raise ValueError("logits has a row with no finite value (all -inf or NaN): nothing to sample from")
    return sample_unchecked(logits, temperature, top_k, top_p, generator)


def sample_unchecked(logits, temperature, top_k, top_p, generator=None) -> torch.Tensor:
    """`sample` without the argument checks and the host-synchronising finiteness check.

    For hot loops (generation) whose arguments were validated once up front.
    """
    uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device, dtype=torch.float32)
    return dispatch.call("sample", logits, temperature, top_k, top_p, uniform)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of q (B, H, Tq, D) over k, v (B, H, Tk, D), Tk >= Tq.

    Query i sees keys j <= i + (Tk - Tq); scale defaults to 1/sqrt(D). No T x T matrix is
    kept by the kernels.
    """
    validate.attention_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else validate.positive_float("scale", scale)
    return dispatch.call("causal_attention", q, k, v, scale)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x weight^T + bias for x (..., K), weight (N, K), bias (N,) or None: nn.Linear's op.

    A decoding step multiplies a few rows by every weight matrix, which is bound by reading
    the weights. On the CPU, up to 8 rows (fp32 or bf16) run on a kernel that streams
    each weight once (csrc/cpu/linear.cpp); more rows, other devices and the reference
    backend use torch's matmul.
    """
    validate.tensor("x", x, min_ndim=1)
    validate.tensor("weight", weight, ndim=2)
    if bias is not None:
        validate.tensor("bias", bias, ndim=1)
    if weight.shape[1] != x.shape[-1] or (bias is not None and bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"linear: x {tuple(x.shape)} needs weight (N, {x.shape[-1]}) and bias (N,), got weight "
            f"{tuple(weight.shape)} and bias {None if bias is None else tuple(bias.shape)}"
        )
    return dispatch.call("linear", x, weight, bias)


def quantized_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + bias for W stored in 8 or 4 bits (`pyminigpt.quantize`); y has x's dtype.

    qweight: int8 (N, K), w = q * scale; or uint8 (N, K / 2), two 4-bit weights per byte,
    w = q * scale + offset. scales, offsets: fp32 (N, groups), groups dividing K. For inference
    (no gradient). On the CPU, up to 8 rows stream each weight byte once (csrc/cpu/quantized_linear.cpp),
    more rows dequantize tiles for a GEMM; CUDA tensors run kernels/quantized_linear.py.
    """
    validate.tensor("x", x, min_ndim=1)
    validate.quantized_weight(x, qweight, scales, offsets)
    if bias is not None:
        validate.tensor("bias", bias, ndim=1)
        if bias.shape[0] != qweight.shape[0]:
            raise ValueError(f"bias must have shape ({qweight.shape[0]},), got {tuple(bias.shape)}")
    return dispatch.call("quantized_linear", x, qweight, scales, offsets, bias)


REDUCTIONS = ("mean", "sum")


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """cross_entropy(x weight^T + bias, labels) without ever holding the (N, V) logits.

    x (..., K), weight (V, K), bias (V,) or None, labels (...) integer, each in [0, V) or
    ignore_index (rows that count for nothing). reduction "mean" averages over the counted rows
    (NaN when every row is ignored, with zero gradients, as F.cross_entropy), "sum" adds them.
    Returns a scalar, fp32 (fp64 for fp64 inputs), differentiable in x, weight and bias.

    The kernels compute the LM head and the loss over chunks of `chunk_rows` rows (None: the
    backend's choice, a few tens of MiB of logits on the CPU) and the gradients in the same
    pass, so memory grows with the chunk, not with rows x V. Under autocast, x, weight and
    bias are cast as F.linear would cast them.
    """
    validate.tensor("x", x, min_ndim=1)
    validate.tensor("weight", weight, ndim=2)
    if bias is not None:
        validate.tensor("bias", bias, ndim=1)
    validate.tensor("labels", labels, floating=False)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    vocab, width = weight.shape
    if x.shape[-1] != width or vocab == 0 or (bias is not None and bias.shape[0] != vocab):
        raise ValueError(
            f"linear_cross_entropy: x {tuple(x.shape)} needs weight (V, {x.shape[-1]}) with V >= 1 and bias (V,), "
            f"got weight {tuple(weight.shape)} and bias {None if bias is None else tuple(bias.shape)}"
        )
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(x.shape[:-1])} (x's without the last dim), got {tuple(labels.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias), ("labels", labels)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be an int >= 1 or None, got {chunk_rows!r}")
    labels = labels.reshape(-1).long()
    if not torch.compiler.is_compiling():
        out_of_range = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if bool(out_of_range.any()):
            bad = labels[out_of_range][0].item()
            raise ValueError(f"labels must be in [0, V={vocab}) or ignore_index={ignore_index}, got {bad}")
    x = x.reshape(-1, width)
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return dispatch.call("linear_cross_entropy", x, weight, labels, bias, ignore_index, reduction, chunk_rows or 0)
    # a custom op is not autocast: cast as F.linear would, then run with autocast off
    dtype = torch.get_autocast_dtype(device_type)
    x, weight, bias = (_autocast_to(t, dtype) for t in (x, weight, bias))
    with torch.autocast(device_type, enabled=False):
        return dispatch.call("linear_cross_entropy", x, weight, labels, bias, ignore_index, reduction, chunk_rows or 0)


def _autocast_to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t cast to autocast's dtype as autocast casts a matmul's inputs (fp64 stays fp64)."""
    return t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
