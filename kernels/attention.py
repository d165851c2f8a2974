"""Causal flash attention (FlashAttention-2), forward and backward, plus a split-K decode path.

Math, per (batch, head), q (Tq, D), k and v (Tk, D), Tk >= Tq, c = Tk - Tq:

    s_ij = scale * q_i . k_j            for j <= i + c  (query i sees the keys up to its own position)
    lse_i = log sum_j exp(s_ij)
    p_ij = exp(s_ij - lse_i),   o_i = sum_j p_ij v_j

    backward, with delta_i = do_i . o_i:
    dv_j = sum_i p_ij do_i
    ds_ij = p_ij (do_i . v_j - delta_i)
    dq_i = scale * sum_j ds_ij k_j,   dk_j = scale * sum_i ds_ij q_i

Forward (`attention_fwd_kernel`): one program per block of BLOCK_M queries. It streams the
key/value blocks the queries can see through on-chip memory, keeping a running row max m,
a running sum l and an unnormalised accumulator (online softmax, exp2 of log2(e)-scaled
scores), so no Tq x Tk matrix ever reaches device memory. Key blocks wholly above the
diagonal are never loaded; blocks wholly below it run without the causal mask, only the
blocks the diagonal crosses apply it. It saves lse (fp32, natural log) for the backward.
Traffic: q and o once, k and v once per query block (from L2 mostly); FLOPs 4 Tq Tk D / 2.

Backward, FlashAttention-2 style, two kernels so that no program writes what another reads:
  - `attention_bwd_dkdv_kernel`: one program per key block, looping over the query blocks
    that see it, recomputing p from q, k and lse; accumulates dk and dv in registers;
  - `attention_bwd_dq_kernel`: one program per query block, looping over the key blocks
    it sees; accumulates dq.
delta = rowsum(do * o) is computed once up front. FLOPs 2.5x the forward's.

Decode (Tq == 1 against a long KV cache): a single query row gives one program per head,
too few to fill a GPU. `attention_decode_partial_kernel` splits the keys into chunks, each
program writing the normalised partial output of its chunk and its lse; then
`attention_decode_combine_kernel` merges the chunks: o = sum_s exp(lse_s - lse) o_s.
No matrix units are involved (a single row), so these use elementwise products and sums.

Head dims 1..128 are padded to a power of two (at least 16, the smallest tensor-core tile)
with masks; any Tq, Tk with masked edges.
fp32 inputs use IEEE fp32 dots (tf32 would cost ~1e-3 relative error); fp16/bf16 feed the
tensor cores and accumulate in fp32.
"""

import os

import torch
import triton
import triton.language as tl

from . import _no_wrap, rounded_to

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 128

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _forward_configs():
    if _INTERPRET:  # the interpreter cannot benchmark configs, and small blocks run faster there
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    ]


