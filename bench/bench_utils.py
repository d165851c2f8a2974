"""Shared pieces of the op benchmarks: the device, the kernel backends measured on it,
the measured copy bandwidth (the roof of a memory-bound kernel) and the extra_info
each member reports."""

from __future__ import annotations

import time

import torch

from pyminigpt import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The kernel backends measured on this device, beside the eager reference.
KERNELS = [b for b in ops.available_backends() if b in (("cuda", "triton") if DEVICE == "cuda" else ("cpu",))]


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure_copy_bandwidth(numel: int = 32 * 2**20, repeats: int = 10) -> float:
    """Bytes per second of a large device-to-device tensor copy (read + write)."""
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync()
    return repeats * 2 * src.numel() * src.element_size() / (time.perf_counter() - start)


def on_backend(name: str, fn):
    """fn run with backend `name` active (strict: a fallback to the reference would fail)."""

    def run(*args):
        with ops.use_backend(name, strict=True):
            return fn(*args)

    return run


def report_bandwidth(benchmark, moved_bytes: int, copy_bandwidth: float) -> None:
    """Adds GB/s and the fraction of the copy bandwidth to the benchmark's extra_info."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    bytes_per_second = moved_bytes / stats.stats.median
    benchmark.extra_info["GB/s"] = round(bytes_per_second / 1e9, 2)
    benchmark.extra_info["fraction_of_copy"] = round(bytes_per_second / copy_bandwidth, 3)
