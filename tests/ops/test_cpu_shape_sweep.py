"""Random shapes through every C++ CPU kernel, against the reference ops.

The op tests list their awkward shapes by hand; this sweep draws them (seeded, so a failure
replays): sequence lengths on both sides of the 64-row tiles, head dims that are and are not
multiples of the vector width, q, k, v as views of a fused projection or slices of a KV cache,
rows of 1 to 5000 columns. Its main use is `make test-sanitized`, which runs it against the
kernels built with AddressSanitizer: an access past a buffer that leaves every value right (the
CPU attention backward had one, found by a CI crash) fails there, at the shapes where it happens.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from op_testing import (
    assert_draws_match_reference,
    assert_low_precision_close,
    assert_same_kept,
    attention_low_precision,
    near_top_p_threshold,
)

from pyminigpt.ops import available_backends, reference

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="the C++ CPU kernels are not built")

ops = torch.ops.pyminigpt


@pytest.fixture(params=range(48))
def rng(request):
    """One seeded draw of shapes per test case: a failure replays from its seed."""
    return random.Random(request.param)


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=str)
def dtype(request):
    return request.param


def _attention_shape(rng: random.Random):
    batch, heads = rng.randint(1, 3), rng.randint(1, 3)
    q_len = rng.choice([1, rng.randint(2, 70), rng.randint(60, 200)])
    kv_len = q_len + rng.choice([0, rng.randint(1, 200)])
    head_dim = rng.choice([rng.randint(1, 40), 64, 80, rng.randint(60, 140)])
    return batch, heads, q_len, kv_len, head_dim


def _attention_inputs(rng: random.Random, dtype):
    """q, k, v (B, H, T, D): packed, q, k, v views of one (B, T, 3, H, D) projection, or (with
    kv_len > q_len) k and v slices of a cache with spare positions."""
    batch, heads, q_len, kv_len, head_dim = _attention_shape(rng)
    layout = rng.choice(["packed", "strided"])
    if layout == "strided" and q_len == kv_len:
        qkv = torch.randn(batch, q_len, 3, heads, head_dim).to(dtype)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    spare = 8 if layout == "strided" else 0
    q = torch.randn(batch, heads, q_len, head_dim).to(dtype)
    k, v = (torch.randn(batch, heads, kv_len + spare, head_dim).to(dtype)[:, :, :kv_len] for _ in "kv")
    return q, k, v


def test_attention(rng, dtype):
    q, k, v = (t.detach().requires_grad_() for t in _attention_inputs(rng, dtype))
    scale = q.shape[-1] ** -0.5
    out, lse = ops.causal_attention_fwd(q, k, v, scale)
    grad_out = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).to(dtype).transpose(1, 2)
    grads = ops.causal_attention_bwd(grad_out, q, k, v, out, lse, scale)

    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = reference.causal_attention(*exact_inputs, scale)
    exact_grads = torch.autograd.grad(exact, exact_inputs, grad_out.double())
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    low_out = attention_low_precision(*low, scale)
    low_grads = torch.autograd.grad(low_out, low, grad_out)
    assert_low_precision_close(out, exact, low_out)
    for got, want, yardstick in zip(grads, exact_grads, low_grads):
        assert_low_precision_close(got, want, yardstick, factor=3.0)


def _rows(rng: random.Random, dtype):
    rows = rng.randint(1, 70)
    cols = rng.choice([1, rng.randint(2, 100), rng.randint(100, 5000)])
    return torch.randn(rows, cols).to(dtype)


def _assert_close_to_exact(got, exact, low_precision):
    """The kernel's error is at most 3x that of the reference op run in the input's dtype,
    plus 1e-3 of the result's magnitude (one column: rstd = 1/sqrt(eps) magnifies roundings)."""
    assert_low_precision_close(got, exact, low_precision, factor=3.0, atol=1e-3 * (exact.abs().max().item() + 1.0))


def test_layer_norm_and_softmax(rng, dtype):
    x = _rows(rng, dtype)
    weight, bias = torch.randn(x.shape[1]).to(dtype), torch.randn(x.shape[1]).to(dtype)
    grad_y = torch.randn_like(x)
    y, mean, rstd = ops.layer_norm_fwd(x, weight, bias, 1e-5)
    grads = ops.layer_norm_bwd(grad_y, x, weight, mean, rstd)
    exact_inputs = [t.double().requires_grad_() for t in (x, weight, bias)]
    exact = F.layer_norm(exact_inputs[0], x.shape[1:], *exact_inputs[1:], 1e-5)
    exact_grads = torch.autograd.grad(exact, exact_inputs, grad_y.double())
    low_inputs = [t.detach().requires_grad_() for t in (x, weight, bias)]
    low = reference.layer_norm(*low_inputs)
    low_grads = torch.autograd.grad(low, low_inputs, grad_y)
    for got, want, yardstick in zip((y, *grads), (exact, *exact_grads), (low, *low_grads)):
        _assert_close_to_exact(got, want.detach(), yardstick.detach())

    temperature = rng.choice([0.7, 1.0, 1.6])
    probs = ops.softmax_fwd(x, temperature)
    grad = ops.softmax_bwd(probs, grad_y, temperature)
    exact_x = x.double().requires_grad_()
    exact = reference.softmax(exact_x, temperature)
    (exact_grad,) = torch.autograd.grad(exact, exact_x, grad_y.double())
    low_x = x.detach().requires_grad_()
    low = reference.softmax(low_x, temperature)
    (low_grad,) = torch.autograd.grad(low, low_x, grad_y)
    _assert_close_to_exact(probs, exact.detach(), low.detach())
    _assert_close_to_exact(grad, exact_grad, low_grad)


def test_filter_sample_and_linear(rng, dtype):
    logits = _rows(rng, dtype)
    vocab = logits.shape[1]
    top_k, top_p = rng.choice([0, 1, rng.randint(1, vocab)]), rng.choice([1.0, 0.9, 0.3])
    min_keep = rng.randint(1, 3)
    assert_same_kept(
        ops.top_k_top_p_filter(logits, top_k, top_p, min_keep),
        reference.top_k_top_p_filter(logits, top_k, top_p, min_keep),
        logits,
        near_top_p_threshold(logits, top_k, top_p),
    )
    temperature, uniform = rng.choice([0.7, 1.0]), torch.rand(logits.shape[0])
    tokens = ops.sample(logits, temperature, top_k, top_p, uniform)
    assert_draws_match_reference(tokens, logits, temperature, top_k, top_p, uniform)

    x = torch.randn(rng.randint(1, 9), vocab).to(dtype)
    n = rng.randint(1, 300)
    # nn.Linear's (N, K), or stored (K, N) and passed transposed, as GPT-2's Conv1D (the other kernel)
    weight = torch.randn(n, vocab).to(dtype) if rng.random() < 0.5 else torch.randn(vocab, n).to(dtype).t()
    bias = torch.randn(weight.shape[0]).to(dtype) if rng.random() < 0.5 else None
    got = ops.linear(x, weight, bias)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    scale = (x.double().abs() @ weight.double().abs().T).max().item() + 1.0
    assert (got.double() - expected).abs().max().item() / scale < (1e-5 if dtype == torch.float32 else 2e-2)
