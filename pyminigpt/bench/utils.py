"""Shared pieces of the op benchmarks: the device, the kernel backends measured on it,
the measured copy and read bandwidths (the roofs of memory-bound kernels and of decoding),
the last-level cache size (below it a GB/s figure is "from cache"), the inputs and peers
several files measure, the extra_info each member reports, and the do_bench table of
the GPU benchmarks (test_bench_gpu.py)."""

from __future__ import annotations

import glob
import os
import statistics
import time

import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from pyminigpt import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The kernel backends measured on this device, beside the eager reference.
KERNELS = [b for b in ops.available_backends() if b in (("cuda", "triton") if DEVICE == "cuda" else ("cpu",))]


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def synced(fn, *args):
    """The call a benchmark times: fn(*args), then wait for the device."""

    def run():
        out = fn(*args)
        sync()
        return out

    return run


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (sysfs; 32 MiB when it cannot be read)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 * 2**20)


# Working sets at or below this many bytes are served (at least partly) from the cache.
CACHE_BYTES = last_level_cache_bytes() if DEVICE == "cpu" else 0
# A tensor this large streams from DRAM on every pass: four times the last-level cache, at least 1 GiB.
DRAM_BYTES = max(4 * CACHE_BYTES, 2**30)


def _median_seconds(fn, repeats: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_copy_bandwidth(nbytes: int = DRAM_BYTES // 2, repeats: int = 5) -> float:
    """Bytes per second (read + write) of a device-to-device copy, source and destination nbytes each."""
    src = torch.ones(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), repeats)


def measure_read_bandwidth(nbytes: int = DRAM_BYTES, repeats: int = 5) -> float:
    """Bytes per second of torch.sum over an nbytes tensor (far larger than the cache: read from DRAM).

    A decode step only reads its weights, so this read rate, not the copy rate, bounds it."""
    x = torch.ones(nbytes // 4, device=DEVICE)
    return nbytes / _median_seconds(x.sum, repeats)


def memory_resident_rows(columns: int, dtype: torch.dtype) -> int:
    """Rows (a multiple of 1024) of a (rows, columns) dtype tensor 1.25x the last-level cache, so
    that a pass over it streams from DRAM."""
    row_bytes = columns * torch.empty((), dtype=dtype).element_size()
    return -(-max(CACHE_BYTES, 2**20) * 5 // 4 // row_bytes // 1024) * 1024


def on_backend(name: str, fn):
    """fn run with backend `name` active (strict: a fallback to the reference would fail)."""

    def run(*args):
        with ops.use_backend(name, strict=True):
            return fn(*args)

    return run


def report_bandwidth(benchmark, moved_bytes: int, copy_bandwidth: float) -> None:
    """Adds GB/s, the fraction of the (DRAM) copy bandwidth and where the working set lives to the
    benchmark's extra_info. A working set that fits in the last-level cache is labelled
    "from cache": its GB/s, and a fraction above 1, are not DRAM rates."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    bytes_per_second = moved_bytes / stats.stats.median
    benchmark.extra_info["GB/s"] = round(bytes_per_second / 1e9, 2)
    benchmark.extra_info["fraction_of_copy"] = round(bytes_per_second / copy_bandwidth, 3)
    benchmark.extra_info["from"] = "cache" if moved_bytes <= CACHE_BYTES else "DRAM"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def size_name(size) -> str:
    return "x".join(map(str, size))


# ---- inputs and peers ------------------------------------------------------------------


def layer_norm_inputs(n: int, c: int, dtype: torch.dtype, requires_grad: bool = False):
    """x (n, c) and a weight and bias (c,) away from zero, on DEVICE."""
    x = torch.randn(n, c, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    w = (torch.rand(c, device=DEVICE, dtype=dtype) + 0.5).requires_grad_(requires_grad)
    b = torch.randn(c, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    return x, w, b


def transformers_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' TopKLogitsWarper then TopPLogitsWarper (a full sort, cumsum and scatter)."""
    if top_k > 0:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return logits


def transformers_sample(logits, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """What transformers' generate does per step: temperature, the warpers, softmax, multinomial."""
    probs = torch.softmax(transformers_filter(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---- GPU: do_bench medians against the measured ceilings -------------------------------


class KernelTable:
    """The GPU benchmarks of one kernel backend, timed with triton.testing.do_bench (median
    after warm-up) and collected as a Markdown table: per (group, member) the median, the
    rate (GB/s or TFLOP/s) and its fraction of the ceiling gpu_roofline measured (copy
    bandwidth or bf16 matmul rate), the ratio to the group's peer, and for the kernel's
    rows the group's target and whether it is met."""

    def __init__(self, roofline: dict, kernel: str, title: str):
        self.roofline, self.kernel, self.title = roofline, kernel, title
        self.rows: list[dict] = []

    def measure(self, benchmark, group, member, fn, *, bytes_moved=None, flops=None, peer=None, target=None):
        """Time fn with do_bench and pytest-benchmark; record its rate and fraction of the ceiling.

        target: ("ceiling", fraction) or ("peer", speedup over the peer) for the kernel, or None.
        Returns the row it recorded."""
        from triton.testing import do_bench

        fn()  # first call: compile, autotune, load modules, allocate
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        if flops is not None:
            tflops = flops / (ms * 1e-3) / 1e12
            rate, fraction = f"{tflops:.1f} TFLOP/s", tflops / self.roofline["matmul_bf16_TFLOPs"]
        else:
            gbps = bytes_moved / (ms * 1e-3) / 1e9
            rate, fraction = f"{gbps:.0f} GB/s", gbps / self.roofline["copy_GBps"]
        row = {
            "group": group,
            "member": member,
            "ms": ms,
            "rate": rate,
            "fraction": fraction,
            "peer": peer,
            "target": target,
        }
        self.rows.append(row)
        benchmark.group = group
        benchmark.extra_info.update(median_ms_do_bench=round(ms, 5), rate=rate, fraction_of_ceiling=round(fraction, 3))
        benchmark.pedantic(synced(fn), rounds=20, warmup_rounds=2)
        return row

    def _target(self, row, speedup) -> tuple[str, str]:
        """(the target, whether it is met) of a kernel row; empty for the other members."""
        if row["member"] != self.kernel or not row["target"]:
            return "", ""
        kind, bound = row["target"]
        value = row["fraction"] if kind == "ceiling" else speedup
        target = f">= {bound:g} of ceiling" if kind == "ceiling" else f">= {bound:g}x {row['peer']}"
        return target, "yes" if value is not None and value >= bound else "NO"

    def markdown(self) -> str:
        import triton

        roofline = self.roofline
        versions = f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}"
        ceilings = (
            f"copy {roofline['copy_GBps']} GB/s (read + write), bf16 matmul {roofline['matmul_bf16_TFLOPs']} TFLOP/s"
        )
        lines = [
            f"# {self.title} on {roofline['device']}",
            "",
            f"{versions}; measured {ceilings}. Medians of triton.testing.do_bench.",
            "",
            "| group | member | median ms | rate | of ceiling | peer ms / this | target | met |",
            "|---|---|---:|---:|---:|---:|---|---|",
        ]
        for row in self.rows:
            peer = next((r for r in self.rows if r["group"] == row["group"] and r["member"] == row["peer"]), None)
            speedup = peer["ms"] / row["ms"] if peer else None
            target, met = self._target(row, speedup)
            lines.append(
                f"| {row['group']} | {row['member']} | {row['ms']:.4f} | {row['rate']} | {row['fraction']:.3f} | "
                f"{'' if speedup is None else f'{speedup:.2f}'} | {target} | {met} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, filename: str) -> None:
        """Prints the table and writes it to $PYMINIGPT_RESULTS_DIR/filename when that is set."""
        table = self.markdown()
        print("\n" + table)
        results_dir = os.environ.get("PYMINIGPT_RESULTS_DIR")
        if results_dir:
            os.makedirs(results_dir, exist_ok=True)
            with open(os.path.join(results_dir, filename), "w") as f:
                f.write(table)


def causal_flops(q: torch.Tensor) -> float:
    """Forward flops of causal attention with Tq = Tk: 4 * B * H * T * T * D, halved."""
    b, h, t, d = q.shape
    return 4 * b * h * t * t * d / 2


def gpu_attention_inputs(d: int, t: int, requires_grad: bool = False):
    """q, k, v in bf16 for 16384 tokens of a model 2048 wide: (16384 // t, 2048 // d, t, d)."""
    batch, heads = 16384 // t, 2048 // d
    return [
        torch.randn(batch, heads, t, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=requires_grad)
        for _ in range(3)
    ]
