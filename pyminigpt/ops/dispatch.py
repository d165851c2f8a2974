"""Backend registry and choice.

Every operation has a `reference` implementation (plain PyTorch). Kernel backends
register themselves here with `register(op, backend, fn)`; what each kernel takes is its
entry in `rules.RULES`. `call(op, ...)` runs the active backend's kernel when its rule
accepts the inputs and the reference otherwise.

The active backend is `auto` unless `PYMINIGPT_BACKEND` or `use_backend(...)` says
otherwise. `auto` tries, for the device of the op's first tensor argument, the backends
in `AUTO_ORDER` and then the reference. A named backend that cannot run the inputs
falls back to the reference too, unless `use_backend(name, strict=True)` is asked for
(the tests use that to be sure the kernel itself ran).

The active backend is a `contextvars.ContextVar`: each thread (and each asyncio task) holds
its own, so a server thread and a data-loader thread cannot switch each other's. A new
thread starts at the default (`PYMINIGPT_BACKEND`, else `auto`).

The choice is cached per (op, active backend, device, dtype of the first tensor): the
kernels whose rule takes that device and dtype, in the order they are tried. Only a rule's
`check` (shapes, the other tensors, autocast) is asked again on each call, and most rules
have none. Registering a kernel or marking a backend unavailable empties the cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .rules import RULES, Rule

# Every op that has a kernel somewhere: the ops named in rules.RULES, in their order there (an op's
# entry there is what makes it dispatchable). `linear` (nn.Linear's op) has only a `cpu` kernel
# (decoding's few-row matmuls); on other backends it is torch's matmul, strict or not.
OPS = tuple(dict.fromkeys(op for op, _backend in RULES))
BACKENDS = ("reference", "cpu", "triton", "cuda")
# Which kernel backends `auto` tries first, by device type.
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# The module that registers each kernel backend; imported on first use.
_BACKEND_MODULES = {"cpu": "pyminigpt.ops.native", "cuda": "pyminigpt.ops.native", "triton": "pyminigpt.ops.triton"}


@dataclass(frozen=True)
class Kernel:
    fn: Callable
    rule: Rule


_kernels: dict[str, dict[str, Kernel]] = {op: {} for op in OPS}
_unavailable: dict[str, str] = {}  # backend -> why it cannot run here
_imported: set[str] = set()
_import_lock = threading.RLock()  # a second thread waits for the backend's import instead of seeing it half done
# (op, active backend name, device, dtype) -> ((backend, fn, check or None), ...) to try in order
_choices: dict[tuple, tuple[tuple[str, Callable, Callable | None], ...]] = {}
_registry_changes = 0  # counts _forget_choices(): a choice computed across a change is not cached


def constant_result(fn: Callable) -> Callable:
    """`torch.compiler.assume_constant_result(fn)` without importing torch._dynamo when nothing has yet.

    torch's decorator imports torch._dynamo (and with it triton, on a CPU-only machine too), which
    costs more than `import torch` itself; all it does is mark the function, which this does
    without the import (tests/ops/test_dispatch.py checks the mark is torch's own)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def _forget_choices() -> None:
    global _registry_changes
    _registry_changes += 1
    _choices.clear()


def register(op: str, backend: str, fn: Callable) -> None:
    """Register `fn` (the op's public signature, inputs already validated) as `backend`'s kernel for `op`.

    The inputs it takes are `rules.RULES[(op, backend)]`.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend not in BACKENDS or backend == "reference":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    if (op, backend) not in RULES:
        raise ValueError(f"rules.RULES has no entry for ({op!r}, {backend!r}): say which inputs the kernel takes")
    _kernels[op][backend] = Kernel(fn, RULES[(op, backend)])
    _forget_choices()


def mark_unavailable(backend: str, reason: str) -> None:
    """Record why `backend` cannot run on this install (shown by `backend_status()`)."""
    _unavailable[backend] = reason
    _forget_choices()


# torch.compile cannot trace an import: the first call under compilation imports at trace time
@constant_result
def _import_backend(backend: str) -> None:
    module = _BACKEND_MODULES[backend]
    if module in _imported:
        return
    with _import_lock:
        if module in _imported:
            return
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001  (any import failure of a backend must leave the reference path working)
            for name, mod in _BACKEND_MODULES.items():
                if mod == module:
                    _unavailable.setdefault(name, f"{module} failed to import: {type(exc).__name__}: {exc}")
            _forget_choices()
        _imported.add(module)


def _kernel(op: str, backend: str) -> Kernel | None:
    if backend == "reference":
        return None
    _import_backend(backend)
    return _kernels[op].get(backend)


def _check_backend_name(name) -> str:
    if name == "auto" or name in BACKENDS:
        return name
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")


# (backend name, strict). The environment's name is checked on first use, so a typo is reported, not fatal at import.
_active: contextvars.ContextVar[tuple[str, bool]] = contextvars.ContextVar(
    "pyminigpt_backend", default=(os.environ.get("PYMINIGPT_BACKEND") or "auto", False)
)


# torch.compile cannot trace ContextVar.get: a compiled graph reads the backend once, when it is traced
@constant_result
def _active_backend() -> tuple[str, bool]:
    return _active.get()


def current_backend() -> str:
    return _check_backend_name(_active_backend()[0])


@contextlib.contextmanager
def use_backend(name: str, strict: bool = False):
    """Run the ops in this block on backend `name` ('auto', 'reference', 'cpu', 'triton', 'cuda').

    With strict=True an input the backend cannot run raises instead of falling back to
    the reference. The choice holds for this thread (this context) only. A graph that
    torch.compile traced keeps the backend it was traced with.
    """
    _check_backend_name(name)
    token = _active.set((name, bool(strict)))
    try:
        yield
    finally:
        _active.reset(token)


def _candidates(op: str, name: str, device_type: str, dtype: torch.dtype) -> tuple:
    """The kernels `name` would try for op on a first tensor of this device type and dtype, in order."""
    backends = AUTO_ORDER.get(device_type, ()) if _check_backend_name(name) == "auto" else (name,)
    found = []
    for backend in backends:
        kernel = _kernel(op, backend)
        if kernel is not None and kernel.rule.takes_device_and_dtype(device_type, dtype):
            found.append((backend, kernel.fn, kernel.rule.check))
    return tuple(found)


def _rule_in_words(rule: Rule) -> str:
    """What a kernel takes, for strict mode's error: its rules.RULES entry in words."""
    dtypes = ", ".join(str(d).replace("torch.", "") for d in rule.dtypes)
    return f"its kernel takes {' or '.join(rule.devices)} tensors of {dtypes}" + (
        f"; {rule.limit}" if rule.limit else ""
    )


def choose(op: str, *args) -> tuple[str, Callable]:
    """The backend that `call(op, *args)` would run, and its function. Every op's first argument is its tensor."""
    name, strict = _active_backend()
    first = args[0]
    key = (op, name, first.device, first.dtype)  # the device itself: hashing it is cheaper than its .type
    candidates = _choices.get(key)
    if candidates is None:
        changes = _registry_changes
        candidates = _candidates(op, name, first.device.type, first.dtype)
        if changes == _registry_changes:
            _choices[key] = candidates
    for backend, fn, check in candidates:
        if check is None or check(*args):
            return backend, fn
    if strict and name not in ("auto", "reference"):
        implements = name in _kernels[op] or name in _unavailable  # an unavailable backend fails every op
        if implements:
            why = _unavailable[name] if name in _unavailable else _rule_in_words(_kernels[op][name].rule)
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
