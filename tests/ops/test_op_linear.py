"""linear(x, weight, bias): the CPU kernel for decoding's few-row matmuls (csrc/cpu/linear.cpp).

Against F.linear in float64, with the FlashAttention rule (the kernel's error at most 2x
that of torch's matmul in the same precision, plus a small atol): 1 to 8 rows run on the
kernel, more on ATen's GEMM; the weight in nn.Linear's layout and stored transposed (GPT-2's
Conv1D); awkward widths (K not a multiple of the vector, K = 0, N = 1, N past one tile of
columns), bf16, leading dims, non-contiguous inputs, gradients, opcheck, a bf16 model's logits.
Only the `cpu` backend has this kernel (no Triton or CUDA form).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET
from op_testing import assert_low_precision_close, poison

from pyminigpt import GPT, GPTConfig, ops
from pyminigpt.ops import dispatch

pytestmark = [
    pytest.mark.skipif("cpu" not in ops.available_backends(), reason="the cpu backend is not built"),
    # the interpreter stage runs the Triton kernels, and linear has none (test-python runs these)
    pytest.mark.skipif(INTERPRET, reason="no Triton kernel: the interpreter stage has nothing to run here"),
]

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _inputs(rows: int, k: int, n: int, dtype=torch.float32, bias: bool = True, layout: str = "linear"):
    """x (rows, k), weight (n, k), bias (n,); with layout "conv1d" the weight is stored (k, n) and
    passed transposed, as transformers' GPT-2 holds its projections (the kernel's second path)."""
    x = torch.randn(rows, k).to(dtype)
    stored = (torch.randn(n, k) if layout == "linear" else torch.randn(k, n)) / k**0.5
    weight = stored.to(dtype) if layout == "linear" else stored.to(dtype).t()
    return x, weight, torch.randn(n).to(dtype) if bias else None


def _check(got, x, weight, bias):
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.shape == exact.shape and got.dtype == x.dtype
    assert_low_precision_close(got, exact, F.linear(x, weight, bias), atol=ATOL[x.dtype])


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("k, n", [(768, 2304), (80, 7), (33, 1), (769, 50), (5, 3), (0, 5), (130, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_matches_float64(rows, k, n, dtype, layout):
    x, weight, bias = _inputs(rows, k, n, dtype, layout=layout)
    poison("cpu", rows * n)
    with ops.use_backend("cpu", strict=True):
        _check(ops.linear(x, weight, bias), x, weight, bias)
        _check(ops.linear(x, weight), x, weight, None)


def test_few_rows_run_on_the_kernel():
    x, weight, bias = _inputs(8, 64, 10)
    assert dispatch.choose("linear", x, weight, bias)[0] == "cpu"
    assert dispatch.choose("linear", x.bfloat16(), weight, bias)[0] == "reference"  # mixed dtypes: torch's matmul
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for torch's matmul, not for a custom op
        assert dispatch.choose("linear", x, weight, bias)[0] == "reference"


def test_leading_dims_and_non_contiguous_inputs():
    x = torch.randn(2, 3, 2 * 96)[..., ::2]  # 6 rows of a strided last dim
    weight = torch.randn(96, 40).t()  # (40, 96) with a strided last dim
    assert not x.is_contiguous() and not weight.is_contiguous()
    with ops.use_backend("cpu", strict=True):
        got = ops.linear(x, weight)
    assert got.shape == (2, 3, 40)
    _check(got.reshape(6, 40), x.reshape(6, 96), weight, None)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_gradients_match_torch(layout):
    x, weight, bias = (t.detach().requires_grad_() for t in _inputs(3, 80, 50, layout=layout))
    grad_y = torch.randn(3, 50)
    with ops.use_backend("cpu", strict=True):
        got = torch.autograd.grad(ops.linear(x, weight, bias), (x, weight, bias), grad_y)
    want = torch.autograd.grad(F.linear(x, weight, bias), (x, weight, bias), grad_y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_kernel_takes_an_empty_inner_dim():
    x, weight, bias = torch.randn(3, 0), torch.randn(5, 0), torch.randn(5)
    torch.testing.assert_close(torch.ops.pyminigpt.linear(x, weight, bias), bias.expand(3, 5))


def test_opcheck():
    x, weight, bias = _inputs(4, 80, 33)
    torch.library.opcheck(torch.ops.pyminigpt.linear, (x, weight, bias))
    torch.library.opcheck(torch.ops.pyminigpt.linear, (x, weight, None))
    torch.library.opcheck(torch.ops.pyminigpt.linear, tuple(t.requires_grad_() for t in (x, weight, bias)))
    torch.library.opcheck(torch.ops.pyminigpt.linear, _inputs(4, 80, 33, layout="conv1d"))


def test_bad_inputs_name_the_argument():
    x, weight, bias = _inputs(2, 16, 4)
    with pytest.raises(ValueError, match="weight"):
        ops.linear(x, weight[:, :8])
    with pytest.raises(ValueError, match="bias"):
        ops.linear(x, weight, bias[:3])
    with pytest.raises(TypeError, match="x must be"):
        ops.linear(x.long(), weight)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        torch.ops.pyminigpt.linear(x, weight.bfloat16(), None)


def test_bf16_model_decode_step():
    """A bf16 model's logits for one new token per row (the kernel's case) against the float64 model."""
    config = GPTConfig(vocab_size=301, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    model = GPT(config).eval()
    ids = torch.randint(0, config.vocab_size, (3, 1))
    with torch.no_grad():
        exact = model.double()(ids).logits
        with ops.use_backend("reference"):
            reference_bf16 = model.bfloat16()(ids).logits
        with ops.use_backend("cpu"):
            got = model(ids).logits
    assert_low_precision_close(got, exact, reference_bf16, atol=ATOL[torch.bfloat16])
