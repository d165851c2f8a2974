"""Assisted decoding (`generate(..., assistant_model=draft)`): a small draft proposes, the model verifies.

Each round the draft (another `pyminigpt.GPT` with the same vocabulary) proposes k tokens greedily;
the model then runs all of them in ONE forward (k + 1 positions on its KV cache) and keeps the
longest prefix of the proposal that equals its own greedy choice, plus its own next token. So
every round yields between 1 and k + 1 tokens for one forward of the model, and the output is
token for token the model's own greedy output. Rejected positions are dropped from both KV caches
(`KVCache.crop`). k starts at `num_assistant_tokens` (transformers' default 20); with
`num_assistant_tokens_schedule="heuristic"` it grows by 2 after a fully accepted round and
shrinks by 1 otherwise, as in transformers.

Greedy search, one prompt (batch size 1, as transformers), one beam.
"""

from __future__ import annotations

import torch

from .processors import seen_tokens
from .request import finish


class _Follower:
    """A model and its KV cache, which holds every token of the sequence but the last few `pending` ones."""

    def __init__(self, model, capacity: int):
        self.model, self.cache = model, model.new_cache(1, capacity)

    def feed(self, sequence: torch.Tensor, upto: int, keep: int = 1) -> torch.Tensor:
        """Run sequence[:, cache.length:upto] on the cache; the float logits of the last `keep` positions."""
        out = self.model._forward(sequence[:, self.cache.length : upto], cache=self.cache, use_cache=True,
                                  logits_to_keep=keep)  # fmt: skip
        return out.logits[0].float()


def _check_assistant(request, assistant) -> None:
    from ..model import GPT

    c, model = request.config, request.model
    if not isinstance(assistant, GPT):
        raise TypeError(f"assistant_model must be a pyminigpt.GPT, got {type(assistant).__name__}")
    if assistant.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"assistant_model has vocab_size {assistant.config.vocab_size}, the model {model.config.vocab_size}: "
            "they must share the vocabulary"
        )
    if assistant.device != model.device:
        raise ValueError(f"assistant_model is on {assistant.device} but the model is on {model.device}")
    for name, value, plain in (("do_sample", c.do_sample, False), ("num_beams", c.num_beams, 1)):
        if (value or plain) != plain:
            raise ValueError(f"assisted decoding supports greedy search only: {name}={value!r} is not supported")
    if c.output_scores or c.output_logits:
        raise ValueError("output_scores / output_logits are not supported with assistant_model")
    if request.input_ids.shape[0] != 1:
        raise ValueError(f"assisted decoding takes one prompt (batch size 1), got {request.input_ids.shape[0]}")
    if request.attention_mask is not None and not bool(request.attention_mask.all()):
        raise ValueError("assisted decoding takes one prompt without padding")


def assisted_decoding(request, assistant):
    _check_assistant(request, assistant)
    c, streamer = request.config, request.streamer
    prompt = request.input_ids
    T, new = prompt.shape[1], request.max_new_tokens
    end = T + new
    k = c.num_assistant_tokens or 20
    heuristic = c.num_assistant_tokens_schedule == "heuristic"
    process = request.processors()
    uses_seen = process.seen is not None
    eos = set(request.eos)
    sequence = torch.empty(1, end, dtype=torch.long, device=prompt.device)
    sequence[:, :T] = prompt
    length = T
    target = _Follower(request.model, end)
    draft = _Follower(assistant, min(end, assistant.config.n_positions))
    if streamer is not None:
        streamer.put(prompt.cpu())

    def choose(logits: torch.Tensor, upto: int) -> int:
        """The greedy token after sequence[:, :upto], given the logits (V,) there."""
        if uses_seen:  # the repetition penalty of exactly this prefix
            process.seen = seen_tokens(sequence[:, :upto], logits.shape[-1])
        return int(process.pre(sequence[:, :upto], logits.unsqueeze(0), upto - T).argmax(-1))

    if T > 1:  # the caches hold every token but the last
        target.feed(sequence, T - 1)
        draft.feed(sequence, T - 1)
    done = False
    while not done and length < end:
        proposals = min(k, end - length - 1, assistant.config.n_positions - length)
        for i in range(max(proposals, 0)):  # the draft's greedy proposal, one token per forward
            sequence[0, length + i] = choose(draft.feed(sequence, length + i)[-1], length + i)
        proposals = max(proposals, 0)
        logits = target.feed(sequence, length + proposals, keep=proposals + 1)  # every position in one forward
        accepted = []
        for i in range(proposals + 1):
            token = choose(logits[i], length + i)
            accepted.append(token)
            if token in eos or i == proposals or token != int(sequence[0, length + i]):
                break
        sequence[0, length : length + len(accepted)] = torch.tensor(accepted, device=sequence.device)
        length += len(accepted)
        done = any(t in eos for t in accepted)
        if streamer is not None:
            streamer.put(torch.tensor([accepted]))  # (1, n), as transformers' assisted decoding
        target.cache.crop(min(target.cache.length, length - 1))
        draft.cache.crop(min(draft.cache.length, length - 1))
        if heuristic:
            k = k + 2 if len(accepted) == proposals + 1 else max(1, k - 1)
    return finish(request, sequence[:, :length].clone())
