"""generate() against transformers' generate and logits processors on random tiny GPT-2s."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from generation_pair import VOCAB, hf_and_gpt, left_padded_prompts
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pyminigpt.generation import GenerateOutput, apply_repetition_penalty, seen_tokens, warp_scores
from pyminigpt.model import GPT

NEW = 32


@pytest.fixture(scope="module")
def pair():
    return hf_and_gpt()


@pytest.fixture(scope="module")
def prompts():
    return left_padded_prompts()


def hf_generate(hf, ids, mask=None, **kwargs):
    kwargs.setdefault("pad_token_id", 0)
    return hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), **kwargs)


def test_greedy_matches_hf_single_prompt(pair):
    hf, model = pair
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    expected = hf_generate(hf, ids, max_new_tokens=NEW, eos_token_id=None)
    got = model.generate(ids, max_new_tokens=NEW, eos_token_id=[])
    assert got.shape == (1, 5 + NEW)
    assert torch.equal(got, expected)


def test_greedy_matches_hf_left_padded_batch(pair, prompts):
    hf, model = pair
    ids, mask = prompts
    expected = hf_generate(hf, ids, mask, max_new_tokens=NEW, eos_token_id=None)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[]), expected)


def test_greedy_with_repetition_penalty_matches_hf(pair, prompts):
    hf, model = pair
    ids, mask = prompts
    expected = hf_generate(hf, ids, mask, eos_token_id=None, max_new_tokens=NEW, repetition_penalty=1.5)
    got = model.generate(ids, attention_mask=mask, eos_token_id=[], max_new_tokens=NEW, repetition_penalty=1.5)
    assert torch.equal(got, expected)


def test_eos_stops_rows_and_pads_them_like_hf(pair, prompts):
    hf, model = pair
    ids, mask = prompts
    free_run = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    eos = int(free_run[1, 7 + 5])  # a token row 1 produces at its 6th step
    expected = hf_generate(hf, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=None)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos)
    assert torch.equal(got, expected)
    first = int((free_run[1, 7:] == eos).nonzero()[0])
    assert (got[1, 7 + first :] == eos).all(), "a finished row is filled with pad_token_id, which defaults to eos"
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[eos, 5], pad_token_id=0)
    assert torch.equal(got, hf_generate(hf, ids, mask, max_new_tokens=NEW, eos_token_id=[eos, 5], pad_token_id=0))


def test_generation_ends_when_every_row_has_stopped(pair):
    hf, model = pair
    ids = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(4))
    free_run = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    eos = int(free_run[0, 4 + 3])
    first = int((free_run[0, 4:] == eos).nonzero()[0])
    got = model.generate(ids, max_new_tokens=10, eos_token_id=eos)
    assert got.shape == (1, 4 + first + 1)
    assert torch.equal(got, hf_generate(hf, ids, max_new_tokens=10, eos_token_id=eos))


def test_cached_generation_equals_recomputing_everything(pair, prompts):
    """The KV-cache path (one position per step) against full forwards over the whole sequence."""
    _, model = pair
    ids, mask = prompts
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    seq, full_mask = ids, mask
    with torch.no_grad():
        for _ in range(12):
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(seq, attention_mask=full_mask, position_ids=positions).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
    assert torch.equal(got, seq)


class RowwiseRepetitionPenalty:
    """transformers' repetition penalty with each row's left padding ignored: one processor per row.

    transformers 5.24's generate ignores the padding through a per-row `prompt_ignore_length`
    tensor, which 5.17 (the GPU machine's) does not take; an int, which both take, describes one row.
    """

    def __init__(self, penalty, mask):
        self.penalty = penalty
        self.padding = None if mask is None else (mask != 0).int().argmax(dim=1).tolist()  # leading zeros per row

    def __call__(self, input_ids, scores):
        if self.padding is None:
            return RepetitionPenaltyLogitsProcessor(self.penalty)(input_ids, scores)
        rows = [
            RepetitionPenaltyLogitsProcessor(self.penalty, prompt_ignore_length=n)(
                input_ids[i : i + 1], scores[i : i + 1]
            )
            for i, n in enumerate(self.padding)
        ]
        return torch.cat(rows)


def hf_processors(mask, temperature, top_k, top_p, repetition_penalty, min_tokens_to_keep=1):
    """transformers' processors, in the order generate builds them (prompt padding ignored by the penalty)."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RowwiseRepetitionPenalty(repetition_penalty, mask))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        processors.append(TopKLogitsWarper(top_k, min_tokens_to_keep=min_tokens_to_keep))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p, min_tokens_to_keep=min_tokens_to_keep))
    return processors


def assert_same_scores(got, expected):
    assert torch.equal(torch.isinf(got), torch.isinf(expected)), "kept sets differ"
    kept = torch.isfinite(expected)
    torch.testing.assert_close(got[kept], expected[kept], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, repetition_penalty",
    [(0.7, 10, 0.8, 1.3), (1.0, 50, 1.0, 1.0), (1.6, 0, 0.5, 0.8), (0.9, 3, 1.0, 2.0)],
)
def test_sampling_scores_match_hf_processors(pair, prompts, temperature, top_k, top_p, repetition_penalty):
    _, model = pair
    ids, mask = prompts
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=[], generator=torch.Generator().manual_seed(0),
        output_scores=True, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert isinstance(out, GenerateOutput) and len(out.scores) == len(out.logits) == NEW
    processors = hf_processors(mask, temperature, top_k, top_p, repetition_penalty)
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        prefix = out.sequences[:, : 7 + step]
        assert_same_scores(scores, processors(prefix, logits.clone()))
        drawn = out.sequences[:, 7 + step]
        assert torch.isfinite(scores.gather(1, drawn[:, None])).all(), "a draw outside the kept set"


def test_greedy_scores_are_penalized_logits(pair, prompts):
    _, model = pair
    ids, mask = prompts
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, repetition_penalty=1.4, top_k=2, temperature=0.1,
                         eos_token_id=[], output_scores=True, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    processors = hf_processors(mask, 1.0, 0, 1.0, 1.4)  # greedy: no warpers
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        assert_same_scores(scores, processors(out.sequences[:, : 7 + step], logits.clone()))
        assert torch.equal(out.sequences[:, 7 + step], scores.argmax(-1))


def check_penalty_and_warpers(logits, top_k, top_p, min_tokens_to_keep):
    gen = torch.Generator().manual_seed(6)
    input_ids = torch.randint(0, logits.shape[1], (logits.shape[0], 9), generator=gen)
    mask = (torch.arange(9) >= torch.randint(0, 9, (logits.shape[0], 1), generator=gen)).long()
    expected = hf_processors(mask, 0.8, top_k, top_p, 1.25, min_tokens_to_keep)(input_ids, logits.clone())
    penalized = apply_repetition_penalty(logits, seen_tokens(input_ids, logits.shape[1], mask), 1.25)
    got = warp_scores(penalized, 0.8, top_k, top_p, min_tokens_to_keep)
    assert_same_scores(got, expected)
    assert (torch.isfinite(got).sum(-1) >= min_tokens_to_keep).all()


@pytest.mark.parametrize("top_k, min_tokens_to_keep", [(1, 1), (4, 1), (2, 3), (7, 2), (40, 1)])
def test_penalty_and_warpers_top_k_ties_match_hf(top_k, min_tokens_to_keep):
    """Top-k keeps every logit tied with the k-th largest, exactly like TopKLogitsWarper."""
    logits = torch.randint(-6, 7, (4, 40), generator=torch.Generator().manual_seed(5)).float() / 2  # many ties
    logits[0, :10] = 4.0  # ten-way tie at the top
    check_penalty_and_warpers(logits, top_k, 1.0, min_tokens_to_keep)


@pytest.mark.parametrize(
    "top_k, top_p, min_tokens_to_keep", [(0, 0.6, 1), (5, 0.3, 1), (0, 0.05, 4), (8, 0.9, 2), (0, 0.999, 1)]
)
def test_penalty_and_warpers_top_p_matches_hf(top_k, top_p, min_tokens_to_keep):
    """Distinct logits: where ties straddle the top-p cut, which of them stay depends on the sort's tie order."""
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(5)) * 3
    check_penalty_and_warpers(logits, top_k, top_p, min_tokens_to_keep)


