"""quantized_linear(x, qweight, scales, offsets, bias): every kernel against the float64 product.

The exact answer is x times the dequantized weight (pyminigpt/ops/reference.py::dequantize, the
format's definition) in float64. A kernel sums K products in fp32, in its own order, so each output
may be off by the accumulated rounding, bounded elementwise by

    |got - exact| <= 2 K u sum_k |x_k w_k| + |exact| * (output rounding)     u = 2^-24 (fp32)

(the classical bound for a recursive or blocked sum is K u; twice that covers the scale and offset
terms and the lane reductions). bf16 outputs add their rounding, 2^-8 relative. Shapes: K not a
multiple of the vector width (int8 per channel), 1, 8 and many rows (the decode kernel and the
prefill path), every group size the API accepts, fp32 and bf16 activations.
"""

from __future__ import annotations

import pytest
import torch
from op_testing import poison, skip_if_declined

from pyminigpt import ops
from pyminigpt.ops.reference import dequantize
from pyminigpt.quantize import INT4_GROUP_SIZES, quantize_weight

ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8}


def _skip_cuda_backend():
    from pyminigpt.ops import dispatch

    if dispatch.current_backend() == "cuda":
        pytest.skip("quantized_linear has no CUDA C++ form: CUDA tensors run the Triton kernel")


def _layer(n, k, weights, group_size, dtype, bias=True):
    qweight, scales, offsets = quantize_weight(torch.randn(n, k) / k**0.5, weights, group_size)
    return qweight, scales, offsets, (torch.randn(n).to(dtype) if bias else None)


def _check(got, x, qweight, scales, offsets, bias):
    w = dequantize(qweight, scales, offsets).double().to(got.device)
    xd = x.double()
    exact = xd @ w.t() + (0 if bias is None else bias.double())
    magnitude = xd.abs() @ w.abs().t() + (0 if bias is None else bias.double().abs())
    k = x.shape[-1]
    bound = 2 * k * 2.0**-24 * magnitude + ROUNDING[x.dtype] * exact.abs() + 1e-30
    assert got.shape == exact.shape and got.dtype == x.dtype
    assert not torch.isnan(got).any()
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max().item()} over bound {(err / bound).max().item()}x"


CASES = [("int8", None, k) for k in (768, 100, 33, 5)] + [("int8", 64, 192), ("int8", 32, 96)]
CASES += [("int4", g, k) for g in INT4_GROUP_SIZES for k in (g, 3 * g)]


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("weights, group_size, k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_float64(backend, rows, weights, group_size, k, dtype):
    _skip_cuda_backend()
    n = 70  # not a multiple of a vector or of a Triton tile
    qweight, scales, offsets, bias = (
        t if t is None else t.to(backend) for t in _layer(n, k, weights, group_size, dtype)
    )
    x = torch.randn(rows, k, device=backend).to(dtype)
    skip_if_declined("quantized_linear", x, qweight, scales, offsets, bias)
    poison(backend, rows * n)
    _check(ops.quantized_linear(x, qweight, scales, offsets, bias), x, qweight, scales, offsets, bias)
    _check(ops.quantized_linear(x, qweight, scales, offsets), x, qweight, scales, offsets, None)


def test_leading_dims_and_empty_inputs(backend):
    _skip_cuda_backend()
    qweight, scales, offsets, bias = (t.to(backend) for t in _layer(24, 64, "int4", 32, torch.float32))
    x = torch.randn(2, 3, 64, device=backend)
    got = ops.quantized_linear(x, qweight, scales, offsets, bias)
    assert got.shape == (2, 3, 24)
    _check(got.reshape(6, 24), x.reshape(6, 64), qweight, scales, offsets, bias)
    assert ops.quantized_linear(x[:0], qweight, scales, offsets, bias).shape == (0, 3, 24)


def test_reference_is_dequantize_then_matmul():
    qweight, scales, offsets, bias = _layer(10, 64, "int4", 32, torch.float32)
    x = torch.randn(4, 64)
    want = x @ dequantize(qweight, scales, offsets).t() + bias
    torch.testing.assert_close(ops.reference.quantized_linear(x, qweight, scales, offsets, bias), want)


def test_bad_inputs_name_the_argument():
    qweight, scales, offsets, _ = _layer(8, 64, "int4", 32, torch.float32)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="qweight"):
        ops.quantized_linear(x, qweight.float(), scales, offsets)
    with pytest.raises(ValueError, match="qweight"):
        ops.quantized_linear(torch.randn(2, 32), qweight, scales, offsets)
    with pytest.raises(ValueError, match="offsets"):
        ops.quantized_linear(x, qweight, scales, None)
    with pytest.raises(TypeError, match="scales"):
        ops.quantized_linear(x, qweight, scales.double(), offsets)
    with pytest.raises(ValueError, match="scales"):
        ops.quantized_linear(x, qweight, scales[:, :1].expand(8, 3).contiguous(), offsets)
    q8, s8, _, _ = _layer(8, 64, "int8", None, torch.float32)
    with pytest.raises(ValueError, match="offsets"):
        ops.quantized_linear(x, q8, s8, s8)
    with pytest.raises(ValueError, match="bias"):
        ops.quantized_linear(x, q8, s8, None, torch.zeros(3))


def test_few_and_many_rows_run_on_the_cpu_kernel():
    if "cpu" not in ops.available_backends():
        pytest.skip("the cpu backend is not built")
    from pyminigpt.ops import dispatch

    qweight, scales, offsets, bias = _layer(8, 64, "int4", 32, torch.float32)
    for rows in (1, 8, 100):
        assert dispatch.choose("quantized_linear", torch.randn(rows, 64), qweight, scales, offsets, bias)[0] == "cpu"
    # a bias of another dtype: the reference
    x = torch.randn(2, 64).bfloat16()
    assert dispatch.choose("quantized_linear", x, qweight, scales, offsets, bias)[0] == "reference"
