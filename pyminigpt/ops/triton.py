"""The `triton` backend: the kernels of kernels/*.py as PyTorch custom operators.

Each launcher becomes a `torch.library.triton_op` in the `pyminigpt_triton` namespace,
its kernels launched through `wrap_triton`, so that torch.compile traces into them
(fake tensors flow through the launchers; no `register_fake` needed). Layer norm, softmax
and attention get their backward from autograd.py. The functions at the bottom
have the public signatures of `pyminigpt.ops` and are registered with `dispatch`; the
inputs they take are their entries in `rules.RULES`, with the kernels' limits published below.

The kernels run on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (tests).
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

# No second try as a top-level `kernels`: a failure here (triton missing, a kernel that does not
# import) is the reason `pyminigpt info` must show.
from pyminigpt.kernels import INTERPRET, sampling
from pyminigpt.kernels import causal_attention as attention_kernels
from pyminigpt.kernels import layer_norm as layer_norm_kernels
from pyminigpt.kernels import linear_cross_entropy as linear_cross_entropy_kernels
from pyminigpt.kernels import quantized_linear as quantized_linear_kernels
from pyminigpt.kernels import softmax as softmax_kernels

from . import autograd, dispatch, rules
from .autograd import below_autograd


def _wrap(kernel):
    """`wrap_triton(kernel)`; under the interpreter the kernel itself, which is what torch 2.13's
    wrap_triton returns there (torch 2.11 raises on the interpreter's kernels with triton 3.6)."""
    return kernel if INTERPRET else wrap_triton(kernel)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., C) as (N, C) with a contiguous last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- softmax --------------------------------------------------------------------------


@triton_op("pyminigpt_triton::softmax_fwd", mutates_args=())
def softmax_fwd(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return softmax_kernels.softmax_fwd(x, temperature, wrap=_wrap)


@triton_op("pyminigpt_triton::softmax_bwd", mutates_args=())
def softmax_bwd(y: torch.Tensor, grad_y: torch.Tensor, temperature: float) -> torch.Tensor:
    return softmax_kernels.softmax_bwd(y, grad_y, temperature, wrap=_wrap)


# ---- layer norm -----------------------------------------------------------------------


@triton_op("pyminigpt_triton::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_kernels.layer_norm_fwd(x, weight, bias, eps, wrap=_wrap)


@triton_op("pyminigpt_triton::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_kernels.layer_norm_bwd(grad_y, x, weight, mean, rstd, wrap=_wrap)


# ---- top-k / top-p filter and sampling (not differentiable) ----------------------------


@triton_op("pyminigpt_triton::top_k_top_p_filter", mutates_args=())
def top_k_top_p_filter_op(logits: torch.Tensor, top_k: int, top_p: float, min_tokens_to_keep: int) -> torch.Tensor:
    return sampling.top_k_top_p_filter(logits, top_k, top_p, min_tokens_to_keep, wrap=_wrap)


@triton_op("pyminigpt_triton::sample", mutates_args=())
def sample_op(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, uniform: torch.Tensor
) -> torch.Tensor:
    return sampling.sample(logits, temperature, top_k, top_p, uniform, wrap=_wrap)


# ---- causal attention -----------------------------------------------------------------


@triton_op("pyminigpt_triton::causal_attention_fwd", mutates_args=())
def causal_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_kernels.attention_fwd(q, k, v, scale, wrap=_wrap)


@triton_op("pyminigpt_triton::causal_attention_bwd", mutates_args=())
def causal_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_kernels.attention_bwd(grad_out, q, k, v, out, lse, scale, wrap=_wrap)


# ---- quantized linear (inference only) ----------------------------------------------------


@triton_op("pyminigpt_triton::quantized_linear", mutates_args=())
def quantized_linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return quantized_linear_kernels.quantized_linear(x, qweight, scales, offsets, bias, wrap=_wrap)


autograd.register(
    "pyminigpt_triton",
    {"softmax": softmax_bwd, "layer_norm": layer_norm_bwd, "causal_attention": causal_attention_bwd},
)


# ---- the backend: public signatures ----------------------------------------------------


def layer_norm(x, weight, bias, eps):
    y, _mean, _rstd = below_autograd(layer_norm_fwd, _rows(x), weight, bias, eps)
    return y.view_as(x)


def softmax(x, temperature):
    return below_autograd(softmax_fwd, _rows(x), temperature).view_as(x)


def top_k_top_p_filter(logits, top_k, top_p, min_tokens_to_keep):
    return top_k_top_p_filter_op(_last_dim_contiguous(logits), top_k, top_p, min_tokens_to_keep)


def sample(logits, temperature, top_k, top_p, uniform):
    return sample_op(_last_dim_contiguous(logits), temperature, top_k, top_p, uniform)


def causal_attention(q, k, v, scale):
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out, _lse = below_autograd(causal_attention_fwd, q, k, v, scale)
    return out


def quantized_linear(x, qweight, scales, offsets, bias):
    y = quantized_linear_op(_rows(x), qweight, scales, offsets, bias)
    return y.view(*x.shape[:-1], qweight.shape[0])


rules.LIMITS["triton_layer_norm_max_cols"] = layer_norm_kernels.MAX_COLS
rules.LIMITS["triton_attention_max_head_dim"] = attention_kernels.MAX_HEAD_DIM
rules.LIMITS["triton_attention_max_batch_heads"] = attention_kernels.MAX_BATCH_HEADS

# ---- linear cross entropy ---------------------------------------------------------------

# Rows per chunk: about 256 MiB of logits at 4 bytes (1335 rows of GPT-2's 50257 words), enough
# rows for cuBLAS to run near its peak while the chunk stays a small part of a GPU's memory.
TRITON_CHUNK_BYTES = 256 << 20


@triton_op("pyminigpt_triton::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    reduce_sum: bool,
    compute_grad: bool,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_kernels.linear_cross_entropy_fwd(
        x, weight, bias, labels, ignore_index, reduce_sum, compute_grad, chunk_rows, wrap=_wrap
    )


autograd.register_linear_cross_entropy("pyminigpt_triton")


def linear_cross_entropy(x, weight, labels, bias, ignore_index, reduction, chunk_rows):
    chunk_rows = chunk_rows or max(1, TRITON_CHUNK_BYTES // (4 * weight.shape[0]))
    compute_grad = autograd.wants_grad(x, weight, bias)
    args = (x, weight, bias, labels.contiguous(), ignore_index, reduction == "sum", compute_grad, chunk_rows)
    return below_autograd(linear_cross_entropy_fwd, *args)[0]


# every op with a ("op", "triton") rule is the function of the op's name above
for _op, _backend in rules.RULES:
    if _backend == "triton":
        dispatch.register(_op, "triton", globals()[_op])