def test_sampling_is_reproducible_with_a_generator(pair, prompts):
    _, model = pair
    ids, mask = prompts

    def draw(seed):
        return model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=0, eos_token_id=[],
                              num_return_sequences=2, generator=torch.Generator().manual_seed(seed))  # fmt: skip

    first = draw(0)
    assert first.shape == (6, 7 + 16)
    assert torch.equal(first, draw(0))
    assert not torch.equal(first, draw(1))


def test_outputs_are_ordinary_tensors_that_can_be_trained_on(pair, prompts):
    """generate decodes under inference mode, but what it returns must work with autograd."""
    _, model = pair
    ids, mask = prompts
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, output_scores=True,
                         output_logits=True, return_dict_in_generate=True)  # fmt: skip
    for tensor in (out.sequences, *out.scores, *out.logits):
        assert not tensor.is_inference()
    model.train()
    try:
        model(out.sequences, labels=out.sequences).loss.backward()  # the embedding saves the ids for backward
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    assert model.transformer.wte.weight.grad is None  # zeroed again for the other tests
    assert not model.generate(ids, max_new_tokens=2).is_inference()


def test_config_eos_outside_the_vocabulary_is_no_error():
    """GPT2Config keeps eos 50256 with a small vocab_size: that eos is never drawn, so the pad id
    derived from it is never used, and only an explicit pad_token_id is range-checked."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=24, n_layer=1, n_head=2)
    model = GPT.from_hf(transformers.GPT2LMHeadModel(config)).eval()
    assert model.config.eos_token_id >= VOCAB
    assert model.generate(torch.randint(0, VOCAB, (2, 5)), max_new_tokens=3).shape == (2, 8)


def test_generate_under_autocast(pair, prompts):
    """Under autocast q, k and v come out bf16 while the KV cache keeps the model's fp32: the
    cached attention runs in the cache's dtype (it raised a dtype mismatch before)."""
    _, model = pair
    ids, mask = prompts
    for attention_mask in (None, mask):  # the causal kernel, and SDPA under a padding mask
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=5, eos_token_id=[])
        assert out.shape == (3, 12) and bool(((out >= 0) & (out < VOCAB)).all())
        assert torch.equal(out[:, :7], ids)


