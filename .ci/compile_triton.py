"""Compiles every Triton kernel for sm_80 and sm_90 on a machine without a GPU.

CI runs the Triton kernels through the interpreter (TRITON_INTERPRET=1), which checks what
they compute but not that they compile: the interpreter runs Python code the compiler
rejects (a global that is not a tl.constexpr, say). Here the real launchers run on small CPU
tensors with a `wrap` that records each launch instead of running it; every recorded launch,
with each of its autotune configs, then goes through triton.compile for a CUDA target, down
to ptxas. Prints one line per kernel and config (registers, stack: spills show there, shared
memory) and exits non-zero if any compile fails.

    python .ci/compile_triton.py            (must run without TRITON_INTERPRET=1)
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_triton.py: unset TRITON_INTERPRET (the launchers would pick the interpreter's configs)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pyminigpt import kernels

ARCHS = (80, 90)
_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


class Launch:
    """One recorded `kernel[grid](*args, **kwargs)`."""

    def __init__(self, kernel, args, kwargs):
        self.kernel, self.args, self.kwargs = kernel, args, kwargs


launches: list[Launch] = []


def record(kernel):
    """A `wrap` for the launchers: kernel[grid](...) records the launch instead of running it."""

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(kernel, args, kwargs))

    return Recorder()


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _variants(launch: Launch):
    """(jit function, constexprs, options) per config the launch can compile to."""
    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    configs = [None]
    if isinstance(kernel, triton.runtime.Autotuner):
        configs = kernel.configs
        if kernel.early_config_prune:
            named = dict(zip(kernel.fn.arg_names, launch.args))
            configs = kernel.early_config_prune(configs, named, **kwargs)
        kernel = kernel.fn
    for config in configs:
        constexprs = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
        options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
        if config is not None:
            constexprs.update(config.kwargs)
            options.update(num_warps=config.num_warps, num_stages=config.num_stages)
        yield kernel, constexprs, options


def compile_launch(launch: Launch, arch: int) -> list[str]:
    """Compiles every variant of launch for sm_<arch>; a report line per variant."""
    lines = []
    for fn, constexprs, options in _variants(launch):
        signature = dict(zip(fn.arg_names, map(_arg_type, launch.args)))
        signature.update({name: "constexpr" for name in constexprs})
        shown = {k: v for k, v in constexprs.items() if k.isupper()}
        label = f"sm_{arch} {fn.__name__} {_signature_dtypes(launch)} {shown} {options}"
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                  options=options)  # fmt: skip
        lines.append(f"ok    {label}: {_resource_usage(compiled)}")
    return lines


def _signature_dtypes(launch: Launch) -> str:
    return "/".join(sorted({_DTYPES[a.dtype] for a in launch.args if isinstance(a, torch.Tensor)}))


def _resource_usage(compiled) -> str:
    """Registers and stack (spills) of the compiled cubin, from the bundled cuobjdump, and the
    shared memory Triton allocates (dynamic, so cuobjdump does not see it)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        result = subprocess.run([cuobjdump, "-res-usage", cubin.name], check=False, capture_output=True, text=True)
    usage = [line.split()[:2] for line in result.stdout.splitlines() if line.strip().startswith("REG:")]
    if not usage:
        return (result.stdout + result.stderr).strip()[-200:]
    return f"{' '.join(usage[0])} (bytes: spills) SHARED:{compiled.metadata.shared}"


def kernel_modules() -> dict:
    """Every module of pyminigpt.kernels (the package's folder, walked): name -> module."""
    names = sorted(info.name for info in pkgutil.iter_modules(kernels.__path__))
    return {name: importlib.import_module(f"{kernels.__name__}.{name}") for name in names}


def _has_kernels(module) -> bool:
    return any(
        isinstance(value, (triton.runtime.JITFunction, triton.runtime.Autotuner))
        and getattr(value, "__module__", module.__name__) == module.__name__
        for value in vars(module).values()
    )


def record_all_launches() -> list[str]:
    """Each kernel module's `compile_check_launches`; the modules with @triton.jit kernels but
    without one (which would drop out of this check unseen) are returned as failures."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    missing = []
    for name, module in kernel_modules().items():
        check = getattr(module, "compile_check_launches", None)
        if check is not None:
            check(record, randn)
        elif _has_kernels(module):
            missing.append(f"FAIL  kernels/{name}.py has Triton kernels but no compile_check_launches(wrap, randn)")
    return missing


def main() -> int:
    start = time.perf_counter()
    missing = record_all_launches()
    print("\n".join(missing), flush=True)
    seen, failures = set(), len(missing)
    for arch in ARCHS:
        for launch in launches:
            key = (arch, launch.kernel, tuple(map(_arg_type, launch.args)), tuple(sorted(launch.kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            try:
                print("\n".join(compile_launch(launch, arch)), flush=True)
            except Exception as exc:  # noqa: BLE001  (report every failing kernel, not just the first)
                failures += 1
                message = " | ".join(str(exc).strip().splitlines()[-6:])
                print(
                    f"FAIL  sm_{arch} {getattr(launch.kernel, '__name__', launch.kernel)}: {type(exc).__name__}: {message}"
                )
    print(f"{len(seen)} launches compiled for {ARCHS} in {time.perf_counter() - start:.0f} s, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
