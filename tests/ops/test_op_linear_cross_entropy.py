"""linear_cross_entropy(x, weight, labels, bias): every kernel backend against the float64 reference.

The loss is held to a bound derived from fp32 rounding: a logit is a K-term dot product, off
by at most K u sum_k |x_k w_jk| (u = 2^-24), and the log-sum-exp adds at most V u from summing V
exponentials, so each row's loss is within 2 K u max_j sum_k |x_k w_jk| + V u (+ the same
again for safety). The gradients follow the FlashAttention rule of the other op tests: at most
3x the error of the reference run in the same precision, plus a small atol. Shapes include one
row, rows not a multiple of the chunk, GPT-2's 50257 words; rows with ignore_index, all rows
ignored (F.cross_entropy's NaN mean with zero gradients), bf16, non-contiguous inputs, autocast,
opcheck, and a memory test that no (N, V) tensor is allocated.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET
from op_testing import assert_low_precision_close, max_error

from pyminigpt import ops
from pyminigpt.ops import reference

U = 2.0**-24
# (rows, K, V, chunk_rows): one row, one chunk, rows not a multiple of the chunk, the vocabulary
SHAPES = [(1, 16, 7, None), (37, 24, 300, 8), (64, 32, 1000, 64), (50, 16, 257, 16)]
if not INTERPRET:
    SHAPES += [(40, 64, 50257, 16), (300, 96, 4099, None)]


def _inputs(rows, k, v, dtype=torch.float32, device="cpu", bias=True, ignored=0.2):
    x = torch.randn(rows, k, device=device).to(dtype)
    weight = (torch.randn(v, k, device=device) * 2 / k**0.5).to(dtype)
    b = torch.randn(v, device=device).to(dtype) if bias else None
    labels = torch.randint(0, v, (rows,), device=device)
    labels[torch.rand(rows, device=device) < ignored] = -100
    return x, weight, b, labels


def _with_grads(fn, x, weight, bias, labels, **kwargs):
    leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    loss = fn(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None, **kwargs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else (None,) * len(leaves)
    return loss.detach(), grads


def _loss_bound(x, weight, labels) -> float:
    """The fp32 rounding bound of one row's loss (see the module docstring)."""
    k, v = x.shape[-1], weight.shape[0]
    dot = (x.double().abs() @ weight.double().abs().t()).max().item() if x.numel() else 0.0
    return 2 * (2 * k * U * dot + v * U) + 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(backend, shape, bias, reduction):
    rows, k, v, chunk = shape
    x, weight, b, labels = _inputs(rows, k, v, device=backend, bias=bias)
    labels[0] = 3 % v  # at least one counted row
    exact_loss, exact_grads = _with_grads(
        reference.linear_cross_entropy, x.double(), weight.double(), None if b is None else b.double(), labels,
        reduction=reduction,
    )  # fmt: skip
    _, fp32_grads = _with_grads(reference.linear_cross_entropy, x, weight, b, labels, reduction=reduction)
    loss, grads = _with_grads(ops.linear_cross_entropy, x, weight, b, labels, reduction=reduction, chunk_rows=chunk)
    assert loss.dtype == torch.float32 and loss.shape == ()
    counted = int((labels != -100).sum())
    bound = _loss_bound(x, weight, labels) * (counted if reduction == "sum" else 1)
    assert max_error(loss, exact_loss) <= bound, (max_error(loss, exact_loss), bound)
    for got, exact, fp32 in zip(grads, exact_grads, fp32_grads):
        assert got.dtype == torch.float32 and got.shape == exact.shape
        assert_low_precision_close(got, exact, fp32, factor=3.0, atol=1e-6 * exact.abs().max().item() + 1e-9)


