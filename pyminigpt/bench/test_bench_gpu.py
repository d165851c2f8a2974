"""GPU benchmarks of the Triton and CUDA C++ kernels against eager PyTorch and the strongest peer.

One pytest-benchmark group per op, size and dtype; its members are `eager` (the reference in
pyminigpt.ops.reference), the peer (F.layer_norm, torch.softmax, F.scaled_dot_product_attention,
transformers' sort-based sampling chain) and each kernel backend: `triton` (kernels/, the
`torch.ops.pyminigpt_triton` operators) and `cuda` (csrc/cuda/, the `torch.ops.pyminigpt`
operators on CUDA tensors), called as custom operators, without the public functions'
argument checks. Eager and the peer are measured once and appear in both tables. Every member is timed with
triton.testing.do_bench (median of ~100 ms of runs after warm-up; random inputs, never
zeros) and reported, in extra_info and in the tables `triton_gpu.md` and `cuda_gpu.md`
written to $PYMINIGPT_RESULTS_DIR (bench/gpu_check.sh sets it), as GB/s and fraction of
the measured copy bandwidth (memory-bound ops) or TFLOP/s and fraction of the measured bf16
matmul rate (attention), and as a ratio to the peer, with the issue's target for that
kernel and whether it is met. The pytest-benchmark table beside it times the same calls
with a host clock and a synchronize per call.

Skipped without a CUDA device (these numbers only mean something on a GPU); a backend that
is not available (the extension built without CUDA, Triton missing) is not parametrized.

    pytest pyminigpt/bench/test_bench_gpu.py --benchmark-group-by=group
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks: no CUDA device", allow_module_level=True)

from pyminigpt.bench.utils import (
    DEVICE,
    KERNELS,
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

if not KERNELS:
    pytest.skip("GPU benchmarks: neither the cuda nor the triton backend is available", allow_module_level=True)

TITLES = {"triton": "Triton kernels", "cuda": "CUDA C++ kernels"}

# The targets of issue 5 (Triton) and issue 6 (CUDA C++) on an H100 / H200:
# ("ceiling", fraction of the measured ceiling) or ("peer", speedup over the peer).
TARGETS = {
    "triton": {
        "layer_norm fwd wide": ("ceiling", 0.85),  # N >= 4096
        "layer_norm fwd 768": ("peer", 1.0),  # GPT-2's width, where fused norms often lose
        "layer_norm bwd": ("peer", 1.0),
        "softmax fwd 50257 bf16": ("ceiling", 0.85),
        "attention fwd": ("peer", 0.8),
        "attention fwd+bwd": ("peer", 0.6),
        "sample": ("peer", 10.0),
    },
    "cuda": {
        "layer_norm fwd wide": ("ceiling", 0.8),
        "softmax fwd": ("ceiling", 0.8),  # every size here is large
        "attention fwd T=4096": ("peer", 0.5),
        "sample": ("peer", 10.0),
    },
}


def target(member: str, *names: str):
    """The target of a kernel member for the first of `names` (most specific first) that has
    one; None for the other members."""
    targets = TARGETS.get(member, {})
    return next((targets[n] for n in names if n in targets), None)


def kernel_ops(kernel: str):
    """The custom operators of a kernel backend; both namespaces have the same schemas."""
    if kernel == "triton":
        import pyminigpt.ops.triton  # noqa: F401  (registers torch.ops.pyminigpt_triton)

        return torch.ops.pyminigpt_triton
    return torch.ops.pyminigpt


@pytest.fixture(scope="module")
def tables(roofline):
    """One KernelTable per kernel backend, each written as <backend>_gpu.md at the end."""
    tables = {kernel: KernelTable(roofline, kernel, TITLES[kernel]) for kernel in KERNELS}
    yield tables
    for kernel, table in tables.items():
        if table.rows:
            table.write(f"{kernel}_gpu.md")


def _role(member: str) -> str:
    """The key of a member's function below: "kernel" for every kernel backend, else the member."""
    return "kernel" if member in KERNELS else member


@pytest.fixture
def record(tables, benchmark, member):
    """record(group, fn, *, bytes_moved= or flops=, peer=, target=None): times fn once
    (KernelTable.measure) as this test's member. A kernel's row goes to its own table, an eager
    or peer row to every table, so each is measured once however many kernels there are."""

    def measure(group, fn, *, target=None, **rate):
        owners = [member] if member in tables else list(tables)
        row = tables[owners[0]].measure(benchmark, group, member, fn, target=target, **rate)
        for kernel in owners[1:]:
            tables[kernel].rows.append(dict(row))

    return measure


# ---- layer norm -----------------------------------------------------------------------

