"""Linear benchmarks for decoding's few-row matmuls: eager F.linear (torch's MKL / oneDNN
matmul, also the reference) and the `cpu` kernel (csrc/cpu/linear.cpp), one group per rows,
shape and dtype: GPT-2's LM head (768 -> 50257) and MLP (768 -> 3072), and a memory-resident
shape whose fp32 weight is larger than the last-level cache.

Bound by reading the weights: each member reports GB/s of weight bytes, that as a fraction
of the measured DRAM copy bandwidth, and "from": cache when the weight fits in the
last-level cache (GPT-2's weights, read once per decode step, mostly do not).

    pytest pyminigpt/bench/test_bench_linear.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyminigpt import ops
from pyminigpt.bench.utils import (
    DEVICE,
    KERNELS,
    dtype_name,
    memory_resident_rows,
    on_backend,
    report_bandwidth,
    synced,
)

pytestmark = [
    pytest.mark.skipif(DEVICE != "cpu", reason="linear has only a CPU kernel"),
    pytest.mark.parametrize("rows", [1, 8]),  # both within native.LINEAR_MAX_ROWS: they run on the kernel
    pytest.mark.parametrize(
        "k, n",
        [(768, 50257), (768, 3072), (768, memory_resident_rows(768, torch.float32))],
        ids=["lm_head", "mlp", "dram"],
    ),
    pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name),
    pytest.mark.parametrize("member", ["eager", *KERNELS]),
]


def test_linear(benchmark, copy_bandwidth, rows, k, n, dtype, member):
    benchmark.group = f"linear {rows}x{k} -> {n} {dtype_name(dtype)}"
    x = torch.randn(rows, k).to(dtype)
    weight = (torch.randn(n, k) / k**0.5).to(dtype)
    bias = torch.randn(n).to(dtype)
    fn = F.linear if member == "eager" else on_backend(member, ops.linear)
    with torch.no_grad():
        benchmark(synced(fn, x, weight, bias))
    report_bandwidth(benchmark, weight.numel() * weight.element_size(), copy_bandwidth)
