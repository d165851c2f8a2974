"""causal_attention: every kernel backend against the float64 reference, forward and backward.

fp32 is compared with the reference run in float64; bf16 with the FlashAttention rule:
the kernel's max error may be at most 2x (3x for gradients) the error of the reference
run in bf16, plus a small atol. Shapes cover one position, odd lengths, Tk > Tq (a KV
cache, down to decoding one query against 1000 keys), lengths that cross the kernels'
block boundaries, head dims 16/64/80/128 and one that is not a multiple of the vector
width, and q/k/v that are strided views of one (B, T, 3, H, D) tensor, as the model makes
them. Inputs are fresh random numbers, never zeros; outputs land on memory poisoned with
NaN, and NaN never passes.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import INTERPRET
from op_testing import attention_low_precision, max_error, poison

from pyminigpt import ops
from pyminigpt.ops import reference

# (B, H, Tq, Tk, D)
SHAPES = [
    (1, 1, 1, 1, 16),  # one position
    (2, 3, 37, 37, 64),  # odd T
    (1, 2, 1, 300 if INTERPRET else 1000, 64),  # decoding one query against a KV cache
    (2, 2, 5, 70, 80),  # a few new queries against a cache; D = 80 (GPT-2 medium/large heads)
    (1, 2, 65, 65, 128),  # crosses a 64-position block
    (1, 1, 3, 11, 7),  # D not a multiple of any vector width
] + ([] if INTERPRET else [(1, 2, 300, 300, 64), (2, 2, 200, 333, 16)])  # cross 256-key blocks; Tk > Tq
GRAD_SHAPES = [s for s in SHAPES if s[3] <= 333]


def _inputs(shape, dtype, device, spread=1.0):
    b, h, tq, tk, d = shape
    q = (torch.randn(b, h, tq, d, device=device) * spread).to(dtype)
    k = (torch.randn(b, h, tk, d, device=device) * spread).to(dtype)
    v = (torch.randn(b, h, tk, d, device=device) + 0.5).to(dtype)
    return q, k, v


def _reference_f64(q, k, v, scale=None, grad_out=None):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference.causal_attention(*leaves, scale)
    if grad_out is None:
        return out
    return out, torch.autograd.grad(out, leaves, grad_out.double())


def _reference_lse_f64(q, k, scale):
    tq, tk = q.shape[-2], k.shape[-2]
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    masked = torch.arange(tk, device=q.device) > torch.arange(tq, device=q.device).unsqueeze(-1) + (tk - tq)
    return scores.masked_fill(masked, float("-inf")).logsumexp(dim=-1)


def _shape_id(shape) -> str:
    return "B{}H{}Tq{}Tk{}D{}".format(*shape)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_forward_fp32(backend, shape):
    q, k, v = _inputs(shape, torch.float32, backend)
    poison(backend, q.numel())
    out = ops.causal_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert max_error(out, _reference_f64(q, k, v)) < 1e-5


@pytest.mark.parametrize("scale", [0.05, 1.0], ids=["scale0.05", "scale1"])
def test_forward_scale_and_peaked_scores(backend, scale):
    # spread 4 with scale 1: scores of size ~100, so the running max changes a lot and
    # exp would overflow without it
    shape = (1, 2, 70, 70, 64)
    q, k, v = _inputs(shape, torch.float32, backend, spread=4.0 if scale == 1.0 else 1.0)
    poison(backend, q.numel())
    out = ops.causal_attention(q, k, v, scale)
    exact = _reference_f64(q, k, v, scale)
    # scores of ~100 carry fp32 rounding errors of ~1e-5 into exp: measure against fp32
    assert max_error(out, exact) <= 2 * max_error(attention_low_precision(q, k, v, scale), exact) + 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_forward_bf16(backend, shape):
    q, k, v = _inputs(shape, torch.bfloat16, backend)
    poison(backend, q.numel())
    out = ops.causal_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    exact = _reference_f64(q, k, v)
    reference_err = max_error(attention_low_precision(q, k, v), exact)
    assert max_error(out, exact) <= 2 * reference_err + 1e-3


def _model_layout_qkv(b, t, h, d, device, dtype=torch.float32):
    """q, k, v as the model makes them: (B, H, T, D) views of one (B, T, 3, H, D) projection."""
    qkv = (torch.randn(b, t, 3, h, d, device=device) + 0.1).to(dtype)
    return [x.transpose(1, 2) for x in qkv.unbind(dim=2)]


def test_non_contiguous_inputs(backend):
    q, k, v = _model_layout_qkv(2, 37, 3, 64, backend)
    assert not q.is_contiguous() and q.stride(-1) == 1
    assert max_error(ops.causal_attention(q, k, v), _reference_f64(q, k, v)) < 1e-5
    # a last dim with a stride (costs the kernels a copy, but must be right)
    qt, kt, vt = (torch.randn(2, 3, 64, 37, device=backend).transpose(-2, -1) for _ in range(3))
    assert qt.stride(-1) != 1
    assert max_error(ops.causal_attention(qt, kt, vt), _reference_f64(qt, kt, vt)) < 1e-5


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=_shape_id)
def test_gradients_fp32(backend, shape):
    q, k, v = (t.requires_grad_() for t in _inputs(shape, torch.float32, backend))
    grad_out = torch.randn(q.shape, device=backend)
    poison(backend, k.numel())
    out = ops.causal_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    _, expected = _reference_f64(q, k, v, grad_out=grad_out)
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
        assert got.shape == want.shape and got.dtype == torch.float32, name
        assert max_error(got, want) < 1e-4, name


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=_shape_id)
def test_gradients_bf16(backend, shape):
    q, k, v = (t.requires_grad_() for t in _inputs(shape, torch.bfloat16, backend))
    grad_out = torch.randn(q.shape, device=backend).to(torch.bfloat16)
    poison(backend, k.numel())
    grads = torch.autograd.grad(ops.causal_attention(q, k, v), (q, k, v), grad_out)
    _, exact = _reference_f64(q, k, v, grad_out=grad_out)
    reference_grads = torch.autograd.grad(attention_low_precision(q, k, v), (q, k, v), grad_out)
    for name, got, want, ref_bf16 in zip(("dq", "dk", "dv"), grads, exact, reference_grads):
        assert got.dtype == torch.bfloat16, name
        assert max_error(got, want) <= 3 * max_error(ref_bf16, want) + 1e-3, name


def test_gradients_non_contiguous(backend):
    q, k, v = (x.detach().requires_grad_() for x in _model_layout_qkv(1, 45, 2, 64, backend))
    grad_out = torch.randn(q.shape, device=backend).transpose(-2, -1).contiguous().transpose(-2, -1)
    grads = torch.autograd.grad(ops.causal_attention(q, k, v), (q, k, v), grad_out)
    _, expected = _reference_f64(q, k, v, grad_out=grad_out)
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
        assert max_error(got, want) < 1e-4, name


@pytest.mark.parametrize("tk", [1, 1000], ids=["Tk1", "Tk1000"])
def test_decode_with_more_threads_than_heads(backend, tk):
    # one head, four threads: the CPU kernel splits the keys into ranges and merges them
    q, k, v = _inputs((1, 1, 1, tk, 64), torch.float32, backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        out = ops.causal_attention(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert max_error(out, _reference_f64(q, k, v)) < 1e-5


# ---- the C++ operators themselves (cpu and cuda backends) ----------------------------


@pytest.mark.parametrize("shape", [(2, 3, 37, 37, 64), (1, 2, 1, 100, 80), (1, 1, 5, 9, 7)], ids=_shape_id)
def test_native_lse(native_device, shape):
    q, k, v = _inputs(shape, torch.float32, native_device)
    scale = 1 / math.sqrt(shape[-1])
    poison(native_device, q.numel())
    _, lse = torch.ops.pyminigpt.causal_attention_fwd(q, k, v, scale)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert max_error(lse, _reference_lse_f64(q, k, scale)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 2, 9, 9, 16), (1, 2, 1, 20, 16), (1, 1, 4, 13, 7)], ids=_shape_id)
def test_native_opcheck(native_device, shape, dtype):
    q, k, v = (t.requires_grad_() for t in _inputs(shape, dtype, native_device))
    torch.library.opcheck(torch.ops.pyminigpt.causal_attention_fwd, (q, k, v, 0.25))
    out, lse = torch.ops.pyminigpt.causal_attention_fwd(q, k, v, 0.25)
    grad_out = torch.randn_like(out)
    args = (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.25)
    torch.library.opcheck(torch.ops.pyminigpt.causal_attention_bwd, args)


def test_native_rejects_bad_inputs(native_device):
    q, k, v = _inputs((1, 2, 4, 6, 16), torch.float32, native_device)
    fwd = torch.ops.pyminigpt.causal_attention_fwd
    with pytest.raises(RuntimeError, match="q must be float32 or bfloat16"):
        fwd(q.double(), k.double(), v.double(), 0.25)
    with pytest.raises(RuntimeError, match="k must have q's dtype"):
        fwd(q, k.bfloat16(), v, 0.25)
    with pytest.raises(RuntimeError, match="at least as many positions"):
        fwd(q, k[:, :, :3], v[:, :, :3], 0.25)
    with pytest.raises(RuntimeError, match="v must have q's B, H and D"):
        fwd(q, k, v[..., :8], 0.25)


def test_public_api_rejects_tk_below_tq(backend):
    q, k, v = _inputs((1, 1, 5, 5, 16), torch.float32, backend)
    with pytest.raises(ValueError, match="Tk >= Tq"):
        ops.causal_attention(q, k[:, :, :4], v[:, :, :4])
