"""Launcher-level tests of the Triton kernels (kernels/*.py) and their custom operators.

The shared op tests (tests/ops/test_op_*.py) check the public functions on every backend;
these check what only the Triton launchers have: the one-tile and looped softmax paths,
the two-stage layer norm reduction, attention's masked/unmasked block split and split-K
decode, the sampler's tie handling and draw, and the operator registration.

They run on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (small sizes: the
interpreter runs ~1 ms per program). Everything is compared with the float64 reference;
low-precision results follow the FlashAttention rule: at most 2x (3x for gradients) the
error of the same computation done in that low precision, plus a small atol.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from op_testing import attention_low_precision

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

pytest.importorskip("triton")

from pyminigpt.ops import reference
from pyminigpt.ops import triton as triton_ops

attention_kernels = triton_ops.attention_kernels
layer_norm_kernels = triton_ops.layer_norm_kernels
sampling = triton_ops.sampling
softmax_kernels = triton_ops.softmax_kernels

ON_GPU = DEVICE == "cuda"
LOW = (torch.float16, torch.bfloat16)


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def assert_matches(name, out, ref64, ref_low=None, factor=2.0, atol=1e-5):
    """out vs the float64 reference: tight for fp32, the FlashAttention rule for fp16/bf16.

    atol is relative to the reference's magnitude; for fp16/bf16 it is at least one ulp of
    the output dtype (a result rounded the other way from the reference's is still right).
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out.double() - ref64).abs().max().item()
    scale = max(ref64.abs().max().item(), 1.0)
    if ref_low is None:
        bound = atol * scale
    else:
        ref_err = (ref_low.double() - ref64).abs().max().item()
        bound = factor * ref_err + max(atol, torch.finfo(out.dtype).eps) * scale
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


# ---- softmax --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [1, 80, 9000])  # one tile; one tile; looped (> 8192)
def test_softmax_fwd_bwd(dtype, width):
    x = rand(3, width, dtype=dtype, scale=3.0)
    if width > 1:
        x[0, 0] = float("-inf")  # masked logits stay at probability 0
    temperature = 0.7
    y = softmax_kernels.softmax_fwd(x, temperature)
    y64 = reference.softmax(x.double(), temperature)
    assert_matches("y", y, y64, None if dtype == torch.float32 else reference.softmax(x, temperature))
    if width > 1:
        assert y[0, 0].item() == 0.0

    dy = rand(3, width, dtype=dtype)
    dx = softmax_kernels.softmax_bwd(y, dy, temperature)
    dx64 = y64 * (dy.double() - (dy.double() * y64).sum(-1, keepdim=True)) / temperature
    if dtype == torch.float32:
        assert_matches("dx", dx, dx64)
    else:
        yl, dyl = y64.to(dtype), dy
        dx_low = (yl * (dyl - (dyl * yl).sum(-1, keepdim=True)) / temperature).to(dtype)
        assert_matches("dx", dx, dx64, dx_low, factor=3.0, atol=1e-3)


def test_softmax_strided_rows():
    x = rand(4, 2 * 300)[:, :300]  # row stride 600, contiguous last dim
    y = softmax_kernels.softmax_fwd(x, 1.3)
    assert_matches("y", y, reference.softmax(x.double(), 1.3))


# ---- layer norm -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,param_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
)
@pytest.mark.parametrize("n_rows,n_cols", [(1, 16), (37, 80), (9, 768)])  # 37 rows: uneven row groups
def test_layer_norm_fwd_bwd(dtype, param_dtype, n_rows, n_cols):
    x = (rand(n_rows, n_cols, scale=2.0) + 0.5).to(dtype)
    w, b = rand(n_cols, dtype=param_dtype), rand(n_cols, dtype=param_dtype)
    dy = rand(n_rows, n_cols, dtype=dtype)
    y, mean, rstd = layer_norm_kernels.layer_norm_fwd(x, w, b, 1e-5)
    dx, dw, db = layer_norm_kernels.layer_norm_bwd(dy, x, w, mean, rstd)
    assert mean.dtype == rstd.dtype == torch.float32 and dw.dtype == db.dtype == param_dtype

    leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
    y64 = reference.layer_norm(*leaves64)
    y64.backward(dy.double())
    xf = x.double()
    assert_matches("mean", mean, xf.mean(-1), atol=1e-6)
    assert_matches("rstd", rstd, torch.rsqrt(xf.var(-1, unbiased=False) + 1e-5), atol=1e-5)
    if dtype == torch.float32:
        for name, out, ref in zip(("y", "dx", "dw", "db"), (y, dx, dw, db), (y64, *[t.grad for t in leaves64])):
            assert_matches(name, out, ref.detach(), atol=1e-5)
        return
    leaves_low = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y_low = reference.layer_norm(*leaves_low)
    y_low.backward(dy)
    assert_matches("y", y, y64.detach(), y_low.detach(), atol=1e-3)
    for name, out, ref, low in zip(("dx", "dw", "db"), (dx, dw, db), leaves64, leaves_low):
        assert_matches(name, out, ref.grad, low.grad, factor=3.0, atol=1e-3)


