"""The CUDA kernels of csrc/cuda/, run on the CPU by the emulator, against the reference ops.

This checks what the kernels compute (indexing, fragment layouts, masks, barriers, the
launch configuration) on a machine without a GPU; speed, and what only the hardware does,
still need a GPU (bench/gpu_check.sh). Each case runs twice: with the first warp of a
block running ahead of the others as far as the barriers let it, and with the last one
(lanes reversed too): a missing barrier shows up in one of the two. Buffers and dynamic
shared memory end at an unmapped page in the first run and start at one in the second,
so an access past either end fails one of them.

Run with `make test-cuda-emulated` (needs the CUDA toolkit's headers, not a GPU).
"""

from __future__ import annotations

import ctypes
import mmap

import build_emulator
import pytest
import torch
from op_testing import (
    assert_draws_match_reference,
    assert_low_precision_close,
    assert_same_kept,
    attention_low_precision,
    near_top_p_threshold,
)

from pyminigpt.ops import reference

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
HALF_DTYPES = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float32, *HALF_DTYPES]

i64, f32, ptr, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int


class Heads(ctypes.Structure):
    """launchers.h's Heads: an attention input (batch, heads, len, head_dim) by its strides."""

    _fields_ = [("data", ptr), ("batch_stride", i64), ("head_stride", i64), ("row_stride", i64)]


SIGNATURES = {
    "emu_configure": (None, [i32, i32, i32]),
    "emu_last_failure": (ctypes.c_char_p, []),
    "emu_clear_failure": (None, []),
    "layer_norm_unsupported": (ctypes.c_char_p, [i64, i64, i32, i32]),
    "layer_norm_fwd": (i32, [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, f32, i32, i32]),
    "layer_norm_bwd_workspace_bytes": (ctypes.c_size_t, [i64, i64]),
    "layer_norm_bwd": (i32, [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i32, i32]),
    "softmax_unsupported": (ctypes.c_char_p, [i64, i64, f32]),
    "softmax_fwd": (i32, [ptr, ptr, i64, i64, f32, i32]),
    "softmax_bwd": (i32, [ptr, ptr, ptr, i64, i64, f32, i32]),
    "sampling_unsupported": (ctypes.c_char_p, [i64, i64, i64, f32, i64]),
    "top_k_top_p_filter": (i32, [ptr, ptr, i64, i64, i64, f32, i64, i32]),
    "sample": (i32, [ptr, ptr, ptr, i64, i64, f32, i64, f32, i32]),
    "causal_attention_unsupported": (ctypes.c_char_p, [i64, i64, i64, i64, i64, i32]),
    "causal_attention_fwd_workspace_bytes": (ctypes.c_size_t, [i64, i64, i64, i64, i64]),
    "causal_attention_fwd": (i32, [Heads] * 3 + [ptr] * 3 + [i64] * 5 + [f32, i32]),
    "causal_attention_bwd_workspace_bytes": (ctypes.c_size_t, [i64, i64, i64, i64]),
    "causal_attention_bwd": (i32, [Heads] * 4 + [ptr] * 6 + [i64] * 5 + [f32, i32]),
}


@pytest.fixture(scope="module")
def lib():
    library = ctypes.CDLL(str(build_emulator.build()))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(library, name)
        fn.restype, fn.argtypes = restype, argtypes
    return library


@pytest.fixture(params=["first warp ahead, guards after", "last warp ahead, guards before"])
def cuda(lib, request):
    """The emulated kernels; `cuda.call(name, *args)` runs a launcher and fails the test with
    the emulator's report if the launch does not succeed."""
    second_run = request.param.startswith("last")
    _GUARD["before"] = second_run  # for guarded()
    lib.emu_configure(second_run, second_run, 132)
    lib.emu_clear_failure()

    class Kernels:
        @staticmethod
        def configure(sm_count: int) -> None:
            lib.emu_configure(second_run, second_run, sm_count)

        @staticmethod
        def call(name: str, *args) -> None:
            error = getattr(lib, name)(*args)
            failure = lib.emu_last_failure().decode()
            assert error == 0 and not failure, f"{name} returned cudaError {error}: {failure}"

        @staticmethod
        def workspace(name: str, *args) -> torch.Tensor:
            """Scratch of the size the launcher's *_workspace_bytes function asks for, filled with 0xff."""
            return guarded(torch.full((max(getattr(lib, name)(*args), 1),), 0xFF, dtype=torch.uint8))

        @staticmethod
        def supported(name: str, *args) -> None:
            reason = getattr(lib, name)(*args)
            assert reason is None, f"{name}: {reason.decode()}"

    return Kernels()


