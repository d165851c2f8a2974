"""causal_attention: every kernel backend against the float64 reference, forward and backward.

fp32 is compared with the reference run in float64; bf16 with the FlashAttention rule:
the kernel's max error may be at most 2x (3x for gradients) the error of the reference
run in bf16, plus a small atol. Shapes cover one position, odd lengths, Tk > Tq (a KV
cache, down to decoding one query against 1000 keys), lengths that cross the kernels'
block boundaries, head dims 16/64/80/128 and one that is not a multiple of the vector
width, and q/k/v that are strided views of one (B, T, 3, H, D) tensor, as the model makes
them. Inputs are fresh random numbers, never zeros; outputs land on memory poisoned with
NaN, and NaN never passes.

The `cuda` backend takes fp16/bf16 with head dims 64 and 128 only (`auto` sends the rest to
Triton): on CUDA the other inputs are skipped for it (`skip_if_declined`), and the tests of
the C++ operators use the dtypes and head dims each device's kernels take.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import INTERPRET
from op_testing import attention_low_precision, max_error, poison, skip_if_declined

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


def _assert_close(out, q, k, v):
    """fp32: within 1e-5 of the float64 reference; bf16: the FlashAttention rule."""
    exact = _reference_f64(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    if q.dtype == torch.float32:
        assert max_error(out, exact) < 1e-5
    else:
        assert max_error(out, exact) <= 2 * max_error(attention_low_precision(q, k, v), exact) + 1e-3


def _assert_gradients_close(grads, q, k, v, grad_out):
    """fp32: within 1e-4 of the float64 reference; bf16: the FlashAttention rule (3x for gradients)."""
    _, exact = _reference_f64(q, k, v, grad_out=grad_out)
    if q.dtype == torch.float32:
        bounds = [1e-4] * 3
    else:
        low_precision = torch.autograd.grad(attention_low_precision(q, k, v), (q, k, v), grad_out)
        bounds = [3 * max_error(low, want) + 1e-3 for low, want in zip(low_precision, exact)]
    for name, got, want, bound in zip(("dq", "dk", "dv"), grads, exact, bounds):
        assert got.shape == want.shape and got.dtype == q.dtype, name
        assert max_error(got, want) <= bound, name


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_forward_fp32(backend, shape):
    q, k, v = _inputs(shape, torch.float32, backend)
    skip_if_declined("causal_attention", q, k, v, 1.0)
    poison(backend, q.numel())
    _assert_close(ops.causal_attention(q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [0.05, 1.0], ids=["scale0.05", "scale1"])
def test_forward_scale_and_peaked_scores(backend, scale, dtype):
    # spread 4 with scale 1: scores of size ~100, so the running max changes a lot and
    # exp would overflow without it
    shape = (1, 2, 70, 70, 64)
    q, k, v = _inputs(shape, dtype, backend, spread=4.0 if scale == 1.0 else 1.0)
    skip_if_declined("causal_attention", q, k, v, scale)
    poison(backend, q.numel())
    out = ops.causal_attention(q, k, v, scale)
    exact = _reference_f64(q, k, v, scale)
    # scores of ~100 carry fp32 rounding errors of ~1e-5 into exp: measure against the
    # same computation in q's dtype
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert max_error(out, exact) <= 2 * max_error(attention_low_precision(q, k, v, scale), exact) + atol


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_forward_bf16(backend, shape):
    q, k, v = _inputs(shape, torch.bfloat16, backend)
    skip_if_declined("causal_attention", q, k, v, 1.0)
    poison(backend, q.numel())
    _assert_close(ops.causal_attention(q, k, v), q, k, v)


def _model_layout_qkv(b, t, h, d, device, dtype=torch.float32):
    """q, k, v as the model makes them: (B, H, T, D) views of one (B, T, 3, H, D) projection."""
    qkv = (torch.randn(b, t, 3, h, d, device=device) + 0.1).to(dtype)
    return [x.transpose(1, 2) for x in qkv.unbind(dim=2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_contiguous_inputs(backend, dtype):
    q, k, v = _model_layout_qkv(2, 37, 3, 64, backend, dtype)
    assert not q.is_contiguous() and q.stride(-1) == 1
    skip_if_declined("causal_attention", q, k, v, 1.0)
    _assert_close(ops.causal_attention(q, k, v), q, k, v)
    # a last dim with a stride (costs the kernels a copy, but must be right)
    qt, kt, vt = (torch.randn(2, 3, 64, 37, device=backend).to(dtype).transpose(-2, -1) for _ in range(3))
    assert qt.stride(-1) != 1
    _assert_close(ops.causal_attention(qt, kt, vt), qt, kt, vt)


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=_shape_id)
def test_gradients_fp32(backend, shape):
    q, k, v = (t.requires_grad_() for t in _inputs(shape, torch.float32, backend))
    skip_if_declined("causal_attention", q, k, v, 1.0)
    grad_out = torch.randn(q.shape, device=backend)
    poison(backend, k.numel())
    grads = torch.autograd.grad(ops.causal_attention(q, k, v), (q, k, v), grad_out)
    _assert_gradients_close(grads, q, k, v, grad_out)


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=_shape_id)
def test_gradients_bf16(backend, shape):
    q, k, v = (t.requires_grad_() for t in _inputs(shape, torch.bfloat16, backend))
    skip_if_declined("causal_attention", q, k, v, 1.0)
    grad_out = torch.randn(q.shape, device=backend).to(torch.bfloat16)
    poison(backend, k.numel())
    grads = torch.autograd.grad(ops.causal_attention(q, k, v), (q, k, v), grad_out)
    _assert_gradients_close(grads, q, k, v, grad_out)


@pytest.mark.parametrize("grad_layout", ["model", "strided_last_dim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradients_non_contiguous(backend, dtype, grad_layout):
    q, k, v = (x.detach().requires_grad_() for x in _model_layout_qkv(1, 45, 2, 64, backend, dtype))
    skip_if_declined("causal_attention", q, k, v, 1.0)
    if grad_layout == "model":  # the gradient of y.transpose(1, 2).reshape(B, T, C): (B, T, H, D) transposed
        grad_out = torch.randn(1, 45, 2, 64, device=backend).to(dtype).transpose(1, 2)
    else:
        grad_out = torch.randn(q.shape, device=backend).to(dtype).transpose(-2, -1).contiguous().transpose(-2, -1)
    grads = torch.autograd.grad(ops.causal_attention(q, k, v), (q, k, v), grad_out)
    _assert_gradients_close(grads, q, k, v, grad_out)


@pytest.mark.parametrize("tk", [1, 1000], ids=["Tk1", "Tk1000"])
def test_decode_with_more_threads_than_heads(backend, tk):
    # one head, four threads: the CPU kernel splits the keys into ranges and merges them
    q, k, v = _inputs((1, 1, 1, tk, 64), torch.float32, backend)
    skip_if_declined("causal_attention", q, k, v, 1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        out = ops.causal_attention(q, k, v)
    finally:
        torch.set_num_threads(threads)
    _assert_close(out, q, k, v)


# ---- the C++ operators themselves (cpu and cuda backends) ----------------------------


# The dtypes each device's operator takes: csrc/cpu/causal_attention.cpp fp32/bf16 and any head dim;
# csrc/cuda/causal_attention.cu fp16/bf16 (tensor cores) and head dims 64 and 128 only.
NATIVE_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16)}


def _native_shape(shape, device):
    """shape, with its head dim rounded up to 64 or 128 on CUDA."""
    if device != "cuda":
        return shape
    return (*shape[:-1], 64 if shape[-1] <= 64 else 128)


@pytest.mark.parametrize("shape", [(2, 3, 37, 37, 64), (1, 2, 1, 100, 80), (1, 1, 5, 9, 7)], ids=_shape_id)
def test_native_lse(native_device, shape):
    shape = _native_shape(shape, native_device)
    scale = 1 / math.sqrt(shape[-1])
    for dtype in NATIVE_DTYPES[native_device]:
        q, k, v = _inputs(shape, dtype, native_device)
        poison(native_device, q.numel())
        _, lse = torch.ops.pyminigpt.causal_attention_fwd(q, k, v, scale)
        assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
        # the reference from the same fp16/bf16 inputs: the scores are exact products summed in fp32
        tolerance = 1e-5 if dtype == torch.float32 else 1e-4
        assert max_error(lse, _reference_lse_f64(q, k, scale)) < tolerance, dtype


@pytest.mark.parametrize("shape", [(2, 2, 9, 9, 16), (1, 2, 1, 20, 16), (1, 1, 4, 13, 7)], ids=_shape_id)
def test_native_opcheck(native_device, shape):
    for dtype in NATIVE_DTYPES[native_device]:
        q, k, v = (t.requires_grad_() for t in _inputs(_native_shape(shape, native_device), dtype, native_device))
        torch.library.opcheck(torch.ops.pyminigpt.causal_attention_fwd, (q, k, v, 0.25))
        out, lse = torch.ops.pyminigpt.causal_attention_fwd(q, k, v, 0.25)
        grad_out = torch.randn_like(out)
        args = (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.25)
        torch.library.opcheck(torch.ops.pyminigpt.causal_attention_bwd, args)


def test_native_rejects_bad_inputs(native_device):
    device = native_device
    q, k, v = _inputs(_native_shape((1, 2, 4, 6, 16), device), torch.bfloat16, device)
    # the inputs, and each device's message (csrc/cpu/causal_attention.cpp, csrc/cuda_ops.cpp and
    # csrc/cuda/causal_attention.cu)
    cases = [
        (
            (q.double(), k.double(), v.double()),
            {"cpu": "q must be float32 or bfloat16", "cuda": "q must be float32, float16 or bfloat16"},
        ),
        ((q, k.float(), v), {"cpu": "k must have q's dtype", "cuda": "k must have dtype"}),
        ((q, k[:, :, :3], v[:, :, :3]), {"cpu": "at least as many positions", "cuda": "kv_len must be >= q_len"}),
        ((q, k, v[..., :8]), {"cpu": "v must have q's B, H and D", "cuda": "v must have k's shape"}),
        # the CUDA kernels' limits (the cpu operator takes these)
        ((q.float(), k.float(), v.float()), {"cuda": "dtype must be fp16 or bf16"}),
        ((q[..., :48], k[..., :48], v[..., :48]), {"cuda": "head_dim must be 64 or 128"}),
    ]
    for args, messages in cases:
        if device in messages:
            with pytest.raises(RuntimeError, match=messages[device]):
                torch.ops.pyminigpt.causal_attention_fwd(*args, 0.25)


def test_public_api_rejects_tk_below_tq(backend):
    q, k, v = _inputs((1, 1, 5, 5, 16), torch.float32, backend)
    with pytest.raises(ValueError, match="Tk >= Tq"):
        ops.causal_attention(q, k[:, :, :4], v[:, :, :4])