LAYER_NORM_SIZES = [(16384, 768), (8192, 1600), (8192, 4096), (4096, 8192)]


def _layer_norm_member(member):
    return {
        "eager": lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
        "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
        "kernel": lambda x, w, b: kernel_ops(member).layer_norm_fwd(x, w, b, 1e-5)[0],
    }[_role(member)]


@pytest.mark.parametrize("member", ["eager", "torch", *KERNELS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_name)
@pytest.mark.parametrize("size", LAYER_NORM_SIZES, ids=size_name)
def test_layer_norm_forward(record, size, dtype, member):
    x, w, b = layer_norm_inputs(*size, dtype)
    fn = _layer_norm_member(member)
    group = f"layer_norm fwd {size_name(size)} {dtype_name(dtype)}"
    width = "wide" if size[1] >= 4096 else str(size[1])
    with torch.no_grad():
        record(
            group,
            lambda: fn(x, w, b),
            bytes_moved=2 * x.nbytes,
            peer="torch",
            target=target(member, f"layer_norm fwd {width}"),
        )


@pytest.mark.parametrize("member", ["eager", "torch", *KERNELS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_name)
@pytest.mark.parametrize("size", LAYER_NORM_SIZES, ids=size_name)
def test_layer_norm_backward(record, size, dtype, member):
    x, w, b = layer_norm_inputs(*size, dtype, requires_grad=True)
    y = _layer_norm_member(member)(x, w, b)
    grad_y = torch.randn_like(y)
    group = f"layer_norm bwd {size_name(size)} {dtype_name(dtype)}"
    backward = functools.partial(torch.autograd.grad, y, (x, w, b), grad_y, retain_graph=True)
    record(
        group,
        backward,
        bytes_moved=3 * x.nbytes,  # read x and dy, write dx
        peer="torch",
        target=target(member, "layer_norm bwd"),
    )


# ---- softmax --------------------------------------------------------------------------

SOFTMAX_CASES = [((4096, 50257), torch.bfloat16), ((4096, 50257), torch.float32), ((16384, 1024), torch.bfloat16)]


def _softmax_case_name(case) -> str:
    return f"{size_name(case[0])}-{dtype_name(case[1])}"


@pytest.mark.parametrize("member", ["eager", "torch", *KERNELS])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=_softmax_case_name)
def test_softmax_forward(record, case, member):
    size, dtype = case
    x = torch.randn(size, device=DEVICE, dtype=dtype) * 3
    fn = {
        "eager": lambda: reference.softmax(x, 0.8),
        "torch": lambda: torch.softmax(x, dim=-1),  # the peer at temperature 1: one kernel, same bytes
        "kernel": lambda: kernel_ops(member).softmax_fwd(x, 0.8),
    }[_role(member)]
    group = f"softmax fwd {size_name(size)} {dtype_name(dtype)}"
    record(
        group,
        fn,
        bytes_moved=2 * x.nbytes,
        peer="torch",
        target=target(member, f"softmax fwd {size[1]} {dtype_name(dtype)}", "softmax fwd"),
    )


@pytest.mark.parametrize("member", ["torch", *KERNELS])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=_softmax_case_name)
def test_softmax_backward(record, case, member):
    size, dtype = case
    y = torch.softmax(torch.randn(size, device=DEVICE, dtype=torch.float32) * 3, dim=-1).to(dtype)
    grad_y = torch.randn_like(y)
    fn = {
        "torch": lambda: torch._softmax_backward_data(grad_y, y, -1, dtype),
        "kernel": lambda: kernel_ops(member).softmax_bwd(y, grad_y, 0.8),
    }[_role(member)]
    group = f"softmax bwd {size_name(size)} {dtype_name(dtype)}"
    record(group, fn, bytes_moved=3 * y.nbytes, peer="torch")


# ---- causal attention -----------------------------------------------------------------

# bf16, 16384 tokens per batch, model width 2048: (head dim, sequence length, member);
# eager only up to 2048 (it holds B * H * T * T fp32)
ATTENTION_CASES = [
    (d, t, member)
    for d in (64, 128)
    for t in (2048, 4096, 8192)
    for member in (["eager", "sdpa", *KERNELS] if t <= 2048 else ["sdpa", *KERNELS])
]


def _attention_member(member):
    return {
        "eager": lambda q, k, v: reference.causal_attention(q, k, v),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "kernel": lambda q, k, v: kernel_ops(member).causal_attention_fwd(q, k, v, q.shape[-1] ** -0.5)[0],
    }[_role(member)]


