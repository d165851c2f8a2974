"""The two ceilings of this GPU, measured: device-to-device copy bandwidth and matmul rate.

Memory-bound kernels are reported as a fraction of the copy bandwidth (bytes read plus
bytes written by a large `copy_`), compute-bound ones against the bf16 matmul rate
(cuBLAS through torch.matmul). Random data, never zeros; medians of triton's do_bench.

    python -m pyminigpt.bench.gpu_roofline [--out roofline.json]
"""

from __future__ import annotations

import argparse
import functools
import json

import torch


def _median_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def copy_bandwidth(device: str = "cuda") -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.randn(256 * 2**20, device=device)  # far beyond L2
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_rate(dtype: torch.dtype, device: str = "cuda", n: int = 8192) -> float:
    """TFLOP/s of an n x n x n product (fp32 runs as tf32 if torch allows it)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


@functools.cache
def measure(device: str = "cuda") -> dict:
    """{"device", "copy_GBps", "matmul_bf16_TFLOPs", "matmul_fp32_TFLOPs"} for this GPU."""
    return {
        "device": torch.cuda.get_device_name(device),
        "copy_GBps": round(copy_bandwidth(device), 1),
        "matmul_bf16_TFLOPs": round(matmul_rate(torch.bfloat16, device), 1),
        "matmul_fp32_TFLOPs": round(matmul_rate(torch.float32, device), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the numbers as JSON here too")
    args = parser.parse_args()
    result = measure()
    for key, value in result.items():
        print(f"{key:>20}: {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
