"""layer_norm: every kernel backend against the float64 reference, forward and backward.

fp32 is compared with the reference run in float64; bf16 with the FlashAttention rule:
the kernel's max error may be at most 2x (3x for gradients) the error of the reference
run in bf16, plus a small atol. Inputs are fresh random numbers, never zeros; outputs
land on memory poisoned with NaN, and NaN never passes. The Triton kernels take rows of at
most 16384 columns (`auto` sends wider ones elsewhere): on CUDA the vocabulary-wide shape
is skipped for them (`skip_if_declined`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRET
from op_testing import max_error, poison, skip_if_declined

from pyminigpt import ops
from pyminigpt.ops import reference

# (N, C): one row, odd row counts, C = 1, a non-power-of-two C, GPT-2's 768, a vocabulary-wide row
SHAPES = [(1, 80), (7, 768), (33, 1), (64, 17), (2, 5, 80)] + ([] if INTERPRET else [(3, 50257), (129, 768)])


def _inputs(shape, dtype, device, weight_dtype=None):
    c = shape[-1]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    weight = (torch.rand(c, device=device) + 0.5).to(weight_dtype or dtype)
    bias = torch.randn(c, device=device).to(weight_dtype or dtype)
    return x, weight, bias


def _reference_f64(x, weight, bias, grad_y=None):
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y = reference.layer_norm(*leaves, eps=1e-5)
    if grad_y is None:
        return y
    return y, torch.autograd.grad(y, leaves, grad_y.double())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_fp32(backend, shape):
    x, weight, bias = _inputs(shape, torch.float32, backend)
    skip_if_declined("layer_norm", x, weight, bias, 1e-5)
    poison(backend, x.numel())
    y = ops.layer_norm(x, weight, bias)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert max_error(y, _reference_f64(x, weight, bias)) < 2e-5


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16_weight", "fp32_weight"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_bf16(backend, shape, weight_dtype):
    x, weight, bias = _inputs(shape, torch.bfloat16, backend, weight_dtype)
    skip_if_declined("layer_norm", x, weight, bias, 1e-5)
    poison(backend, x.numel())
    y = ops.layer_norm(x, weight, bias)
    assert y.dtype == torch.bfloat16
    exact = _reference_f64(x, weight, bias)
    reference_err = max_error(reference.layer_norm(x, weight, bias), exact)
    assert max_error(y, exact) <= 2 * reference_err + 1e-3


def test_non_contiguous_input(backend):
    base = torch.randn(24, 2 * 80, device=backend)
    x = base[::3, ::2]  # strided rows and columns
    xt = torch.randn(80, 9, device=backend).t()  # transposed
    weight, bias = torch.rand(80, device=backend) + 0.5, torch.randn(80, device=backend)
    for inp in (x, xt):
        assert not inp.is_contiguous()
        assert max_error(ops.layer_norm(inp, weight, bias), _reference_f64(inp, weight, bias)) < 2e-5


def test_strided_weight_and_bias(backend):
    """Every other element of longer vectors: the kernels must not read them as contiguous."""
    x = torch.randn(6, 80, device=backend)
    weight, bias = (torch.rand(160, device=backend) + 0.5)[::2], torch.randn(160, device=backend)[::2]
    assert weight.stride(0) == 2
    assert max_error(ops.layer_norm(x, weight, bias), _reference_f64(x, weight, bias)) < 2e-5


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradients_fp32(backend, shape):
    x, weight, bias = (t.requires_grad_() for t in _inputs(shape, torch.float32, backend))
    skip_if_declined("layer_norm", x, weight, bias, 1e-5)
    grad_y = torch.randn(shape, device=backend)
    poison(backend, x.numel())
    y = ops.layer_norm(x, weight, bias)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_y)
    _, expected = _reference_f64(x, weight, bias, grad_y)
    rows = x.numel() // shape[-1]
    # dx scales with rstd (C = 1: rstd = 1/sqrt(eps)); dw, db are sums over the rows
    for name, got, want, tol in zip(
        ("dx", "dweight", "dbias"), grads, expected, (1e-4 if shape[-1] > 1 else 5e-2, 2e-5 * rows, 2e-5 * rows)
    ):
        assert got.shape == want.shape, name
        assert max_error(got, want) < tol, name


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16_weight", "fp32_weight"])
@pytest.mark.parametrize("shape", [(7, 768), (64, 17), (2, 5, 80)], ids=str)
def test_gradients_bf16(backend, shape, weight_dtype):
    x, weight, bias = (t.requires_grad_() for t in _inputs(shape, torch.bfloat16, backend, weight_dtype))
    grad_y = torch.randn(shape, device=backend).to(torch.bfloat16)
    grads = torch.autograd.grad(ops.layer_norm(x, weight, bias), (x, weight, bias), grad_y)
    low_precision = torch.autograd.grad(reference.layer_norm(x, weight, bias), (x, weight, bias), grad_y)
    _, exact = _reference_f64(x, weight, bias, grad_y)
    for name, got, ref_low, want in zip(("dx", "dweight", "dbias"), grads, low_precision, exact):
        assert got.dtype == ref_low.dtype, name
        scale = want.abs().max().item()
        assert max_error(got, want) <= 3 * max_error(ref_low, want) + 1e-3 * scale, name


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_opcheck(native_device, transposed):
    """Fake tensors must match the kernels, strides included (a transposed input gives a
    row-major output)."""
    device = native_device
    x, weight, bias = _inputs((5, 80), torch.float32, device)
    if transposed:
        x = x.t().contiguous().t()  # (5, 80) with strides (1, 5)
    torch.library.opcheck(torch.ops.pyminigpt.layer_norm_fwd, (x, weight, bias, 1e-5))
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    torch.library.opcheck(torch.ops.pyminigpt.layer_norm_fwd, (x, weight, bias, 1e-5))
    _, mean, rstd = torch.ops.pyminigpt.layer_norm_fwd(x.detach(), weight.detach(), bias.detach(), 1e-5)
    grad_y = torch.randn(80, 5, device=device).t() if transposed else torch.randn(5, 80, device=device)
    torch.library.opcheck(torch.ops.pyminigpt.layer_norm_bwd, (grad_y, x.detach(), weight.detach(), mean, rstd))


def test_saved_statistics(native_device):
    device = native_device
    x, weight, bias = _inputs((9, 80), torch.float32, device)
    _, mean, rstd = torch.ops.pyminigpt.layer_norm_fwd(x, weight, bias, 1e-5)
    xd = x.double()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (9,)
    assert max_error(mean, xd.mean(-1)) < 1e-6
    assert max_error(rstd, torch.rsqrt(xd.var(-1, unbiased=False) + 1e-5)) < 1e-5


def test_weight_gradients_are_deterministic_across_thread_counts():
    if "cpu" not in ops.available_backends():
        pytest.skip("the cpu backend is not built on this install")
    x, weight, bias = _inputs((300, 80), torch.float32, "cpu")
    _, mean, rstd = torch.ops.pyminigpt.layer_norm_fwd(x, weight, bias, 1e-5)
    grad_y = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.pyminigpt.layer_norm_bwd(grad_y, x, weight, mean, rstd))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_cpu_kernel_rejects_bad_inputs():
    if "cpu" not in ops.available_backends():
        pytest.skip("the cpu backend is not built on this install")
    x, weight, bias = _inputs((4, 80), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.pyminigpt.layer_norm_fwd(x, weight[:40], bias, 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        torch.ops.pyminigpt.layer_norm_fwd(x.double(), weight, bias, 1e-5)
