"""Looking inside a trained model: generation, perplexity, next-token tables, attention
maps, hidden states.

Every function takes a `pyminigpt.GPT` and a `pyminigpt.tokenizer` tokenizer.

    generate_text(model, tok, prompt, stream=callback, **generate_kwargs)   -> [prompt + continuation]
    perplexity(model, tok, text, stride=None, max_length=None)              -> float
    token_probabilities(model, tok, text)                                   -> [(position, token, prob)]
    next_token_table(model, tok, prompt, top_n=10)                          -> [(token, prob)]
    word_split(tok, text)                                                   -> [WordSplit]
    attention_maps(model, tok, text)                                        -> (layers, heads, T, T)
    layer_states(model, tok, text)                                          -> (layers + 1, T, n_embd)
    hidden_states(model, tok, texts, layer=-1)                              -> (N, n_embd)
    embeddings(model, tok, tokens)                                          -> (N, n_embd)
    pca(vectors, k=2)                                                       -> (N, k), variance ratios

The pictures of them (plot_attention, plot_pca, ...) are in `plots.py`.

`next_token_table`, `attention_maps` and `layer_states` take the text or its token ids
(a list of ints), so that a caller can cut a long text to a window of tokens.

Models trained on `<SOS> text <EOS>` sequences (`data.SequenceDataset`) want their
prompts after <SOS> (`sos=True`) and their texts scored with `add_special_tokens=True`;
models trained on a plain token stream want neither.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# generation and its prompt helpers live in the generation layer (below this one); re-exported here
from .generation.text import (
    _as_input,
    _context_length,
    _device,
    _encode,
    _text_or_ids,
    evaluating,
    generate_text,
    prompt_ids,
)

__all__ = [
    "WordSplit",
    "attention_maps",
    "embeddings",
    "evaluating",
    "format_next_token_table",
    "generate_text",
    "hidden_states",
    "layer_states",
    "next_token_table",
    "pca",
    "perplexity",
    "prompt_ids",
    "token_probabilities",
    "token_strings",
    "word_split",
]


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token id as the text it stands for, special tokens included (for plot axes and tables).

    A byte-level BPE token that is only part of a character (which decodes alone to
    U+FFFD) is shown by its bytes instead: '<0xF0><0x9F>'."""
    strings = []
    for i in ids:
        text = tokenizer.decode([int(i)], skip_special_tokens=False)
        strings.append(_token_bytes_text(tokenizer, int(i)) or text if "\ufffd" in text else text)
    return strings


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins (GPT-2's): character -> the byte it stands for.

    The printable Latin-1 bytes stand for themselves; the others (controls, space,
    0x7F-0xA0, 0xAD), in byte order, take the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_alphabet()


def _token_bytes_text(tokenizer, token_id: int) -> str | None:
    """The bytes of a byte-level BPE token as text, with what is not valid UTF-8 written as
    <0xNN>; None when the tokenizer is not a byte-level BPE (no `tokenizers` vocabulary)."""
    id_to_token = getattr(getattr(tokenizer, "tokenizer", None), "id_to_token", None)
    piece = id_to_token(token_id) if id_to_token is not None else None
    if piece is None or any(c not in _BYTE_LEVEL for c in piece):
        return None
    raw, out = bytes(_BYTE_LEVEL[c] for c in piece), []
    while raw:
        try:
            out.append(raw.decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            out.append(raw[: err.start].decode("utf-8"))
            out.append("".join(f"<0x{b:02X}>" for b in raw[err.start : err.end]))
            raw = raw[err.end :]
    return "".join(out)


@dataclass
class WordSplit:
    """One word of a text (with the whitespace before it) and the pieces the tokenizer cuts it into.

    `pieces` are the texts of its tokens; a character spread over several byte-level
    tokens is one piece, and `tokens` counts the tokens (so tokens >= len(pieces))."""

    word: str
    pieces: list[str]
    tokens: int


_WORD = re.compile(r"\s*\S+|\s+")


def _token_pieces(tokenizer, ids: list[int]) -> list[tuple[str, int]]:
    """(text, number of tokens) per piece of `ids`: each token's text, with the tokens of a
    character cut across byte-level tokens (which decode alone to U+FFFD) joined into one piece."""
    pieces, pending = [], []
    for position, token in enumerate(ids):
        pending.append(token)
        text = tokenizer.decode(pending, skip_special_tokens=False)
        if text.endswith("\ufffd") and position + 1 < len(ids) and len(pending) < 4:  # UTF-8: at most 4 bytes
            continue
        pieces.append((text, len(pending)))
        pending = []
    return pieces


def word_split(tokenizer, text: str, add_special_tokens: bool = False) -> list[WordSplit]:
    """How the tokenizer splits each word of `text`: one `WordSplit` per word, in order.

    A word is a run of non-space characters with the whitespace before it (GPT-2's BPE
    puts the space inside the next token: ' strawberry' -> ' str', 'aw', 'berry'). A token
    belongs to the word in which its text starts. The pieces, joined, give back the text.
    """
    ids = _encode(tokenizer, text, add_special_tokens=add_special_tokens)
    pieces = _token_pieces(tokenizer, ids)
    decoded = "".join(piece for piece, _ in pieces)
    starts = [m.start() for m in _WORD.finditer(decoded)] or [0]
    splits = [WordSplit(decoded[a:b], [], 0) for a, b in zip(starts, [*starts[1:], len(decoded)])]
    index, start = 0, 0
    for piece, n in pieces:
        while index + 1 < len(starts) and starts[index + 1] <= start:
            index += 1
        splits[index].pieces.append(piece)
        splits[index].tokens += n
        start += len(piece)
    return splits if ids else []


# ----------------------------------------------------------------------------- scoring


def _window(model, stride: int | None, max_length: int | None) -> tuple[int, int]:
    """(stride, max_length) of the sliding window, checked, with their defaults."""
    context = _context_length(model)
    max_length = context if max_length is None else int(max_length)
    if not 2 <= max_length <= context:
        raise ValueError(f"max_length must be in [2, {context}] (the model's context), got {max_length}")
    stride = max(1, max_length // 2) if stride is None else int(stride)
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    return stride, max_length


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str | Sequence[str],
    stride: int | None = None,
    max_length: int | None = None,
    add_special_tokens: bool = False,
) -> float:
    """exp(mean negative log-likelihood per token) of `text` under the model.

    Texts longer than the window `max_length` (default: the model's context) are scored
    with the strided sliding window of transformers' perplexity guide: windows start
    every `stride` tokens (default max_length // 2) and each scores only the tokens that
    no earlier window scored, with the rest of the window as their context. The first
    token of the text (and, with stride == max_length, of every window) has no context
    and is not scored. `text` may be a list of texts, scored independently and pooled
    (every scored token weighs the same). `add_special_tokens` scores `<SOS> text <EOS>`
    (for models trained on such sequences).
    """
    stride, max_length = _window(model, stride, max_length)
    texts = [text] if isinstance(text, str) else list(text)
    nll_sum, n_scored = 0.0, 0
    with evaluating(model):
        for t in texts:
            ids = _encode(tokenizer, t, add_special_tokens=add_special_tokens)
            positions, nlls = _token_nlls(model, ids, stride, max_length)
            nll_sum, n_scored = nll_sum + float(nlls.sum()), n_scored + len(positions)
    if n_scored == 0:
        raise ValueError("text must have at least 2 tokens to have something to predict")
    return math.exp(nll_sum / n_scored)


@torch.no_grad()
def token_probabilities(
    model,
    tokenizer,
    text: str,
    stride: int | None = None,
    max_length: int | None = None,
    add_special_tokens: bool = False,
) -> list[tuple[int, str, float]]:
    """How much the model expected each token of `text`: (position, token text, p(token | what
    comes before)) for every token that `perplexity` scores, in order; the perplexity is
    exp(-mean log p) over them. The window arguments are those of `perplexity`."""
    stride, max_length = _window(model, stride, max_length)
    ids = _encode(tokenizer, text, add_special_tokens=add_special_tokens)
    with evaluating(model):
        positions, nlls = _token_nlls(model, ids, stride, max_length)
    tokens = token_strings(tokenizer, [ids[i] for i in positions])
    return list(zip(positions, tokens, torch.exp(-nlls).tolist()))


def _token_nlls(model, ids: list[int], stride: int, max_length: int) -> tuple[list[int], torch.Tensor]:
    """The positions of ids (N,) that the sliding window scores, and -log p(token | window
    context) of each: (positions, float64 (len(positions),) on CPU)."""
    ids = torch.tensor(ids, dtype=torch.long, device=_device(model))
    positions, nlls, scored_until = [], [], 1  # tokens [0, scored_until) are done
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end]
        logits = model(window[None]).logits[0].float()  # logits[i] predicts window[i + 1]
        first = max(scored_until - begin, 1)  # window index of the first target to score
        log_probs = F.log_softmax(logits[first - 1 : -1], dim=-1)
        nlls.append(-log_probs.gather(-1, window[first:, None])[:, 0].double().cpu())
        positions += range(begin + first, end)
        scored_until = end
        if end == len(ids):
            break
    return positions, torch.cat(nlls) if nlls else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def next_token_table(
    model, tokenizer, prompt: str | Sequence[int], top_n: int = 10, temperature: float = 1.0, sos: bool = False
) -> list[tuple[str, float]]:
    """The `top_n` most likely next tokens after `prompt` as (token text, probability), best first.

    `prompt` is a text (after <SOS> with `sos`, see `prompt_ids`) or its token ids, taken as they are."""
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"top_n must be a positive int, got {top_n!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    ids = prompt_ids(tokenizer, prompt, sos) if isinstance(prompt, str) else _text_or_ids(tokenizer, prompt, "prompt")
    if not ids:
        raise ValueError("prompt has no token ids: there is nothing to continue")
    input_ids = _as_input(model, ids, "prompt")
    with evaluating(model):
        logits = model(input_ids).logits[0, -1].float()
    probs = torch.softmax(logits / temperature, dim=-1)
    top = torch.topk(probs, min(top_n, probs.numel()))
    return list(zip(token_strings(tokenizer, top.indices.tolist()), top.values.tolist()))


def format_next_token_table(rows: Sequence[tuple[str, float]], bar_width: int = 30) -> str:
    """`next_token_table` rows as a small text table with a probability bar per token."""
    lines = [f"{'token':>10}  {'prob':>6}"]
    for token, prob in rows:
        lines.append(f"{_visible(token):>10}  {prob:6.3f}  {'#' * round(prob * bar_width)}")
    return "\n".join(lines)


def _visible(token: str) -> str:
    """A token with its spaces and control characters made visible ('\\n', '␣')."""
    return repr(token)[1:-1].replace(" ", "\u2423")


# ----------------------------------------------------------------------------- internals


def _window_input(model, tokenizer, text, add_special_tokens: bool) -> torch.Tensor:
    """(1, T) input ids of a text or token ids, checked to be non-empty and within the context."""
    ids = _text_or_ids(tokenizer, text, "text", add_special_tokens)
    if not ids:
        raise ValueError("text is empty: there is nothing to look at")
    return _as_input(model, ids, "text")


@torch.no_grad()
def attention_maps(model, tokenizer, text: str | Sequence[int], add_special_tokens: bool = False) -> torch.Tensor:
    """Attention probabilities of every layer and head on `text`: (layers, heads, T, T), float32 on CPU.

    Row i of a map is how much query token i attends to each key token (zero above the
    diagonal). The tokens are `token_strings(tokenizer, tokenizer.encode(text, add_special_tokens))`,
    or `text` itself when it is a list of token ids.
    """
    input_ids = _window_input(model, tokenizer, text, add_special_tokens)
    with evaluating(model):
        attentions = model(input_ids, output_attentions=True).attentions
    return torch.stack([a[0] for a in attentions]).float().cpu()


@torch.no_grad()
def layer_states(model, tokenizer, text: str | Sequence[int], add_special_tokens: bool = False) -> torch.Tensor:
    """Every token's residual stream at every depth: (n_layer + 1, T, n_embd), float32 on CPU.

    Index 0 is the embeddings (token + position), index l the output of block l, and the
    last one the final layer-normed output. `text` is a str or a list of token ids.
    """
    input_ids = _window_input(model, tokenizer, text, add_special_tokens)
    with evaluating(model):
        states = model(input_ids, output_hidden_states=True).hidden_states
    return torch.stack([h[0] for h in states]).float().cpu()


def hidden_states(
    model, tokenizer, texts: Sequence[str], layer: int = -1, pool: str = "mean", add_special_tokens: bool = False
) -> torch.Tensor:
    """One vector per text from the residual stream: (N, n_embd), float32 on CPU.

    `layer` indexes the n_layer + 1 hidden states (0: the embeddings, -1: the final,
    layer-normed output). `pool` is 'mean' (over the text's tokens) or 'last' (the last token).
    """
    if pool not in ("mean", "last"):
        raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    n_states = model.config.n_layer + 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_states <= layer < n_states:
        raise ValueError(f"layer must be an int in [{-n_states}, {n_states - 1}], got {layer!r}")
    vectors = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must hold strings, got {type(text).__name__}")
        if not _encode(tokenizer, text, add_special_tokens=add_special_tokens):
            raise ValueError(f"text {text!r} encodes to no tokens")
        h = layer_states(model, tokenizer, text, add_special_tokens)[layer]
        vectors.append(h.mean(0) if pool == "mean" else h[-1])
    return torch.stack(vectors)


@torch.no_grad()
def embeddings(model, tokenizer, tokens: Sequence[str]) -> torch.Tensor:
    """The rows of the token embedding table (wte) for each token text in `tokens`: (N, n_embd), float32 on CPU."""
    rows = []
    for token in tokens:
        ids = _encode(tokenizer, token, "token")
        if len(ids) != 1:
            raise ValueError(f"token {token!r} must encode to exactly one token, got {len(ids)}: {ids}")
        rows.append(ids[0])
    return model.transformer.wte.weight[rows].float().cpu()


def pca(vectors: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Project `vectors` (N, C) onto their first k principal components.

    Returns the coordinates (N, k) and the fraction of the variance each component
    explains (k,). Centering then an SVD: X - mean = U S V^T, coordinates = U S.
    """
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError(f"vectors must be (N, C) with N >= 2, got shape {tuple(vectors.shape)}")
    if not 1 <= k <= min(vectors.shape):
        raise ValueError(f"k must be in [1, {min(vectors.shape)}] for vectors of shape {tuple(vectors.shape)}, got {k}")
    x = vectors.detach().cpu().double()
    x = x - x.mean(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    variance = s.square()
    ratio = variance[:k] / variance.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return (u[:, :k] * s[:k]).float(), ratio.float()


# ----------------------------------------------------------------------------- plots
