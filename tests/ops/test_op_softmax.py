"""softmax(x, temperature): every kernel backend against the float64 reference.

Every dtype is held to the FlashAttention rule against the reference in float64: the
kernel's error is at most 2x (3x for gradients) the error of the reference run in the
same precision, plus a small atol. (Even in fp32 the rounding of x / T alone gives a
relative error of |x / T| * 6e-8 in exp(x / T), so a fixed atol would be wrong for wide,
peaked rows.) Fresh random inputs, outputs on NaN-poisoned memory.
"""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRET
from op_testing import assert_low_precision_close, max_error, poison

from pyminigpt import ops
from pyminigpt.ops import reference

# a single element, odd widths, GPT-2's width, leading batch dims, a vocabulary-wide row
SHAPES = [(1, 1), (1, 80), (7, 33), (3, 5, 80), (64, 17)] + ([] if INTERPRET else [(4, 50257), (129, 768)])
TEMPERATURES = [1.0, 0.7, 2.5]


def _inputs(shape, dtype, device, spread=3.0):
    return (torch.randn(shape, device=device) * spread).to(dtype)


def _reference_f64(x, temperature, grad_y=None):
    leaf = x.detach().double().requires_grad_()
    y = reference.softmax(leaf, temperature)
    if grad_y is None:
        return y.detach()
    return torch.autograd.grad(y, leaf, grad_y.double())[0]


def _low_precision_dtypes(device):
    return [torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_fp32(backend, shape, temperature):
    x = _inputs(shape, torch.float32, backend)
    poison(backend, x.numel())
    y = ops.softmax(x, temperature)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_low_precision_close(y, _reference_f64(x, temperature), reference.softmax(x, temperature), atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_low_precision(backend, shape):
    for dtype in _low_precision_dtypes(backend):
        x = _inputs(shape, dtype, backend)
        y = ops.softmax(x, 0.8)
        assert y.dtype == dtype
        assert_low_precision_close(y, _reference_f64(x, 0.8), reference.softmax(x, 0.8), atol=1e-4)


def test_masked_and_extreme_logits(backend):
    """-inf entries get probability 0; huge logits do not overflow (the max is subtracted)."""
    x = _inputs((6, 97), torch.float32, backend)
    x[0, 5] = 1e4
    x[1] = -1e4
    x[:, ::3] = float("-inf")
    y = ops.softmax(x, 0.5)
    assert (y[:, ::3] == 0).all()
    assert max_error(y, _reference_f64(x, 0.5)) < 1e-6


def test_non_contiguous_input(backend):
    base = _inputs((12, 2 * 80), torch.float32, backend)
    for x in (base[::3, ::2], _inputs((80, 9), torch.float32, backend).t()):
        assert not x.is_contiguous()
        assert max_error(ops.softmax(x, 1.7), _reference_f64(x, 1.7)) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradient_fp32(backend, shape, temperature):
    x = _inputs(shape, torch.float32, backend).requires_grad_()
    grad_y = torch.randn(shape, device=backend)
    poison(backend, x.numel())
    (dx,) = torch.autograd.grad(ops.softmax(x, temperature), x, grad_y)
    (dx_fp32,) = torch.autograd.grad(reference.softmax(x, temperature), x, grad_y)
    assert_low_precision_close(dx, _reference_f64(x, temperature, grad_y), dx_fp32, factor=3.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(7, 33), (64, 17), (3, 5, 80)], ids=str)
def test_gradient_low_precision(backend, shape):
    for dtype in _low_precision_dtypes(backend):
        x = _inputs(shape, dtype, backend).requires_grad_()
        grad_y = torch.randn(shape, device=backend).to(dtype)
        (dx,) = torch.autograd.grad(ops.softmax(x, 0.8), x, grad_y)
        (dx_low,) = torch.autograd.grad(reference.softmax(x, 0.8), x, grad_y)
        assert dx.dtype == dtype
        assert_low_precision_close(dx, _reference_f64(x, 0.8, grad_y), dx_low, factor=3.0, atol=1e-3)


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_opcheck(native_device, transposed):
    """Fake tensors must match the kernels, strides included (a transposed input gives a
    row-major output)."""
    x = _inputs((5, 37), torch.float32, native_device)
    if transposed:
        x = x.t().contiguous().t()  # (5, 37) with strides (1, 5)
    torch.library.opcheck(torch.ops.pyminigpt.softmax_fwd, (x, 0.7))
    torch.library.opcheck(torch.ops.pyminigpt.softmax_fwd, (x.clone().requires_grad_(), 0.7))
    y = torch.ops.pyminigpt.softmax_fwd(x, 0.7)
    grad_y = torch.randn_like(y)
    if transposed:
        y, grad_y = y.t().contiguous().t(), grad_y.t().contiguous().t()
    torch.library.opcheck(torch.ops.pyminigpt.softmax_bwd, (y, grad_y, 0.7))


def test_composes_with_torch_compile(native_device):
    x = _inputs((4, 50), torch.float32, native_device)
    with ops.use_backend("cpu" if native_device == "cpu" else "cuda", strict=True):
        compiled = torch.compile(lambda t: ops.softmax(t, 0.9) * 2, fullgraph=False)
        assert max_error(compiled(x), 2 * _reference_f64(x, 0.9)) < 1e-6


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(2, 3), 0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
        ((torch.randn(2, 3), -1.0), ValueError, "temperature"),
        ((torch.randn(2, 3), float("nan")), ValueError, "temperature"),
        ((torch.randn(2, 3), "hot"), TypeError, "temperature must be a number"),
        ((torch.ones(2, 3, dtype=torch.long), 1.0), TypeError, "x must be a floating-point tensor"),
        (([1.0, 2.0], 1.0), TypeError, "x must be a torch.Tensor"),
        ((torch.tensor(1.0), 1.0), ValueError, "x must have at least 1 dimension"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        ops.softmax(*args)
