"""Shared test set-up: which kernel backends the op tests run, and on which device.

- On a CUDA machine: the `cuda` and `triton` backends on CUDA tensors.
- On a CPU machine: the `cpu` backend.
- With TRITON_INTERPRET=1: the `triton` backend on CPU tensors, through the interpreter
  (the op tests then use their small shape lists).

PYMINIGPT_REQUIRE_BACKENDS (a comma-separated list) turns a missing backend into a test-session
error instead of an empty parametrisation, so CI cannot pass vacuously. The Makefile sets it
(`cpu` in test-python, `triton` in test-triton), as do .ci/device_stack.sh (the same two)
and bench/gpu_check.sh (`cpu,cuda,triton`).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from pyminigpt import ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_backends() -> list:
    """pytest params (backend name, device) for the kernel backends under test here."""
    available = ops.available_backends()
    params = []
    if INTERPRET:
        if "triton" in available:
            params.append(pytest.param(("triton", "cpu"), id="triton"))
        return params
    if "cpu" in available:
        params.append(pytest.param(("cpu", "cpu"), id="cpu"))
    if torch.cuda.is_available():
        params += [pytest.param((name, "cuda"), id=name) for name in ("cuda", "triton") if name in available]
    return params


KERNEL_BACKENDS = kernel_backends()
NATIVE_BACKENDS = [p for p in KERNEL_BACKENDS if p.values[0][0] in ("cpu", "cuda")]


def pytest_sessionstart(session):
    required = [b for b in os.environ.get("PYMINIGPT_REQUIRE_BACKENDS", "").split(",") if b]
    status = ops.backend_status()
    missing = {
        b: status.get(b, {}).get("reason", "unknown backend")
        for b in required
        if not status.get(b, {}).get("available")
    }
    if missing:
        raise pytest.UsageError(f"required kernel backends are missing: {missing}")


@pytest.fixture(autouse=True)
def _seed_from_test_name(request):
    """Fresh random inputs for every test, but the same ones on every run of that test:
    a failure is reproducible, and CI cannot go red by the luck of the draw."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """Runs the test with one kernel backend active (strict: no silent fallback); yields its device."""
    name, device = request.param
    with ops.use_backend(name, strict=True):
        yield device


@pytest.fixture(params=NATIVE_BACKENDS)
def native_device(request):
    """The device of a C++/CUDA backend, for tests that call torch.ops.pyminigpt directly."""
    return request.param[1]


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 directory (random weights, vocab.json + merges.txt BPE); shared, so treat it as read-only."""
    from tiny_gpt2 import make_tiny_gpt2_dir

    return make_tiny_gpt2_dir(tmp_path_factory.mktemp("tiny_gpt2"))
