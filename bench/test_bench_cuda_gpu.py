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

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks: no CUDA device", allow_module_level=True)

from pyminigpt.ops import library  # loads pyminigpt._C and its autograd formulas

if not library.has_kernel("softmax_fwd", "CUDA"):
    pytest.skip("GPU benchmarks: pyminigpt._C was built without the CUDA kernels", allow_module_level=True)

import gpu_roofline  # bench/ is on sys.path for its test modules
from transformers import TopKLogitsWarper, TopPLogitsWarper
from triton.testing import do_bench

from pyminigpt.ops import reference

ops = torch.ops.pyminigpt
DEVICE = "cuda"
ROWS: list[dict] = []  # one per (group, member), for the table


@pytest.fixture(scope="module")
def roofline() -> dict:
    return gpu_roofline.measure(DEVICE)


def _table(roofline) -> str:
    ceilings = f"copy {roofline['copy_GBps']} GB/s (read + write), bf16 matmul {roofline['matmul_bf16_TFLOPs']} TFLOP/s"
    lines = [
        f"# CUDA C++ kernels on {roofline['device']}",
        "",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}); measured {ceilings}. Medians of do_bench.",
        "",
        "| group | member | median ms | rate | of ceiling | peer ms / this | target | met |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for row in ROWS:
        peer = next((r for r in ROWS if r["group"] == row["group"] and r["member"] == row["peer"]), None)
        speedup = peer["ms"] / row["ms"] if peer else None
        target = met = ""
        if row["member"] == "cuda" and row["target"]:
            kind, bound = row["target"]
            value = row["fraction"] if kind == "ceiling" else speedup
            target = f">= {bound:g} of ceiling" if kind == "ceiling" else f">= {bound:g}x {row['peer']}"
            met = "yes" if value is not None and value >= bound else "NO"
        lines.append(
            f"| {row['group']} | {row['member']} | {row['ms']:.4f} | {row['rate']} | {row['fraction']:.3f} | "
            f"{'' if speedup is None else f'{speedup:.2f}'} | {target} | {met} |"
        )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def _write_table(roofline):
    yield
    table = _table(roofline)
    print("\n" + table)
    results_dir = os.environ.get("PYMINIGPT_RESULTS_DIR")
    if results_dir:
        os.makedirs(results_dir, exist_ok=True)
        with open(os.path.join(results_dir, "cuda_gpu.md"), "w") as f:
            f.write(table)


def _measure(benchmark, roofline, group, member, fn, *, bytes_moved=None, flops=None, peer=None, target=None):
    """Time fn with do_bench (median) and pytest-benchmark; record rate and fraction of the ceiling."""
    fn()  # first call: module load, allocations
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    if flops is not None:
        tflops = flops / (ms * 1e-3) / 1e12
        rate, fraction = f"{tflops:.1f} TFLOP/s", tflops / roofline["matmul_bf16_TFLOPs"]
    else:
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        rate, fraction = f"{gbps:.0f} GB/s", gbps / roofline["copy_GBps"]
    ROWS.append(
        {"group": group, "member": member, "ms": ms, "rate": rate, "fraction": fraction, "peer": peer, "target": target}
    )
    benchmark.group = group
    benchmark.extra_info.update(median_ms_do_bench=round(ms, 5), rate=rate, fraction_of_ceiling=round(fraction, 3))

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, warmup_rounds=2)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- layer norm -----------------------------------------------------------------------

LAYER_NORM_SIZES = [(16384, 768), (8192, 1600), (8192, 4096), (4096, 8192)]


