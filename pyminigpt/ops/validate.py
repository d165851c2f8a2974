"""Argument checks shared by every backend.

The public functions in `pyminigpt.ops` call these before dispatching, so every kernel
can assume well-formed inputs, and a caller always gets a `TypeError` / `ValueError` that
names the argument and the value instead of a crash deep inside a kernel.
"""

from __future__ import annotations

import math
import numbers

import torch

from .rules import FLOAT_DTYPES


def tensor(name: str, value, *, ndim: int | None = None, min_ndim: int | None = None, floating: bool = True) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {value.dtype}"
        )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")


def same_device_and_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, other in others.items():
        if other.device != reference.device:
            raise ValueError(f"{name} is on {other.device} but {reference_name} is on {reference.device}")
        if other.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {other.dtype} but {reference_name} has dtype {reference.dtype}")


def positive_float(name: str, value) -> float:
    if type(value) is float and 0.0 < value < math.inf:  # the common case, without the ABC checks below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def top_k(value) -> int:
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"top_k must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {value}")
    return int(value)


def top_p(value) -> float:
    if type(value) is float and 0.0 < value <= 1.0:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"top_p must be a number, got {type(value).__name__}")
    if not (0.0 < value <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1.0 disables it), got {value}")
    return float(value)


def min_tokens_to_keep(value) -> int:
    if type(value) is int and value >= 1:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"min_tokens_to_keep must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"min_tokens_to_keep must be >= 1, got {value}")
    return int(value)


def logits(value) -> None:
    tensor("logits", value, ndim=2)
    if value.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(value.shape)}")


def generator(value, device: torch.device) -> None:
    """None, or a torch.Generator on the device type of the tensors it draws for."""
    if value is None:
        return
    if not isinstance(value, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(value).__name__}")
    if value.device.type != device.type:
        raise ValueError(f"generator is on {value.device} but the tensors it draws for are on {device}")


def attention_inputs(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(name, t, ndim=4)
    same_device_and_dtype("q", q, k=k, v=v)
    b, h, tq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k must be (B, H, Tk, D) matching q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.shape[2] < tq:
        raise ValueError(f"causal attention needs Tk >= Tq, got Tq={tq} and Tk={k.shape[2]}")


def quantized_weight(x: torch.Tensor, qweight, scales, offsets) -> None:
    """The 8-bit / 4-bit weight of `quantized_linear` for x (..., K) (pyminigpt.quantize's format)."""
    k = x.shape[-1]
    if not isinstance(qweight, torch.Tensor) or qweight.dtype not in (torch.int8, torch.uint8):
        raise TypeError(
            f"qweight must be an int8 or uint8 (packed int4) tensor, got {getattr(qweight, 'dtype', qweight)}"
        )
    int4 = qweight.dtype == torch.uint8
    width = k // 2 if int4 else k
    if qweight.dim() != 2 or qweight.shape[1] != width or (int4 and k % 32):
        raise ValueError(
            f"qweight must be (N, {width}) for x {tuple(x.shape)}"
            + (" (int4: K a multiple of 32)" if int4 else "")
            + f", got {tuple(qweight.shape)}"
        )
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
        raise TypeError(f"scales must be a float32 tensor, got {getattr(scales, 'dtype', scales)}")
    n = qweight.shape[0]
    if scales.dim() != 2 or scales.shape[0] != n or scales.shape[1] == 0 or k % scales.shape[1]:
        raise ValueError(f"scales must be ({n}, groups) with groups dividing K={k}, got {tuple(scales.shape)}")
    group = k // scales.shape[1]
    if scales.shape[1] > 1 and group % 32:
        raise ValueError(f"groups of {group} weights: a group must be a whole row or a multiple of 32")
    if int4 != (offsets is not None):
        raise ValueError("offsets: int4 (uint8) weights need offsets, int8 weights take none")
    if offsets is not None and (
        not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.float32 or offsets.shape != scales.shape
    ):
        raise ValueError(f"offsets must be a float32 tensor of shape {tuple(scales.shape)}, got {offsets!r:.80}")
    for name, t in (("qweight", qweight), ("scales", scales), ("offsets", offsets)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
