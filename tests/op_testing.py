"""Helpers for the op tests: poisoned memory, error measurement, the low-precision rule,
the sampling checks (the kept set, the draws), and skipping the inputs a CUDA backend
declines by its documented limits."""

from __future__ import annotations

import pytest
import torch

from pyminigpt.ops import dispatch, reference
from pyminigpt.ops.rules import RULES

# The documented input limits of the kernel backends on CUDA, by (backend, op). `auto` sends
# inputs outside them to another backend, so a strict test of such an input is skipped there.
# The words are the rules' own (pyminigpt/ops/rules.py).
DOCUMENTED_LIMITS = {
    (backend, op): RULES[(op, backend)].limit
    for backend, op in (("cuda", "causal_attention"), ("triton", "layer_norm"))
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


# ---- sampling: the kept set and the draw, with the fp32 rounding the kernels may differ by


def near_top_p_threshold(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Tokens whose ascending cumulative probability is within 1e-6 of 1 - top_p (float64)."""
    top_k_only = reference.top_k_top_p_filter(logits.double(), top_k, 1.0)
    if top_p >= 1.0:
        return torch.zeros_like(logits, dtype=torch.bool)
    sorted_logits, order = torch.sort(top_k_only, dim=-1, stable=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    near = (cumulative - (1.0 - top_p)).abs() < 1e-6
    return near.scatter(-1, order, near)


def assert_same_kept(got: torch.Tensor, expected: torch.Tensor, logits: torch.Tensor, ambiguous: torch.Tensor):
    """The filter kept exactly `expected`'s set, outside `ambiguous`, and left kept logits unchanged."""
    assert not torch.isnan(got).any(), "NaN in the filtered logits"
    kept, expected_kept = got > float("-inf"), expected > float("-inf")
    differ = (kept != expected_kept) & ~ambiguous
    assert not differ.any(), f"kept sets differ at {differ.nonzero()[:10].tolist()}"
    assert torch.equal(got[kept], logits[kept]), "kept logits must be unchanged"
    assert (got[~kept] == float("-inf")).all()


def assert_draws_match_reference(tokens, logits, temperature, top_k, top_p, uniform):
    """Equal to the reference's draw, except where the uniform sits within 1e-6 of a bucket edge."""
    logits, tokens, uniform = logits.cpu(), tokens.cpu(), uniform.cpu()
    expected = reference.sample(logits, temperature, top_k, top_p, uniform)
    kept = reference.top_k_top_p_filter(logits.double() / temperature, top_k, top_p) > float("-inf")
    assert kept.gather(-1, tokens[:, None]).all(), "a draw outside the kept set"
    for row in (tokens != expected).nonzero().flatten().tolist():
        probs = torch.softmax(
            reference.top_k_top_p_filter(logits[row : row + 1].double() / temperature, top_k, top_p), -1
        )
        cumulative = probs[0].cumsum(0)
        edge = cumulative[min(tokens[row], expected[row])]
        assert abs(edge.item() - uniform[row].item() * cumulative[-1].item()) < 1e-6, f"row {row}"
