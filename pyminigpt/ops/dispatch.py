"""Backend registry and choice.

Every operation has a `reference` implementation (plain PyTorch). Kernel backends
register themselves here with `register(op, backend, fn, supports)`; `call(op, ...)`
runs the active backend's kernel when its `supports(...)` accepts the inputs and the
reference otherwise.

The active backend is `auto` unless `PYMINIGPT_BACKEND` or `use_backend(...)` says
otherwise. `auto` tries, for the device of the op's first tensor argument, the backends
in `AUTO_ORDER` and then the reference. A named backend that cannot run the inputs
falls back to the reference too, unless `use_backend(name, strict=True)` is asked for
(the tests use that to be sure the kernel itself ran).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference

# The five operations, and `linear` (nn.Linear's op), which only the `cpu` backend implements
# (decoding's few-row matmuls); on other backends it is torch's matmul, strict or not.
OPS = ("layer_norm", "softmax", "top_k_top_p_filter", "sample", "causal_attention", "linear")
BACKENDS = ("reference", "cpu", "triton", "cuda")
# Which kernel backends `auto` tries first, by device type.
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# The module that registers each kernel backend; imported on first use.
_BACKEND_MODULES = {"cpu": "pyminigpt.ops.native", "cuda": "pyminigpt.ops.native", "triton": "pyminigpt.ops.triton"}


@dataclass(frozen=True)
class Kernel:
    fn: Callable
    supports: Callable[..., bool]


_kernels: dict[str, dict[str, Kernel]] = {op: {} for op in OPS}
_unavailable: dict[str, str] = {}  # backend -> why it cannot run here
_imported: set[str] = set()


def _always(*args, **kwargs) -> bool:
    return True


def register(op: str, backend: str, fn: Callable, supports: Callable[..., bool] | None = None) -> None:
    """Register `fn` (the op's public signature, inputs already validated) as `backend`'s kernel for `op`."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend not in BACKENDS or backend == "reference":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _kernels[op][backend] = Kernel(fn, supports or _always)


def mark_unavailable(backend: str, reason: str) -> None:
    """Record why `backend` cannot run on this install (shown by `backend_status()`)."""
    _unavailable[backend] = reason


# torch.compile cannot trace an import: the first call under compilation imports at trace time
@torch.compiler.assume_constant_result
def _import_backend(backend: str) -> None:
    module = _BACKEND_MODULES[backend]
    if module in _imported:
        return
    _imported.add(module)
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  (any import failure of a backend must leave the reference path working)
        for name, mod in _BACKEND_MODULES.items():
            if mod == module:
                _unavailable.setdefault(name, f"{module} failed to import: {type(exc).__name__}: {exc}")


def _kernel(op: str, backend: str) -> Kernel | None:
    if backend == "reference":
        return None
    _import_backend(backend)
    return _kernels[op].get(backend)


def _check_backend_name(name) -> str:
    if name == "auto" or name in BACKENDS:
        return name
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")


_active = {"name": "auto", "strict": False}
_env_backend = os.environ.get("PYMINIGPT_BACKEND")
if _env_backend:
    _active["name"] = _env_backend  # checked on first use, so a typo is reported, not fatal at import


def current_backend() -> str:
    return _check_backend_name(_active["name"])


@contextlib.contextmanager
def use_backend(name: str, strict: bool = False):
    """Run the ops in this block on backend `name` ('auto', 'reference', 'cpu', 'triton', 'cuda').

    With strict=True an input the backend cannot run raises instead of falling back to
    the reference.
    """
    _check_backend_name(name)
    saved = dict(_active)
    _active.update(name=name, strict=strict)
    try:
        yield
    finally:
        _active.clear()
        _active.update(saved)


def _first_tensor(args) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


def choose(op: str, *args) -> tuple[str, Callable]:
    """The backend that `call(op, *args)` would run, and its function."""
    name = current_backend()
    candidates = AUTO_ORDER.get(_first_tensor(args).device.type, ()) if name == "auto" else (name,)
    for backend in candidates:
        kernel = _kernel(op, backend)
        if kernel is not None and kernel.supports(*args):
            return backend, kernel.fn
    implements = name in _kernels[op] or name in _unavailable  # an unavailable backend fails every op
    if _active["strict"] and name not in ("auto", "reference") and implements:
        why = _unavailable.get(name, "its supports() rejected these inputs")
        shapes = [tuple(a.shape) + (a.dtype, a.device.type) for a in args if isinstance(a, torch.Tensor)]
        raise ValueError(f"backend {name!r} cannot run {op} on inputs {shapes}: {why}")
    return "reference", getattr(reference, op)


def call(op: str, *args):
    return choose(op, *args)[1](*args)


def available_backends() -> list[str]:
    """The backends that have at least one kernel on this install (always includes 'reference')."""
    return [name for name, status in backend_status().items() if status["available"]]


def backend_status() -> dict[str, dict]:
    """For every backend: available or not, why not, and which ops it implements."""
    status = {"reference": {"available": True, "reason": "plain PyTorch, always present", "ops": list(OPS)}}
    for backend in BACKENDS[1:]:
        _import_backend(backend)
        ops = [op for op in OPS if backend in _kernels[op]]
        reason = _unavailable.get(backend, "" if ops else "no kernels registered")
        status[backend] = {"available": bool(ops) and backend not in _unavailable, "reason": reason, "ops": ops}
    return status
