"""`generate`: transformers' `generate` for `pyminigpt.GPT`, and its decode loop (greedy and sampling).

The arguments are resolved once (`config.resolve`: defaults < model.generation_config <
generation_config= < keyword arguments) and checked up front; then one of three loops runs:
this module's (greedy or sampling, one beam), `beam.beam_search` (num_beams > 1), or
`assisted.assisted_decoding` (assistant_model=). Each step turns the logits of the last position
into the next token the way transformers' logits processors do (`processors.Processors`); on the
fast path (no processors beyond repetition penalty, temperature, top-k, top-p) that is the
repetition penalty and then `argmax` or the fused `ops.sample`, as before this layer grew.

A `streamer` (transformers' protocol: `put(prompt ids)`, `put(new tokens)` per step, `end()`)
sees the tokens as they come; `TextStreamer`/`TextIteratorStreamer` work unchanged. The loop never
waits for the device on CUDA without one: "has every row stopped at eos?" is read only every
`CUDA_EOS_CHECK_INTERVAL` steps (the extra steps are cut off, so the output is transformers').
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import torch

from ..ops import validate
from . import steps
from .assisted import assisted_decoding
from .beam import beam_search
from .config import GenerationConfig, check_supported, resolve, token_ids
from .request import GenerateOutput, Request, finish

DEFAULT_NEW_TOKENS = 20  # without max_new_tokens and max_length
SETTINGS = {f.name for f in dataclasses.fields(GenerationConfig)} - {"unsupported"}


def _in_inference_mode(fn):
    """fn run under torch.inference_mode(), with the tensors it returns made ordinary tensors.

    Inference mode skips autograd's bookkeeping in every op of every decode step (the Python
    autograd wrappers of the custom ops, version counters): GPT-2-124M on 2 CPU cores, batch 1,
    went from 48.3 to 51.3 tokens/s (no_grad and inference mode interleaved in one process).
    Its tensors cannot be saved for backward, though, and a generated batch is often trained on
    next, so the caller gets clones (a few small tensors).
    """

    def ordinary(value):
        if isinstance(value, tuple):
            return tuple(ordinary(v) for v in value)
        return value.clone() if isinstance(value, torch.Tensor) else value

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        if isinstance(out, GenerateOutput):
            return GenerateOutput(**{f.name: ordinary(getattr(out, f.name)) for f in dataclasses.fields(out)})
        return ordinary(out)

    return run


@_in_inference_mode
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config=None,
    streamer=None,
    assistant_model=None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> torch.Tensor | GenerateOutput:
    """Continue input_ids (B, T); returns (B * num_return_sequences, T + new), like transformers' `generate`.

    Takes transformers' names, defaults and semantics (`inputs=` too): max_new_tokens / max_length
    (default: 20 new tokens), min_new_tokens / min_length, do_sample, temperature, top_k, top_p,
    min_p, typical_p, repetition_penalty, no_repeat_ngram_size, bad_words_ids, num_beams,
    early_stopping, length_penalty, num_return_sequences, eos_token_id (an id or a list),
    pad_token_id, bos_token_id, use_cache, return_dict_in_generate, output_scores, output_logits,
    streamer, generation_config and assistant_model (greedy only). None means "not set". Every other
    argument transformers accepts raises a ValueError naming it. `generator` (a torch.Generator on
    the model's device) is pyminigpt's own: the draws of do_sample use it.
    """
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    settings = {k: v for k, v in kwargs.items() if k in SETTINGS}
    check_supported({k: v for k, v in kwargs.items() if k not in SETTINGS})
    config = resolve(model, generation_config, settings)
    if input_ids is None:  # transformers starts from bos alone
        if config.bos_token_id is None:
            raise ValueError("input_ids is None and there is no bos_token_id to start from")
        input_ids = torch.full((1, 1), config.bos_token_id, dtype=torch.long, device=model.device)
    request = _request(model, input_ids, attention_mask, config, generator, streamer)
    if assistant_model is not None:
        return assisted_decoding(request, assistant_model)
    if (config.num_beams or 1) > 1:
        return beam_search(request)
    return decode(request)


def _request(model, input_ids, attention_mask, config, generator, streamer) -> Request:
    model._check_inputs(input_ids, attention_mask)
    T = input_ids.shape[1]
    if config.max_new_tokens is not None:
        new = config.max_new_tokens
    elif config.max_length is None:  # transformers' default: 20 new tokens, within the context
        new = min(DEFAULT_NEW_TOKENS, model.config.n_positions - T)
    else:
        new = config.max_length - T
        if new < 1:
            raise ValueError(
                f"max_length={config.max_length} leaves no room after the prompt of {T} tokens: "
                "raise max_length or set max_new_tokens"
            )
    if T + new > model.config.n_positions:
        raise ValueError(
            f"prompt length {T} + max_new_tokens {new} = {T + new} exceeds n_positions={model.config.n_positions}"
        )
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask has padding at the end of a row: pad prompts on the LEFT for generation")
    validate.generator(generator, input_ids.device)
    if streamer is not None and not (
        callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))
    ):
        raise TypeError(f"streamer must have put(token_ids) and end() methods, got {type(streamer).__name__}")
    eos = token_ids("eos_token_id", config.eos_token_id)
    vocab = model.config.vocab_size
    pad = config.pad_token_id
    if pad is not None and not (isinstance(pad, numbers.Integral) and not isinstance(pad, bool) and 0 <= pad < vocab):
        # an id outside the embedding would fail inside a later step (on CUDA as a device-side assert)
        raise ValueError(f"pad_token_id must be an int in [0, vocab_size={vocab}), got {pad!r}")
    if pad is None and eos:
        pad = eos[0]  # an eos id outside the vocabulary is never drawn, so never padded with
    return Request(model, input_ids, attention_mask, config, eos, pad, new, generator, streamer)


def decode(request: Request):
    """Greedy search or sampling, one sequence per row (num_return_sequences rows per prompt when sampling)."""
    c, streamer = request.config, request.streamer
    repeats = c.num_return_sequences or 1
    input_ids = request.input_ids.repeat_interleave(repeats, dim=0)
    mask = request.attention_mask
    mask = mask.repeat_interleave(repeats, dim=0) if mask is not None else None
    B, T = input_ids.shape
    new = request.max_new_tokens
    process = request.processors(input_ids, mask)
    sequences = None  # the tokens so far, kept only for the processors that read them
    if process.needs_sequences:
        sequences = torch.empty(B, T + new, dtype=input_ids.dtype, device=input_ids.device)
        sequences[:, :T] = input_ids
    eos = torch.tensor(request.eos, device=input_ids.device)
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    model_steps = steps.Steps(request.model, input_ids, mask, new)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits = model_steps.prefill()
    # Whether every row has stopped is read on the host only every `check_every` steps (each read
    # waits for the device); the steps run past the end are cut off below, as if never run.
    check_every = 1 if streamer is not None else steps.eos_check_interval(input_ids.device)
    new_tokens, scores, raw_logits, any_unfinished = [], [], [], []
    for step in range(new):
        logits = logits.float()
        pre = process.pre(sequences[:, : T + step] if sequences is not None else None, logits, step)
        next_token, warped = process.choose(pre, request.generator)
        if c.output_logits:
            raw_logits.append(logits)
        if c.output_scores:
            scores.append(warped if warped is not None else process.warp(pre))
        if len(eos):
            next_token = torch.where(unfinished, next_token, request.pad_token_id)
            unfinished &= ~(next_token[:, None] == eos).any(-1)  # torch.isin of many ids would sync
            any_unfinished.append(unfinished.any())
        new_tokens.append(next_token)
        if sequences is not None:
            sequences[:, T + step] = next_token
        process.seen_next(next_token)
        if streamer is not None:
            streamer.put(next_token.cpu())
        last = step + 1 == new
        if last or (len(eos) and (step + 1) % check_every == 0 and not bool(any_unfinished[-1])):
            break
        logits = model_steps.step(next_token)
    if any_unfinished:  # keep the steps up to the one where every row had stopped, as transformers does
        stopped = (~torch.stack(any_unfinished)).nonzero()
        if len(stopped):
            kept = int(stopped[0]) + 1
            new_tokens, scores, raw_logits = new_tokens[:kept], scores[:kept], raw_logits[:kept]
    return finish(request, torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1), scores, raw_logits)