# ---- attention ------------------------------------------------------------------------


def check_attention(b, h, tq, tk, d, dtype, transpose_layout=False):
    if transpose_layout:  # (B, T, H, D) storage seen as (B, H, T, D), as the model makes them
        q, k, v = (rand(b, t, h, d, dtype=dtype).transpose(1, 2) for t in (tq, tk, tk))
    else:
        q, k, v = rand(b, h, tq, d, dtype=dtype), rand(b, h, tk, d, dtype=dtype), rand(b, h, tk, d, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    out, lse = attention_kernels.attention_fwd(q, k, v, scale)
    grad_out = rand(b, h, tq, d, dtype=dtype)
    dq, dk, dv = attention_kernels.attention_bwd(grad_out, q, k, v, out, lse, scale)

    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64 = reference.causal_attention(*leaves64, scale)
    out64.backward(grad_out.double())
    tq_pos = torch.arange(tq, device=DEVICE)[:, None] + (tk - tq)
    scores64 = (leaves64[0] @ leaves64[1].transpose(-2, -1)).detach() * scale
    lse64 = scores64.masked_fill(torch.arange(tk, device=DEVICE)[None, :] > tq_pos, float("-inf")).logsumexp(-1)
    assert lse.dtype == torch.float32
    assert_matches("lse", lse, lse64, atol=1e-5 if dtype == torch.float32 else 2e-3)
    grads = (dq, dk, dv)
    if dtype == torch.float32:
        assert_matches("out", out, out64.detach(), atol=2e-5)
        for name, g, leaf in zip(("dq", "dk", "dv"), grads, leaves64):
            assert_matches(name, g, leaf.grad, atol=5e-5)
        return
    leaves_low = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_low = attention_low_precision(*leaves_low, scale)
    out_low.backward(grad_out)
    assert_matches("out", out, out64.detach(), out_low.detach(), atol=1e-3)
    for name, g, leaf, low in zip(("dq", "dk", "dv"), grads, leaves64, leaves_low):
        assert_matches(name, g, leaf.grad, low.grad, factor=3.0, atol=1e-3)


@pytest.mark.parametrize(
    "b,h,tq,tk,d",
    [
        (1, 2, 19, 19, 16),  # odd T: masked edges
        (2, 1, 40, 40, 64),  # several blocks: unmasked blocks below the diagonal
        (1, 1, 7, 45, 80),  # Tk > Tq (cache), head dim padded to 128
        (1, 1, 33, 33, 128),
        (1, 1, 3, 11, 7),  # head dim padded to 16
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention(b, h, tq, tk, d, dtype):
    check_attention(b, h, tq, tk, d, dtype)


def test_attention_fp16_strided():
    check_attention(2, 2, 21, 21, 32, torch.float16, transpose_layout=True)


# a GPU split takes >= 256 keys (the interpreter's >= 16): longer caches there, so that they split
@pytest.mark.parametrize(
    "tk,d,dtype",
    [(1, 16, torch.float32), (700 if ON_GPU else 70, 64, torch.float32), (1500 if ON_GPU else 150, 80, torch.bfloat16)],
)
def test_attention_decode_split_k(tk, d, dtype):
    """Tq == 1 goes through the split-K partial + combine kernels (fwd), the usual kernels (bwd)."""
    n_splits, _ = attention_kernels._decode_splits(2, tk, torch.device(DEVICE))
    assert tk < 64 or n_splits > 1  # the long case really splits
    check_attention(1, 2, 1, tk, d, dtype)


def test_attention_rejects_unsupported_head_dim():
    q = rand(1, 1, 4, 256)
    assert not attention_kernels.supports(q)
    with pytest.raises(ValueError, match="head dims"):
        attention_kernels.attention_fwd(q, q, q, 1.0)


# ---- top-k / top-p filter and sampling -------------------------------------------------


def kept(logits):
    return torch.isfinite(logits)


def assert_same_kept_set(out, ref, logits):
    assert torch.equal(kept(out), kept(ref)), f"kept sets differ at {torch.nonzero(kept(out) != kept(ref)).tolist()}"
    assert torch.equal(out[kept(out)], logits[kept(out)])  # kept logits pass through unchanged


def tie_heavy_logits(rows, vocab, dtype):
    """Random logits with runs of equal values (bf16-like rounding) and NaN/-inf entries."""
    logits = torch.round(rand(rows, vocab, scale=2.0) * 2) / 2
    logits[0, 1] = float("nan")
    logits[-1, 2] = float("-inf")
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "top_k,top_p,min_keep",
    [(0, 0.9, 1), (10, 1.0, 1), (1, 1.0, 1), (10, 0.6, 1), (0, 0.3, 5), (3, 0.05, 4), (0, 0.02, 1)],
)
def test_filter_matches_reference_with_ties(dtype, top_k, top_p, min_keep):
    logits = tie_heavy_logits(3, 300, dtype)
    out = sampling.top_k_top_p_filter(logits, top_k, top_p, min_keep)
    ref = reference.top_k_top_p_filter(logits, top_k, top_p, min_keep)
    assert out.dtype == logits.dtype
    assert_same_kept_set(out, ref, logits)


def test_filter_top_p_ties_at_boundary_keep_highest_indices():
    # 8 equal logits: each 1/8 of the mass. top_p = 0.3: keep 3 (mass above them 0, 1/8, 2/8 < 0.3),
    # the ones last in the stable ascending order, i.e. the highest indices.
    logits = torch.zeros(1, 8, device=DEVICE)
    out = sampling.top_k_top_p_filter(logits, 0, 0.3, 1)
    assert kept(out).tolist() == [[False] * 5 + [True] * 3]
    assert_same_kept_set(out, reference.top_k_top_p_filter(logits, 0, 0.3, 1), logits)


def test_filter_row_without_finite_logit():
    logits = torch.full((2, 16), float("-inf"), device=DEVICE)
    logits[1, 0] = float("nan")
    out = sampling.top_k_top_p_filter(logits, 3, 0.5, 1)
    assert torch.isneginf(out).all()
    assert sampling.sample(logits, 1.0, 3, 0.5, torch.rand(2, device=DEVICE)).tolist() == [0, 0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.8), (1.5, 0, 0.5), (2.0, 5, 1.0)])
