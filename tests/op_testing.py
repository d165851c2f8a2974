"""Helpers for the op tests: poisoned memory, error measurement, the low-precision rule,
and skipping the inputs a CUDA backend declines by its documented limits."""

from __future__ import annotations

import pytest
import torch

from pyminigpt.ops import dispatch

# The documented input limits of the kernel backends on CUDA, by (backend, op). `auto` sends
# inputs outside them to another backend, so a strict test of such an input is skipped there.
DOCUMENTED_LIMITS = {
    ("cuda", "causal_attention"): "csrc/cuda/attention.cu takes fp16/bf16, head dim 64 or 128, non-empty q",
    ("triton", "layer_norm"): "kernels/layernorm.py takes rows of at most MAX_COLS (16384) columns",
}


def skip_if_declined(op: str, *args) -> None:
    """Skip the test if the active backend (the `backend` fixture's) declines `op` on `args`
    (the op's dispatch arguments) by a limit in DOCUMENTED_LIMITS, on CUDA tensors only.

    On the CPU and under the interpreter, and for any other decline, the test fails instead:
    there every input of the op tests must run on the kernel, so CI cannot pass vacuously.
    """
    backend = dispatch.current_backend()
    with dispatch.use_backend(backend):  # not strict: ask which backend would run, without raising
        chosen, _ = dispatch.choose(op, *args)
    if chosen == backend:
        return
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    inputs = [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors]
    limit = DOCUMENTED_LIMITS.get((backend, op))
    if tensors[0].device.type == "cuda" and limit is not None:
        pytest.skip(f"{backend} declines {op} on {inputs}: {limit}")
    raise AssertionError(f"backend {backend!r} declines {op} on {inputs} ({tensors[0].device.type} tensors)")


def poison(device, numel: int) -> None:
    """Leave NaN in memory the allocator is likely to hand out next, to catch unwritten outputs."""
    for n in (numel, 2 * numel):
        torch.full((n,), float("nan"), device=device)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| in float64; NaN in `got` fails the test (NaN never passes)."""
    assert not torch.isnan(got).any(), "NaN in the kernel's output"
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def assert_low_precision_close(got, exact, reference_low, factor: float = 2.0, atol: float = 1e-3) -> None:
    """The FlashAttention rule: the kernel's error is at most `factor` x the error of the
    reference run in the same low precision, plus a small atol."""
    kernel_err, reference_err = max_error(got, exact), max_error(reference_low, exact)
    assert kernel_err <= factor * reference_err + atol, f"kernel error {kernel_err} vs reference error {reference_err}"


def attention_low_precision(q, k, v, scale=None):
    """Causal attention run in q's dtype (the softmax in fp32, like the kernels): the
    error yardstick of the FlashAttention rule for fp16/bf16 attention. The reference op
    upcasts everything to fp32, which would make the yardstick unfairly tight."""
    tq, tk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    visible = torch.arange(tk, device=q.device)[None, :] <= torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
