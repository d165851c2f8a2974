"""top_k_top_p_filter and sample: every kernel backend against transformers and the reference.

The kept set must equal transformers' TopKLogitsWarper + TopPLogitsWarper exactly (ties
included), except for tokens whose ascending cumulative probability lies within 1e-6 of
the top-p threshold, where fp32 rounding of the cumsum decides. NaN counts as -inf
(transformers would keep it; the reference is the oracle there). Draws lie in the kept
set, equal the reference's draw for the same uniform, are reproducible with a fixed
generator, and follow the filtered distribution (a chi-square test on 200k draws).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import INTERPRET
from op_testing import assert_draws_match_reference, assert_same_kept, near_top_p_threshold, poison
from transformers import TopKLogitsWarper, TopPLogitsWarper

from pyminigpt import ops
from pyminigpt.ops import reference

WIDE = 257 if INTERPRET else 50257  # GPT-2's vocabulary, or a small odd width in the interpreter
BATCH = 8 if INTERPRET else 64
# (batch, vocab) of most tests: the float64 oracles sort whole rows, so few wide rows
# (5, 3): min_tokens_to_keep above the vocabulary keeps every token
SHAPES = [(1, WIDE), (6, WIDE), (BATCH, 80), (3, 1), (5, 3)]


# (top_k, top_p, min_tokens_to_keep): each warper alone, both, disabled ones, k above the
# vocabulary, min_tokens_to_keep above k, top-p keeping a single token
FILTERS = [
    (50, 0.9, 1),
    (0, 0.9, 1),
    (50, 1.0, 1),
    (0, 1.0, 1),
    (10**9, 0.5, 1),
    (1, 1.0, 1),
    (3, 0.95, 5),
    (0, 0.3, 4),
    (0, 0.01, 1),
    (700, 0.99, 1),
]


def _logits(batch: int, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=g) * 2.5).to(device)


def _transformers_filter(logits: torch.Tensor, top_k: int, top_p: float, min_keep: int) -> torch.Tensor:
    scores = logits.clone()
    if top_k > 0:
        scores = TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(None, scores)
    return scores


@pytest.mark.parametrize(
    "batch, vocab, top_k, top_p, min_keep",
    [(*shape, *f) for shape in SHAPES for f in FILTERS] + [(BATCH, WIDE, 50, 0.9, 1)],
)
def test_filter_matches_transformers(backend, batch, vocab, top_k, top_p, min_keep):
    logits = _logits(batch, vocab, backend, seed=vocab + top_k)
    logits[0, : min(vocab - 1, 7)] = float("-inf")  # a few -inf entries
    poison(backend, logits.numel())
    got = ops.top_k_top_p_filter(logits, top_k, top_p, min_keep)
    assert got.shape == logits.shape and got.dtype == logits.dtype
    expected = _transformers_filter(logits.cpu(), top_k, top_p, min_keep)
    assert_same_kept(got.cpu(), expected, logits.cpu(), near_top_p_threshold(logits.cpu(), top_k, top_p))


@pytest.mark.parametrize("top_k, top_p, min_keep", FILTERS)
@pytest.mark.parametrize("batch, vocab", [(BATCH, 80), (5, 3), (3, 1)])
def test_reference_filter_matches_transformers(batch, vocab, top_k, top_p, min_keep):
    """The oracle itself against transformers' warpers (min_tokens_to_keep above the vocabulary included)."""
    logits = _logits(batch, vocab, "cpu", seed=vocab + top_k)
    got = reference.top_k_top_p_filter(logits, top_k, top_p, min_keep)
    expected = _transformers_filter(logits, top_k, top_p, min_keep)
    assert_same_kept(got, expected, logits, near_top_p_threshold(logits, top_k, top_p))