def test_sampling_with_top_k_1_is_greedy(pair, prompts):
    _, model = pair
    ids, mask = prompts
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], do_sample=True, top_k=1,
                             temperature=3.0)  # fmt: skip
    assert torch.equal(greedy, sampled)


def test_greedy_ignores_sampling_arguments(pair, prompts):
    _, model = pair
    ids, mask = prompts
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(plain, model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[],
                                             temperature=0.0, top_k=1, top_p=0.1))  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature"),
        ({"do_sample": True, "temperature": -1.0}, ValueError, "temperature"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"top_k": -1}, ValueError, "top_k"),
        ({"top_k": 2.5}, TypeError, "top_k"),
        ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 60}, ValueError, "n_positions"),
        ({"num_return_sequences": 0}, ValueError, "num_return_sequences"),
        ({"num_return_sequences": 2}, ValueError, "num_return_sequences"),  # greedy, like transformers
        ({"eos_token_id": -1}, ValueError, "eos_token_id"),
        ({"generator": 1234}, TypeError, "generator"),
        ({"pad_token_id": VOCAB}, ValueError, "pad_token_id"),
        ({"pad_token_id": -1}, ValueError, "pad_token_id"),
    ],
)
def test_bad_arguments(pair, kwargs, error, match):
    _, model = pair
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=match):
        model.generate(ids, **kwargs)


def test_bad_inputs(pair):
    _, model = pair
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="input_ids"):
        model.generate(ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(ids[0])
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate(ids + VOCAB)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    right_padded = torch.ones(2, 5, dtype=torch.long)
    right_padded[0, -2:] = 0
    with pytest.raises(ValueError, match="LEFT"):
        model.generate(ids, attention_mask=right_padded)