@pytest.mark.parametrize("d,t,member", ATTENTION_CASES, ids=str)
def test_attention_forward(record, d, t, member):
    q, k, v = gpu_attention_inputs(d, t)
    fn = _attention_member(member)
    group = f"attention fwd bf16 D={d} T={t}"
    with torch.no_grad():
        record(
            group,
            lambda: fn(q, k, v),
            flops=causal_flops(q),
            peer="sdpa",
            target=target(member, f"attention fwd T={t}", "attention fwd"),
        )


@pytest.mark.parametrize("d,t,member", ATTENTION_CASES, ids=str)
def test_attention_forward_backward(record, d, t, member):
    q, k, v = gpu_attention_inputs(d, t, requires_grad=True)
    grad_out = torch.randn_like(q)
    fn = _attention_member(member)
    group = f"attention fwd+bwd bf16 D={d} T={t}"

    def forward_backward():
        return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

    record(
        group,
        forward_backward,
        flops=3.5 * causal_flops(q),
        peer="sdpa",
        target=target(member, "attention fwd+bwd"),
    )


@pytest.mark.parametrize("member", ["sdpa", *KERNELS])
def test_attention_model_layout(record, member):
    """Forward + backward as a GPT-2-124M layer calls it at B=8, T=1024: q, k, v are views of
    one fused (B, T, 3, H, D) projection, the gradient goes to that projection, and grad_out
    is a transposed (B, T, H, D). Every member reads these in place; a kernel that copied its
    inputs would pay for it here, not in the packed groups above."""
    batch, t, heads, d = 8, 1024, 12, 64
    qkv = torch.randn(batch, t, 3, heads, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(batch, t, heads, d, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    fn = _attention_member(member)

    def forward_backward():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return torch.autograd.grad(fn(q, k, v), qkv, grad_out)

    group = f"attention fwd+bwd bf16 GPT-2 layer layout B={batch} H={heads} T={t} D={d}"
    record(group, forward_backward, flops=3.5 * causal_flops(grad_out), peer="sdpa")


@pytest.mark.parametrize("member", ["sdpa", *KERNELS])
@pytest.mark.parametrize("cache", [4096, 16384])
def test_attention_decode(record, cache, member):
    """One new query against a KV cache: the split-K path (memory-bound: k and v read once)."""
    batch, heads, d = 8, 16, 64
    q = torch.randn(batch, heads, 1, d, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads, cache, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    fn = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),  # a single query sees the whole cache
        "kernel": lambda: kernel_ops(member).causal_attention_fwd(q, k, v, d**-0.5)[0],
    }[_role(member)]
    group = f"attention decode bf16 B={batch} H={heads} D={d} cache={cache}"
    with torch.no_grad():
        record(group, fn, bytes_moved=2 * k.nbytes, peer="sdpa")


# ---- sampling -------------------------------------------------------------------------

VOCAB, TOP_K, TOP_P, TEMPERATURE = 50257, 50, 0.9, 0.8


@pytest.mark.parametrize("member", ["transformers", "eager", *KERNELS])
@pytest.mark.parametrize("top_k", [TOP_K, 0])
@pytest.mark.parametrize("batch", [64, 256])
def test_sample(record, batch, top_k, member):
    logits = torch.randn(batch, VOCAB, device=DEVICE) * 3
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def uniform():
        return torch.rand(batch, generator=generator, device=DEVICE)

    fn = {
        "transformers": lambda: transformers_sample(logits, TEMPERATURE, top_k, TOP_P, generator),
        "eager": lambda: reference.sample(logits, TEMPERATURE, top_k, TOP_P, uniform()),
        "kernel": lambda: kernel_ops(member).sample(logits, TEMPERATURE, top_k, TOP_P, uniform()),
    }[_role(member)]
    group = f"sample top_k={top_k} top_p={TOP_P} {batch}x{VOCAB} fp32"
    record(
        group,
        fn,
        bytes_moved=logits.nbytes,
        peer="transformers",
        target=target(member, "sample"),
    )


@pytest.mark.parametrize("member", ["transformers", *KERNELS])
@pytest.mark.parametrize("top_k,top_p", [(50, 0.9), (0, 0.9)])
def test_top_k_top_p_filter(record, top_k, top_p, member):
    logits = torch.randn(64, VOCAB, device=DEVICE) * 3
    fn = {
        "transformers": lambda: transformers_filter(logits, top_k, top_p),
        "kernel": lambda: kernel_ops(member).top_k_top_p_filter(logits, top_k, top_p, 1),
    }[_role(member)]
    group = f"top_k_top_p_filter top_k={top_k} top_p={top_p} 64x{VOCAB} fp32"
    record(group, fn, bytes_moved=2 * logits.nbytes, peer="transformers")
