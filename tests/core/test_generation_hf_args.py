"""GPT.generate takes what transformers' generate takes: every supported argument against
transformers on the same tiny random weights, streamers, assisted decoding, generation_config,
and a ValueError naming each argument it does not support."""

import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from generation_pair import VOCAB, hf_and_gpt, left_padded_prompts
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from pyminigpt import GPT, GPTConfig
from pyminigpt.generation import GenerationConfig

NEW = 12


@pytest.fixture(scope="module")
def pair():
    return hf_and_gpt()


@pytest.fixture(scope="module")
def prompts():
    return left_padded_prompts()


@pytest.fixture(scope="module")
def frequent(pair, prompts):
    """A token greedy decoding of the prompts reaches after a few steps (an eos that really stops rows)."""
    _, model = pair
    ids, mask = prompts
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[])
    return int(free[1, 7 + 3])


def both(pair, ids, mask, **kwargs):
    hf, model = pair
    kwargs.setdefault("pad_token_id", 0)
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    got = model.generate(ids, attention_mask=mask, **kwargs)
    return got, expected


def notebook_generate(model, tokenizer, prompt, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=50,
                      top_p=1.0, num_return_sequences=1, repetition_penalty=1.0):  # fmt: skip
    """The generation helper of the exploration notebook, unchanged."""
    inputs = tokenizer(prompt, return_tensors="pt")
    outputs = model.generate(**inputs, max_new_tokens=max_new_tokens,
                             temperature=temperature if do_sample else 1.0,
                             top_k=top_k if do_sample else None, top_p=top_p if do_sample else None,
                             do_sample=do_sample, num_return_sequences=num_return_sequences,
                             repetition_penalty=repetition_penalty, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]


def test_the_notebook_helper_runs_unchanged(tiny_gpt2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    ours = GPT.from_pretrained(tiny_gpt2_dir)
    for kwargs in ({}, {"repetition_penalty": 1.3}, {"max_new_tokens": 7}):
        assert notebook_generate(ours, tokenizer, "the cat", **kwargs) == notebook_generate(
            hf, tokenizer, "the cat", **kwargs
        )
    texts = notebook_generate(ours, tokenizer, "the cat", do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                              num_return_sequences=3)  # fmt: skip
    assert len(texts) == 3 and all(t.startswith("the cat") for t in texts)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_length": 19},
        {"max_new_tokens": NEW, "min_new_tokens": 10},
        {"max_new_tokens": NEW, "min_length": 15},
        {"max_new_tokens": NEW, "no_repeat_ngram_size": 2},
        {"max_new_tokens": NEW, "no_repeat_ngram_size": 1, "repetition_penalty": 1.2},
        {"max_new_tokens": NEW, "bad_words_ids": [[5], [7, 8], [40, 41, 42]]},
        {"max_new_tokens": NEW, "use_cache": True},
        {"max_new_tokens": NEW, "top_k": None, "top_p": None, "temperature": 1.0},
    ],
)
@pytest.mark.parametrize("eos", ["none", "list"])
def test_greedy_arguments_match_hf(pair, prompts, frequent, kwargs, eos):
    ids, mask = prompts
    eos_token_id = {"none": None, "one": frequent, "list": [frequent, 5]}[eos]
    got, expected = both(pair, ids, mask, eos_token_id=eos_token_id, **kwargs)
    if eos_token_id is None:  # transformers: an explicit None means no eos; ours reads it the same way
        got = pair[1].generate(ids, attention_mask=mask, eos_token_id=None, pad_token_id=0, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_beams": 3},
        {"num_beams": 4, "early_stopping": True},
        {"num_beams": 3, "early_stopping": "never", "length_penalty": 2.0},
        {"num_beams": 3, "early_stopping": False, "length_penalty": -1.0, "num_return_sequences": 2},
        {"num_beams": 2, "no_repeat_ngram_size": 2, "repetition_penalty": 1.3, "min_new_tokens": 4},
    ],
)
@pytest.mark.parametrize("eos", ["one", "list"])
def test_beam_search_matches_hf(pair, prompts, frequent, kwargs, eos):
    ids, mask = prompts
    eos_token_id = {"none": None, "one": frequent, "list": [frequent, 5]}[eos]
    got, expected = both(pair, ids, mask, max_new_tokens=NEW, eos_token_id=eos_token_id, output_scores=True,
                         output_logits=True, return_dict_in_generate=True, **kwargs)  # fmt: skip
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-5, atol=1e-5)
    assert len(got.scores) == len(expected.scores)
    for ours, theirs in zip(got.scores, expected.scores):  # the processed log-probabilities of every step
        kept = torch.isfinite(theirs) & (theirs > -1e8)
        assert torch.equal(kept, torch.isfinite(ours) & (ours > -1e8))
        torch.testing.assert_close(ours[kept], theirs[kept], rtol=1e-4, atol=1e-4)