def test_all_rows_ignored_is_nan_with_zero_gradients(backend):
    """As F.cross_entropy: the mean over no rows is 0 / 0 = NaN, its gradients are 0; the sum is 0."""
    x, weight, b, labels = _inputs(9, 16, 50, device=backend)
    labels[:] = -100
    loss, grads = _with_grads(ops.linear_cross_entropy, x, weight, b, labels, chunk_rows=4)
    want_loss, want_grads = _with_grads(reference.linear_cross_entropy, x, weight, b, labels)
    assert torch.isnan(loss) and torch.isnan(want_loss)
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, torch.zeros_like(got)) and torch.equal(want, torch.zeros_like(want))
    total, _ = _with_grads(ops.linear_cross_entropy, x, weight, b, labels, reduction="sum")
    assert total.item() == 0.0


def test_other_ignore_index_and_leading_dims(backend):
    x, weight, b, labels = _inputs(12, 16, 40, device=backend, ignored=0.0)
    labels[::3] = 7  # ignore_index=7: these rows count for nothing
    x3, labels2 = x.reshape(3, 4, 16), labels.reshape(3, 4)
    got = ops.linear_cross_entropy(x3, weight, labels2, b, ignore_index=7, chunk_rows=5)
    want = F.cross_entropy(F.linear(x.double(), weight.double(), b.double()), labels, ignore_index=7)
    assert max_error(got, want) <= _loss_bound(x, weight, labels)


def test_low_precision(backend):
    x, weight, b, labels = _inputs(33, 32, 500, dtype=torch.bfloat16, device=backend)
    labels[0] = 1
    exact_loss, exact_grads = _with_grads(
        reference.linear_cross_entropy, x.double(), weight.double(), b.double(), labels
    )
    low_loss, low_grads = _with_grads(reference.linear_cross_entropy, x, weight, b, labels)
    loss, grads = _with_grads(ops.linear_cross_entropy, x, weight, b, labels, chunk_rows=8)
    assert_low_precision_close(loss, exact_loss, low_loss, atol=1e-3)
    for got, exact, low in zip(grads, exact_grads, low_grads):
        assert got.dtype == torch.bfloat16
        assert_low_precision_close(got, exact, low, factor=3.0, atol=1e-4)


def test_non_contiguous_inputs(backend):
    x, weight, b, labels = _inputs(20, 2 * 24, 70, device=backend)
    x = x[:, ::2]  # strided rows
    weight = torch.randn(24, 70, device=backend).t()  # (70, 24) stored transposed
    labels = torch.randint(0, 70, (40,), device=backend)[::2]
    assert not (x.is_contiguous() or weight.is_contiguous() or labels.is_contiguous())
    loss, grads = _with_grads(ops.linear_cross_entropy, x, weight, b, labels, chunk_rows=6)
    exact_loss, exact_grads = _with_grads(
        reference.linear_cross_entropy, x.double(), weight.double(), b.double(), labels
    )
    assert max_error(loss, exact_loss) <= _loss_bound(x, weight, labels)
    for got, exact in zip(grads, exact_grads):
        assert max_error(got, exact) < 1e-5


def test_no_grad_gives_the_same_loss(backend):
    x, weight, b, labels = _inputs(17, 16, 90, device=backend)
    labels[0] = 2
    with_grad, _ = _with_grads(ops.linear_cross_entropy, x, weight, b, labels, chunk_rows=4)
    with torch.no_grad():
        without = ops.linear_cross_entropy(x, weight, labels, b, chunk_rows=4)
    assert not without.requires_grad
    assert max_error(without, with_grad) <= 1e-6


