"""Softmax-with-temperature benchmarks: eager `torch.softmax(x / T, -1)` (the reference and
the usual peer) and every kernel backend, one group per direction, size and dtype.

Memory-bound: forward moves x in and y out (2 tensors), forward + backward also moves y
and dy in and dx out (5 tensors); each member reports GB/s, the fraction of the measured
DRAM copy bandwidth and "from": cache when the working set fits in the last-level cache.
The last size is memory-resident (more rows than the cache holds).

    pytest pyminigpt/bench/test_bench_softmax.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch

from pyminigpt import ops
from pyminigpt.bench.utils import (
    DEVICE,
    KERNELS,
    dtype_name,
    memory_resident_rows,
    on_backend,
    report_bandwidth,
    size_name,
    synced,
)

TEMPERATURE = 0.7
SIZES = [(64, 50257), (8192, 768), (4096 if DEVICE == "cuda" else memory_resident_rows(50257, torch.float32), 50257)]
DTYPES = [torch.float32, torch.bfloat16]

# every test: one group per size and dtype, one member per implementation
pytestmark = [
    pytest.mark.parametrize("size", SIZES, ids=size_name),
    pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name),
    pytest.mark.parametrize("member", ["eager", *KERNELS]),
]


def _member(name: str):
    if name == "eager":
        return lambda x: torch.softmax(x / TEMPERATURE, dim=-1)
    return on_backend(name, lambda x: ops.softmax(x, TEMPERATURE))


def test_softmax_forward(benchmark, copy_bandwidth, size, dtype, member):
    benchmark.group = f"softmax forward {size_name(size)} {dtype_name(dtype)}"
    x = (torch.randn(size, device=DEVICE) * 3).to(dtype)
    with torch.no_grad():
        benchmark(synced(_member(member), x))
    report_bandwidth(benchmark, 2 * x.numel() * x.element_size(), copy_bandwidth)


def test_softmax_forward_backward(benchmark, copy_bandwidth, size, dtype, member):
    benchmark.group = f"softmax forward+backward {size_name(size)} {dtype_name(dtype)}"
    x = (torch.randn(size, device=DEVICE) * 3).to(dtype).requires_grad_()
    grad_y = torch.randn(size, device=DEVICE).to(dtype)
    fn = _member(member)
    benchmark(synced(lambda: torch.autograd.grad(fn(x), x, grad_y)))
    report_bandwidth(benchmark, 5 * x.numel() * x.element_size(), copy_bandwidth)
