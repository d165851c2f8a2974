"""The text API of generation: a prompt string in, strings out, optionally streamed piece by piece.

    generate_text(model, tokenizer, prompt, stream=callback, sos=False, **generate_kwargs) -> [prompt + continuation]

`prompt_ids`, `evaluating` and the small prompt helpers here serve `pyminigpt.analysis` too.
It runs `GPT.generate` (the one decode loop); `stream` goes to `generate` as a
`TextCallbackStreamer`, transformers' streamer protocol, so the command's `generate --stream`,
`chat` and the demo see the same tokens `generate` returns. Takes pyminigpt's tokenizers
(`pyminigpt.tokenizer`) with their `eos_id`, `pad_id` and `sos_id`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch

from .config import token_ids

# ----------------------------------------------------------------------------- prompts (analysis uses them too)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _context_length(model) -> int:
    return int(model.config.n_positions)


def _encode(tokenizer, text: str, name: str = "text", add_special_tokens: bool = False) -> list[int]:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _text_or_ids(tokenizer, text, name: str, add_special_tokens: bool = False) -> list[int]:
    """The token ids of `text`: a str is encoded, a sequence of ints (token ids) is taken as is."""
    if isinstance(text, str):
        return _encode(tokenizer, text, name, add_special_tokens)
    if isinstance(text, torch.Tensor) or not isinstance(text, Sequence):
        raise TypeError(f"{name} must be a str or a list of token ids, got {type(text).__name__}")
    ids = list(text)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{name} must be a str or a list of int token ids, got an element {i!r}")
    return ids


def prompt_ids(tokenizer, prompt: str, sos: bool = False) -> list[int]:
    """The token ids of `prompt`, after <SOS> when `sos` (models trained on <SOS> text <EOS>
    sequences) or when the prompt is empty (there must be something to continue)."""
    ids = _encode(tokenizer, prompt, "prompt")
    return [tokenizer.sos_id, *ids] if sos or not ids else ids


def _as_input(model, ids: list[int], name: str) -> torch.Tensor:
    if len(ids) > _context_length(model):
        raise ValueError(f"{name} is {len(ids)} tokens, longer than the model's context of {_context_length(model)}")
    return torch.tensor([ids], dtype=torch.long, device=_device(model))


class evaluating:
    """`with evaluating(model):` runs the block in eval mode (no dropout) and restores the mode after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# ----------------------------------------------------------------------------- streaming and generate_text


class TextCallbackStreamer:
    """A streamer for `generate` that sends each new piece of decoded text to `callback(piece)`.

    Follows transformers' protocol: the first `put` is the prompt (skipped), then one `put` per
    step with the new token of the (single) row, then `end()`. The text is decoded whole each
    step and only its growth is sent, so a byte-level BPE character split over two tokens comes
    out once complete (held back while it ends in U+FFFD). Tokens from the first stop token on
    (eos, and the padding after it) are not text.
    """

    def __init__(self, tokenizer, callback: Callable[[str], None], stop_tokens: Sequence[int] = ()):
        self.tokenizer, self.callback, self.stops = tokenizer, callback, set(stop_tokens)
        self.prompt_seen, self.stopped = False, False
        self.tokens: list[int] = []
        self.sent = ""

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if value.dim() > 1 and value.shape[0] > 1:  # transformers' TextStreamer rule
            raise ValueError("TextCallbackStreamer streams one sequence (batch size 1)")
        for token in (value[0] if value.dim() > 1 else value).tolist():
            if self.stopped or token in self.stops:
                self.stopped = True
                return
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd") and len(text) > len(self.sent):
            self.callback(text[len(self.sent) :])
            self.sent = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens)
        if len(text) > len(self.sent):  # what was held back: an incomplete character at the very end
            self.callback(text[len(self.sent) :])
            self.sent = text


def generate_text(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    stream: Callable[[str], None] | None = None,
    sos: bool = False,
    **generate_kwargs,
) -> list[str]:
    """Continue `prompt`; returns one string (prompt + continuation) per returned sequence.

    `generate_kwargs` are those of `GPT.generate` (max_new_tokens, do_sample, temperature,
    top_k, top_p, repetition_penalty, num_beams, num_return_sequences, generator, ...); a sequence
    stops at the tokenizer's <EOS> unless `eos_token_id` says otherwise. `sos` starts the
    prompt with <SOS> (see `prompt_ids`).

    With `stream`, `stream(piece)` receives each new piece of text as soon as its token is
    drawn (through `generate`'s streamer: same draws, same text). Streaming returns one sequence.

    `prompt` may also be token ids, taken as they are (`sos` is then ignored); the
    strings returned start with their decoded text.
    """
    if isinstance(prompt, str):
        ids = prompt_ids(tokenizer, prompt, sos)
    else:
        ids = _text_or_ids(tokenizer, prompt, "prompt")
        if not ids:
            raise ValueError("prompt has no token ids: there is nothing to continue")
        prompt = tokenizer.decode(ids)
    input_ids = _as_input(model, ids, "prompt")
    generate_kwargs.setdefault("eos_token_id", tokenizer.eos_id)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_id)
    stops = set(token_ids("eos_token_id", generate_kwargs["eos_token_id"]))  # generate pads only after <EOS>
    if stream is not None:
        if generate_kwargs.get("num_return_sequences") not in (None, 1):
            raise ValueError("stream needs num_return_sequences=1")
        generate_kwargs["streamer"] = TextCallbackStreamer(tokenizer, stream, stops)
    with evaluating(model):
        rows = model.generate(input_ids, **generate_kwargs)[:, input_ids.shape[1] :].tolist()
    return [prompt + tokenizer.decode(_until(row, stops)) for row in rows]


def _until(ids: list[int], stops: set[int]) -> list[int]:
    """ids up to (not including) the first stop token."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids
