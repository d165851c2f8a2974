"""Backend choice: per-thread `use_backend`, the cached choice, strict mode, and the rules table."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from pyminigpt import ops
from pyminigpt.ops import dispatch, reference, rules

needs_cpu = pytest.mark.skipif("cpu" not in ops.available_backends(), reason="the cpu backend is not built")


@needs_cpu
def test_two_threads_hold_different_backends_at_once():
    x = torch.randn(3, 8)
    barrier = threading.Barrier(2, timeout=30)
    seen, errors = {}, []

    def run(name: str, strict: bool) -> None:
        try:
            with ops.use_backend(name, strict=strict):
                barrier.wait()  # both threads are inside their blocks now
                chosen = [dispatch.choose("softmax", x)[0] for _ in range(100)]
                barrier.wait()  # neither leaves before the other has chosen
                seen[name] = (dispatch.current_backend(), set(chosen), dispatch._active.get())
        except Exception as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=args) for args in (("reference", False), ("cpu", True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen["reference"] == ("reference", {"reference"}, ("reference", False))
    assert seen["cpu"] == ("cpu", {"cpu"}, ("cpu", True))


def test_a_new_thread_starts_at_the_default_backend():
    default = dispatch._active.get()
    seen = []
    with ops.use_backend("reference", strict=True):
        t = threading.Thread(target=lambda: seen.append(dispatch._active.get()))
        t.start()
        t.join()
        assert dispatch._active.get() == ("reference", True)
    assert seen == [default]
    assert dispatch._active.get() == default


def test_use_backend_restores_the_outer_choice_after_an_error():
    with ops.use_backend("reference"):
        with pytest.raises(RuntimeError), ops.use_backend("cpu", strict=True):
            raise RuntimeError("inside")
        assert dispatch._active.get() == ("reference", False)


def test_an_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="'nope'"), ops.use_backend("nope"):
        pass


@needs_cpu
def test_the_cached_choice_follows_the_active_backend():
    x = torch.randn(2, 8)
    for name, want in (("cpu", "cpu"), ("reference", "reference"), ("auto", "cpu"), ("cpu", "cpu")):
        with ops.use_backend(name):
            assert dispatch.choose("softmax", x)[0] == want
    with ops.use_backend("auto"):  # a dtype the cpu kernels do not take: its own cache entry
        assert dispatch.choose("softmax", x.double())[0] == "reference"
        assert dispatch.choose("softmax", x)[0] == "cpu"


@needs_cpu
def test_a_rule_check_is_asked_on_every_call():
    """Same op, device and dtype of x (one cache entry), but the rest of the inputs differ."""
    x, weight, bias = torch.randn(2, 8), torch.randn(8), torch.randn(8)
    with ops.use_backend("cpu"):
        assert dispatch.choose("layer_norm", x, weight, bias, 1e-5)[0] == "cpu"
        assert dispatch.choose("layer_norm", x, weight.double(), bias.double(), 1e-5)[0] == "reference"
        assert dispatch.choose("layer_norm", x, weight, bias, 1e-5)[0] == "cpu"
        w = torch.randn(4, 8)
        assert dispatch.choose("linear", x, w, None)[0] == "cpu"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert dispatch.choose("linear", x, w, None)[0] == "reference"
        assert dispatch.choose("linear", x, w, None)[0] == "cpu"


@needs_cpu
def test_strict_mode_names_the_backend_the_op_and_the_inputs():
    x = torch.randn(2, 8, dtype=torch.float16)
    with ops.use_backend("cpu", strict=True), pytest.raises(ValueError) as info:
        ops.softmax(x)
    assert str(info.value) == (
        "backend 'cpu' cannot run softmax on inputs [(2, 8, torch.float16, 'cpu')]: "
        "its kernel takes cpu tensors of float32, bfloat16"
    )
    weight, bias = torch.randn(8), torch.randn(8, dtype=torch.float64)
    with ops.use_backend("cpu", strict=True), pytest.raises(ValueError, match="; weight and bias of one dtype"):
        ops.layer_norm(torch.randn(2, 8), weight, bias)  # the rule's limit, in its words
    with ops.use_backend("cpu"):  # not strict: the reference runs it
        torch.testing.assert_close(ops.softmax(x), reference.softmax(x, 1.0))


@needs_cpu
def test_registering_a_kernel_empties_the_cache():
    x = torch.randn(2, 8)
    original = dispatch._kernels["softmax"]["cpu"]
    calls = []

    def counting_softmax(x, temperature):
        calls.append(temperature)
        return original.fn(x, temperature)

    with ops.use_backend("cpu", strict=True):
        ops.softmax(x, 2.0)  # fills the cache with the original kernel
        try:
            dispatch.register("softmax", "cpu", counting_softmax)
            ops.softmax(x, 3.0)
        finally:
            dispatch.register("softmax", "cpu", original.fn)
        ops.softmax(x, 4.0)
    assert calls == [3.0]


def test_register_needs_a_rule():
    with pytest.raises(ValueError, match="rules.RULES has no entry for \\('linear', 'triton'\\)"):
        dispatch.register("linear", "triton", lambda x, weight, bias: x)


def test_every_registered_kernel_reads_its_rule():
    for op, kernels in dispatch._kernels.items():
        for backend, kernel in kernels.items():
            assert kernel.rule is rules.RULES[(op, backend)]
    for op, backend in rules.RULES:
        assert op in dispatch.OPS and backend in dispatch.BACKENDS[1:]


@needs_cpu
def test_the_linear_row_limit_comes_from_the_extension():
    import pyminigpt._C

    from pyminigpt.ops import native

    assert native.LINEAR_MAX_ROWS == pyminigpt._C.LINEAR_MAX_ROWS == rules.LIMITS["linear_max_rows"]


def test_constant_result_marks_a_function_as_torch_does():
    """dispatch marks its constant functions itself, because torch's decorator imports torch._dynamo
    (and triton) at import time; the mark must be the one torch's decorator sets."""
    code = (
        "import sys, torch\n"
        "from pyminigpt.ops import dispatch\n"
        "assert 'torch._dynamo' not in sys.modules, 'importing dispatch imported torch._dynamo'\n"
        "ours = dict(vars(dispatch._active_backend))\n"
        "def f(): pass\n"
        "torch.compiler.assume_constant_result(f)\n"
        "assert vars(f) and vars(f) == ours, (vars(f), ours)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_reports_the_true_reason_a_backend_is_missing():
    """triton failing to import shows as that failure in backend_status() and `pyminigpt info`,
    not as a second failure (an old retry as a top-level `kernels` package hid it)."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # triton not importable\n"
        "from pyminigpt.cli import main\n"
        "main(['info'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    line = next(line for line in out.splitlines() if line.strip().startswith("triton "))
    assert "unavailable" in line and "import of triton halted" in line, line
    assert "kernels" not in line.replace("pyminigpt.kernels", ""), line