@pytest.mark.parametrize("top_k, top_p, min_keep", FILTERS)
@pytest.mark.parametrize("vocab", [WIDE, 80])
def test_filter_ties_and_nan(backend, vocab, top_k, top_p, min_keep):
    """Integer logits tie everywhere; NaN counts as -inf. The stable reference is the oracle."""
    logits = _logits(6, vocab, backend, seed=1).round()
    logits[1, ::5] = float("nan")
    logits[2, 1:] = float("-inf")  # a single finite token
    logits[3, :] = 1.0  # one big tie
    got = ops.top_k_top_p_filter(logits, top_k, top_p, min_keep)
    expected = reference.top_k_top_p_filter(logits.cpu(), top_k, top_p, min_keep)
    clean = torch.nan_to_num(logits.cpu(), nan=float("-inf"))
    assert_same_kept(got.cpu(), expected, clean, near_top_p_threshold(clean, top_k, top_p))
    if top_p == 1.0:  # top-k alone: transformers agrees on ties too (NaN aside)
        rows = [0, 2, 3]
        hf = _transformers_filter(logits[rows].cpu(), top_k, top_p, min_keep)
        assert_same_kept(got[rows].cpu(), hf, clean[rows], torch.zeros_like(hf, dtype=torch.bool))


def test_filter_bf16(backend):
    logits = _logits(6, WIDE, backend).to(torch.bfloat16)
    got = ops.top_k_top_p_filter(logits, 40, 0.8)
    assert got.dtype == torch.bfloat16
    expected = reference.top_k_top_p_filter(logits.cpu().float(), 40, 0.8)
    ambiguous = near_top_p_threshold(logits.cpu().float(), 40, 0.8)
    assert_same_kept(got.cpu().float(), expected, logits.cpu().float(), ambiguous)


def test_filter_top_k_below_a_larger_logit_with_other_leading_bits(backend):
    """1.0, 1.25 and 1.5 share their leading bits and 100 does not: the 2nd largest is 1.5.
    (A radix selection that forgot the keys above its prefix after the first digit kept 1.25.)"""
    logits = torch.tensor([[100.0, 1.0, 1.5, 1.25]], device=backend)
    got = ops.top_k_top_p_filter(logits, 2, 1.0)
    assert (got.cpu() > float("-inf")).tolist() == [[True, False, True, False]]


def test_filter_row_without_finite_logit(backend):
    logits = _logits(4, 80, backend)
    logits[1] = float("-inf")
    logits[2] = float("nan")
    got = ops.top_k_top_p_filter(logits, 5, 0.9)
    assert (got[1:3] == float("-inf")).all()
    assert (got[[0, 3]] > float("-inf")).sum(-1).tolist() == [
        n.item() for n in (reference.top_k_top_p_filter(logits[[0, 3]].cpu(), 5, 0.9) > float("-inf")).sum(-1)
    ]


@pytest.mark.parametrize(
    "batch, vocab, top_k, top_p, temperature",
    [(*shape, k, p, t) for shape in SHAPES for k, p, m in FILTERS if m == 1 for t in (0.7, 1.6)]
    + [(BATCH, WIDE, 50, 0.9, 0.8)],
)
def test_sample_matches_reference(backend, batch, vocab, top_k, top_p, temperature):
    logits = _logits(batch, vocab, backend, seed=vocab + top_k)
    logits[0, 3:9] = float("-inf")
    generator = torch.Generator(device=backend).manual_seed(top_k)
    uniform = torch.rand(batch, generator=generator, device=backend)
    poison(backend, batch)
    tokens = ops.dispatch.call("sample", logits, temperature, top_k, top_p, uniform)
    assert tokens.dtype == torch.int64 and tokens.shape == (batch,)
    assert_draws_match_reference(tokens, logits, temperature, top_k, top_p, uniform)


def test_sample_ties_and_nan(backend):
    logits = _logits(6, WIDE, backend, seed=2).round()
    logits[1, ::3] = float("nan")
    logits[2, 1:] = float("-inf")
    uniform = torch.rand(6, device=backend)
    for top_k, top_p in [(5, 1.0), (0, 0.6), (20, 0.9)]:
        tokens = ops.sample(logits, 1.0, top_k, top_p)
        assert not torch.isnan(logits[torch.arange(6), tokens]).any(), "drew a NaN logit"
        assert tokens[2].item() == 0
        tokens = ops.dispatch.call("sample", logits, 1.0, top_k, top_p, uniform)
        assert_draws_match_reference(tokens, torch.nan_to_num(logits, nan=float("-inf")), 1.0, top_k, top_p, uniform)


def test_sample_is_reproducible_with_a_generator(backend):
    logits = _logits(BATCH, WIDE, backend)
    draws = [
        ops.sample(logits, 0.8, 50, 0.9, generator=torch.Generator(device=backend).manual_seed(1234)) for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])


