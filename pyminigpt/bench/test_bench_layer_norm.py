"""Layer norm benchmarks: the eager reference, torch's F.layer_norm (the peer) and every
kernel backend, one group per direction, size and dtype.

Layer norm is memory-bound: each member reports GB/s (forward moves x in and y out;
forward + backward also moves dy and x in and dx out), that as a fraction of the measured
DRAM copy bandwidth, and "from": cache when the working set fits in the last-level cache
(those GB/s are cache rates). The last size is memory-resident: more rows than the cache
holds, so its GB/s is a DRAM rate.

    pytest pyminigpt/bench/test_bench_layer_norm.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyminigpt import ops
from pyminigpt.bench.utils import (
    KERNELS,
    dtype_name,
    layer_norm_inputs,
    memory_resident_rows,
    on_backend,
    report_bandwidth,
    size_name,
    synced,
)
from pyminigpt.ops import reference

SIZES = [(8192, 768), (512, 768), (64, 50257), (memory_resident_rows(768, torch.float32), 768)]
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-5

# every test: one group per size and dtype, one member per implementation
pytestmark = [
    pytest.mark.parametrize("size", SIZES, ids=size_name),
    pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name),
    pytest.mark.parametrize("member", ["eager", "torch", *KERNELS]),
]


def _member(name: str):
    if name == "eager":
        return lambda x, w, b: reference.layer_norm(x, w, b, EPS)
    if name == "torch":
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)
    return on_backend(name, lambda x, w, b: ops.layer_norm(x, w, b, EPS))


def test_layer_norm_forward(benchmark, copy_bandwidth, size, dtype, member):
    benchmark.group = f"layer_norm forward {size_name(size)} {dtype_name(dtype)}"
    x, w, b = layer_norm_inputs(*size, dtype)
    with torch.no_grad():
        benchmark(synced(_member(member), x, w, b))
    report_bandwidth(benchmark, 2 * x.numel() * x.element_size(), copy_bandwidth)


def test_layer_norm_forward_backward(benchmark, copy_bandwidth, size, dtype, member):
    benchmark.group = f"layer_norm forward+backward {size_name(size)} {dtype_name(dtype)}"
    x, w, b = layer_norm_inputs(*size, dtype, requires_grad=True)
    grad_y = torch.randn_like(x)
    fn = _member(member)
    benchmark(synced(lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), grad_y)))
    report_bandwidth(benchmark, 5 * x.numel() * x.element_size(), copy_bandwidth)
