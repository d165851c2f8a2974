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

import torch
import triton
import triton.language as tl

from . import INTERPRET, _no_wrap, rounded_to

# constexpr: a compiled @triton.jit function may read only constexpr globals (the
# interpreter reads any global, so only a GPU compile would catch a plain float here)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 128
MAX_BATCH_HEADS = 65535  # batch * heads is grid axis 1 (queries or keys go on axis 0)


# fp32 dots ("ieee") run on CUDA cores, not tensor cores, and hold their tiles in registers:
# the tensor-core tiles spill kilobytes per thread there. These fit without spilling on
# sm_90 (.ci/compile_triton.py prints registers and spills): 32 x 32 up to head dim 64
# (108 registers), 16 x 16 for the 128-wide padded head dims (96; 32 x 32 spills 880 bytes).
_FP32_TILES = ({"BLOCK_M": 32, "BLOCK_N": 32}, {"BLOCK_M": 16, "BLOCK_N": 16})


def _forward_configs():
    if INTERPRET:  # the interpreter cannot benchmark configs, and small blocks run faster there
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        *(triton.Config(tile, num_warps=4, num_stages=2) for tile in _FP32_TILES),
    ]


def _prune_forward_configs(configs, named_args, **kwargs):
    """The fp32 tile of this head dim alone for fp32 dots, the tensor-core tiles otherwise
    (no time spent compiling and timing configs that cannot win)."""
    if len(configs) == 1:  # the interpreter's
        return configs
    if kwargs.get("PRECISION") == "ieee":
        tile = _FP32_TILES[0] if kwargs["BLOCK_D"] <= 64 else _FP32_TILES[1]
        return [c for c in configs if c.kwargs == tile]
    return [c for c in configs if c.kwargs not in _FP32_TILES]


