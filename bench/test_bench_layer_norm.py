"""Layer norm benchmarks: the eager reference, torch's F.layer_norm (the peer) and every
kernel backend, one group per direction, size and dtype.

Layer norm is memory-bound: each member reports GB/s (forward moves x in and y out;
forward + backward also moves dy and x in and dx out) and that as a fraction of the
measured copy bandwidth of this device.

    pytest bench/test_bench_layer_norm.py --benchmark-group-by=group
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from pyminigpt import ops
from pyminigpt.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = [b for b in ops.available_backends() if b in (("cuda", "triton") if DEVICE == "cuda" else ("cpu",))]
SIZES = [(8192, 768), (512, 768), (64, 50257)]
DTYPES = [torch.float32, torch.bfloat16]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write) on DEVICE."""
    src = torch.randn(32 * 2**20, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    _sync()
    return 10 * 2 * src.numel() * src.element_size() / (time.perf_counter() - start)


def _member(name: str, eps: float = 1e-5):
    if name == "eager":
        return lambda x, w, b: reference.layer_norm(x, w, b, eps)
    if name == "torch":
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, eps)

    def kernel(x, w, b):
        with ops.use_backend(name, strict=True):
            return ops.layer_norm(x, w, b, eps)

    return kernel


def _report(benchmark, moved_bytes: int, copy_bandwidth: float) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    gbps = moved_bytes / stats.stats.median / 1e9
    benchmark.extra_info["GB/s"] = round(gbps, 2)
    benchmark.extra_info["fraction_of_copy"] = round(gbps * 1e9 / copy_bandwidth, 3)


@pytest.mark.parametrize("member", ["eager", "torch", *KERNELS])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_norm_forward(benchmark, copy_bandwidth, size, dtype, member):
    n, c = size
    benchmark.group = f"layer_norm forward {n}x{c} {str(dtype).removeprefix('torch.')}"
    x = torch.randn(n, c, device=DEVICE, dtype=dtype)
    w, b = torch.rand(c, device=DEVICE, dtype=dtype) + 0.5, torch.randn(c, device=DEVICE, dtype=dtype)
    fn = _member(member)

    def run():
        y = fn(x, w, b)
        _sync()
        return y

    with torch.no_grad():
        benchmark(run)
    _report(benchmark, 2 * x.numel() * x.element_size(), copy_bandwidth)


@pytest.mark.parametrize("member", ["eager", "torch", *KERNELS])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_norm_forward_backward(benchmark, copy_bandwidth, size, dtype, member):
    n, c = size
    benchmark.group = f"layer_norm forward+backward {n}x{c} {str(dtype).removeprefix('torch.')}"
    x = torch.randn(n, c, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (torch.rand(c, device=DEVICE, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(c, device=DEVICE, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(n, c, device=DEVICE, dtype=dtype)
    fn = _member(member)

    def run():
        grads = torch.autograd.grad(fn(x, w, b), (x, w, b), grad_y)
        _sync()
        return grads

    benchmark(run)
    _report(benchmark, 5 * x.numel() * x.element_size(), copy_bandwidth)
