"""GPU benchmarks of the Triton kernels against eager PyTorch and the strongest peer.

One pytest-benchmark group per op, size and dtype; its members are `eager` (the reference
in pyminigpt.ops.reference), the peer (F.layer_norm, torch.softmax,
F.scaled_dot_product_attention, transformers' sort-based sampling chain) and `triton`
(the backend functions of pyminigpt.ops.triton: the custom operators, without the public
functions' argument checks). Every member is timed with triton.testing.do_bench (median of
~100 ms of runs after warm-up; random inputs, never zeros) and reported, in extra_info and
in the table `triton_gpu.md` written to $PYMINIGPT_RESULTS_DIR (bench/gpu_check.sh sets it),
as GB/s and fraction of the measured copy bandwidth (memory-bound ops) or TFLOP/s and
fraction of the measured bf16 matmul rate (attention), and as a ratio to the peer, with the
target of each group and whether it is met. The pytest-benchmark table beside it times
the same calls with a host clock and a synchronize per call.

Skipped without a CUDA device (these numbers only mean something on a GPU).

    pytest bench/test_bench_triton_gpu.py --benchmark-group-by=group
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks: no CUDA device", allow_module_level=True)

from bench_utils import (
    DEVICE,
    KernelTable,
    causal_flops,
    dtype_name,
    gpu_attention_inputs,
    layer_norm_inputs,
    size_name,
    transformers_filter,
    transformers_sample,
)

from pyminigpt.ops import reference
from pyminigpt.ops import triton as triton_ops


@pytest.fixture(scope="module")
def table(roofline):
    table = KernelTable(roofline, "triton", "Triton kernels")
    yield table
    table.write("triton_gpu.md")


# ---- layer norm -----------------------------------------------------------------------

LAYER_NORM_SIZES = [(16384, 768), (8192, 1600), (8192, 4096), (4096, 8192)]


def _layer_norm_member(member):
    return {
        "eager": lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
        "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
        "triton": lambda x, w, b: triton_ops.layer_norm(x, w, b, 1e-5),
    }[member]


@pytest.mark.parametrize("member", ["eager", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_name)
@pytest.mark.parametrize("size", LAYER_NORM_SIZES, ids=size_name)
def test_layer_norm_forward(benchmark, table, size, dtype, member):
    x, w, b = layer_norm_inputs(*size, dtype)
    fn = _layer_norm_member(member)
    group = f"layer_norm fwd {size_name(size)} {dtype_name(dtype)}"
    # >= 85% of copy bandwidth for wide rows; at GPT-2's 768, at least as fast as F.layer_norm
    c = size[1]
    target = ("ceiling", 0.85) if c >= 4096 else ("peer", 1.0) if c == 768 else None
    with torch.no_grad():
        table.measure(
            benchmark, group, member, lambda: fn(x, w, b), bytes_moved=2 * x.nbytes, peer="torch", target=target
        )


@pytest.mark.parametrize("member", ["eager", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_name)
@pytest.mark.parametrize("size", LAYER_NORM_SIZES, ids=size_name)
def test_layer_norm_backward(benchmark, table, size, dtype, member):
    x, w, b = layer_norm_inputs(*size, dtype, requires_grad=True)
    y = _layer_norm_member(member)(x, w, b)
    grad_y = torch.randn_like(y)
    group = f"layer_norm bwd {size_name(size)} {dtype_name(dtype)}"
    backward = functools.partial(torch.autograd.grad, y, (x, w, b), grad_y, retain_graph=True)
    # read x and dy, write dx
    table.measure(benchmark, group, member, backward, bytes_moved=3 * x.nbytes, peer="torch", target=("peer", 1.0))


# ---- softmax --------------------------------------------------------------------------

SOFTMAX_CASES = [((4096, 50257), torch.bfloat16), ((4096, 50257), torch.float32), ((16384, 1024), torch.bfloat16)]


def _softmax_case_name(case) -> str:
    return f"{size_name(case[0])}-{dtype_name(case[1])}"


@pytest.mark.parametrize("member", ["eager", "torch", "triton"])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=_softmax_case_name)
def test_softmax_forward(benchmark, table, case, member):
    size, dtype = case
    x = torch.randn(size, device=DEVICE, dtype=dtype) * 3
    fn = {
        "eager": lambda: reference.softmax(x, 0.8),
        "torch": lambda: torch.softmax(x, dim=-1),  # the peer at temperature 1: one kernel, same bytes
        "triton": lambda: triton_ops.softmax(x, 0.8),
    }[member]
    group = f"softmax fwd {size_name(size)} {dtype_name(dtype)}"
    target = ("ceiling", 0.85) if (size[1] == 50257 and dtype == torch.bfloat16) else None
    table.measure(benchmark, group, member, fn, bytes_moved=2 * x.nbytes, peer="torch", target=target)


# ---- causal attention -----------------------------------------------------------------

# bf16, 16384 tokens per batch, model width 2048: (head dim, sequence length); eager only
# up to 2048 (it holds B * H * T * T fp32)
ATTENTION_CASES = [
    (d, t, member)
    for d in (64, 128)
    for t in (2048, 4096, 8192)
    for member in (["eager", "sdpa", "triton"] if t <= 2048 else ["sdpa", "triton"])
]


def _attention_member(member):
    return {
        "eager": lambda q, k, v: reference.causal_attention(q, k, v),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "triton": lambda q, k, v: triton_ops.causal_attention(q, k, v, q.shape[-1] ** -0.5),
    }[member]


@pytest.mark.parametrize("d,t,member", ATTENTION_CASES, ids=str)
def test_attention_forward(benchmark, table, d, t, member):
    q, k, v = gpu_attention_inputs(d, t)
    fn = _attention_member(member)
    group = f"attention fwd bf16 D={d} T={t}"
    with torch.no_grad():
        table.measure(
            benchmark, group, member, lambda: fn(q, k, v), flops=causal_flops(q), peer="sdpa", target=("peer", 0.8)
        )


@pytest.mark.parametrize("d,t,member", ATTENTION_CASES, ids=str)
def test_attention_forward_backward(benchmark, table, d, t, member):
    q, k, v = gpu_attention_inputs(d, t, requires_grad=True)
    grad_out = torch.randn_like(q)
    fn = _attention_member(member)
    group = f"attention fwd+bwd bf16 D={d} T={t}"

    def forward_backward():
        return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

    table.measure(
        benchmark, group, member, forward_backward, flops=3.5 * causal_flops(q), peer="sdpa", target=("peer", 0.6)
    )


@pytest.mark.parametrize("member", ["sdpa", "triton"])
@pytest.mark.parametrize("cache", [4096, 16384])
def test_attention_decode(benchmark, table, cache, member):
    """One new query against a KV cache: the split-K path (memory-bound: k and v read once)."""
    batch, heads, d = 8, 16, 64
    q = torch.randn(batch, heads, 1, d, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads, cache, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    fn = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),  # a single query sees the whole cache
        "triton": lambda: triton_ops.causal_attention(q, k, v, d**-0.5),
    }[member]
    group = f"attention decode bf16 B={batch} H={heads} D={d} cache={cache}"
    with torch.no_grad():
        table.measure(benchmark, group, member, fn, bytes_moved=2 * k.nbytes, peer="sdpa")


# ---- sampling -------------------------------------------------------------------------

VOCAB, TOP_K, TOP_P, TEMPERATURE = 50257, 50, 0.9, 0.8


@pytest.mark.parametrize("member", ["transformers", "eager", "triton"])
@pytest.mark.parametrize("batch", [64, 256])
def test_sample(benchmark, table, batch, member):
    logits = torch.randn(batch, VOCAB, device=DEVICE) * 3
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def uniform():
        return torch.rand(batch, generator=generator, device=DEVICE)

    fn = {
        "transformers": lambda: transformers_sample(logits, TEMPERATURE, TOP_K, TOP_P, generator),
        "eager": lambda: reference.sample(logits, TEMPERATURE, TOP_K, TOP_P, uniform()),
        "triton": lambda: triton_ops.sample(logits, TEMPERATURE, TOP_K, TOP_P, uniform()),
    }[member]
    group = f"sample top_k={TOP_K} top_p={TOP_P} {batch}x{VOCAB} fp32"
    table.measure(benchmark, group, member, fn, bytes_moved=logits.nbytes, peer="transformers", target=("peer", 10.0))


@pytest.mark.parametrize("member", ["transformers", "triton"])
@pytest.mark.parametrize("top_k,top_p", [(50, 0.9), (0, 0.9)])
def test_top_k_top_p_filter(benchmark, table, top_k, top_p, member):
    logits = torch.randn(64, VOCAB, device=DEVICE) * 3
    fn = {
        "transformers": lambda: transformers_filter(logits, top_k, top_p),
        "triton": lambda: triton_ops.top_k_top_p_filter(logits, top_k, top_p, 1),
    }[member]
    group = f"top_k_top_p_filter top_k={top_k} top_p={top_p} 64x{VOCAB} fp32"
    table.measure(benchmark, group, member, fn, bytes_moved=2 * logits.nbytes, peer="transformers")
