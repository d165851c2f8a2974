"""A linear layer with 8-bit or 4-bit weights: y = x dequantize(W)^T + b (inference).

The format (pyminigpt/quantize.py writes it, pyminigpt/ops/reference.py::dequantize defines it):

    int8  qweight int8  (N, K):     w[n, k] = q[n, k] * scales[n, g]
    int4  qweight uint8 (N, K / 2): w[n, k] = q[n, k] * scales[n, g] + offsets[n, g], q in [0, 15];
          in each run of 32 weights (16 bytes) byte i holds weight i (low nibble) and 16 + i (high)
    scales, offsets fp32 (N, G): group g = k // (K / G) (G = 1: one scale per output channel)

One program per (BLOCK_M rows of x, BLOCK_N outputs) tile, looping over K in steps of BLOCK_K:
load the tile's weights (int8, or the bytes holding the int4 nibbles, shifted and masked), their
groups' scales and offsets, dequantize to fp32 in registers and accumulate x_tile @ w_tile^T in fp32.
The weights are read once per BLOCK_M rows of x: for decoding (M <= 16) that is once, N * K bytes
(int8) or N * K / 2 (int4) plus the scales, against 2-4 N K for bf16 / fp32 weights. x and y are
M * (K + N) elements. All arithmetic is fp32 (the dot in IEEE fp32, not TF32), as the reference's.
"""

import torch
import triton
import triton.language as tl

from . import _no_wrap, rounded_to

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 32  # BLOCK_K: one int4 run; groups are whole rows or multiples of 32


@triton.jit
def quantized_linear_kernel(
    x_ptr,
    q_ptr,
    scales_ptr,
    offsets_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    G,
    x_row_stride,
    INT4: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    group = K // G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = col_ok[:, None] & k_ok[None, :]
        groups = cols[:, None] * G + ks[None, :] // group
        scale = tl.load(scales_ptr + groups, mask=w_ok, other=0.0)
        if INT4:
            byte = (ks // 32) * 16 + (ks % 16)
            shift = ((ks // 16) % 2) * 4
            packed = tl.load(q_ptr + cols[:, None] * (K // 2) + byte[None, :], mask=w_ok, other=0)
            q = ((packed >> shift[None, :].to(tl.uint8)) & 15).to(tl.float32)
            w = q * scale + tl.load(offsets_ptr + groups, mask=w_ok, other=0.0)
        else:
            w = tl.load(q_ptr + cols[:, None] * K + ks[None, :], mask=w_ok, other=0).to(tl.float32) * scale
        acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = rounded_to(acc, y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


def _check(x, qweight, scales, offsets, bias):
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be (M, K) with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")
    int4 = qweight.dtype == torch.uint8
    K = x.shape[1]
    if qweight.shape[1] != (K // 2 if int4 else K) or (int4 and (K % 32 or offsets is None)):
        raise ValueError(f"qweight {tuple(qweight.shape)} {qweight.dtype} does not fit x {tuple(x.shape)}")
    if scales.dtype != torch.float32 or K % scales.shape[1]:
        raise ValueError(f"scales must be fp32 (N, G) with G dividing K={K}, got {scales.dtype} {tuple(scales.shape)}")


def quantized_linear(x, qweight, scales, offsets=None, bias=None, wrap=_no_wrap):
    """y (M, N) in x's dtype for x (M, K); the weight in the format above."""
    _check(x, qweight, scales, offsets, bias)
    M, K = x.shape
    N, G = scales.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    qweight, scales = qweight.contiguous(), scales.contiguous()
    offsets = scales if offsets is None else offsets.contiguous()  # not read for int8
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    wrap(quantized_linear_kernel)[grid](
        x, qweight, scales, offsets, y if bias is None else bias, y,
        M, N, K, G, x.stride(0),
        INT4=qweight.dtype == torch.uint8, HAS_BIAS=bias is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return y


def compile_check_launches(wrap, randn) -> None:
    """Both formats (int8 with a bias, int4 with offsets) in fp32 and bf16, for .ci/compile_triton.py."""
    for dtype in (torch.float32, torch.bfloat16):
        x, scales = randn(4, 128, dtype=dtype), randn(96, 2).abs()
        quantized_linear(x, torch.zeros(96, 128, dtype=torch.int8), scales, None, randn(96, dtype=dtype), wrap=wrap)
        quantized_linear(x, torch.zeros(96, 64, dtype=torch.uint8), scales, scales, None, wrap=wrap)