def test_beam_search_keeps_the_cache_buffers_in_place(pair, prompts):
    """The cache rows are reordered inside the buffers generate allocated once (no copy per step)."""
    _, model = pair
    ids, mask = prompts
    caches, new_cache = [], model.new_cache

    def spy(batch_size, capacity):
        caches.append(new_cache(batch_size, capacity))
        caches.append([k.data_ptr() for k in caches[-1].keys])
        return caches[0]

    model.new_cache = spy
    try:
        model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, eos_token_id=[])
    finally:
        del model.new_cache
    assert [k.data_ptr() for k in caches[0].keys] == caches[1]


def hf_warpers(temperature, top_k, top_p, min_p, typical_p):
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p))
    if typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(typical_p))
    return warpers


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p, typical_p",
    [(1.0, 0, 1.0, 0.1, 1.0), (0.7, 20, 0.9, 0.05, 1.0), (1.0, 0, 1.0, None, 0.8), (1.3, 30, 1.0, 0.02, 0.9)],
)
def test_sampling_keeps_what_hf_keeps_and_draws_inside_it(pair, prompts, temperature, top_k, top_p, min_p, typical_p):
    _, model = pair
    ids, mask = prompts
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=temperature,
                         top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, eos_token_id=[],
                         generator=torch.Generator().manual_seed(0), output_scores=True, output_logits=True,
                         return_dict_in_generate=True)  # fmt: skip
    warpers = hf_warpers(temperature, top_k, top_p, min_p, typical_p)
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        expected = warpers(out.sequences[:, : 7 + step], logits.clone())
        assert torch.equal(torch.isinf(scores), torch.isinf(expected)), "kept sets differ"
        drawn = out.sequences[:, 7 + step]
        assert torch.isfinite(scores.gather(1, drawn[:, None])).all(), "a draw outside the kept set"


def test_beam_sampling_runs(pair, prompts):
    _, model = pair
    ids, mask = prompts
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=True, top_k=10,
                         num_return_sequences=2, eos_token_id=[], generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.shape == (6, 15) and torch.equal(out[::2, :7], ids)


def test_generation_config_precedence_and_round_trip(pair, prompts, tmp_path):
    hf, model = pair
    ids, mask = prompts
    model.generation_config.max_new_tokens = 5
    try:
        assert model.generate(ids, attention_mask=mask).shape == (3, 12)  # the model's generation_config
        assert model.generate(ids, attention_mask=mask, max_new_tokens=3).shape == (3, 10)  # argument wins
        given = transformers.GenerationConfig(max_new_tokens=4, num_beams=2)
        got = model.generate(ids, attention_mask=mask, generation_config=given, pad_token_id=0)
        expected = hf.generate(ids, attention_mask=mask, generation_config=given, pad_token_id=0)
        assert torch.equal(got, expected)
        assert model.generate(ids, attention_mask=mask, generation_config={"max_new_tokens": 2}).shape == (3, 9)
        # as in transformers, the model's max_new_tokens (unset in the argument) outranks the argument's max_length
        assert model.generate(ids, attention_mask=mask, generation_config={"max_length": 9}).shape == (3, 12)
        model.save_pretrained(tmp_path)
    finally:
        model.generation_config.max_new_tokens = None
    assert transformers.GenerationConfig.from_pretrained(tmp_path).max_new_tokens == 5
    assert GPT.from_pretrained(tmp_path).generation_config.max_new_tokens == 5
    assert model.generate(ids, attention_mask=mask).shape == (3, 27)  # transformers' default: 20 new tokens