def test_sample_equals_reference_for_the_same_uniforms(temperature, top_k, top_p):
    logits = tie_heavy_logits(4, 200, torch.float32)
    uniform = torch.rand(4, device=DEVICE)
    tokens = sampling.sample(logits, temperature, top_k, top_p, uniform)
    assert tokens.dtype == torch.int64 and tokens.shape == (4,)
    assert torch.equal(tokens, reference.sample(logits, temperature, top_k, top_p, uniform))
    allowed = kept(reference.top_k_top_p_filter(logits.double() / temperature, top_k, top_p))
    assert allowed.gather(1, tokens[:, None]).all()


def test_sample_inverse_cdf_frequencies():
    """u on a regular grid: each kept token is drawn (n * p_i) times, to within rounding."""
    vocab, draws, temperature, top_k, top_p = 16, 100_000 if ON_GPU else 64, 0.9, 10, 0.9
    logits = rand(1, vocab)
    uniform = (torch.arange(draws, device=DEVICE, dtype=torch.float32) + 0.5) / draws
    tokens = sampling.sample(logits.expand(draws, vocab), temperature, top_k, top_p, uniform)
    probs = torch.softmax(reference.top_k_top_p_filter(logits.double() / temperature, top_k, top_p), -1)[0]
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert (counts - draws * probs).abs().max() <= 1.0 + 1e-6 * draws


@pytest.mark.skipif(not ON_GPU, reason="a 1,000,000-draw run is for the GPU (the interpreter would take hours)")
def test_sample_frequencies_million_draws():
    vocab, draws = 1000, 1_000_000
    logits = rand(1, vocab, scale=2.0)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    uniform = torch.rand(draws, generator=generator, device=DEVICE)
    tokens = sampling.sample(logits.expand(draws, vocab), 1.0, 50, 0.95, uniform)
    probs = torch.softmax(reference.top_k_top_p_filter(logits.double(), 50, 0.95), -1)[0]
    counts = torch.bincount(tokens, minlength=vocab).double()
    expected = draws * probs
    assert counts[probs == 0].sum() == 0
    # every kept token within 5 standard deviations of its binomial mean
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs)).sqrt() + 1).all()


# ---- the custom operators --------------------------------------------------------------


def test_operators_are_registered_with_autograd():
    x = rand(3, 40).requires_grad_()
    y = triton_ops.softmax(x, 0.8)
    y.backward(torch.ones_like(y))
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name in ("softmax_fwd", "layer_norm_fwd", "causal_attention_fwd", "top_k_top_p_filter", "sample"):
        assert hasattr(torch.ops.pyminigpt_triton, name)


@pytest.mark.parametrize(
    "op,args",
    [
        ("softmax_fwd", lambda: (rand(3, 50, dtype=torch.float32), 0.7)),
        ("layer_norm_fwd", lambda: (rand(5, 32), rand(32), rand(32), 1e-5)),
        ("causal_attention_fwd", lambda: (rand(1, 1, 17, 16), rand(1, 1, 17, 16), rand(1, 1, 17, 16), 0.25)),
    ],
)
def test_opcheck(op, args):
    # fake-tensor tracing of triton_op needs a real Triton device: the interpreter runs the
    # kernels on the fake tensors, so on CPU only the schema and autograd registration are checked
    tests = {} if ON_GPU else {"test_utils": ("test_schema", "test_autograd_registration")}
    inputs = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args()]
    torch.library.opcheck(getattr(torch.ops.pyminigpt_triton, op).default, inputs, **tests)


@pytest.mark.skipif(not ON_GPU, reason="torch.compile of Triton kernels needs a CUDA device")
def test_torch_compile_traces_the_kernels():
    x = rand(8, 300, dtype=torch.bfloat16).requires_grad_()
    compiled = torch.compile(lambda t: triton_ops.softmax(t, 0.9) * 2, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert_matches("y", y / 2, reference.softmax(x.double(), 0.9), reference.softmax(x, 0.9))
