"""Where `native.LINEAR_MAX_ROWS` comes from: the CPU linear kernel against torch's matmul for
1 to 8 rows of x, members interleaved.

For each dtype, shape and row count, every round times the kernel (`torch.ops.pyminigpt.linear`,
called directly, whatever the routing policy says) and `F.linear` (MKL for fp32, oneDNN for
bf16) once each; the medians over rounds are compared. The shapes are GPT-2's LM head
(768 -> 50257, read from memory) and MLP (768 -> 3072, from the L3 cache).

    python bench/linear_rows.py [ROUNDS]
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
                times = {"kernel": [], "torch": []}
                with torch.inference_mode():
                    for _ in range(rounds):
                        times["kernel"].append(seconds_per_call(ops.linear, (x, weight, bias), calls))
                        times["torch"].append(seconds_per_call(F.linear, (x, weight, bias), calls))
                kernel, peer = (statistics.median(times[m]) for m in ("kernel", "torch"))
                routed = "yes" if rows <= LINEAR_MAX_ROWS else "no"
                print(f"| {str(dtype).removeprefix('torch.')} | {k} -> {n} | {rows} | {kernel * 1e3:.3f} | "
                      f"{peer * 1e3:.3f} | {peer / kernel:.2f}x | {routed} |")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