def test_the_default_length_is_20_new_tokens_within_the_context(pair):
    got, expected = both(pair, torch.tensor([[5, 6, 7]]), None)
    assert got.shape == (1, 23) and torch.equal(got, expected)
    got, expected = both(pair, torch.randint(3, VOCAB, (1, 50)), None)  # n_positions=64
    assert got.shape == (1, 64) and torch.equal(got, expected)


def test_streamers_see_the_generated_text(tiny_gpt2_dir, capsys):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = GPT.from_pretrained(tiny_gpt2_dir)
    inputs = tokenizer("the cat sat", return_tensors="pt")
    T = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=12, eos_token_id=[],
                         streamer=transformers.TextStreamer(tokenizer, skip_prompt=True))  # fmt: skip
    assert capsys.readouterr().out == tokenizer.decode(out[0, T:]) + "\n"

    streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=False)
    kwargs = {**inputs, "max_new_tokens": 12, "do_sample": True, "generator": torch.Generator().manual_seed(3),
              "streamer": streamer}  # fmt: skip
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", model.generate(**kwargs)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == tokenizer.decode(result["out"][0])


@pytest.fixture(scope="module")
def target_and_draft():
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=61, n_positions=64, n_embd=48, n_head=3, n_layer=2, eos_token_id=60)).eval()
    draft = GPT(GPTConfig(vocab_size=61, n_positions=64, n_embd=24, n_head=2, n_layer=1, eos_token_id=60)).eval()
    with torch.no_grad():  # peaked distributions, so that the draft is sometimes right and sometimes not
        target.lm_head.weight.normal_(0, 0.5)
        draft.lm_head.weight.normal_(0, 0.5)
    return target, draft


@pytest.mark.parametrize(
    "schedule, extra",
    [("constant", {}), ("heuristic", {}), ("heuristic", {"repetition_penalty": 1.5, "no_repeat_ngram_size": 3})],
)
def test_assisted_decoding_is_the_models_greedy_output(target_and_draft, schedule, extra):
    target, draft = target_and_draft
    for seed in range(3):
        ids = torch.randint(0, 60, (1, 1 + 2 * seed), generator=torch.Generator().manual_seed(seed))
        plain = target.generate(ids, max_new_tokens=30, eos_token_id=[], **extra)
        for k in (1, 5):
            assisted = target.generate(ids, max_new_tokens=30, eos_token_id=[], assistant_model=draft,
                                       num_assistant_tokens=k, num_assistant_tokens_schedule=schedule, **extra)  # fmt: skip
            assert torch.equal(assisted, plain)
        eos = int(plain[0, ids.shape[1] + 3 + seed])
        stopped = target.generate(ids, max_new_tokens=30, eos_token_id=[eos, 59], **extra)
        assisted = target.generate(ids, max_new_tokens=30, eos_token_id=[eos, 59], assistant_model=draft, **extra)
        assert torch.equal(assisted, stopped)


def test_assisted_decoding_refuses_what_it_does_not_do(target_and_draft, pair):
    target, draft = target_and_draft
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="do_sample"):
        target.generate(ids, assistant_model=draft, do_sample=True)
    with pytest.raises(ValueError, match="batch size 1"):
        target.generate(ids.repeat(2, 1), assistant_model=draft)
    with pytest.raises(ValueError, match="vocab"):
        target.generate(ids, assistant_model=pair[1])


