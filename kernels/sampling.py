"""Top-k / top-p filtering and the fused sampler, without sorting the vocabulary.

Semantics (transformers' warpers; see docs/ARCHITECTURE.md), per row x of V logits,
NaN counted as -inf, p_i = softmax(x / T)_i:
  - top-k keeps every x_i >= t_k, the k-th largest value (ties at t_k all stay),
    with k = max(top_k, min_tokens_to_keep);
  - top-p then orders the survivors by (value, index) ascending, and removes those whose
    cumulative probability is <= 1 - top_p, keeping at least min_tokens_to_keep. Seen from
    the top, it keeps the first N tokens in (value desc, index desc) order, where N counts
    the tokens whose "mass strictly above them in that order" is < top_p.

No sort: each row is summarised by a threshold value t and a tie rule, found by bisection
on the logit value. One program per row; every step below is one sweep over the row, in
tiles of BLOCK logits, with per-lane accumulators reduced once per sweep:

  1. max M, smallest finite value L, number of finite logits.
  2. top-k: t_k = the largest logit value t with count(x >= t) >= k. Bisection over
     [L, M] whose ends snap to logit values after every sweep (the sweep at mid also
     returns the smallest logit >= mid and the largest < mid), so the search ends on an
     exact logit value, tie or not, typically in ~log2(V) sweeps.
  3. top-p: Z = sum of w_i = exp((x_i - M) / T) over x_i >= t_k; t_p = the largest value
     with mass(x >= t_p) >= top_p * Z (same search, mass instead of count). Every token
     above t_p is kept. Of the n ties at t_p (weight q each), the kept ones are those with
     the highest indices whose mass above stays < top_p * Z: ceil((top_p Z - mass(x > t_p)) / q)
     of them, at most n. If fewer than min_tokens_to_keep survive, the count search of
     step 2 finds the threshold for exactly min_tokens_to_keep tokens instead.
  4. filter: write x where kept, -inf elsewhere. sample: scan the kept weights in
     vocabulary order (tile cumsum + carry) and return the first index whose cumulative
     weight exceeds u * total (u from the caller's torch.Generator, so no host sync).

Comparisons use the raw logits (exact in fp32, so ties are ties whatever T is);
temperature only enters the weights. Traffic: the row is read once per sweep (~20-45
sweeps, from L2/L1 after the first: 200 KB for V = 50257 fp32); the filter writes it
once, the sampler writes one int64.
"""

import torch
import triton
import triton.language as tl

from . import _no_wrap
from .launch import launch_per_row

LOG2E = 1.4426950408889634  # host side: the sample kernel gets log2(e) / temperature
# constexpr: a compiled @triton.jit function may read only constexpr globals (the
# interpreter reads any global, so only a GPU compile would catch a plain float here)
LOG2E_IN_KERNEL = tl.constexpr(LOG2E)


