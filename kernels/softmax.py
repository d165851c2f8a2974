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

LOG2E = 1.4426950408889634


def _tile_width(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the whole row in one tile up to 8192 columns, else 4096-wide tiles."""
    block = triton.next_power_of_2(n_cols)
    if block > 8192:
        block = 4096
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps


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
        mask = cols < n_cols
        z = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale_log2
        e = tl.exp2(z - tl.max(z, axis=0))
        y = e / tl.sum(e, axis=0)
        tl.store(y_row + cols, rounded_to(y, y_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            z = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale_log2
            m_new = tl.maximum(m, z)
            # a lane that has seen only -inf keeps s = 0 (and no exp2(-inf - -inf) = NaN)
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
            s = s * tl.exp2(m - m_ref) + tl.exp2(z - m_ref)
            m = m_new
        row_max = tl.max(m, axis=0)
        row_sum = tl.sum(s * tl.exp2(m - row_max), axis=0)
        inv_sum = 1.0 / row_sum
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            z = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale_log2
            y = tl.exp2(z - row_max) * inv_sum
            tl.store(y_row + start + cols, rounded_to(y, y_ptr.dtype.element_ty), mask=mask)


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
        mask = cols < n_cols
        y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        dx = y * (dy - tl.sum(y * dy, axis=0)) * inv_temperature
        tl.store(dx_row + cols, rounded_to(dx, dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += y * dy
        dot = tl.sum(acc, axis=0)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            dx = y * (dy - dot) * inv_temperature
            tl.store(dx_row + start + cols, rounded_to(dx, dx_ptr.dtype.element_ty), mask=mask)


def softmax_fwd(x: torch.Tensor, temperature: float, wrap=_no_wrap) -> torch.Tensor:
    """y = softmax(x / temperature) for x (N, V) with a contiguous last dim. Returns (N, V) in x's dtype."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return y
    block, num_warps = _tile_width(n_cols)
    wrap(softmax_fwd_kernel)[(n_rows,)](
        x,
        y,
        x.stride(0),
        y.stride(0),
        n_cols,
        LOG2E / temperature,
        BLOCK=block,
        ONE_TILE=n_cols <= block,
        num_warps=num_warps,
    )
    return y


def softmax_bwd(y: torch.Tensor, dy: torch.Tensor, temperature: float, wrap=_no_wrap) -> torch.Tensor:
    """dx = y * (dy - sum(dy * y)) / temperature for y, dy (N, V). Returns (N, V) in y's dtype."""
    n_rows, n_cols = y.shape
    dx = torch.empty((n_rows, n_cols), dtype=y.dtype, device=y.device)
    if n_rows == 0:
        return dx
    block, num_warps = _tile_width(n_cols)
    wrap(softmax_bwd_kernel)[(n_rows,)](
        y,
        dy,
        dx,
        y.stride(0),
        dy.stride(0),
        dx.stride(0),
        n_cols,
        1.0 / temperature,
        BLOCK=block,
        ONE_TILE=n_cols <= block,
        num_warps=num_warps,
    )
    return dx