def _backward_config(dtype: torch.dtype) -> dict:
    """Block sizes of the two backward kernels (dk/dv: M1 x N1, dq: M2 x N2)."""
    if _INTERPRET:
        return {"BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:  # twice the bytes per tile: smaller tiles to fit shared memory
        return {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32, "num_warps": 4, "num_stages": 3}


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    """ "ieee": exact fp32 products (fp32 inputs; bf16 under the interpreter, see `_dot`); else tensor-core default."""
    return "ieee" if dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16) else "tf32"


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "ieee":
        # fp32 operands (a no-op for fp32 inputs); the interpreter (triton 3.x) multiplies bf16
        # tiles as their raw uint16 bits, so it gets bf16 values widened to fp32 instead.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _fwd_key_blocks(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    start,
    end,
    offs_m,
    offs_d,
    n_keys,
    causal_offset,
    qk_scale,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax over the key blocks [start, end); CAUSAL_MASK for the blocks the diagonal crosses."""
    d_mask = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_keys
        k_t = tl.load(
            k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=d_mask[:, None] & n_mask[None, :], other=0.0
        )
        qk = _dot(q, k_t, PRECISION) * qk_scale
        if CAUSAL_MASK:
            visible = (offs_n[None, :] <= offs_m[:, None] + causal_offset) & n_mask[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
        )
        acc = acc * alpha[:, None] + _dot(rounded_to(p, v.dtype), v, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_forward_configs(), key=["HEAD_DIM"])
@triton.jit
def attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    n_heads,
    n_queries,
    n_keys,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch, head = batch_head // n_heads, batch_head % n_heads
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    o_base = o_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_queries
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0
    )

    causal_offset = n_keys - n_queries
    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys below every query's diagonal and inside Tk: no mask; then the blocks the diagonal crosses
    full_end = tl.minimum((start_m + causal_offset + 1) // BLOCK_N, n_keys // BLOCK_N) * BLOCK_N
    end = tl.minimum(start_m + BLOCK_M + causal_offset, n_keys)
    acc, l_i, m_i = _fwd_key_blocks(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        0,
        full_end,
        offs_m,
        offs_d,
        n_keys,
        causal_offset,
        qk_scale,
        BLOCK_N,
        HEAD_DIM,
        False,
        PRECISION,
    )
    acc, l_i, m_i = _fwd_key_blocks(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        full_end,
        end,
        offs_m,
        offs_d,
        n_keys,
        causal_offset,
        qk_scale,
        BLOCK_N,
        HEAD_DIM,
        True,
        PRECISION,
    )
    o = acc / l_i[:, None]
    tl.store(
        o_base + offs_m[:, None] * stride_ot + offs_d[None, :],
        rounded_to(o, o_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )
    tl.store(lse_ptr + batch_head.to(tl.int64) * n_queries + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=m_mask)


@triton.jit
def attention_decode_partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    partial_o_ptr,
    partial_lse_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    n_heads,
    n_keys,
    keys_per_split,
    n_splits,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = batch_head // n_heads, batch_head % n_heads
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + offs_d, mask=d_mask, other=0.0)
    q = q.to(tl.float32) * (scale * LOG2E)

    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_keys)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)  # per lane, reduced at the end
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(n_mask, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # a lane with no key yet stays at zero
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * v
        l_i = l_i * alpha + p
        m_i = m_new
    m = tl.max(m_i, axis=0)
    lane_weight = tl.exp2(m_i - m)
    l = tl.sum(l_i * lane_weight, axis=0)
    o = tl.sum(acc * lane_weight[:, None], axis=0) / l
    slot = batch_head.to(tl.int64) * n_splits + split
    tl.store(partial_o_ptr + slot * BLOCK_D + offs_d, o)
    tl.store(partial_lse_ptr + slot, m + tl.log2(l))


@triton.jit
def attention_decode_combine_kernel(
    partial_o_ptr,
    partial_lse_ptr,
    o_ptr,
    lse_ptr,
    stride_ob,
    stride_oh,
    n_heads,
    n_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    batch_head = tl.program_id(0)
    batch, head = batch_head // n_heads, batch_head % n_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < n_splits
    slots = batch_head.to(tl.int64) * n_splits + offs_s
    lse_s = tl.load(partial_lse_ptr + slots, mask=s_mask, other=float("-inf"))  # log2 units
    lse_max = tl.max(lse_s, axis=0)
    weight = tl.exp2(lse_s - lse_max)
    total = tl.sum(weight, axis=0)
    o_s = tl.load(partial_o_ptr + slots[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    o = tl.sum(o_s * weight[:, None], axis=0) / total
    o_base = o_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(o_base + offs_d, rounded_to(o, o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(lse_ptr + batch_head, (lse_max + tl.log2(total)) * LN2)


@triton.jit
def attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dkb,
    stride_dkh,
    stride_dkt,  # dk and dv share one layout
    n_heads,
    n_queries,
    n_keys,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    batch_head = tl.program_id(1)
    batch, head = batch_head // n_heads, batch_head % n_heads
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    do_base = do_ptr + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    row_base = batch_head.to(tl.int64) * n_queries  # lse and delta are (B, H, Tq) contiguous

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < n_keys
    d_mask = offs_d < HEAD_DIM
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    causal_offset = n_keys - n_queries
    qk_scale = scale * LOG2E
    # queries i >= start_n - c see some key of this block; i >= start_n + BLOCK_N - 1 - c see all of them
    first = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
    full_start = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M, n_queries)
    full_start = tl.maximum(full_start, first)
    for start_m in range(first, n_queries, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n_queries
        q_t = tl.load(
            q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=d_mask[:, None] & m_mask[None, :], other=0.0
        )
        lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=float("inf"))  # no mass for padding rows
        p_t = tl.exp2(_dot(k, q_t, PRECISION) * qk_scale - lse[None, :] * LOG2E)
        if start_m < full_start:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, p_t, 0.0)
        do = tl.load(
            do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0
        )
        dv += _dot(rounded_to(p_t, do.dtype), do, PRECISION)
        delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
        dp_t = _dot(v, tl.trans(do), PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(rounded_to(ds_t, q_t.dtype), tl.trans(q_t), PRECISION)
    grad_offsets = (
        batch.to(tl.int64) * stride_dkb
        + head.to(tl.int64) * stride_dkh
        + offs_n[:, None] * stride_dkt
        + offs_d[None, :]
    )
    tl.store(dk_ptr + grad_offsets, rounded_to(dk * scale, dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + grad_offsets, rounded_to(dv, dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_key_blocks(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    start,
    end,
    offs_m,
    offs_d,
    n_keys,
    causal_offset,
    qk_scale,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq contributions of the key blocks [start, end); CAUSAL_MASK for the blocks the diagonal crosses."""
    d_mask = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_keys
        kv_t_mask = d_mask[:, None] & n_mask[None, :]
        k_t = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kv_t_mask, other=0.0)
        v_t = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], mask=kv_t_mask, other=0.0)
        p = tl.exp2(_dot(q, k_t, PRECISION) * qk_scale - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where((offs_n[None, :] <= offs_m[:, None] + causal_offset) & n_mask[None, :], p, 0.0)
        dp = _dot(do, v_t, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(rounded_to(ds, k_t.dtype), tl.trans(k_t), PRECISION)
    return dq


@triton.jit
def attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    n_heads,
    n_queries,
    n_keys,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch, head = batch_head // n_heads, batch_head % n_heads
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    do_base = do_ptr + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    row_base = batch_head.to(tl.int64) * n_queries

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_queries
    qo_mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qo_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=qo_mask, other=0.0)
    lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    causal_offset = n_keys - n_queries
    qk_scale = scale * LOG2E
    full_end = tl.minimum((start_m + causal_offset + 1) // BLOCK_N, n_keys // BLOCK_N) * BLOCK_N
    end = tl.minimum(start_m + BLOCK_M + causal_offset, n_keys)
    dq = _dq_key_blocks(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        0,
        full_end,
        offs_m,
        offs_d,
        n_keys,
        causal_offset,
        qk_scale,
        BLOCK_N,
        HEAD_DIM,
        False,
        PRECISION,
    )
    dq = _dq_key_blocks(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        full_end,
        end,
        offs_m,
        offs_d,
        n_keys,
        causal_offset,
        qk_scale,
        BLOCK_N,
        HEAD_DIM,
        True,
        PRECISION,
    )
    dq_base = dq_ptr + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
    tl.store(
        dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :],
        rounded_to(dq * scale, dq_ptr.dtype.element_ty),
        mask=qo_mask,
    )


def supports(q: torch.Tensor) -> bool:
    """Whether these kernels take q's head dim and dtype."""
    return 1 <= q.shape[-1] <= MAX_HEAD_DIM and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _check(q, k, v):
    if not supports(q):
        raise ValueError(
            f"attention kernels take head dims 1..{MAX_HEAD_DIM} in fp16/bf16/fp32, got q {tuple(q.shape)} {q.dtype}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")


def _decode_splits(batch_heads: int, n_keys: int, device: torch.device) -> tuple[int, int]:
    """(n_splits, keys_per_split) for the split-K decode: about two programs per SM, >= 256 keys each."""
    if device.type == "cuda":
        target, min_keys = 2 * torch.cuda.get_device_properties(device).multi_processor_count, 256
    else:
        target, min_keys = 4, 16
    n_splits = max(1, min(triton.cdiv(target, batch_heads), triton.cdiv(n_keys, min_keys), 128))
    keys_per_split = triton.cdiv(n_keys, n_splits)
    return triton.cdiv(n_keys, keys_per_split), keys_per_split


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, wrap=_no_wrap):
    """Causal attention of q (B, H, Tq, D) over k, v (B, H, Tk, D). Returns out (B, H, Tq, D), lse (B, H, Tq) fp32."""
    _check(q, k, v)
    batch, heads, n_queries, head_dim = q.shape
    n_keys = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n_queries), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_d = _padded_head_dim(head_dim)
    if n_queries == 1:
        n_splits, keys_per_split = _decode_splits(batch * heads, n_keys, q.device)
        partial_o = torch.empty((batch * heads, n_splits, block_d), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((batch * heads, n_splits), dtype=torch.float32, device=q.device)
        wrap(attention_decode_partial_kernel)[(n_splits, batch * heads)](
            q,
            k,
            v,
            partial_o,
            partial_lse,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            heads,
            n_keys,
            keys_per_split,
            n_splits,
            scale,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_N=16 if _INTERPRET else 64,
            num_warps=4,
        )
        wrap(attention_decode_combine_kernel)[(batch * heads,)](
            partial_o,
            partial_lse,
            out,
            lse,
            out.stride(0),
            out.stride(1),
            heads,
            n_splits,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(n_splits),
            num_warps=4,
        )
        return out, lse

    def grid(meta):
        return (triton.cdiv(n_queries, meta["BLOCK_M"]), batch * heads)

    wrap(attention_fwd_kernel)[grid](
        q,
        k,
        v,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        heads,
        n_queries,
        n_keys,
        scale,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PRECISION=_dot_precision(q.dtype),
    )
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, scale: float, wrap=_no_wrap):
    """Gradients of causal attention. Shapes as in `attention_fwd`; lse from it. Returns dq, dk, dv."""
    _check(q, k, v)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    batch, heads, n_queries, head_dim = q.shape
    n_keys = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    config = _backward_config(q.dtype)
    common = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": _padded_head_dim(head_dim),
        "PRECISION": _dot_precision(q.dtype),
        "num_warps": config["num_warps"],
        "num_stages": config["num_stages"],
    }
    strides = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        grad_out.stride(0),
        grad_out.stride(1),
        grad_out.stride(2),
    )
    wrap(attention_bwd_dkdv_kernel)[(triton.cdiv(n_keys, config["BLOCK_N1"]), batch * heads)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        *strides,
        dk.stride(0),
        dk.stride(1),
        dk.stride(2),
        heads,
        n_queries,
        n_keys,
        scale,
        BLOCK_M=config["BLOCK_M1"],
        BLOCK_N=config["BLOCK_N1"],
        **common,
    )
    wrap(attention_bwd_dq_kernel)[(triton.cdiv(n_queries, config["BLOCK_M2"]), batch * heads)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dq,
        *strides,
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        heads,
        n_queries,
        n_keys,
        scale,
        BLOCK_M=config["BLOCK_M2"],
        BLOCK_N=config["BLOCK_N2"],
        **common,
    )
    return dq, dk, dv
