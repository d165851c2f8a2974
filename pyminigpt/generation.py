"""Text generation with transformers' `generate` names, defaults and semantics (greedy and sampling).

Each step turns the logits of the last position into the next token the way transformers'
logits processors do, in their order:

    repetition penalty -> temperature -> top-k -> top-p -> argmax (greedy) or draw (sampling)

Greedy uses only the repetition penalty. The draw is `ops.sample` (temperature, filter and
draw fused in one kernel); the processed scores themselves are computed only when asked for
(`output_scores=True`), by `ops.top_k_top_p_filter`.

The prompt runs once, filling a KV cache preallocated for prompt + max_new_tokens; each new
token then costs one position, with the LM head computed for the last position only. The
arguments are checked once up front; the loop itself never waits for the device on CUDA:
the decode step is a CUDA graph (`StaticDecoder`) and "has every row stopped at eos?" is read
only every `CUDA_EOS_CHECK_INTERVAL` steps (the extra steps are cut off, so the output is
transformers'). On the CPU the step runs eagerly on the kernels (`ops.causal_attention` reads
the cache in place) and the eos test is read every step, which costs nothing there.
Prompts of different lengths are LEFT-padded and marked by attention_mask, and positions
count from each row's first real token, as in transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from dataclasses import dataclass

import torch

from . import ops
from .ops import validate

# On CUDA, how many decode steps run between two host reads of "has every row stopped?".
CUDA_EOS_CHECK_INTERVAL = 16


@dataclass
class GenerateOutput:
    """What `generate(..., return_dict_in_generate=True)` returns."""

    sequences: torch.Tensor  # (B * num_return_sequences, T + new) int64
    scores: tuple[torch.Tensor, ...] | None = None  # per step (B', V): the processed scores (output_scores=True)
    logits: tuple[torch.Tensor, ...] | None = None  # per step (B', V): the raw logits (output_logits=True)


def seen_tokens(input_ids: torch.Tensor, vocab_size: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, vocab_size) bool: which tokens occur in each row of input_ids (B, T).

    Left padding (the positions before a row's first attention_mask 1) does not count, as in
    transformers' repetition penalty.
    """
    seen = torch.zeros(input_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    ids = input_ids
    if attention_mask is not None:
        ids = input_ids.masked_fill(attention_mask.cumsum(-1) == 0, vocab_size)  # padding -> the spare column
    return seen.scatter_(1, ids, True)[:, :vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide the positive logits of seen tokens by penalty, multiply the negative ones (CTRL's rule)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def process_scores(
    logits: torch.Tensor,
    seen: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """The scores (B, V) that transformers' logits processors make of logits (B, V).

    seen (B, V) bool marks the tokens the repetition penalty applies to (`seen_tokens`).
    Removed entries are -inf.
    """
    scores = apply_repetition_penalty(logits, seen, repetition_penalty)
    return warp_scores(scores, temperature, top_k, top_p, min_tokens_to_keep) if do_sample else scores


def warp_scores(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, min_tokens_to_keep: int = 1):
    """Temperature, then top-k, then top-p (the sampling-only processors); removed entries are -inf."""
    return ops.top_k_top_p_filter(scores / temperature, top_k, top_p, min_tokens_to_keep)


class StaticDecoder:
    """Decode steps with static shapes and addresses; on CUDA captured once in a CUDA graph and replayed.

    `step(token)` feeds token (B,) at the next cache slot and returns the next-token logits (B, V).
    Every buffer a step reads or writes is allocated here once: the token, the position ids, the
    cache slot (a (1,) device tensor, see `KVCache.slot`) and the key mask (B, 1, 1, capacity),
    True for the written slots that are not padding. Attention covers every slot of the cache under
    that mask (SDPA: the causal kernels take no length argument), so each step has the same shapes
    and the whole step (embeddings, every block, ln_f, the LM head of the last position) is one
    graph launch; the host only updates the four small buffers with device ops. With
    `use_graph=False` (the default off CUDA) the same step runs eagerly, which is how the CPU
    tests check it against the dynamic-shape loop.
    """

    def __init__(self, model, cache, padding_mask: torch.Tensor | None, last_position: torch.Tensor, use_graph=None):
        batch, capacity, device = cache.keys[0].shape[0], cache.capacity, cache.keys[0].device
        self.model, self.cache = model, cache
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.graph, self.logits = None, None
        for buffer in (*cache.keys, *cache.values):
            buffer[:, :, cache.length :].zero_()  # masked-out slots must hold numbers: 0 * NaN would poison SDPA
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position_ids = last_position.expand(batch, 1).clone()  # the position of the last token fed
        self.slot = torch.full((1,), cache.length - 1, dtype=torch.long, device=device)
        written = torch.arange(capacity, device=device) < cache.length
        mask = written if padding_mask is None else written & padding_mask.bool()
        self.key_mask = mask.expand(batch, capacity)[:, None, None, :].clone()

    def _forward(self) -> torch.Tensor:
        transformer = self.model.transformer
        x = transformer.drop(transformer.wte(self.tokens) + transformer.wpe(self.position_ids))
        for layer, block in enumerate(transformer.h):
            x, _ = block(x, self.key_mask, self.cache, layer)
        return self.model.lm_head(transformer.ln_f(x)[:, -1])

    def _capture(self) -> None:
        side = torch.cuda.Stream()  # warm up (allocator, lazy kernel loads) off the capturing stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()  # rewrites the current slot with the same keys and values
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (a DataLoader pinning memory) may go on meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self._forward()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(token.unsqueeze(1))
        self.position_ids.add_(1)
        self.slot.add_(1)
        self.key_mask.index_fill_(3, self.slot, True)
        self.cache.slot = self.slot
        try:
            if not self.use_graph:
                logits = self._forward()
            else:
                with torch.cuda.device(self.tokens.device):  # capture and replay on the model's GPU's streams
                    if self.graph is None:
                        self._capture()
                    self.graph.replay()
                    logits = self.logits.clone()  # the graph's output buffer is overwritten by the next replay
        finally:
            self.cache.slot = None
        self.cache.advance(1)
        return logits


def _static_decoding(device: torch.device) -> bool:
    """Whether generate decodes with a `StaticDecoder` (a CUDA graph) on this device."""
    return device.type == "cuda"


def _eos_check_interval(device: torch.device) -> int:
    """Decode steps between two host reads of "has every row stopped?" (a read waits for the device)."""
    return CUDA_EOS_CHECK_INTERVAL if device.type == "cuda" else 1


def _check_generate_args(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                         repetition_penalty, num_return_sequences, generator):  # fmt: skip
    model._check_inputs(input_ids, attention_mask)
    for name, value in (("max_new_tokens", max_new_tokens), ("num_return_sequences", num_return_sequences)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError(
            f"greedy search gives one sequence per prompt: num_return_sequences={num_return_sequences} needs do_sample=True"
        )
    total = input_ids.shape[1] + max_new_tokens
    if total > model.config.n_positions:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"n_positions={model.config.n_positions}"
        )
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask has padding at the end of a row: pad prompts on the LEFT for generation")
    validate.top_k(top_k)
    validate.top_p(top_p)
    validate.positive_float("repetition_penalty", repetition_penalty)
    if do_sample:
        validate.positive_float("temperature", temperature)
    validate.generator(generator, input_ids.device)


def _token_ids(name: str, value) -> list[int]:
    ids = [value] if isinstance(value, numbers.Integral) else list(value)
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in ids):
        raise ValueError(f"{name} must be a non-negative int or a list of them, got {value!r}")
    return [int(i) for i in ids]


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
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    output_scores: bool = False,
    output_logits: bool = False,
    return_dict_in_generate: bool = False,
) -> torch.Tensor | GenerateOutput:
    """Continue input_ids (B, T) by up to max_new_tokens tokens; returns (B * num_return_sequences, T + new).

    Like transformers' `generate`: greedy unless do_sample; temperature, top_k and top_p only
    apply when sampling; repetition_penalty applies to every token of the row, prompt included.
    A row stops at eos_token_id (default: the config's), and is filled with pad_token_id
    (default: the first eos id) while the other rows go on; generation ends when every row has
    stopped. Draws use `generator` (a torch.Generator on the model's device) when given.
    """
    _check_generate_args(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                         repetition_penalty, num_return_sequences, generator)  # fmt: skip
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = torch.tensor(
        _token_ids("eos_token_id", eos_token_id) if eos_token_id is not None else [], device=input_ids.device
    )
    vocab = model.config.vocab_size
    if pad_token_id is not None and not (
        isinstance(pad_token_id, numbers.Integral) and not isinstance(pad_token_id, bool) and 0 <= pad_token_id < vocab
    ):  # an id outside the embedding would fail inside a later step (on CUDA as a device-side assert)
        raise ValueError(f"pad_token_id must be an int in [0, vocab_size={vocab}), got {pad_token_id!r}")
    if pad_token_id is None and len(eos):
        pad_token_id = int(eos[0])  # an eos id outside the vocabulary is never drawn, so never padded with

    input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
    B, T = input_ids.shape
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded:
        attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
        full_mask = torch.ones(B, T + max_new_tokens, dtype=attention_mask.dtype, device=input_ids.device)
        full_mask[:, :T] = attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    else:
        position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)

    seen = seen_tokens(input_ids, vocab, attention_mask if padded else None) if repetition_penalty != 1.0 else None
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    cache = model.new_cache(B, T + max_new_tokens)
    prompt = model._forward(
        input_ids, attention_mask if padded else None, cache=cache, use_cache=True,
        position_ids=position_ids, logits_to_keep=1,
    )  # fmt: skip
    logits = prompt.logits[:, -1]
    decoder = None
    if _static_decoding(input_ids.device):
        decoder = StaticDecoder(model, cache, full_mask if padded else None, position_ids[:, -1:])
    # Whether every row has stopped is read on the host only every `check_every` steps (each read
    # waits for the device); the steps run past the end are cut off below, as if never run.
    check_every = _eos_check_interval(input_ids.device)
    new_tokens, scores, raw_logits, any_unfinished = [], [], [], []
    for step in range(max_new_tokens):
        logits = logits.float()
        penalized = apply_repetition_penalty(logits, seen, repetition_penalty)
        if do_sample:
            next_token = ops.sample_unchecked(penalized, temperature, top_k, top_p, generator)
        else:
            next_token = penalized.argmax(dim=-1)
        if output_logits:
            raw_logits.append(logits)
        if output_scores:
            scores.append(warp_scores(penalized, temperature, top_k, top_p) if do_sample else penalized)
        if len(eos):
            next_token = torch.where(unfinished, next_token, pad_token_id)
            unfinished &= ~(next_token[:, None] == eos).any(-1)  # torch.isin of many ids would sync
            any_unfinished.append(unfinished.any())
        new_tokens.append(next_token)
        if seen is not None:
            seen.scatter_(1, next_token.unsqueeze(1), True)
        last = step + 1 == max_new_tokens
        if last or (len(eos) and (step + 1) % check_every == 0 and not bool(any_unfinished[-1])):
            break
        if decoder is not None:
            logits = decoder.step(next_token)
        else:
            position_ids = position_ids[:, -1:] + 1
            out = model._forward(
                next_token.unsqueeze(1), full_mask[:, : T + step + 1] if padded else None, cache=cache,
                use_cache=True, position_ids=position_ids, logits_to_keep=1,
            )  # fmt: skip
            logits = out.logits[:, -1]
    if any_unfinished:  # keep the steps up to the one where every row had stopped, as transformers does
        stopped = (~torch.stack(any_unfinished)).nonzero()
        if len(stopped):
            kept = int(stopped[0]) + 1
            new_tokens, scores, raw_logits = new_tokens[:kept], scores[:kept], raw_logits[:kept]

    sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
    if not return_dict_in_generate:
        return sequences
    return GenerateOutput(
        sequences=sequences,
        scores=tuple(scores) if output_scores else None,
        logits=tuple(raw_logits) if output_logits else None,
    )
