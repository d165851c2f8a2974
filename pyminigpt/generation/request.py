"""One `generate` call, resolved (`Request`), and what it returns (`GenerateOutput`, via `finish`).

Shared by the three decode loops: loop.py (greedy / sampling), beam.py and assisted.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GenerationConfig
from .processors import Processors


@dataclass
class GenerateOutput:
    """What `generate(..., return_dict_in_generate=True)` returns (also readable as out["sequences"])."""

    sequences: torch.Tensor  # (B * num_return_sequences, T + new) int64
    scores: tuple[torch.Tensor, ...] | None = None  # per step (B', V): the processed scores (output_scores=True)
    logits: tuple[torch.Tensor, ...] | None = None  # per step (B', V): the raw logits (output_logits=True)
    sequences_scores: torch.Tensor | None = None  # beam search with output_scores: each sequence's final score

    def __getitem__(self, name: str):
        return getattr(self, name)


@dataclass
class Request:
    """One `generate` call, resolved: the prompt, the settings and what follows from them."""

    model: object
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    config: GenerationConfig
    eos: list[int]
    pad_token_id: int | None
    max_new_tokens: int
    generator: torch.Generator | None
    streamer: object

    def processors(self, input_ids=None, attention_mask=None, min_tokens_to_keep=1) -> Processors:
        input_ids = self.input_ids if input_ids is None else input_ids
        attention_mask = self.attention_mask if attention_mask is None else attention_mask
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        return Processors(self.config, input_ids, mask, self.model.config.vocab_size, self.eos, min_tokens_to_keep)


def finish(request: Request, sequences, scores=None, logits=None, sequences_scores=None):
    c = request.config
    if request.streamer is not None:
        request.streamer.end()
    if not c.return_dict_in_generate:
        return sequences
    return GenerateOutput(
        sequences=sequences,
        scores=tuple(scores) if c.output_scores else None,
        logits=tuple(logits) if c.output_logits else None,
        sequences_scores=sequences_scores if c.output_scores else None,
    )
