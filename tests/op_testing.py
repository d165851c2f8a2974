"""Helpers for the op tests: poisoned memory, error measurement, the low-precision rule."""

from __future__ import annotations

import torch


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
