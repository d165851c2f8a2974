"""Beam search (`num_beams > 1`), with transformers' scores, stopping rules and output.

Each prompt keeps `num_beams` running beams and the `num_beams` best finished ones. A step:

    log_softmax(logits) -> processors (transformers' order) -> + running beam score
    -> the K = max(2, 1 + number of eos ids) * num_beams best (or drawn, do_sample) continuations of the prompt
    -> the num_beams best that did not stop run on; those that stopped (eos, or max length) among
       the first num_beams compete with the finished beams by score / generated_length ** length_penalty

and the KV cache rows are reordered in place (`KVCache.reorder`) to follow the surviving beams.
The search ends when no running beam can beat the worst finished one (the heuristic of
`early_stopping`: False compares at the current length, "never" with length_penalty > 0 at the
maximum length), when every beam has finished with early_stopping=True, or at max length.
"""

from __future__ import annotations

import torch

from . import steps
from .request import finish

NEVER = -1.0e9  # transformers' "impossible" score


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (b, n, ...) -> (b, k, ...): the beams index (b, k) picks in each row."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return tensor.gather(1, index.expand(*index.shape[:2], *tensor.shape[2:]))


def beam_search(request):
    c, model = request.config, request.model
    n = c.num_beams
    if request.streamer is not None:
        raise ValueError("streamer cannot be used with beam search (num_beams > 1), as in transformers")
    early_stopping = c.early_stopping if c.early_stopping is not None else False
    length_penalty = c.length_penalty if c.length_penalty is not None else 1.0
    b, T = request.input_ids.shape
    max_length = T + request.max_new_tokens
    device = request.input_ids.device
    input_ids = request.input_ids.repeat_interleave(n, dim=0)
    mask = request.attention_mask
    mask = mask.repeat_interleave(n, dim=0) if mask is not None else None
    eos = torch.tensor(request.eos, device=device, dtype=torch.long)
    keep = max(2, 1 + len(request.eos)) * n
    # transformers keeps eos + 1 tokens in the sampling warpers of beam search
    process = request.processors(input_ids, mask, min_tokens_to_keep=len(request.eos) + 1 if request.eos else 2)
    pad = request.pad_token_id
    fill = (pad if pad else request.eos[0]) if request.eos else -1  # transformers' `pad or eos[0]`

    running = torch.full((b, n, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :T] = input_ids.view(b, n, T)
    running_scores = torch.zeros(b, n, device=device)
    running_scores[:, 1:] = NEVER  # at first the beams are copies: only one may continue
    finished = running.clone()
    finished_scores = torch.full((b, n), NEVER, device=device)
    finished_lengths = torch.zeros(b, n, dtype=torch.long, device=device)
    is_finished = torch.zeros(b, n, dtype=torch.bool, device=device)
    may_improve = torch.ones(b, 1, dtype=torch.bool, device=device)
    first_n = torch.arange(keep, device=device) < n
    offsets = torch.arange(b, device=device).unsqueeze(1) * n

    model_steps = steps.Steps(model, input_ids, mask, request.max_new_tokens)
    logits = model_steps.prefill()
    all_scores, raw_logits = [], []
    for cur in range(T, max_length):
        logits = logits.float()
        log_probs = process(running.view(b * n, -1)[:, :cur], logits.log_softmax(-1), cur - T)
        if c.output_logits:
            raw_logits.append(logits)
        if c.output_scores:
            all_scores.append(log_probs)
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(b, n, vocab) + running_scores.unsqueeze(-1)).view(b, n * vocab)
        if c.do_sample:
            picked = torch.multinomial(totals.softmax(-1), keep, generator=request.generator)
            top_scores, order = totals.gather(1, picked).sort(-1, descending=True)
            picked = picked.gather(1, order)
        else:
            top_scores, picked = totals.topk(keep)
        source, tokens = picked // vocab, picked % vocab  # (b, keep): the beam continued, the token added
        candidates = _gather(running, source)
        candidates[:, :, cur] = tokens
        stops = (tokens.unsqueeze(-1) == eos).any(-1) if len(eos) else torch.zeros_like(tokens, dtype=torch.bool)
        if cur + 1 >= max_length:
            stops = torch.ones_like(stops)

        # the best num_beams candidates that go on
        going_on = top_scores + stops.float() * NEVER
        best = going_on.topk(n).indices
        running, running_scores = _gather(candidates, best), _gather(going_on, best)
        rows = (_gather(source, best) + offsets).view(-1)

        # candidates among the first num_beams that stopped compete with the finished beams
        just_finished = stops & first_n
        scored = top_scores / ((cur + 1 - T) ** length_penalty)
        all_done = is_finished.all(-1, keepdim=True) & (early_stopping is True)
        scored = scored + (all_done.float() + (~may_improve).float() + (~just_finished).float()) * NEVER
        merged_scores = torch.cat([finished_scores, scored], 1)
        top = merged_scores.topk(n).indices
        finished = _gather(torch.cat([finished, candidates], 1), top)
        finished_scores = _gather(merged_scores, top)
        finished_lengths = _gather(torch.cat([finished_lengths, torch.full_like(tokens, cur + 1 - T)], 1), top)
        is_finished = _gather(torch.cat([is_finished, just_finished], 1), top)

        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_length - T
        else:
            best_length = cur + 1 - T
        best_running = running_scores[:, :1] / (best_length**length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, NEVER)
        may_improve = may_improve & (best_running > worst_finished).any(-1, keepdim=True)
        go_on = bool(may_improve.any()) and not (early_stopping is True and bool(is_finished.all()))
        if not go_on or bool(stops.all()):
            break
        model_steps.cache.reorder(rows)
        process.reorder(rows)
        last = running[:, :, cur].reshape(-1)
        process.seen_next(last)
        logits = model_steps.step(last)

    returned = c.num_return_sequences or 1
    length = T + int(finished_lengths[:, :returned].max())
    sequences = finished[:, :returned, :length].reshape(b * returned, length)
    return finish(request, sequences, all_scores, raw_logits, finished_scores[:, :returned].reshape(-1))