def _backward_config(dtype: torch.dtype) -> dict:
    """Block sizes of the two backward kernels (dk/dv: M1 x N1, dq: M2 x N2)."""
    if INTERPRET:
        return {"BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:  # CUDA-core dots: small tiles, no register spills up to head dim 128 on sm_90
        return {"BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32, "num_warps": 4, "num_stages": 3}


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    """ "ieee": exact fp32 products (fp32 inputs; bf16 under the interpreter, see `_dot`); else tensor-core default."""
    return "ieee" if dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16) else "tf32"


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "ieee":
        # fp32 operands (a no-op for fp32 inputs); the interpreter (triton 3.x) multiplies bf16
        # tiles as their raw uint16 bits, so it gets bf16 values widened to fp32 instead.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _head_base(ptr, batch, head, stride_b, stride_h):
    """ptr moved to the (T, D) matrix of (batch, head), in int64 (B * H * T * D may pass 2**31)."""
    return ptr + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h


@triton.jit
def _tile(base, offs_t, stride_t, n_rows, offs_d, HEAD_DIM: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Pointers to the rows offs_t of a (n_rows, HEAD_DIM) matrix as a (rows, BLOCK_D) tile, or
    (BLOCK_D, rows) if TRANSPOSED, and the mask of the elements inside the matrix."""
    if TRANSPOSED:
        ptrs = base + offs_t[None, :] * stride_t + offs_d[:, None]
        mask = (offs_d < HEAD_DIM)[:, None] & (offs_t < n_rows)[None, :]
    else:
        ptrs = base + offs_t[:, None] * stride_t + offs_d[None, :]
        mask = (offs_t < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return ptrs, mask


@triton.jit
def _load_tile(base, offs_t, stride_t, n_rows, offs_d, HEAD_DIM: tl.constexpr, TRANSPOSED: tl.constexpr):
    """A q/k/v/do tile (see `_tile`), zeros outside the matrix."""
    ptrs, mask = _tile(base, offs_t, stride_t, n_rows, offs_d, HEAD_DIM, TRANSPOSED)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_tile(base, offs_t, stride_t, n_rows, offs_d, value, HEAD_DIM: tl.constexpr):
    """value (rows, BLOCK_D) fp32 into the rows offs_t of a (n_rows, HEAD_DIM) matrix, in its dtype."""
    ptrs, mask = _tile(base, offs_t, stride_t, n_rows, offs_d, HEAD_DIM, False)
    tl.store(ptrs, rounded_to(value, base.dtype.element_ty), mask=mask)


@triton.jit
def _key_range(start_m, n_keys, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr):
    """The keys [lo, hi) the query block at start_m visits, in whole blocks of BLOCK_N.

    DIAGONAL false: the blocks below every query's diagonal and inside Tk, which need no mask;
    DIAGONAL true: the blocks after those up to the block's last visible key, which need it.
    Blocks wholly above the diagonal are in neither.
    """
    full_end = tl.minimum((start_m + causal_offset + 1) // BLOCK_N, n_keys // BLOCK_N) * BLOCK_N
    if DIAGONAL:
        lo = full_end
        hi = tl.minimum(start_m + BLOCK_M + causal_offset, n_keys)
    else:
        lo = 0
        hi = full_end
    return lo, hi


@triton.jit
def _scores(
    q, k_t, offs_m, offs_n, n_keys, causal_offset, qk_scale, PRECISION: tl.constexpr, CAUSAL_MASK: tl.constexpr
):
    """The score tile s_ij * log2(e), (BLOCK_M, BLOCK_N); with CAUSAL_MASK, -inf where query i does
    not see key j (j > i + c, or j past Tk)."""
    s = _dot(q, k_t, PRECISION) * qk_scale
    if CAUSAL_MASK:
        visible = (offs_n[None, :] <= offs_m[:, None] + causal_offset) & (offs_n < n_keys)[None, :]
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.autotune(
    configs=_forward_configs(), key=["HEAD_DIM"], prune_configs_by={"early_config_prune": _prune_forward_configs}
)
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
    k_base = _head_base(k_ptr, batch, head, stride_kb, stride_kh)
    v_base = _head_base(v_ptr, batch, head, stride_vb, stride_vh)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(
        _head_base(q_ptr, batch, head, stride_qb, stride_qh), offs_m, stride_qt, n_queries, offs_d, HEAD_DIM, False
    )

    causal_offset = n_keys - n_queries
    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # online softmax over the key blocks below the diagonal (diagonal = 0, no mask), then over those
    # the diagonal crosses (diagonal = 1, masked); unrolled, so each loop is compiled for its case
    for diagonal in tl.static_range(2):
        lo, hi = _key_range(start_m, n_keys, causal_offset, BLOCK_M, BLOCK_N, diagonal)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k_t = _load_tile(k_base, offs_n, stride_kt, n_keys, offs_d, HEAD_DIM, True)
            s = _scores(q, k_t, offs_m, offs_n, n_keys, causal_offset, qk_scale, PRECISION, diagonal)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_tile(v_base, offs_n, stride_vt, n_keys, offs_d, HEAD_DIM, False)
            acc = acc * alpha[:, None] + _dot(rounded_to(p, v.dtype), v, PRECISION)
            m_i = m_new
    o_base = _head_base(o_ptr, batch, head, stride_ob, stride_oh)
    _store_tile(o_base, offs_m, stride_ot, n_queries, offs_d, acc / l_i[:, None], HEAD_DIM)
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(lse_ptr + batch_head.to(tl.int64) * n_queries + offs_m, lse, mask=offs_m < n_queries)


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
    k_base = _head_base(k_ptr, batch, head, stride_kb, stride_kh)
    v_base = _head_base(v_ptr, batch, head, stride_vb, stride_vh)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(_head_base(q_ptr, batch, head, stride_qb, stride_qh) + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    q = q.to(tl.float32) * (scale * LOG2E)

    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_keys)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)  # per lane, reduced at the end
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, stride_kt, end, offs_d, HEAD_DIM, False).to(tl.float32)
        s = tl.where(offs_n < end, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # a lane with no key yet stays at zero
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref)
        v = _load_tile(v_base, offs_n, stride_vt, end, offs_d, HEAD_DIM, False).to(tl.float32)
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
    o_base = _head_base(o_ptr, batch, head, stride_ob, stride_oh)
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
    q_base = _head_base(q_ptr, batch, head, stride_qb, stride_qh)
    do_base = _head_base(do_ptr, batch, head, stride_dob, stride_doh)
    row_base = batch_head.to(tl.int64) * n_queries  # lse and delta are (B, H, Tq) contiguous

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(
        _head_base(k_ptr, batch, head, stride_kb, stride_kh), offs_n, stride_kt, n_keys, offs_d, HEAD_DIM, False
    )
    v = _load_tile(
        _head_base(v_ptr, batch, head, stride_vb, stride_vh), offs_n, stride_vt, n_keys, offs_d, HEAD_DIM, False
    )
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
        q_t = _load_tile(q_base, offs_m, stride_qt, n_queries, offs_d, HEAD_DIM, True)
        lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=float("inf"))  # no mass for padding rows
        p_t = tl.exp2(_dot(k, q_t, PRECISION) * qk_scale - lse[None, :] * LOG2E)
        if start_m < full_start:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, p_t, 0.0)
        do = _load_tile(do_base, offs_m, stride_dot, n_queries, offs_d, HEAD_DIM, False)
        dv += _dot(rounded_to(p_t, do.dtype), do, PRECISION)
        delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
        dp_t = _dot(v, tl.trans(do), PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(rounded_to(ds_t, q_t.dtype), tl.trans(q_t), PRECISION)
    dk_base = _head_base(dk_ptr, batch, head, stride_dkb, stride_dkh)
    dv_base = _head_base(dv_ptr, batch, head, stride_dkb, stride_dkh)
    _store_tile(dk_base, offs_n, stride_dkt, n_keys, offs_d, dk * scale, HEAD_DIM)
    _store_tile(dv_base, offs_n, stride_dkt, n_keys, offs_d, dv, HEAD_DIM)


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
    k_base = _head_base(k_ptr, batch, head, stride_kb, stride_kh)
    v_base = _head_base(v_ptr, batch, head, stride_vb, stride_vh)
    row_base = batch_head.to(tl.int64) * n_queries

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_queries
    q = _load_tile(
        _head_base(q_ptr, batch, head, stride_qb, stride_qh), offs_m, stride_qt, n_queries, offs_d, HEAD_DIM, False
    )
    do = _load_tile(
        _head_base(do_ptr, batch, head, stride_dob, stride_doh), offs_m, stride_dot, n_queries, offs_d, HEAD_DIM, False
    )
    lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    causal_offset = n_keys - n_queries
    qk_scale = scale * LOG2E
    for diagonal in tl.static_range(2):  # the key blocks as in the forward: unmasked, then masked
        lo, hi = _key_range(start_m, n_keys, causal_offset, BLOCK_M, BLOCK_N, diagonal)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k_t = _load_tile(k_base, offs_n, stride_kt, n_keys, offs_d, HEAD_DIM, True)
            v_t = _load_tile(v_base, offs_n, stride_vt, n_keys, offs_d, HEAD_DIM, True)
            p = tl.exp2(
                _scores(q, k_t, offs_m, offs_n, n_keys, causal_offset, qk_scale, PRECISION, diagonal) - lse[:, None]
            )
            ds = p * (_dot(do, v_t, PRECISION) - delta[:, None])
            dq += _dot(rounded_to(ds, k_t.dtype), tl.trans(k_t), PRECISION)
    dq_base = _head_base(dq_ptr, batch, head, stride_dqb, stride_dqh)
    _store_tile(dq_base, offs_m, stride_dqt, n_queries, offs_d, dq * scale, HEAD_DIM)


def supports(q: torch.Tensor) -> bool:
    """Whether these kernels take q's head dim, dtype and batch * heads."""
    return (
        1 <= q.shape[-1] <= MAX_HEAD_DIM
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.shape[0] * q.shape[1] <= MAX_BATCH_HEADS
    )


def _check(q, k, v):
    if not supports(q):
        raise ValueError(
            f"attention kernels take head dims 1..{MAX_HEAD_DIM} in fp16/bf16/fp32 and batch * heads <= "
            f"{MAX_BATCH_HEADS}, got q {tuple(q.shape)} {q.dtype}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")


def _head_strides(*tensors: torch.Tensor) -> list[int]:
    """The batch, head and sequence strides of each (B, H, T, D) tensor, in order (the kernels' stride arguments)."""
    return [stride for t in tensors for stride in t.stride()[:3]]


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
            *_head_strides(q)[:2],
            *_head_strides(k, v),
            heads,
            n_keys,
            keys_per_split,
            n_splits,
            scale,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_N=16 if INTERPRET else (64 if block_d <= 64 else 32),  # D = 128: 64 keys spill registers
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
        *_head_strides(q, k, v, out),
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
    strides = _head_strides(q, k, v, grad_out)
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
        *_head_strides(dk),
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
        *_head_strides(dq),
        heads,
        n_queries,
        n_keys,
        scale,
        BLOCK_M=config["BLOCK_M2"],
        BLOCK_N=config["BLOCK_N2"],
        **common,
    )
    return dq, dk, dv


def compile_check_launches(wrap, randn) -> None:
    """Every launcher here on the shapes that select its distinct code paths; .ci/compile_triton.py
    passes a `wrap` that records each launch and compiles it for sm_80 and sm_90 (no GPU needed)."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for head_dim in (16, 64, 80, 128):
            q, k, v = (randn(1, 2, 64, head_dim, dtype=dtype) for _ in range(3))
            _, lse = attention_fwd(q, k, v, head_dim**-0.5, wrap=wrap)
            attention_bwd(q, q, k, v, q, lse.zero_(), head_dim**-0.5, wrap=wrap)
            attention_fwd(q[:, :, :1], k, v, head_dim**-0.5, wrap=wrap)  # split-K decode
