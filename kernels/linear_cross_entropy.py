"""The LM head and the cross entropy together, in chunks of rows, gradients in the forward.

Math (x (N, K), weight W (V, K), bias b (V,) or none, labels y (N,)):

    z = x W^T + b
    loss_r = logsumexp(z_r) - z_r,y_r                   (0 where y_r == ignore_index)
    loss = sum_r loss_r / count                         (count = rows not ignored; or the sum)
    G_rj = scale * (softmax(z_r)_j - [j == y_r])        (0 on ignored rows; scale = 1 / count or 1)
    dx = G W,   dW = G^T x,   db = sum_r G_r

The launcher walks the rows in chunks of C (chunk_rows). Per chunk, torch's matmul (cuBLAS)
writes the chunk's logits (C, V) in x's dtype, `cross_entropy_grad_kernel` (one program per
row) turns them into G in place and writes loss_r, and two more matmuls add the chunk's share
of dx and dW (fp32). No (N, V) tensor exists: peak memory beyond the inputs is the chunk's
logits (C * V elements), dx (N, K) and dW (V, K) in fp32.

The row kernel reads a row twice and writes it once: sweep 1 is the online softmax of
kernels/softmax.py (a running max and sum per lane), which also gives the log-sum-exp; sweep 2
writes G. A row of V = 50257 (100-200 KB) is still in L2 for the second read. 1 / count comes
from a device tensor, so the launcher never reads back to the host. All arithmetic is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _no_wrap, rounded_to
from .launch import launch_per_row

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: a jit function reads no other global


@triton.jit
def cross_entropy_grad_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    loss_ptr,
    scale_ptr,  # (1,) fp32: 1 / count, or 1 for a sum
    n_cols,
    ignore_index,
    WRITE_GRAD: tl.constexpr,  # False: the loss only (the logits are left as scratch)
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK)
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK):
                zero = tl.zeros([BLOCK], tl.float32)
                tl.store(row_ptr + start + cols, zero.to(row_ptr.dtype.element_ty), mask=start + cols < n_cols)
    else:
        # sweep 1: the online softmax, in log2 units
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            z = tl.load(row_ptr + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
            z = z * LOG2E
            m_new = tl.maximum(m, z)
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # a lane past the row's end keeps s = 0
            s = s * tl.exp2(m - m_ref) + tl.exp2(z - m_ref)
            m = m_new
        row_max = tl.max(m, axis=0)
        lse2 = row_max + tl.log2(tl.sum(s * tl.exp2(m - row_max), axis=0))
        # the launcher checked the labels; the mask keeps a bad one from reading outside the row
        z_label = tl.load(row_ptr + label, mask=(label >= 0) & (label < n_cols), other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, lse2 / LOG2E - z_label)
        if WRITE_GRAD:
            scale = tl.load(scale_ptr)
            # sweep 2: G = scale * (softmax - one-hot)
            for start in range(0, n_cols, BLOCK):
                in_row = start + cols < n_cols
                z = tl.load(row_ptr + start + cols, mask=in_row, other=0.0).to(tl.float32)
                g = tl.exp2(z * LOG2E - lse2) * scale
                g = tl.where(start + cols == label, g - scale, g)
                tl.store(row_ptr + start + cols, rounded_to(g, row_ptr.dtype.element_ty), mask=in_row)


def linear_cross_entropy_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    reduce_sum: bool,
    compute_grad: bool,
    chunk_rows: int,
    wrap=_no_wrap,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dx, dweight, dbias) for x (N, K), weight (V, K), bias (V,) or None, labels (N,) int64.

    loss is an fp32 scalar; the gradients are those of the loss, in the inputs' dtypes, and
    empty (0 rows) without compute_grad; dbias is empty without a bias. Labels must be in
    [0, V) or ignore_index (the caller checks).
    """
    n_rows, width = x.shape
    vocab = weight.shape[0]
    counted = (labels != ignore_index).sum()
    if reduce_sum:
        scale = torch.ones(1, dtype=torch.float32, device=x.device)
    else:  # 1 / count, and 0 when every row is ignored (the gradient of a NaN mean is 0, as in torch)
        scale = torch.where(counted > 0, 1.0 / counted.clamp(min=1).float(), 0.0).reshape(1)
    losses = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    grad_rows = n_rows if compute_grad else 0
    grad_x = torch.empty((grad_rows, width), dtype=x.dtype, device=x.device)
    grad_w = torch.zeros((vocab if compute_grad else 0, width), dtype=torch.float32, device=x.device)
    grad_b = torch.zeros((vocab if compute_grad and bias is not None else 0,), dtype=torch.float32, device=x.device)
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        xs = x[start:end]
        logits = xs @ weight.t() if bias is None else torch.addmm(bias, xs, weight.t())
        launch_per_row(
            cross_entropy_grad_kernel,
            logits,
            logits,
            logits.stride(0),
            labels[start:end],
            losses[start:end],
            scale,
            vocab,
            ignore_index,
            compute_grad,
            wrap=wrap,
        )
        if compute_grad:
            grad_x[start:end] = logits @ weight
            grad_w += (logits.t() @ xs).float()
            if bias is not None:
                grad_b += logits.float().sum(0)
    total = losses.sum()
    loss = total if reduce_sum else total / counted  # 0 / 0 = NaN, as F.cross_entropy
    return loss, grad_x, grad_w.to(weight.dtype), grad_b.to(x.dtype)


def compile_check_launches(wrap, randn) -> None:
    """Every launch of the row kernel on the shapes that select its code paths (one tile, the looped
    online softmax; loss only and with gradients; each dtype); .ci/compile_triton.py passes a `wrap`
    that records each launch and compiles it for sm_80 and sm_90 (no GPU needed)."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for vocab in (300, 50257):
            x, w, b = randn(6, 64, dtype=dtype), randn(vocab, 64, dtype=dtype), randn(vocab, dtype=dtype)
            labels = torch.arange(6) * 37 % vocab
            for compute_grad in (False, True):
                linear_cross_entropy_fwd(x, w, b, labels, -100, False, compute_grad, 4, wrap=wrap)