@triton.jit
def _load_row_tile(row_ptr, start, n_cols, BLOCK: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    x = tl.load(row_ptr + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
    return tl.where(x == x, x, float("-inf")), offs  # noqa: PLR0124  (x != x: NaN, counted as -inf)


@triton.jit
def _row_summary(row_ptr, n_cols, BLOCK: tl.constexpr):
    """(max, smallest finite value, number of finite values) of the row."""
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    n_finite = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n_cols, BLOCK):
        x, _ = _load_row_tile(row_ptr, start, n_cols, BLOCK)
        finite = x > float("-inf")
        hi = tl.maximum(hi, x)
        lo = tl.minimum(lo, tl.where(finite, x, float("inf")))
        n_finite += finite.to(tl.int32)
    return tl.max(hi, axis=0), tl.min(lo, axis=0), tl.sum(n_finite, axis=0)


@triton.jit
def _mass_at_least(row_ptr, n_cols, threshold, row_max, scale_log2, BLOCK: tl.constexpr):
    """sum of exp2((x - row_max) * scale_log2) over x >= threshold."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        x, _ = _load_row_tile(row_ptr, start, n_cols, BLOCK)
        acc += tl.where(x >= threshold, tl.exp2((x - row_max) * scale_log2), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _largest_threshold(
    row_ptr, n_cols, lo, hi, target, row_max, scale_log2, BY_MASS: tl.constexpr, BLOCK: tl.constexpr
):
    """The largest logit value t in [lo, hi] with W(x >= t) >= target.

    W counts logits (BY_MASS=False) or sums their weights exp2((x - row_max) * scale_log2).
    lo and hi must be logit values with W(x >= lo) >= target and t <= hi.
    """
    while lo < hi:
        mid = lo * 0.5 + hi * 0.5
        mid = tl.where(mid > lo, mid, hi)  # lo and hi adjacent floats: try hi
        acc = tl.zeros([BLOCK], tl.float32)
        above = tl.full([BLOCK], float("inf"), tl.float32)  # smallest logit >= mid
        below = tl.full([BLOCK], float("-inf"), tl.float32)  # largest logit < mid
        for start in range(0, n_cols, BLOCK):
            x, _ = _load_row_tile(row_ptr, start, n_cols, BLOCK)
            ge = x >= mid
            if BY_MASS:
                acc += tl.where(ge, tl.exp2((x - row_max) * scale_log2), 0.0)
            else:
                acc += ge.to(tl.float32)
            above = tl.minimum(above, tl.where(ge, x, float("inf")))
            below = tl.maximum(below, tl.where(ge, float("-inf"), x))
        total = tl.sum(acc, axis=0)
        above_value = tl.min(above, axis=0)
        below_value = tl.max(below, axis=0)
        enough = total >= target
        lo = tl.where(enough, above_value, lo)
        hi = tl.where(enough, hi, below_value)
        if not BY_MASS:
            hi = tl.where(total == target, above_value, hi)  # exactly target tokens: t found
    return lo


@triton.jit
def _tie_stats(row_ptr, n_cols, threshold, row_max, scale_log2, BLOCK: tl.constexpr):
    """(count of x > t, count of x == t, mass of x > t, weight of one x == t) for t = threshold."""
    n_above = tl.zeros([BLOCK], tl.int32)
    n_ties = tl.zeros([BLOCK], tl.int32)
    mass_above = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        x, _ = _load_row_tile(row_ptr, start, n_cols, BLOCK)
        gt = x > threshold
        n_above += gt.to(tl.int32)
        n_ties += (x == threshold).to(tl.int32)
        mass_above += tl.where(gt, tl.exp2((x - row_max) * scale_log2), 0.0)
    tie_weight = tl.exp2((threshold - row_max) * scale_log2)
    return tl.sum(n_above, axis=0), tl.sum(n_ties, axis=0), tl.sum(mass_above, axis=0), tie_weight


@triton.jit
def _kept_set(row_ptr, n_cols, top_k, top_p, min_tokens_to_keep, scale_log2, BLOCK: tl.constexpr):
    """The kept set of a row as (threshold, ties skipped, row max, total kept weight).

    Kept: x > threshold, and the ties x == threshold except the `ties skipped` lowest-index ones.
    """
    row_max, smallest, n_finite = _row_summary(row_ptr, n_cols, BLOCK)
    # a row without a finite logit keeps nothing: thresholds above every logit (-inf)
    row_max = tl.where(n_finite > 0, row_max, 0.0)
    smallest = tl.where(n_finite > 0, smallest, 0.0)

    threshold = smallest  # top-k off: every finite logit stays
    k = tl.maximum(top_k, min_tokens_to_keep)
    if (top_k > 0) & (n_finite > k):
        threshold = _largest_threshold(
            row_ptr, n_cols, smallest, row_max, k.to(tl.float32), row_max, scale_log2, False, BLOCK
        )
    n_above, n_ties, mass_above, tie_weight = _tie_stats(row_ptr, n_cols, threshold, row_max, scale_log2, BLOCK)
    n_kept_ties = n_ties
    if top_p < 1.0:
        top_k_threshold = threshold
        n_top_k = n_above + n_ties
        target = top_p * _mass_at_least(row_ptr, n_cols, top_k_threshold, row_max, scale_log2, BLOCK)
        threshold = _largest_threshold(
            row_ptr, n_cols, top_k_threshold, row_max, target, row_max, scale_log2, True, BLOCK
        )
        n_above, n_ties, mass_above, tie_weight = _tie_stats(row_ptr, n_cols, threshold, row_max, scale_log2, BLOCK)
        # ties at the threshold, highest index first, stay while the mass above them is < target
        fits = tl.ceil((target - mass_above) / tl.maximum(tie_weight, 1e-38)).to(tl.int32)
        n_kept_ties = tl.minimum(n_ties, tl.maximum(fits, 1))
        min_keep = tl.minimum(min_tokens_to_keep, n_top_k)
        if n_above + n_kept_ties < min_keep:
            threshold = _largest_threshold(
                row_ptr, n_cols, top_k_threshold, row_max, min_keep.to(tl.float32), row_max, scale_log2, False, BLOCK
            )
            n_above, n_ties, mass_above, tie_weight = _tie_stats(row_ptr, n_cols, threshold, row_max, scale_log2, BLOCK)
            n_kept_ties = min_keep - n_above
    threshold = tl.where(n_finite > 0, threshold, float("inf"))
    total = mass_above + n_kept_ties.to(tl.float32) * tie_weight
    return threshold, n_ties - n_kept_ties, row_max, total


@triton.jit
def _kept_mask(x, ties_before, threshold, ties_skipped):
    """Kept lanes of a tile, and the number of ties at the threshold up to and including it."""
    tie = x == threshold
    tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based among the row's ties
    return (x > threshold) | (tie & (tie_rank > ties_skipped)), ties_before + tl.sum(tie.to(tl.int32), axis=0)


@triton.jit(do_not_specialize=["n_cols", "top_k", "min_tokens_to_keep"])
def top_k_top_p_filter_kernel(
    logits_ptr,
    out_ptr,
    logits_row_stride,
    out_row_stride,
    n_cols,
    top_k,
    top_p,
    min_tokens_to_keep,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    threshold, ties_skipped, _, _ = _kept_set(row_ptr, n_cols, top_k, top_p, min_tokens_to_keep, LOG2E_IN_KERNEL, BLOCK)
    ties_before = tl.full([], 0, tl.int32)
    for start in range(0, n_cols, BLOCK):
        x, offs = _load_row_tile(row_ptr, start, n_cols, BLOCK)
        kept, ties_before = _kept_mask(x, ties_before, threshold, ties_skipped)
        out = tl.where(kept, x, float("-inf"))
        tl.store(out_ptr + row * out_row_stride + offs, out.to(out_ptr.dtype.element_ty), mask=offs < n_cols)


@triton.jit(do_not_specialize=["n_cols", "top_k"])
def sample_kernel(
    logits_ptr,
    uniform_ptr,
    token_ptr,
    logits_row_stride,
    n_cols,
    scale_log2,
    top_k,
    top_p,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    threshold, ties_skipped, row_max, total = _kept_set(row_ptr, n_cols, top_k, top_p, 1, scale_log2, BLOCK)
    target = tl.load(uniform_ptr + row) * total
    # first kept index (vocabulary order) whose cumulative weight exceeds target; if rounding
    # leaves target above the scanned sum, the last kept index; a row with nothing kept gives 0
    token = n_cols
    last_kept = tl.full([], 0, tl.int32)
    cumulative = tl.full([], 0.0, tl.float32)
    ties_before = tl.full([], 0, tl.int32)
    start = tl.full([], 0, tl.int32)
    while (start < n_cols) & (token == n_cols):
        x, offs = _load_row_tile(row_ptr, start, n_cols, BLOCK)
        kept, ties_before = _kept_mask(x, ties_before, threshold, ties_skipped)
        weight = tl.where(kept, tl.exp2((x - row_max) * scale_log2), 0.0)
        running = cumulative + tl.cumsum(weight, axis=0)
        token = tl.minimum(token, tl.min(tl.where(kept & (running > target), offs, n_cols), axis=0))
        last_kept = tl.maximum(last_kept, tl.max(tl.where(kept, offs, 0), axis=0))
        cumulative += tl.sum(weight, axis=0)
        start += BLOCK
    tl.store(token_ptr + row, tl.where(token < n_cols, token, last_kept).to(tl.int64))


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float, min_tokens_to_keep: int, wrap=_no_wrap):
    """logits (B, V) with the entries top-k then top-p remove set to -inf (NaN -> -inf). Returns (B, V)."""
    n_rows, n_cols = logits.shape
    out = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return out
    top_k = top_k if top_k < n_cols else 0
    min_tokens_to_keep = min(min_tokens_to_keep, n_cols)  # more than the row keeps the row (and fits int32)
    launch_per_row(
        top_k_top_p_filter_kernel,
        logits,
        logits,
        out,
        logits.stride(0),
        out.stride(0),
        n_cols,
        top_k,
        top_p,
        min_tokens_to_keep,
        wrap=wrap,
    )
    return out


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, uniform: torch.Tensor, wrap=_no_wrap):
    """One token per row of logits (B, V) from softmax(filter(logits / temperature)), drawn with uniform (B,) fp32.

    Returns (B,) int64: the first kept index whose cumulative probability exceeds uniform * total.
    """
    n_rows, n_cols = logits.shape
    tokens = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    if n_rows == 0:
        return tokens
    top_k = top_k if top_k < n_cols else 0
    launch_per_row(
        sample_kernel,
        logits,
        logits,
        uniform,
        tokens,
        logits.stride(0),
        n_cols,
        LOG2E / temperature,
        top_k,
        top_p,
        wrap=wrap,
    )
    return tokens


def compile_check_launches(wrap, randn) -> None:
    """Every launcher here on the shapes that select its distinct code paths; .ci/compile_triton.py
    passes a `wrap` that records each launch and compiles it for sm_80 and sm_90 (no GPU needed)."""
    for dtype in (torch.float32, torch.bfloat16):
        for width in (300, 50257):
            logits = randn(4, width, dtype=dtype)
            top_k_top_p_filter(logits, 50, 0.9, 1, wrap=wrap)
            sample(logits, 0.8, 50, 0.9, randn(4).uniform_(0, 1), wrap=wrap)
