"""The language-model loss of `GPT.forward` without the (B, T, V) logits.

With labels, `GPT.forward` computes the LM head and the cross entropy together with
`ops.linear_cross_entropy` (chunks of rows; the gradients in the same pass), so training never
holds batch x context x vocabulary logits, nor their gradient. transformers' models return the
logits with the loss; here `out.logits` is computed from the final hidden states on first access,
as the forward would have computed it (same grad mode, same autocast, same weights), and kept.
A training loop that only reads `out.loss` never pays for it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def next_token_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> torch.Tensor | None:
    """The label of every position (B, T): shift_labels as given, else labels[:, t + 1] (-100 at the end).

    As transformers' causal-LM loss: `labels` are the input tokens (position t predicts t + 1),
    `shift_labels` are already the next tokens and win when both are given.
    """
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        return None
    return F.pad(labels[:, 1:], (0, 1), value=-100)  # the last position predicts nothing


def deferred_lm_head(lm_head: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A function that returns lm_head(x) as it would have been computed now.

    It runs later under this moment's grad mode and autocast, and raises if the head's weights
    were changed in place meanwhile (an optimizer step) rather than return other logits.
    """
    grad_enabled = torch.is_grad_enabled()
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    params = [p for p in lm_head.parameters(recurse=False)]
    versions = [p._version for p in params]

    def logits() -> torch.Tensor:
        if [p._version for p in params] != versions:
            raise RuntimeError(
                "out.logits is computed on first access (the loss did not need the logits), but the LM head's "
                "weights changed since the forward (an optimizer step?): read out.logits before changing the model"
            )
        with torch.set_grad_enabled(grad_enabled), torch.autocast(device_type, autocast[1], autocast[0]):
            return lm_head(x)

    return logits