def test_sample_rejects_a_generator_that_is_not_one(backend):
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        ops.sample(_logits(2, 80, backend), generator=1234)


def test_filter_min_tokens_to_keep_beyond_int32_keeps_the_row(backend):
    logits = _logits(3, 80, backend)
    got = ops.top_k_top_p_filter(logits, 5, 0.5, min_tokens_to_keep=2**31)
    assert torch.equal(got, logits)


def test_sample_row_without_finite_logit(backend):
    logits = _logits(3, 80, backend)
    logits[1] = float("-inf")
    with pytest.raises(ValueError, match="no finite value"):
        ops.sample(logits, 1.0, 5, 0.9)
    logits[1, 17] = 0.0  # the only finite token must be drawn, whatever the uniform
    for u in (0.0, 0.5, 0.999999):
        uniform = torch.full((3,), u, device=backend)
        assert ops.dispatch.call("sample", logits, 1.0, 5, 0.9, uniform)[1].item() == 17


def test_kernel_draws_token_0_for_a_row_without_mass(native_device):
    device = native_device
    logits = torch.full((2, 80), float("-inf"), device=device)
    logits[1, 5] = float("nan")
    uniform = torch.rand(2, device=device)
    assert torch.ops.pyminigpt.sample(logits, 1.0, 0, 1.0, uniform).tolist() == [0, 0]


def test_sample_frequencies_follow_the_filtered_distribution(backend):
    """200k draws from one small-vocabulary row: a chi-square test against the filtered softmax.

    The interpreter runs ~0.4 s per row, so there only 32 draws check the kept set; the
    Triton draw's distribution is checked by test_triton_kernels' inverse-CDF grid test.
    """
    vocab, draws = 80, 32 if INTERPRET else 200_000
    temperature, top_k, top_p = 0.8, 30, 0.9
    row = _logits(1, vocab, "cpu", seed=7) * 0.5
    probs = torch.softmax(reference.top_k_top_p_filter(row.double() / temperature, top_k, top_p), -1)[0]
    counts = torch.zeros(vocab, dtype=torch.float64)
    chunk = 50_000 if not INTERPRET else draws
    generator = torch.Generator(device=backend).manual_seed(0)
    for _ in range(draws // chunk):
        logits = row.to(backend).expand(chunk, vocab).contiguous()
        tokens = ops.sample(logits, temperature, top_k, top_p, generator=generator)
        counts += torch.bincount(tokens.cpu(), minlength=vocab).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0, "draws outside the kept set"
    if INTERPRET:
        return
    expected = probs[kept] * draws
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
    dof = int(kept.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), f"chi2 {chi2:.1f} for {dof} degrees of freedom"


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_opcheck(native_device, transposed):
    """Fake tensors must match the kernels, strides included (a transposed input gives a
    row-major output)."""
    device = native_device
    logits = _logits(80, 4, device).t() if transposed else _logits(4, 80, device)
    uniform = torch.rand(4, device=device)
    torch.library.opcheck(torch.ops.pyminigpt.top_k_top_p_filter, (logits, 10, 0.9, 1))
    torch.library.opcheck(torch.ops.pyminigpt.sample, (logits, 0.8, 10, 0.9, uniform))


def test_cpu_kernel_rejects_bad_arguments():
    if "cpu" not in ops.available_backends():
        pytest.skip("the cpu backend is not built on this install")
    logits, uniform = _logits(2, 80, "cpu"), torch.rand(2)
    with pytest.raises(RuntimeError, match="temperature must be"):
        torch.ops.pyminigpt.sample(logits, 0.0, 0, 1.0, uniform)
    with pytest.raises(RuntimeError, match="top_p must be in"):
        torch.ops.pyminigpt.top_k_top_p_filter(logits, 0, 1.5, 1)
    with pytest.raises(RuntimeError, match="top_k must be >= 0"):
        torch.ops.pyminigpt.top_k_top_p_filter(logits, -1, 0.9, 1)
    with pytest.raises(RuntimeError, match="uniform must be"):
        torch.ops.pyminigpt.sample(logits, 1.0, 0, 1.0, torch.rand(3))