def test_autocast_casts_like_f_linear():
    x, weight, b, labels = _inputs(24, 32, 300)
    labels[0] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.linear_cross_entropy(x, weight, labels, b, chunk_rows=8)
        want = reference.linear_cross_entropy(x, weight, labels, b)
    exact = reference.linear_cross_entropy(x.double(), weight.double(), labels, b.double())
    assert_low_precision_close(got, exact, want, atol=1e-3)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, w, y: ops.linear_cross_entropy(x, w, y.float()), TypeError, "labels must be an integer"),
        (lambda x, w, y: ops.linear_cross_entropy(x, w[:, :3], y), ValueError, "needs weight"),
        (lambda x, w, y: ops.linear_cross_entropy(x, w, y[:2]), ValueError, "labels must have shape"),
        (lambda x, w, y: ops.linear_cross_entropy(x, w, y + 1000), ValueError, r"labels must be in \[0, V=10\)"),
        (lambda x, w, y: ops.linear_cross_entropy(x, w, y, reduction="none"), ValueError, "reduction"),
        (lambda x, w, y: ops.linear_cross_entropy(x, w, y, chunk_rows=0), ValueError, "chunk_rows"),
        (lambda x, w, y: ops.linear_cross_entropy(x, w, y, w[:5, 0]), ValueError, "bias"),
    ],
)
def test_bad_input(call, error, match):
    x, weight, _, labels = _inputs(5, 8, 10, bias=False, ignored=0.0)
    with pytest.raises(error, match=match):
        call(x, weight, labels)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck(native_device, bias):
    x, weight, b, labels = _inputs(11, 16, 30, device=native_device, bias=bias)
    labels[0] = 1
    op = torch.ops.pyminigpt.linear_cross_entropy_fwd.default
    for grad in (False, True):
        args = (x.requires_grad_(grad), weight.requires_grad_(grad), b, labels, -100, False, grad, 4)
        torch.library.opcheck(op, args)


@pytest.mark.skipif(INTERPRET, reason="the memory test measures the CPU kernel")
def test_never_allocates_the_full_logits():
    """The profiler's record of CPU allocations (each op's own): the fused op's largest is the chunk's
    logits, the reference's the (N, V) logits."""
    rows, k, v, chunk = 1024, 32, 2048, 64
    x, weight, _, labels = _inputs(rows, k, v, bias=False)
    labels[0] = 1
    full_logits = rows * v * 4

    def largest_allocation(fn) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(x.requires_grad_(), weight.requires_grad_(), labels).backward()
        return max(e.self_cpu_memory_usage for e in prof.events())

    with ops.use_backend("cpu", strict=True):
        fused = largest_allocation(lambda *a: ops.linear_cross_entropy(*a, chunk_rows=chunk))
    assert fused <= max(chunk * v * 4, v * k * 4, rows * k * 4), fused
    assert largest_allocation(reference.linear_cross_entropy) >= full_logits  # the test can see the logits


# ---- GPT(..., labels=...): the model's loss on the fused op --------------------------------


def _tiny_gpt():
    from pyminigpt import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=97, n_positions=32, n_layer=2, n_embd=32, n_head=2)).eval()  # no dropout


def test_model_loss_and_gradients_match_the_full_logits():
    model = _tiny_gpt()
    ids = torch.randint(0, 97, (3, 20))
    labels = ids.clone()
    labels[0, 8:] = -100
    out = model(ids, labels=labels)
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids).logits
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    want.backward()
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
    shifted = model(ids, shift_labels=F.pad(labels[:, 1:], (0, 1), value=-100)).loss
    torch.testing.assert_close(shifted, out.loss, atol=0, rtol=0)


def test_model_logits_are_there_when_read():
    """With labels, out.logits is computed on first access: the same values, differentiable, kept."""
    model = _tiny_gpt()
    ids = torch.randint(0, 97, (2, 16))
    out = model(ids, labels=ids)
    want = model(ids).logits
    assert out.logits.requires_grad and out.logits is out.logits
    torch.testing.assert_close(out.logits, want, atol=0, rtol=0)
    with torch.no_grad():
        assert not model(ids, labels=ids).logits.requires_grad  # the forward's grad mode


def test_model_logits_read_after_an_optimizer_step_raise():
    model = _tiny_gpt()
    ids = torch.randint(0, 97, (2, 16))
    out = model(ids, labels=ids)
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with pytest.raises(RuntimeError, match="read out.logits before changing the model"):
        _ = out.logits
