"""Softmax with temperature over the last dim, forward and backward.

Math (one row x of width V, temperature T):

    z_i = x_i / T
    y_i = exp(z_i - max(z)) / sum_j exp(z_j - max(z))
    dx_i = y_i * (dy_i - sum_j dy_j * y_j) / T

Forward, one program per row. A row that fits one tile (V <= BLOCK) is loaded once,
normalised in registers and stored: 1 read + 1 write of the row, the minimum. A wider row
(the GPT-2 vocabulary, 50257) cannot live in registers, so it takes two sweeps:

  1. online softmax: a running max m and a running sum s = sum exp(z - m), kept per lane
     and rescaled whenever the max grows (s <- s * exp(m_old - m_new) + exp(z - m_new)),
     reduced across lanes once at the end;
  2. normalise: y = exp(z - m) / s.

That is 2 reads + 1 write, but the second read of a row (100-200 KB) follows the first
closely enough to come from L2, so device memory sees close to 1 read + 1 write.
Backward is the same shape: sum(dy * y) in the first sweep, dx in the second.

Exponentials are exp2 of log2(e)-scaled values; all arithmetic is fp32 whatever the
storage dtype.
"""

import torch
import triton
import triton.language as tl

from . import _no_wrap, rounded_to
from .launch import launch_per_row

LOG2E = 1.4426950408889634


# Rows up to this wide are one tile (one read of the row); wider ones are swept in 4096-wide tiles.
WHOLE_ROW_UP_TO = 8192


@triton.jit
def _load_row(row_ptr, cols, n_cols, other):
    """The row's values at cols as fp32, `other` past its end."""
    return tl.load(row_ptr + cols, mask=cols < n_cols, other=other).to(tl.float32)


@triton.jit
def _store_row(row_ptr, cols, n_cols, value):
    """fp32 value into the row at cols (none past its end), in the row's dtype."""
    tl.store(row_ptr + cols, rounded_to(value, row_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def softmax_fwd_kernel(
    x_ptr,
    y_ptr,
    x_row_stride,
    y_row_stride,
    n_cols,
    scale_log2,  # scale_log2 = log2(e) / T
    BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * y_row_stride
    cols = tl.arange(0, BLOCK)
    if ONE_TILE:
        z = _load_row(x_row, cols, n_cols, float("-inf")) * scale_log2
        e = tl.exp2(z - tl.max(z, axis=0))
        _store_row(y_row, cols, n_cols, e / tl.sum(e, axis=0))
    else:
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            z = _load_row(x_row, start + cols, n_cols, float("-inf")) * scale_log2
            m_new = tl.maximum(m, z)
            # a lane that has seen only -inf keeps s = 0 (and no exp2(-inf - -inf) = NaN)
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
            s = s * tl.exp2(m - m_ref) + tl.exp2(z - m_ref)
            m = m_new
        row_max = tl.max(m, axis=0)
        row_sum = tl.sum(s * tl.exp2(m - row_max), axis=0)
        inv_sum = 1.0 / row_sum
        for start in range(0, n_cols, BLOCK):
            z = _load_row(x_row, start + cols, n_cols, float("-inf")) * scale_log2
            _store_row(y_row, start + cols, n_cols, tl.exp2(z - row_max) * inv_sum)


@triton.jit
def softmax_bwd_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    y_row_stride,
    dy_row_stride,
    dx_row_stride,
    n_cols,
    inv_temperature,
    BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * y_row_stride
    dy_row = dy_ptr + row * dy_row_stride
    dx_row = dx_ptr + row * dx_row_stride
    cols = tl.arange(0, BLOCK)
    if ONE_TILE:
        y = _load_row(y_row, cols, n_cols, 0.0)
        dy = _load_row(dy_row, cols, n_cols, 0.0)
        _store_row(dx_row, cols, n_cols, y * (dy - tl.sum(y * dy, axis=0)) * inv_temperature)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            acc += _load_row(y_row, start + cols, n_cols, 0.0) * _load_row(dy_row, start + cols, n_cols, 0.0)
        dot = tl.sum(acc, axis=0)
        for start in range(0, n_cols, BLOCK):
            y = _load_row(y_row, start + cols, n_cols, 0.0)
            dy = _load_row(dy_row, start + cols, n_cols, 0.0)
            _store_row(dx_row, start + cols, n_cols, y * (dy - dot) * inv_temperature)


def _launch(kernel, rows: tuple[torch.Tensor, ...], scalar: float, wrap) -> torch.Tensor:
    """kernel over the (N, V) matrices `rows` (inputs, then the output), one program per row. Returns the output."""
    out = rows[-1]
    launch_per_row(
        kernel,
        out,
        *rows,
        *(t.stride(0) for t in rows),
        out.shape[1],
        scalar,
        wrap=wrap,
        whole_row_up_to=WHOLE_ROW_UP_TO,
        pass_one_tile=True,
    )
    return out


def softmax_fwd(x: torch.Tensor, temperature: float, wrap=_no_wrap) -> torch.Tensor:
    """y = softmax(x / temperature) for x (N, V) with a contiguous last dim. Returns (N, V) in x's dtype."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _launch(softmax_fwd_kernel, (x, y), LOG2E / temperature, wrap)


def softmax_bwd(y: torch.Tensor, dy: torch.Tensor, temperature: float, wrap=_no_wrap) -> torch.Tensor:
    """dx = y * (dy - sum(dy * y)) / temperature for y, dy (N, V). Returns (N, V) in y's dtype."""
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    return _launch(softmax_bwd_kernel, (y, dy, dx), 1.0 / temperature, wrap)


def compile_check_launches(wrap, randn) -> None:
    """Every launcher here on the shapes that select its distinct code paths; .ci/compile_triton.py
    passes a `wrap` that records each launch and compiles it for sm_80 and sm_90 (no GPU needed)."""
    for dtype in (torch.float32, torch.bfloat16):
        for width in (80, 50257):  # one tile; the looped online softmax
            x = randn(4, width, dtype=dtype)
            softmax_fwd(x, 0.8, wrap=wrap)
            softmax_bwd(x, x, 0.8, wrap=wrap)