@pytest.mark.parametrize(
    "name, value",
    [
        ("penalty_alpha", 0.6),
        ("num_beam_groups", 2),
        ("diversity_penalty", 1.0),
        ("constraints", ["x"]),
        ("force_words_ids", [[3]]),
        ("logits_processor", LogitsProcessorList([TopKLogitsWarper(3)])),
        ("stopping_criteria", ["x"]),
        ("prefix_allowed_tokens_fn", lambda batch, ids: [3]),
        ("prompt_lookup_num_tokens", 3),
        ("stop_strings", ["a"]),
        ("epsilon_cutoff", 0.1),
        ("suppress_tokens", [3]),
        ("output_attentions", True),
        ("max_time", 1.0),
        ("sequence_bias", {(3,): 1.0}),
        ("dola_layers", "low"),
        ("no_such_argument", 1),
    ],
)
def test_unsupported_arguments_raise_a_value_error_naming_them(pair, name, value):
    _, model = pair
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=f"{name}.*not supported"):
        model.generate(ids, max_new_tokens=2, **{name: value})
    with pytest.raises(ValueError, match=f"{name}.*not supported"):
        model.generate(ids, max_new_tokens=2, generation_config={name: value})
    model.generate(ids, max_new_tokens=2, **{name: None})  # None: not set


def test_no_op_values_of_unsupported_arguments_are_accepted(pair):
    _, model = pair
    ids = torch.tensor([[5, 6, 7]])
    plain = model.generate(ids, max_new_tokens=4)
    same = model.generate(ids, max_new_tokens=4, num_beam_groups=1, diversity_penalty=0.0, epsilon_cutoff=0.0,
                          output_attentions=False, synced_gpus=False)  # fmt: skip
    assert torch.equal(plain, same)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_beams": 0}, ValueError, "num_beams"),
        ({"num_beams": 2, "num_return_sequences": 3}, ValueError, "num_return_sequences"),
        ({"early_stopping": "sometimes"}, ValueError, "early_stopping"),
        ({"min_p": 1.5, "do_sample": True}, ValueError, "min_p"),
        ({"typical_p": 0.0, "do_sample": True}, ValueError, "typical_p"),
        ({"no_repeat_ngram_size": -1}, ValueError, "no_repeat_ngram_size"),
        ({"bad_words_ids": [5]}, ValueError, "bad_words_ids"),
        ({"max_length": 3}, ValueError, "max_length"),
        ({"min_new_tokens": 1.5}, TypeError, "min_new_tokens"),
        ({"streamer": object()}, TypeError, "streamer"),
        ({"num_beams": 2, "streamer": transformers.generation.BaseStreamer()}, ValueError, "streamer"),
        ({"generation_config": 3}, TypeError, "generation_config"),
    ],
)
def test_bad_settings(pair, kwargs, error, match):
    _, model = pair
    with pytest.raises(error, match=match):
        model.generate(torch.tensor([[5, 6, 7]]), **kwargs)


def test_generation_config_repr_and_dict():
    config = GenerationConfig(max_new_tokens=3, eos_token_id=[1, 2])
    assert config.to_dict() == {"max_new_tokens": 3, "eos_token_id": [1, 2]}
    assert "max_new_tokens=3" in repr(config)
    assert GenerationConfig.from_dict({"top_k": 4, "transformers_version": "5", "num_beam_groups": 1}).to_dict() == {
        "top_k": 4
    }


def test_assisted_decoding_streams_what_it_returns(target_and_draft):
    from pyminigpt.generation import TextCallbackStreamer

    class Letters:
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    target, draft = target_and_draft
    pieces = []
    streamer = TextCallbackStreamer(Letters(), pieces.append)
    out = target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, eos_token_id=[], assistant_model=draft,
                          streamer=streamer)  # fmt: skip
    assert "".join(pieces) == Letters().decode(out[0, 3:].tolist())
