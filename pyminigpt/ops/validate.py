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
