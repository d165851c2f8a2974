"""Causal attention benchmarks: the eager reference, torch's scaled_dot_product_attention
(the peer) and every kernel backend, one group per direction and size.

Every member reports TFLOP/s: a forward does 4 * D flops per (query, visible key) pair,
which is 4 * B * H * Tq * Tk * D halved for causal attention with Tq = Tk; a backward 2.5x
that. Decoding (one query against a 1024-key cache) is memory-bound, so it also reports
the GB/s of reading k and v.

SDPA's `is_causal=True` aligns the mask top-left, so for decoding (Tq = 1, where our
bottom-right mask hides nothing) the peer runs with no mask.

    pytest pyminigpt/bench/test_bench_causal_attention.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyminigpt import ops
from pyminigpt.bench.utils import DEVICE, KERNELS, on_backend, synced
from pyminigpt.ops import reference

MEMBERS = ["eager", "sdpa", *KERNELS]
TRAINING = (4, 12, 1024, 1024, 64)  # (B, H, Tq, Tk, D): GPT-2 small heads, a 1024-token context
DECODE = (8, 12, 1, 1024, 64)  # one new token per sequence against a KV cache of 1024


def _member(name: str):
    if name == "eager":
        return reference.causal_attention
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-2] > 1)
    return on_backend(name, ops.causal_attention)


def _forward_flops(b, h, tq, tk, d) -> int:
    visible_pairs = tq * (tk - tq) + tq * (tq + 1) // 2  # query i sees i + (tk - tq) + 1 keys
    return 4 * b * h * visible_pairs * d


def _report(benchmark, flops: float, moved_bytes: int = 0) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    seconds = stats.stats.median
    benchmark.extra_info["TFLOP/s"] = round(flops / seconds / 1e12, 4)
    if moved_bytes:
        benchmark.extra_info["GB/s"] = round(moved_bytes / seconds / 1e9, 2)


def _inputs(shape, requires_grad=False):
    b, h, tq, tk, d = shape
    q = torch.randn(b, h, tq, d, device=DEVICE, requires_grad=requires_grad)
    k = torch.randn(b, h, tk, d, device=DEVICE, requires_grad=requires_grad)
    v = torch.randn(b, h, tk, d, device=DEVICE, requires_grad=requires_grad)
    return q, k, v


def _group(direction: str, shape) -> str:
    return "attention {} B{} H{} Tq{} Tk{} D{} fp32".format(direction, *shape)


@pytest.mark.parametrize("member", MEMBERS)
def test_attention_forward(benchmark, member):
    benchmark.group = _group("forward", TRAINING)
    q, k, v = _inputs(TRAINING)
    with torch.no_grad():
        benchmark.pedantic(synced(_member(member), q, k, v), rounds=5, warmup_rounds=1)
    _report(benchmark, _forward_flops(*TRAINING))


@pytest.mark.parametrize("member", MEMBERS)
def test_attention_forward_backward(benchmark, member):
    benchmark.group = _group("forward+backward", TRAINING)
    q, k, v = _inputs(TRAINING, requires_grad=True)
    grad_out = torch.randn_like(q)
    fn = _member(member)
    benchmark.pedantic(synced(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)), rounds=3, warmup_rounds=1)
    _report(benchmark, 3.5 * _forward_flops(*TRAINING))


@pytest.mark.parametrize("member", MEMBERS)
def test_attention_decode(benchmark, member):
    benchmark.group = _group("decode", DECODE)
    q, k, v = _inputs(DECODE)
    with torch.no_grad():
        benchmark.pedantic(synced(_member(member), q, k, v), rounds=30, warmup_rounds=2)
    _report(benchmark, _forward_flops(*DECODE), moved_bytes=2 * k.numel() * k.element_size())
