"""FeedbackTrainer: a rewarded response becomes more likely, a punished one less, only the
response tokens are trained on, the KL term holds the model near its start."""

import pytest
import torch

from pyminigpt.model import GPT, GPTConfig
from pyminigpt.tokenizer import CharTokenizer
from pyminigpt.train.feedback import FeedbackTrainer, check_reward

CHARS = "abcdefghijklmnopqrstuvwxyz "


@pytest.fixture
def tok():
    return CharTokenizer.from_text(CHARS)


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.sos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    return GPT(config)


@pytest.mark.parametrize("reward,direction", [(1.0, 1), (0.5, 1), (-1.0, -1), (-0.3, -1)])
def test_reward_moves_the_response_logprob(tok, reward, direction):
    trainer = FeedbackTrainer(tiny_model(tok), tok, lr=1e-2, kl_coef=0.1)
    before = trainer.response_logprob("hello ", "world")
    stats = trainer.step("hello ", "world", reward)
    after = trainer.response_logprob("hello ", "world")
    assert stats["logprob"] == pytest.approx(before, abs=1e-6)
    assert stats["advantage"] == reward  # the baseline starts at 0
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # nothing has moved yet
    assert direction * (after - before) > 0.05


def test_repeated_praise_and_the_baseline(tok):
    trainer = FeedbackTrainer(tiny_model(tok), tok, lr=5e-3, kl_coef=0.0, baseline_momentum=0.5)
    start = trainer.response_logprob("", "abc")
    for _ in range(3):
        stats = trainer.step("", "abc", 1.0)
    assert trainer.response_logprob("", "abc") > start + 0.5
    assert stats["advantage"] == pytest.approx(1.0 - 0.75)  # baseline 0 -> 0.5 -> 0.75 before the third
    assert trainer.baseline == pytest.approx(0.875)
    assert trainer.rewards == [1.0, 1.0, 1.0]
    assert stats["kl"] > 0


def test_only_response_tokens_are_trained(tok):
    """The log-probabilities scored are those of the response tokens given everything before them."""
    model = tiny_model(tok).eval()
    trainer = FeedbackTrainer(model, tok, lr=1e-2, kl_coef=0.0)
    ids, n_prompt = trainer._sequence("xyz ", "ab")
    assert ids.tolist() == tok.encode("xyz ab") and n_prompt == 4
    log_probs = trainer._response_log_probs(model, ids, n_prompt)
    assert log_probs.shape == (2, tok.vocab_size)
    full = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
    torch.testing.assert_close(log_probs, full[3:5])


def test_kl_pulls_back_towards_the_start(tok):
    """With a huge KL weight the model barely moves; without it, it moves a lot."""
    moves = []
    for kl_coef in (0.0, 50.0):
        trainer = FeedbackTrainer(tiny_model(tok), tok, lr=1e-2, kl_coef=kl_coef)
        start = trainer.response_logprob("the ", "cat")
        for _ in range(6):
            trainer.step("the ", "cat", 1.0)
            trainer.step("the ", "dog", -1.0)
        moves.append(trainer.response_logprob("the ", "cat") - start)
    assert moves[0] > 2 * moves[1] > 0


def test_sos_and_context(tok):
    trainer = FeedbackTrainer(tiny_model(tok), tok, sos=True)
    ids, n_prompt = trainer._sequence("ab", "c")
    assert ids.tolist() == [tok.sos_id, *tok.encode("abc")] and n_prompt == 3
    ids, n_prompt = trainer._sequence("a" * 40, "bc")  # long prompt: its end is kept
    assert len(ids) == 32 and n_prompt == 30
    with pytest.raises(ValueError, match="shorter than the context"):
        trainer.step("a", "b" * 32, 1.0)
    with pytest.raises(ValueError, match="response is empty"):
        trainer.step("a", "", 1.0)


@pytest.mark.parametrize("bad", [1.5, -1.01, float("nan"), float("inf")])
def test_reward_out_of_range(bad):
    with pytest.raises(ValueError, match="reward must be a finite number in \\[-1, 1\\]"):
        check_reward(bad)


@pytest.mark.parametrize("bad", ["1", None, True])
def test_reward_not_a_number(bad):
    with pytest.raises(TypeError, match="reward"):
        check_reward(bad)


def test_bad_hyperparameters(tok):
    model = tiny_model(tok)
    for kwargs, name in [
        ({"lr": 0}, "lr"),
        ({"kl_coef": -1}, "kl_coef"),
        ({"baseline_momentum": 1.0}, "baseline_momentum"),
    ]:
        with pytest.raises(ValueError, match=name):
            FeedbackTrainer(model, tok, **kwargs)
