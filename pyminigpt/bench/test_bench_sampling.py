"""Top-k / top-p filter and sampling benchmarks at GPT-2's vocabulary, one group per op
and setting: eager (plain fp32 PyTorch: the reference filter; for `sample` then softmax and
torch.multinomial over the filtered logits), transformers' chain (TopKLogitsWarper,
TopPLogitsWarper, softmax, torch.multinomial: a full sort, cumsum and scatter) and every
kernel backend. The float64 oracle `reference.sample` is for the tests, not a baseline.

    pytest pyminigpt/bench/test_bench_sampling.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch

from pyminigpt import ops
from pyminigpt.bench.utils import DEVICE, KERNELS, on_backend, synced, transformers_filter, transformers_sample
from pyminigpt.ops import reference

BATCH, VOCAB = 64, 50257
# (top_k, top_p): the usual setting, top-p alone over the whole vocabulary, top-k alone
SETTINGS = [(50, 0.9), (0, 0.9), (50, 1.0)]
TEMPERATURE = 0.8

# every test: one group per setting, one member per implementation
pytestmark = [
    pytest.mark.parametrize("top_k, top_p", SETTINGS, ids=[f"k{k}-p{p}" for k, p in SETTINGS]),
    pytest.mark.parametrize("member", ["transformers", "eager", *KERNELS]),
]


def _filter_member(name: str):
    if name == "transformers":
        return transformers_filter
    if name == "eager":
        return reference.top_k_top_p_filter
    return on_backend(name, ops.top_k_top_p_filter)


def _sample_member(name: str, generator: torch.Generator):
    if name == "transformers":  # what GenerationMixin does per step
        return lambda logits, k, p: transformers_sample(logits, TEMPERATURE, k, p, generator)
    if name == "eager":
        return lambda logits, k, p: eager_sample(logits, TEMPERATURE, k, p, generator)
    return on_backend(name, lambda logits, k, p: ops.sample_unchecked(logits, TEMPERATURE, k, p, generator))


def eager_sample(logits, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """Plain fp32 PyTorch: temperature, the reference filter, softmax, torch.multinomial. (B,) int64."""
    probs = torch.softmax(reference.top_k_top_p_filter(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _logits() -> torch.Tensor:
    return torch.randn(BATCH, VOCAB, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0)) * 2.5


def _label(top_k, top_p) -> str:
    return f"{BATCH}x{VOCAB} k={top_k} p={top_p}"


def test_top_k_top_p_filter(benchmark, top_k, top_p, member):
    benchmark.group = f"top_k_top_p_filter {_label(top_k, top_p)}"
    benchmark(synced(_filter_member(member), _logits(), top_k, top_p))


def test_sample(benchmark, top_k, top_p, member):
    benchmark.group = f"sample T={TEMPERATURE} {_label(top_k, top_p)}"
    fn = _sample_member(member, torch.Generator(DEVICE).manual_seed(0))
    benchmark(synced(fn, _logits(), top_k, top_p))
