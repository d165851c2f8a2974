"""GPU benchmarks of the CUDA C++ kernels against eager PyTorch and the strongest peer.

One pytest-benchmark group per op, size and dtype; its members are `eager` (the reference
in pyminigpt.ops.reference), the peer (F.layer_norm, torch.softmax,
F.scaled_dot_product_attention, transformers' sort-based sampling chain) and `cuda` (the
custom operators `torch.ops.pyminigpt.*` on CUDA tensors, i.e. csrc/cuda/, without the
public functions' argument checks). Every member is timed with triton.testing.do_bench
(median after warm-up; random inputs, never zeros) and reported, in extra_info and in the
table `cuda_gpu.md` written to $PYMINIGPT_RESULTS_DIR (bench/gpu_check.sh sets it), as
GB/s and fraction of the measured copy bandwidth (memory-bound ops) or TFLOP/s and
fraction of the measured bf16 matmul rate (attention), and as a ratio to the peer, with the
target of each group and whether it is met.

Skipped without a CUDA device or without the CUDA kernels in pyminigpt._C.

    pytest bench/test_bench_cuda_gpu.py --benchmark-group-by=group
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks: no CUDA device", allow_module_level=True)

from pyminigpt.ops import library  # loads pyminigpt._C and its autograd formulas

if not library.has_kernel("softmax_fwd", "CUDA"):
    pytest.skip("GPU benchmarks: pyminigpt._C was built without the CUDA kernels", allow_module_level=True)

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

ops = torch.ops.pyminigpt


@pytest.fixture(scope="module")
def table(roofline):
    table = KernelTable(roofline, "cuda", "CUDA C++ kernels")
    yield table
    table.write("cuda_gpu.md")


# ---- layer norm -----------------------------------------------------------------------

LAYER_NORM_SIZES = [(16384, 768), (8192, 1600), (8192, 4096), (4096, 8192)]


def _layer_norm_member(member):
    return {
        "eager": lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
        "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
        "cuda": lambda x, w, b: ops.layer_norm_fwd(x, w, b, 1e-5)[0],
    }[member]


@pytest.mark.parametrize("member", ["eager", "torch", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_name)
@pytest.mark.parametrize("size", LAYER_NORM_SIZES, ids=size_name)
def test_layer_norm_forward(benchmark, table, size, dtype, member):
    x, w, b = layer_norm_inputs(*size, dtype)
    fn = _layer_norm_member(member)
    group = f"layer_norm fwd {size_name(size)} {dtype_name(dtype)}"
    target = ("ceiling", 0.8) if size[1] >= 4096 else ("peer", 1.0)
    with torch.no_grad():
        table.measure(
            benchmark, group, member, lambda: fn(x, w, b), bytes_moved=2 * x.nbytes, peer="torch", target=target
        )


@pytest.mark.parametrize("member", ["eager", "torch", "cuda"])
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


@pytest.mark.parametrize("member", ["eager", "torch", "cuda"])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=_softmax_case_name)
def test_softmax_forward(benchmark, table, case, member):
    size, dtype = case
    x = torch.randn(size, device=DEVICE, dtype=dtype) * 3
    fn = {
        "eager": lambda: reference.softmax(x, 0.8),
        "torch": lambda: torch.softmax(x, dim=-1),  # the peer at temperature 1: one kernel, same bytes
        "cuda": lambda: ops.softmax_fwd(x, 0.8),
    }[member]
    group = f"softmax fwd {size_name(size)} {dtype_name(dtype)}"
    table.measure(benchmark, group, member, fn, bytes_moved=2 * x.nbytes, peer="torch", target=("ceiling", 0.8))


@pytest.mark.parametrize("member", ["torch", "cuda"])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=_softmax_case_name)
def test_softmax_backward(benchmark, table, case, member):
    size, dtype = case
    y = torch.softmax(torch.randn(size, device=DEVICE, dtype=torch.float32) * 3, dim=-1).to(dtype)
    grad_y = torch.randn_like(y)
    fn = {
        "torch": lambda: torch._softmax_backward_data(grad_y, y, -1, dtype),
        "cuda": lambda: ops.softmax_bwd(y, grad_y, 0.8),
    }[member]
    group = f"softmax bwd {size_name(size)} {dtype_name(dtype)}"
    table.measure(benchmark, group, member, fn, bytes_moved=3 * y.nbytes, peer="torch", target=("ceiling", 0.8))


# ---- causal attention -----------------------------------------------------------------

# bf16, 16384 tokens per batch, model width 2048: (head dim, sequence length)
ATTENTION_CASES = [(d, t, member) for d in (64, 128) for t in (1024, 4096) for member in ("sdpa", "cuda")]


def _attention_member(member):
    return {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "cuda": lambda q, k, v: ops.causal_attention_fwd(q, k, v, q.shape[-1] ** -0.5)[0],
    }[member]


@pytest.mark.parametrize("d,t,member", ATTENTION_CASES, ids=str)
def test_attention_forward(benchmark, table, d, t, member):
    q, k, v = gpu_attention_inputs(d, t)
    fn = _attention_member(member)
    group = f"attention fwd bf16 D={d} T={t}"
    with torch.no_grad():
        table.measure(
            benchmark, group, member, lambda: fn(q, k, v), flops=causal_flops(q), peer="sdpa", target=("peer", 0.5)
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
        benchmark, group, member, forward_backward, flops=3.5 * causal_flops(q), peer="sdpa", target=("peer", 0.4)
    )


@pytest.mark.parametrize("member", ["sdpa", "cuda"])
@pytest.mark.parametrize("cache", [4096, 16384])
def test_attention_decode(benchmark, table, cache, member):
    """One new query against a KV cache: the split-K path (memory-bound: k and v read once)."""
    batch, heads, d = 8, 16, 64
    q = torch.randn(batch, heads, 1, d, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads, cache, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    fn = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),  # a single query sees the whole cache
        "cuda": lambda: ops.causal_attention_fwd(q, k, v, d**-0.5)[0],
    }[member]
    group = f"attention decode bf16 B={batch} H={heads} D={d} cache={cache}"
    with torch.no_grad():
        table.measure(benchmark, group, member, fn, bytes_moved=2 * k.nbytes, peer="sdpa", target=("ceiling", 0.6))


# ---- sampling -------------------------------------------------------------------------

VOCAB, TOP_K, TOP_P, TEMPERATURE = 50257, 50, 0.9, 0.8


@pytest.mark.parametrize("member", ["transformers", "eager", "cuda"])
@pytest.mark.parametrize("top_k", [TOP_K, 0])
@pytest.mark.parametrize("batch", [64, 256])
def test_sample(benchmark, table, batch, top_k, member):
    logits = torch.randn(batch, VOCAB, device=DEVICE) * 3
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def uniform():
        return torch.rand(batch, generator=generator, device=DEVICE)

    fn = {
        "transformers": lambda: transformers_sample(logits, TEMPERATURE, top_k, TOP_P, generator),
        "eager": lambda: reference.sample(logits, TEMPERATURE, top_k, TOP_P, uniform()),
        "cuda": lambda: ops.sample(logits, TEMPERATURE, top_k, TOP_P, uniform()),
    }[member]
    group = f"sample top_k={top_k} top_p={TOP_P} {batch}x{VOCAB} fp32"
    table.measure(benchmark, group, member, fn, bytes_moved=logits.nbytes, peer="transformers", target=("peer", 10.0))


@pytest.mark.parametrize("member", ["transformers", "cuda"])
@pytest.mark.parametrize("top_k,top_p", [(50, 0.9), (0, 0.9)])
def test_top_k_top_p_filter(benchmark, table, top_k, top_p, member):
    logits = torch.randn(64, VOCAB, device=DEVICE) * 3
    fn = {
        "transformers": lambda: transformers_filter(logits, top_k, top_p),
        "cuda": lambda: ops.top_k_top_p_filter(logits, top_k, top_p, 1),
    }[member]
    group = f"top_k_top_p_filter top_k={top_k} top_p={top_p} 64x{VOCAB} fp32"
    table.measure(benchmark, group, member, fn, bytes_moved=2 * logits.nbytes, peer="transformers")
