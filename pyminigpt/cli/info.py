"""`pyminigpt info`: the version, the kernel backends (and why the others are missing), the CPU and GPUs."""

from __future__ import annotations

import os
import platform

import torch


def run(args) -> int:
    from .. import __version__, ops
    from ..ops import dispatch

    print(f"pyminigpt {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    for name in ("transformers", "triton"):
        try:
            module = __import__(name)
            print(f"{name} {module.__version__}")
        except ImportError as err:
            print(f"{name}: not installed ({err})")
    print(
        f"CPU: {platform.machine()}, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} logical cores"
    )
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    elif torch.version.cuda is None:
        print("GPU: none (this torch is a CPU-only build)")
    else:
        print(f"GPU: none found (torch built with CUDA {torch.version.cuda})")
    print("kernel backends:")
    for name, status in ops.backend_status().items():
        state = "available" if status["available"] else "unavailable"
        detail = f"ops: {', '.join(status['ops'])}" if status["available"] else status["reason"]
        print(f"  {name:<10} {state:<12} {detail}")
    env = os.environ.get("PYMINIGPT_BACKEND")
    try:
        active = dispatch.current_backend()
    except ValueError as err:
        active = f"invalid: {err}"
    print(f"active backend: {active}" + (f" (from PYMINIGPT_BACKEND={env})" if env else ""))
    return 0


def add_parser(subparsers) -> None:
    """Add the `info` sub-command to an argparse sub-parser set."""
    p = subparsers.add_parser(
        "info",
        help="version, kernel backends, CPU and GPU",
        description="Show the version, which kernel backends this install has (and why the others are "
        "missing), the CPU capability and the GPUs.",
    )
    p.set_defaults(run=run)