def _layer_norm_inputs(n, c, dtype, requires_grad=False):
    x = torch.randn(n, c, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    w = (torch.rand(c, device=DEVICE, dtype=dtype) + 0.5).requires_grad_(requires_grad)
    b = torch.randn(c, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    return x, w, b


def _layer_norm_member(member):
    return {
        "eager": lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
        "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
        "cuda": lambda x, w, b: ops.layer_norm_fwd(x, w, b, 1e-5)[0],
    }[member]


@pytest.mark.parametrize("member", ["eager", "torch", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_dtype_name)
@pytest.mark.parametrize("size", LAYER_NORM_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_norm_forward(benchmark, roofline, size, dtype, member):
    n, c = size
    x, w, b = _layer_norm_inputs(n, c, dtype)
    fn = _layer_norm_member(member)
    with torch.no_grad():
        _measure(
            benchmark,
            roofline,
            f"layer_norm fwd {n}x{c} {_dtype_name(dtype)}",
            member,
            lambda: fn(x, w, b),
            bytes_moved=2 * x.numel() * x.element_size(),
            peer="torch",
            target=("ceiling", 0.8) if c >= 4096 else ("peer", 1.0),
        )


@pytest.mark.parametrize("member", ["eager", "torch", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_dtype_name)
@pytest.mark.parametrize("size", LAYER_NORM_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_norm_backward(benchmark, roofline, size, dtype, member):
    n, c = size
    x, w, b = _layer_norm_inputs(n, c, dtype, requires_grad=True)
    y = _layer_norm_member(member)(x, w, b)
    grad_y = torch.randn_like(y)
    _measure(
        benchmark,
        roofline,
        f"layer_norm bwd {n}x{c} {_dtype_name(dtype)}",
        member,
        lambda: torch.autograd.grad(y, (x, w, b), grad_y, retain_graph=True),
        bytes_moved=3 * x.numel() * x.element_size(),  # read x, dy; write dx
        peer="torch",
        target=("peer", 1.0),
    )


# ---- softmax --------------------------------------------------------------------------

SOFTMAX_CASES = [((4096, 50257), torch.bfloat16), ((4096, 50257), torch.float32), ((16384, 1024), torch.bfloat16)]


@pytest.mark.parametrize("member", ["eager", "torch", "cuda"])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{_dtype_name(c[1])}")
def test_softmax_forward(benchmark, roofline, case, member):
    (n, v), dtype = case
    x = torch.randn(n, v, device=DEVICE, dtype=dtype) * 3
    fn = {
        "eager": lambda: reference.softmax(x, 0.8),
        "torch": lambda: torch.softmax(x, dim=-1),  # the peer at temperature 1: one kernel, same bytes
        "cuda": lambda: ops.softmax_fwd(x, 0.8),
    }[member]
    _measure(
        benchmark,
        roofline,
        f"softmax fwd {n}x{v} {_dtype_name(dtype)}",
        member,
        fn,
        bytes_moved=2 * x.numel() * x.element_size(),
        peer="torch",
        target=("ceiling", 0.8),
    )


@pytest.mark.parametrize("member", ["torch", "cuda"])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{_dtype_name(c[1])}")
def test_softmax_backward(benchmark, roofline, case, member):
    (n, v), dtype = case
    y = torch.softmax(torch.randn(n, v, device=DEVICE, dtype=torch.float32) * 3, dim=-1).to(dtype)
    grad_y = torch.randn_like(y)
    fn = {
        "torch": lambda: torch._softmax_backward_data(grad_y, y, -1, dtype),
        "cuda": lambda: ops.softmax_bwd(y, grad_y, 0.8),
    }[member]
    _measure(
        benchmark,
        roofline,
        f"softmax bwd {n}x{v} {_dtype_name(dtype)}",
        member,
        fn,
        bytes_moved=3 * y.numel() * y.element_size(),
        peer="torch",
        target=("ceiling", 0.8),
    )


# ---- causal attention -----------------------------------------------------------------

# bf16, 16384 tokens per batch, model width 2048: (head dim, sequence length)
ATTENTION_CASES = [(d, t) for d in (64, 128) for t in (1024, 4096)]


def _attention_inputs(d, t, requires_grad=False):
    batch, heads = 16384 // t, 2048 // d
    return [
        torch.randn(batch, heads, t, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=requires_grad)
        for _ in range(3)
    ]


def _attention_member(member):
    return {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "cuda": lambda q, k, v: ops.causal_attention_fwd(q, k, v, q.shape[-1] ** -0.5)[0],
    }[member]


def _causal_flops(q):
    b, h, t, d = q.shape
    return 4 * b * h * t * t * d / 2


@pytest.mark.parametrize("d,t,member", [(d, t, m) for d, t in ATTENTION_CASES for m in ("sdpa", "cuda")], ids=str)
def test_attention_forward(benchmark, roofline, d, t, member):
    q, k, v = _attention_inputs(d, t)
    fn = _attention_member(member)
    with torch.no_grad():
        _measure(
            benchmark,
            roofline,
            f"attention fwd bf16 D={d} T={t}",
            member,
            lambda: fn(q, k, v),
            flops=_causal_flops(q),
            peer="sdpa",
            target=("peer", 0.5),
        )


@pytest.mark.parametrize("d,t,member", [(d, t, m) for d, t in ATTENTION_CASES for m in ("sdpa", "cuda")], ids=str)
def test_attention_forward_backward(benchmark, roofline, d, t, member):
    q, k, v = _attention_inputs(d, t, requires_grad=True)
    grad_out = torch.randn_like(q)
    fn = _attention_member(member)
    _measure(
        benchmark,
        roofline,
        f"attention fwd+bwd bf16 D={d} T={t}",
        member,
        lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out),
        flops=3.5 * _causal_flops(q),
        peer="sdpa",
        target=("peer", 0.4),
    )


@pytest.mark.parametrize("member", ["sdpa", "cuda"])
@pytest.mark.parametrize("cache", [4096, 16384])
def test_attention_decode(benchmark, roofline, cache, member):
    """One new query against a KV cache: the split-K path (memory-bound: k and v read once)."""
    batch, heads, d = 8, 16, 64
    q = torch.randn(batch, heads, 1, d, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads, cache, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    fn = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),  # a single query sees the whole cache
        "cuda": lambda: ops.causal_attention_fwd(q, k, v, d**-0.5)[0],
    }[member]
    with torch.no_grad():
        _measure(
            benchmark,
            roofline,
            f"attention decode bf16 B={batch} H={heads} D={d} cache={cache}",
            member,
            fn,
            bytes_moved=2 * k.numel() * k.element_size(),
            peer="sdpa",
            target=("ceiling", 0.6),
        )


# ---- sampling -------------------------------------------------------------------------

VOCAB, TOP_K, TOP_P, TEMPERATURE = 50257, 50, 0.9, 0.8


def _transformers_sample(logits, top_k, generator):
    """What transformers' generate does per step: warpers (topk, full sort, cumsum, scatter), softmax, multinomial."""
    scores = logits / TEMPERATURE
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(TOP_P)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]


@pytest.mark.parametrize("member", ["transformers", "eager", "cuda"])
@pytest.mark.parametrize("top_k", [TOP_K, 0])
@pytest.mark.parametrize("batch", [64, 256])
def test_sample(benchmark, roofline, batch, top_k, member):
    logits = torch.randn(batch, VOCAB, device=DEVICE) * 3
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def uniform():
        return torch.rand(batch, generator=generator, device=DEVICE)

    fn = {
        "transformers": lambda: _transformers_sample(logits, top_k, generator),
        "eager": lambda: reference.sample(logits, TEMPERATURE, top_k, TOP_P, uniform()),
        "cuda": lambda: ops.sample(logits, TEMPERATURE, top_k, TOP_P, uniform()),
    }[member]
    _measure(
        benchmark,
        roofline,
        f"sample top_k={top_k} top_p={TOP_P} {batch}x{VOCAB} fp32",
        member,
        fn,
        bytes_moved=logits.numel() * logits.element_size(),
        peer="transformers",
        target=("peer", 10.0),
    )


@pytest.mark.parametrize("member", ["transformers", "cuda"])
@pytest.mark.parametrize("top_k,top_p", [(50, 0.9), (0, 0.9)])
def test_top_k_top_p_filter(benchmark, roofline, top_k, top_p, member):
    logits = torch.randn(64, VOCAB, device=DEVICE) * 3

    def transformers_filter():
        scores = TopKLogitsWarper(top_k)(None, logits) if top_k else logits
        return TopPLogitsWarper(top_p)(None, scores)

    fn = {
        "transformers": transformers_filter,
        "cuda": lambda: ops.top_k_top_p_filter(logits, top_k, top_p, 1),
    }[member]
    _measure(
        benchmark,
        roofline,
        f"top_k_top_p_filter top_k={top_k} top_p={top_p} 64x{VOCAB} fp32",
        member,
        fn,
        bytes_moved=2 * logits.numel() * logits.element_size(),
        peer="transformers",
    )
