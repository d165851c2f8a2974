"""The logits processors of `generate`: transformers' semantics, in transformers' order.

    repetition penalty -> no-repeat n-gram -> bad words -> min length -> min new tokens    (`Processors.pre`)
    -> temperature -> top-k -> top-p -> min-p -> typical-p                               (sampling only)

Each takes scores (B, V) float32 and returns new scores with removed entries at -inf. The
sampling warpers temperature, top-k and top-p are fused into `ops.sample` on the fast path (the
draw itself) and computed here (`ops.top_k_top_p_filter`) only when their scores are asked for
or min-p / typical-p follow them.
"""

from __future__ import annotations

import torch

from .. import ops


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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Divide the positive logits of seen tokens by penalty, multiply the negative ones (CTRL's rule)."""
    if penalty == 1.0 or seen is None:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def warp_scores(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, min_tokens_to_keep: int = 1):
    """Temperature, then top-k, then top-p (the sampling-only processors); removed entries are -inf."""
    return ops.top_k_top_p_filter(scores / temperature, top_k, top_p, min_tokens_to_keep)


def no_repeat_ngram(sequences: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for every token that would complete an n-gram already in the row (padding included, as transformers)."""
    length = sequences.shape[1]
    if length < n:
        return scores
    prefix = sequences[:, length + 1 - n :]  # the last n - 1 tokens
    windows = sequences.unfold(1, n, 1)  # (B, length - n + 1, n): every n-gram so far
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(-1)
    vocab = scores.shape[1]
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], float("-inf"))


def bad_words(sequences: torch.Tensor, scores: torch.Tensor, words: list[list[int]]) -> torch.Tensor:
    """-inf for the last token of each banned word whose other tokens end the row."""
    banned = torch.zeros_like(scores, dtype=torch.bool)
    for word in words:
        *prefix, last = word
        if last >= scores.shape[1]:
            raise ValueError(f"bad_words_ids holds token {last}, outside the vocabulary of {scores.shape[1]}")
        if not prefix:
            banned[:, last] = True
        elif len(prefix) <= sequences.shape[1]:
            ends = (sequences[:, -len(prefix) :] == torch.tensor(prefix, device=sequences.device)).all(-1)
            banned[:, last] |= ends
    return scores.masked_fill(banned, float("-inf"))


def min_p_filter(scores: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Remove tokens whose probability is below min_p times the top probability."""
    probs = scores.softmax(-1)
    remove = probs < min_p * probs.amax(-1, keepdim=True)
    keep = probs.topk(min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    return scores.masked_fill(remove.scatter(-1, keep, False), float("-inf"))


def typical_filter(scores: torch.Tensor, mass: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, up to `mass`."""
    log_probs = scores.log_softmax(-1)
    entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)
    distance, order = (-log_probs - entropy).abs().sort(-1)
    cumulative = scores.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass).sum(-1).clamp_(max=scores.shape[-1] - 1)
    remove_sorted = distance > distance.gather(1, last.view(-1, 1))
    remove_sorted[..., :min_tokens_to_keep] = False
    return scores.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))


class Processors:
    """The processors one `generate` call applies, built once from its resolved settings.

    `pre(sequences, scores, new)` applies those before the sampling warpers (`new`: tokens
    generated so far); `warp(scores)` the sampling warpers; `fused` says whether the warpers are
    exactly what `ops.sample` fuses (temperature, top-k, top-p), so the draw needs no scores.
    The repetition penalty keeps its own (B, V) "seen" mask, updated by `seen_next`.
    """

    def __init__(self, config, input_ids, attention_mask, vocab_size, eos_ids, min_tokens_to_keep=1):
        c = config
        self.do_sample = bool(c.do_sample)
        self.penalty = c.repetition_penalty if c.repetition_penalty is not None else 1.0
        self.temperature = c.temperature if c.temperature is not None else 1.0
        self.top_k = c.top_k or 0
        self.top_p = c.top_p if c.top_p is not None else 1.0
        self.min_p = c.min_p
        self.typical_p = c.typical_p if c.typical_p is not None and c.typical_p < 1.0 else None
        self.ngram = c.no_repeat_ngram_size or 0
        eos = set(eos_ids)
        self.bad_words = [list(w) for w in c.bad_words_ids or () if not (len(w) == 1 and w[0] in eos)]
        self.min_tokens_to_keep = min_tokens_to_keep
        self.prompt_length = input_ids.shape[1]
        eos_column = torch.zeros(vocab_size, dtype=torch.bool, device=input_ids.device)
        eos_column[[i for i in eos_ids if i < vocab_size]] = True
        self.eos_column = eos_column
        self.min_length = c.min_length or 0 if eos_ids else 0
        self.min_new_tokens = c.min_new_tokens or 0 if eos_ids else 0
        self.seen = seen_tokens(input_ids, vocab_size, attention_mask) if self.penalty != 1.0 else None
        # whether pre() needs the sequences so far (the fast path keeps none)
        self.needs_sequences = bool(self.ngram or self.bad_words)
        self.fused = self.do_sample and self.min_p is None and self.typical_p is None

    def pre(self, sequences, scores: torch.Tensor, new: int) -> torch.Tensor:
        scores = apply_repetition_penalty(scores, self.seen, self.penalty)
        if self.ngram:
            scores = no_repeat_ngram(sequences, scores, self.ngram)
        if self.bad_words:
            scores = bad_words(sequences, scores, self.bad_words)
        if self.prompt_length + new < self.min_length or new < self.min_new_tokens:
            scores = scores.masked_fill(self.eos_column, float("-inf"))
        return scores

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return scores
        scores = warp_scores(scores, self.temperature, self.top_k, self.top_p, self.min_tokens_to_keep)
        if self.min_p is not None:
            scores = min_p_filter(scores, self.min_p, self.min_tokens_to_keep)
        if self.typical_p is not None:
            scores = typical_filter(scores, self.typical_p, self.min_tokens_to_keep)
        return scores

    def __call__(self, sequences, scores: torch.Tensor, new: int) -> torch.Tensor:
        """All of them: the scores transformers reports as `scores`."""
        return self.warp(self.pre(sequences, scores, new))

    def choose(self, scores: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(next token (B,), the warped scores or None) from pre-processed scores: argmax, or a draw."""
        if not self.do_sample:
            return scores.argmax(-1), scores
        if self.fused:
            return ops.sample_unchecked(scores, self.temperature, self.top_k, self.top_p, generator), None
        warped = self.warp(scores)
        return ops.sample_unchecked(warped, 1.0, 0, 1.0, generator), warped

    def seen_next(self, tokens: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, tokens.unsqueeze(1), True)

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: the state of row i becomes that of row rows[i]."""
        if self.seen is not None:
            self.seen = self.seen.index_select(0, rows)
