"""Top-k / top-p filter and sampling benchmarks at GPT-2's vocabulary, one group per op
and setting: the eager reference, transformers' chain (TopKLogitsWarper, TopPLogitsWarper,
softmax, torch.multinomial: a full sort, cumsum and scatter) and every kernel backend.

    pytest bench/test_bench_sampling.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from pyminigpt import ops
from pyminigpt.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = [b for b in ops.available_backends() if b in (("cuda", "triton") if DEVICE == "cuda" else ("cpu",))]
BATCH, VOCAB = 64, 50257
# (top_k, top_p): the usual setting, top-p alone over the whole vocabulary, top-k alone
SETTINGS = [(50, 0.9), (0, 0.9), (50, 1.0)]
TEMPERATURE = 0.8


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _transformers_filter(logits, top_k, top_p):
    if top_k > 0:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return logits


def _filter_member(name: str):
    if name == "transformers":
        return lambda logits, k, p: _transformers_filter(logits, k, p)
    if name == "eager":
        return lambda logits, k, p: reference.top_k_top_p_filter(logits, k, p)

    def kernel(logits, k, p):
        with ops.use_backend(name, strict=True):
            return ops.top_k_top_p_filter(logits, k, p)

    return kernel


def _sample_member(name: str, generator: torch.Generator):
    if name == "transformers":  # what GenerationMixin does per step
        return lambda logits, k, p: torch.multinomial(
            torch.softmax(_transformers_filter(logits / TEMPERATURE, k, p), dim=-1), 1, generator=generator
        )[:, 0]
    if name == "eager":
        return lambda logits, k, p: reference.sample(
            logits, TEMPERATURE, k, p, torch.rand(logits.shape[0], generator=generator, device=DEVICE)
        )

    def kernel(logits, k, p):
        with ops.use_backend(name, strict=True):
            return ops.sample_unchecked(logits, TEMPERATURE, k, p, generator)

    return kernel


def _logits() -> torch.Tensor:
    return torch.randn(BATCH, VOCAB, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0)) * 2.5


def _label(top_k, top_p) -> str:
    return f"{BATCH}x{VOCAB} k={top_k} p={top_p}"


@pytest.mark.parametrize("member", ["transformers", "eager", *KERNELS])
@pytest.mark.parametrize("top_k, top_p", SETTINGS, ids=[f"k{k}-p{p}" for k, p in SETTINGS])
def test_top_k_top_p_filter(benchmark, top_k, top_p, member):
    benchmark.group = f"top_k_top_p_filter {_label(top_k, top_p)}"
    logits, fn = _logits(), _filter_member(member)

    def run():
        out = fn(logits, top_k, top_p)
        _sync()
        return out

    benchmark(run)


@pytest.mark.parametrize("member", ["transformers", "eager", *KERNELS])
@pytest.mark.parametrize("top_k, top_p", SETTINGS, ids=[f"k{k}-p{p}" for k, p in SETTINGS])
def test_sample(benchmark, top_k, top_p, member):
    benchmark.group = f"sample T={TEMPERATURE} {_label(top_k, top_p)}"
    logits = _logits()
    fn = _sample_member(member, torch.Generator(DEVICE).manual_seed(0))

    def run():
        out = fn(logits, top_k, top_p)
        _sync()
        return out

    benchmark(run)
