"""Where `native.LINEAR_MAX_ROWS` comes from: the CPU linear kernel against torch's matmul for 1
to 8 rows of x, members interleaved.

For each dtype, shape and row count, every round times the kernel (`torch.ops.pyminigpt.linear`,
called directly, whatever the routing policy says) and `F.linear` (MKL for fp32, oneDNN for
bf16) once each; the medians over rounds are compared.

- Default: weights in nn.Linear's (N, K) layout; GPT-2's LM head (768 -> 50257, read from
  memory) and MLP (768 -> 3072, from the L3 cache).
- `--transposed`: weights stored (K, N), as transformers' GPT-2 Conv1D holds them, passed as a
  transposed view; the four projections of a GPT-2-124M block, 12 copies of each (one decode
  step's weights, read from memory). Reports GB/s of weights read.

    python bench/linear_rows.py [ROUNDS] [--transposed]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from pyminigpt.ops.library import ops
from pyminigpt.ops.native import LINEAR_MAX_ROWS


def seconds_per_call(fn, args, calls: int) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls


def kernel_and_torch_seconds(kernel_args, torch_args, calls: int, rounds: int) -> tuple[float, float]:
    """Median seconds per call of `kernel_args[0](*kernel_args[1:])` and of the torch one, timed
    alternately, once each per round."""
    times = {"kernel": [], "torch": []}
    with torch.inference_mode():
        for _ in range(rounds):
            for member, (fn, *args) in (("kernel", kernel_args), ("torch", torch_args)):
                times[member].append(seconds_per_call(fn, args, calls))
    return statistics.median(times["kernel"]), statistics.median(times["torch"])


def main(rounds: int) -> None:
    torch.manual_seed(0)
    print("| dtype | shape | rows | kernel (ms) | torch (ms) | kernel speedup | routed to the kernel |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for k, n, calls in ((768, 50257, 5), (768, 3072, 200)):
            weight = (torch.randn(n, k) / k**0.5).to(dtype)
            bias = torch.randn(n).to(dtype)
            for rows in (1, 2, 3, 4, 6, 8):
                x = torch.randn(rows, k).to(dtype)
                kernel, peer = kernel_and_torch_seconds(
                    (ops.linear, x, weight, bias), (F.linear, x, weight, bias), calls, rounds
                )
                routed = "yes" if rows <= LINEAR_MAX_ROWS else "no"
                print(f"| {str(dtype).removeprefix('torch.')} | {k} -> {n} | {rows} | {kernel * 1e3:.3f} | "
                      f"{peer * 1e3:.3f} | {peer / kernel:.2f}x | {routed} |")  # fmt: skip


def projections(linear, xs, stored, biases) -> None:
    """Every projection of the model once: x (rows, K) times each stored wt (K, N), passed transposed."""
    for x, layers, bias in zip(xs, stored, biases):
        for wt in layers:
            linear(x, wt.t(), bias)


def main_transposed(rounds: int) -> None:
    """Conv1D's layout: every projection of GPT-2-124M's 12 blocks, from memory."""
    torch.manual_seed(0)
    shapes = ((768, 2304), (768, 768), (768, 3072), (3072, 768))  # c_attn, attn c_proj, c_fc, mlp c_proj
    print("| dtype | rows | kernel (GB/s) | torch (GB/s) | kernel speedup |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        stored = [[(torch.randn(k, n) / k**0.5).to(dtype) for _ in range(12)] for k, n in shapes]
        biases = [torch.randn(n).to(dtype) for _, n in shapes]
        weight_bytes = sum(wt.numel() * wt.element_size() for layers in stored for wt in layers)
        for rows in (1, 2, 3, 4, 6, 8):
            xs = [torch.randn(rows, k).to(dtype) for k, _ in shapes]
            kernel, peer = kernel_and_torch_seconds(
                (projections, ops.linear, xs, stored, biases), (projections, F.linear, xs, stored, biases), 3, rounds
            )
            print(f"| {str(dtype).removeprefix('torch.')} | {rows} | {weight_bytes / kernel / 1e9:.1f} | "
                  f"{weight_bytes / peer / 1e9:.1f} | {peer / kernel:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--transposed"]
    (main_transposed if "--transposed" in sys.argv else main)(int(args[0]) if args else 5)