_LIBC = ctypes.CDLL(None, use_errno=True)
_GUARDED: set[int] = set()  # data pointers of the guarded tensors
_GUARD = {"before": False}  # which side of guarded() tensors the unmapped page is (the `cuda` fixture sets it)


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` whose storage starts 16-byte aligned (as the CUDA binding's do) and ends
    within 15 bytes of an unmapped page, or, in the second run of each case, starts right
    after one: a kernel access past the end (or before the start) faults, and the emulator
    fails the launch naming the thread and the address."""
    nbytes = t.numel() * t.element_size()
    padded = (nbytes + 15) // 16 * 16
    data_pages = (padded + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    buffer = mmap.mmap(-1, (data_pages + 1) * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    guard_page = 0 if _GUARD["before"] else data_pages
    guard = ctypes.c_void_p(base + guard_page * mmap.PAGESIZE)
    assert _LIBC.mprotect(guard, ctypes.c_size_t(mmap.PAGESIZE), 0) == 0, "mprotect failed"
    start = mmap.PAGESIZE if _GUARD["before"] else data_pages * mmap.PAGESIZE - padded
    copy = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=start).view(t.dtype).view(t.shape)
    copy.copy_(t)
    _GUARDED.add(copy.data_ptr())
    return copy


def p(t: torch.Tensor) -> int:
    """The address a launcher gets: only guarded tensors (or views of one) are passed to kernels."""
    assert t.untyped_storage().data_ptr() in _GUARDED, "pass kernels guarded() tensors"
    return t.data_ptr()


def heads(t: torch.Tensor) -> Heads:
    """An attention input as launchers.h's Heads, read in place through its strides."""
    assert t.stride(3) == 1, "head_dim must be contiguous"
    return Heads(p(t), *t.stride()[:3])


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so an element the kernel never writes fails the test."""
    return guarded(torch.full_like(t, float("nan")))


# ---- layer norm ------------------------------------------------------------------------

LAYER_NORM_SHAPES = [(1, 1), (3, 7), (4, 64), (5, 768), (2, 1000), (3, 4099)]


# (x dtype, weight dtype): autocast gives half inputs fp32 weights.
LAYER_NORM_DTYPES = [(d, d) for d in ALL_DTYPES] + [(d, torch.float32) for d in HALF_DTYPES]


@pytest.mark.parametrize("rows, cols", LAYER_NORM_SHAPES)
@pytest.mark.parametrize("dtype, weight_dtype", LAYER_NORM_DTYPES, ids=str)
def test_layer_norm(cuda, rows, cols, dtype, weight_dtype):
    x = guarded((torch.randn(rows, cols) * 3 + 1).to(dtype))
    weight = guarded(torch.randn(cols).to(weight_dtype))
    bias = guarded(torch.randn(cols).to(weight_dtype))
    grad_y = guarded(torch.randn(rows, cols).to(dtype))
    codes = DTYPE_CODE[dtype], DTYPE_CODE[weight_dtype]
    cuda.supported("layer_norm_unsupported", rows, cols, *codes)

    y, mean, rstd = nan_like(x), nan_like(torch.empty(rows)), nan_like(torch.empty(rows))
    cuda.call("layer_norm_fwd", p(x), p(weight), p(bias), p(y), p(mean), p(rstd), rows, cols, 1e-5, *codes)
    xd = x.double().requires_grad_()
    wd, bd = weight.double().requires_grad_(), bias.double().requires_grad_()
    want = reference.layer_norm(xd, wd, bd, 1e-5)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(y, want.to(dtype), **tol)
    torch.testing.assert_close(mean, x.double().mean(-1).float())
    torch.testing.assert_close(rstd, (x.double().var(-1, unbiased=False) + 1e-5).rsqrt().float(), rtol=1e-4, atol=0)

    grad_x, grad_w, grad_b = nan_like(x), nan_like(weight), nan_like(bias)
    work = cuda.workspace("layer_norm_bwd_workspace_bytes", rows, cols)
    cuda.call(
        "layer_norm_bwd",
        p(grad_y),
        p(x),
        p(weight),
        p(mean),
        p(rstd),
        p(grad_x),
        p(grad_w),
        p(grad_b),
        p(work),
        rows,
        cols,
        *codes,
    )
    want_x, want_w, want_b = torch.autograd.grad(want, (xd, wd, bd), grad_y.double())
    scale = 1.0 if dtype == torch.float32 else 3e2
    for got, exp in ((grad_x, want_x), (grad_w, want_w), (grad_b, want_b)):
        torch.testing.assert_close(got.double(), exp, atol=1e-4 * scale, rtol=1e-4 * scale)


# ---- softmax ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 5), (2, 1000), (4, 4097), (1, 50257)])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_softmax(cuda, rows, cols, dtype, temperature):
    x = guarded((torch.randn(rows, cols) * 4).to(dtype))
    grad_y = guarded(torch.randn(rows, cols).to(dtype))
    code = DTYPE_CODE[dtype]
    cuda.supported("softmax_unsupported", rows, cols, temperature)
    y = nan_like(x)
    cuda.call("softmax_fwd", p(x), p(y), rows, cols, temperature, code)
    xd = x.double().requires_grad_()
    want = reference.softmax(xd, temperature)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(y, want.to(dtype), **tol)

    grad_x = nan_like(x)
    cuda.call("softmax_bwd", p(y), p(grad_y), p(grad_x), rows, cols, temperature, code)
    # The backward's inputs are the rounded y: the oracle takes the same.
    yd = y.double()
    gd = grad_y.double()
    want_grad = yd * (gd - (gd * yd).sum(-1, keepdim=True)) / temperature
    tol = {"atol": 1e-6, "rtol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(grad_x, want_grad.to(dtype), **tol)


# ---- top-k / top-p filter and sampling -------------------------------------------------

FILTERS = [(0, 0.9, 1), (1, 1.0, 1), (5, 1.0, 1), (50, 0.9, 1), (5, 0.5, 3), (0, 0.3, 1), (2000, 0.95, 1)]


@pytest.mark.parametrize("vocab", [7, 1000, 50257])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("top_k, top_p, min_keep", FILTERS)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_top_k_top_p_filter(cuda, vocab, dtype, top_k, top_p, min_keep, ties):
    rows = 3
    logits = torch.randn(rows, vocab) * 3
    if ties:
        logits = logits.round()  # many equal logits: the kept set must take ties as transformers does
    logits = guarded(logits.to(dtype))
    cuda.supported("sampling_unsupported", rows, vocab, top_k, top_p, min_keep)
    out = nan_like(logits)
    cuda.call("top_k_top_p_filter", p(logits), p(out), rows, vocab, top_k, top_p, min_keep, DTYPE_CODE[dtype])
    want = reference.top_k_top_p_filter(logits, top_k, top_p, min_keep)
    assert_same_kept(out, want, logits, near_top_p_threshold(logits, top_k, top_p))


@pytest.mark.parametrize("vocab", [7, 1000, 50257])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (50, 0.9), (1, 1.0), (0, 0.5)])
def test_sample(cuda, vocab, dtype, top_k, top_p):
    rows = 16
    logits = guarded((torch.randn(rows, vocab) * 3).to(dtype))
    uniform = torch.rand(rows)
    uniform[0], uniform[1] = 0.0, 1.0 - 2**-24  # both ends of [0, 1)
    uniform = guarded(uniform)
    tokens = guarded(torch.full((rows,), -1, dtype=torch.long))
    temperature = 0.8
    cuda.call("sample", p(logits), p(uniform), p(tokens), rows, vocab, temperature, top_k, top_p, DTYPE_CODE[dtype])
    assert_draws_match_reference(tokens, logits, temperature, top_k, top_p, uniform)


# ---- causal attention ------------------------------------------------------------------

# batch, heads, q_len, kv_len, head_dim, and the SM count the decode split (q_len == 1) is
# sized for: 132 as on an H100, 2 to force other splits.
ATTENTION_CASES = [
    (1, 2, 1, 1, 64, 132),
    (1, 1, 17, 17, 64, 132),
    (2, 2, 100, 100, 64, 132),
    (1, 2, 64, 64, 128, 132),
    (1, 1, 130, 130, 128, 132),
    (1, 2, 5, 77, 64, 132),
    (1, 1, 70, 200, 128, 132),
    (2, 2, 1, 300, 64, 132),  # 3 splits
    (2, 2, 1, 300, 64, 2),  # 1 split
    (1, 1, 1, 1000, 128, 132),  # 8 splits
    (1, 1, 1, 1000, 128, 2),  # 4 splits
]


def attention_inputs(shape, dtype, layout):
    """q, k, v and grad_out, either packed or laid out as the model passes them: q, k and v
    views of one fused (batch, len, 3, heads, head_dim) projection or, with kv_len > q_len,
    keys and values in a KV cache with room for 8 more positions; grad_out a transposed view."""
    batch, heads_, q_len, kv_len, head_dim = shape

    def randn(*size):
        return guarded(torch.randn(*size).to(dtype))

    if layout == "packed":
        q, grad_out = randn(batch, heads_, q_len, head_dim), randn(batch, heads_, q_len, head_dim)
        return q, randn(batch, heads_, kv_len, head_dim), randn(batch, heads_, kv_len, head_dim), grad_out
    q, k, v = randn(batch, q_len, 3, heads_, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if kv_len > q_len:
        k, v = (randn(batch, heads_, kv_len + 8, head_dim)[:, :, :kv_len] for _ in "kv")
    return q, k, v, randn(batch, q_len, heads_, head_dim).transpose(1, 2)


@pytest.mark.parametrize("layout", ["packed", "strided"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-{c[5]}SMs")
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_causal_attention(cuda, case, dtype, layout):
    *shape, sm_count = case
    batch, heads_, q_len, kv_len, head_dim = shape
    cuda.configure(sm_count)
    code, scale = DTYPE_CODE[dtype], head_dim**-0.5
    q, k, v, grad_out = attention_inputs(shape, dtype, layout)
    cuda.supported("causal_attention_unsupported", batch, heads_, q_len, kv_len, head_dim, code)

    # outputs are written packed
    out, lse = nan_like(q.contiguous()), nan_like(torch.empty(batch, heads_, q_len))
    work = cuda.workspace("causal_attention_fwd_workspace_bytes", batch, heads_, q_len, kv_len, head_dim)
    cuda.call("causal_attention_fwd", heads(q), heads(k), heads(v), p(out), p(lse), p(work), *shape, scale, code)

    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    exact = reference.causal_attention(qd, kd, vd, scale)
    assert_low_precision_close(out, exact, attention_low_precision(q, k, v, scale))
    scores = (qd @ kd.transpose(-2, -1)) * scale
    visible = torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + (kv_len - q_len)
    want_lse = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), want_lse.detach(), atol=1e-2, rtol=1e-3)

    grads = [nan_like(t.contiguous()) for t in (q, k, v)]
    work = cuda.workspace("causal_attention_bwd_workspace_bytes", batch, heads_, q_len, head_dim)
    cuda.call(
        "causal_attention_bwd",
        heads(grad_out),
        heads(q),
        heads(k),
        heads(v),
        p(out),
        p(lse),
        *map(p, grads),
        p(work),
        *shape,
        scale,
        code,
    )
    want = torch.autograd.grad(exact, (qd, kd, vd), grad_out.double())
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    low_grads = torch.autograd.grad(attention_low_precision(*low, scale), low, grad_out)
    for name, got, exp, yardstick in zip("qkv", grads, want, low_grads):
        assert_low_precision_close(got, exp, yardstick, factor=3.0), name


@pytest.mark.parametrize("fault", ["start", "head_stride", "row_stride", "row_stride_over_int32"])
def test_causal_attention_refuses_rows_it_cannot_read(lib, fault):
    """The launchers return cudaErrorInvalidValue, launching nothing, for an input whose rows
    16-byte copies cannot read or whose row stride does not fit in 32 bits (the torch
    binding copies such inputs first)."""
    batch, heads_, length, head_dim = 1, 2, 8, 64
    packed = guarded(torch.randn(batch, heads_, length, head_dim).half())
    good = heads(packed)
    bad = {  # in elements of 2 bytes
        "start": Heads(p(packed) + 2, *packed.stride()[:3]),
        "head_stride": Heads(p(packed), 0, 516, 64),
        "row_stride": Heads(p(packed), 0, 520, 65),
        "row_stride_over_int32": Heads(p(packed), 0, 520, 2**31),
    }[fault]
    out = nan_like(packed)
    lse, grads = nan_like(torch.empty(batch, heads_, length)), [nan_like(packed) for _ in "qkv"]
    work = guarded(torch.zeros(1 << 16, dtype=torch.uint8))
    shape, scale, code = (batch, heads_, length, length, head_dim), head_dim**-0.5, DTYPE_CODE[torch.float16]
    cuda_error_invalid_value = 1
    lib.emu_clear_failure()
    for q, k in [(bad, good), (good, bad)]:
        error = lib.causal_attention_fwd(q, k, good, p(out), p(lse), p(work), *shape, scale, code)
        assert error == cuda_error_invalid_value
        error = lib.causal_attention_bwd(good, q, k, good, p(out), p(lse), *map(p, grads), p(work), *shape, scale, code)
        assert error == cuda_error_invalid_value
    assert not lib.emu_last_failure()
    assert out.isnan().all() and all(g.isnan().all() for g in grads)
