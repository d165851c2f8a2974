"""Softmax-with-temperature benchmarks: eager `torch.softmax(x / T, -1)` (the reference and
the usual peer) and every kernel backend, one group per direction, size and dtype.

Memory-bound: forward moves x in and y out (2 tensors), forward + backward also moves y
and dy in and dx out (5 tensors); each member reports GB/s and the fraction of the
measured copy bandwidth.

    pytest bench/test_bench_softmax.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
from bench_utils import DEVICE, KERNELS, on_backend, report_bandwidth, sync

from pyminigpt import ops
from pyminigpt.ops import reference

TEMPERATURE = 0.7
SIZES = [(64, 50257), (8192, 768)] + ([(4096, 50257)] if DEVICE == "cuda" else [])
DTYPES = [torch.float32, torch.bfloat16]


def _member(name: str):
    if name == "eager":
        return lambda x: torch.softmax(x / TEMPERATURE, dim=-1)
    if name == "reference":
        return lambda x: reference.softmax(x, TEMPERATURE)
    return on_backend(name, lambda x: ops.softmax(x, TEMPERATURE))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("member", ["eager", *KERNELS])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_softmax_forward(benchmark, copy_bandwidth, size, dtype, member):
    benchmark.group = f"softmax forward {size[0]}x{size[1]} {_dtype_name(dtype)}"
    x = (torch.randn(size, device=DEVICE) * 3).to(dtype)
    fn = _member(member)

    def run():
        y = fn(x)
        sync()
        return y

    with torch.no_grad():
        benchmark(run)
    report_bandwidth(benchmark, 2 * x.numel() * x.element_size(), copy_bandwidth)


@pytest.mark.parametrize("member", ["eager", *KERNELS])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_softmax_forward_backward(benchmark, copy_bandwidth, size, dtype, member):
    benchmark.group = f"softmax forward+backward {size[0]}x{size[1]} {_dtype_name(dtype)}"
    x = (torch.randn(size, device=DEVICE) * 3).to(dtype).requires_grad_()
    grad_y = torch.randn(size, device=DEVICE).to(dtype)
    fn = _member(member)

    def run():
        (dx,) = torch.autograd.grad(fn(x), x, grad_y)
        sync()
        return dx

    benchmark(run)
    report_bandwidth(benchmark, 5 * x.numel() * x.element_size(), copy_bandwidth)
