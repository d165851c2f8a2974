"""Trainer: loss falls, exact resume, Ctrl-C, atomic and verified checkpoints, optimizer groups, AMP."""

import json
import math
import os
import shutil
import signal

import pytest
import safetensors.torch
import torch

from pyminigpt.model import GPT, GPTConfig
from pyminigpt.tokenizer import CharTokenizer
from pyminigpt.train.checkpoint import CheckpointError, resolve_checkpoint
from pyminigpt.train.data import SequenceDataset, SlidingWindowDataset, names_corpus
from pyminigpt.train.trainer import Trainer, TrainerConfig

SEQ_LEN = 16
SAVED_MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors"]  # what save_pretrained writes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and threads thrash on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    names = names_corpus(300, seed=0)
    tok = CharTokenizer.from_text(names + ["\n"])
    ids = tok.encode("\n".join(names))
    return tok, names, ids


def tiny_model(vocab_size, seed=0, dropout=0.0, n_embd=32):
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=vocab_size, n_positions=SEQ_LEN, n_embd=n_embd, n_layer=2, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return GPT(config)


def config(tmp_path=None, **overrides):
    values = {
        "max_steps": 6,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "eval_interval": 0,
        "progress": False,
    }
    values.update(overrides)
    return TrainerConfig(out_dir=None if tmp_path is None else str(tmp_path), **values)


def losses(history):
    return [r["loss"] for r in history]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_short_run_loss_falls(tmp_path, corpus):
    tok, _, ids = corpus
    train = SlidingWindowDataset(ids, SEQ_LEN, stride=8)
    evals = SlidingWindowDataset(ids[:600], SEQ_LEN)
    trainer = Trainer(
        tiny_model(tok.vocab_size), train, evals, config(tmp_path, max_steps=40, batch_size=8, eval_interval=20)
    )
    history = trainer.train()
    assert [r["step"] for r in history] == list(range(1, 41))
    assert set(history[0]) >= {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"}
    start, end = sum(losses(history)[:3]) / 3, sum(losses(history)[-5:]) / 5
    assert start > math.log(tok.vocab_size) - 0.5 and end < start - 0.5
    evaluated = [r for r in history if "eval_loss" in r]
    assert [r["step"] for r in evaluated] == [20, 40]
    assert evaluated[-1]["eval_ppl"] == pytest.approx(math.exp(evaluated[-1]["eval_loss"]))
    assert trainer.best_eval_loss == min(r["eval_loss"] for r in evaluated)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("best", "last"):
        assert GPT.from_pretrained(tmp_path / name).config == trainer.model.config
    assert not trainer.interrupted


def test_resume_reproduces_uninterrupted_run(tmp_path, corpus):
    """Stop mid-epoch at step 3 (with dropout, accumulation, eval), resume into a fresh model: same run."""
    tok, _, ids = corpus
    train = SlidingWindowDataset(ids[:300], SEQ_LEN, stride=7)  # 41 windows: 5 steps of 2 x 4 per epoch
    evals = SlidingWindowDataset(ids[300:500], SEQ_LEN)
    cfg = {"max_steps": 9, "grad_accum_steps": 2, "eval_interval": 2}

    full = Trainer(tiny_model(tok.vocab_size, dropout=0.1), train, evals, config(tmp_path / "full", **cfg))
    expected = full.train()

    def stop_at_3(trainer, record):
        if record["step"] == 3:
            trainer.request_stop()

    first = Trainer(tiny_model(tok.vocab_size, dropout=0.1), train, evals, config(tmp_path / "cut", **cfg))
    first.train(callback=stop_at_3)
    assert first.interrupted and first.step == 3
    torch.manual_seed(123)  # the global RNG state must come from the checkpoint, not from here
    second = Trainer(tiny_model(tok.vocab_size, seed=1, dropout=0.1), train, evals, config(tmp_path / "cut", **cfg))
    resumed = second.train(resume_from="auto")
    assert not second.interrupted and second.step == 9
    assert [r["step"] for r in resumed] == list(range(1, 10))
    assert losses(resumed) == pytest.approx(losses(expected), abs=1e-6, rel=0)
    assert [r["step"] for r in resumed if "eval_loss" in r] == [2, 4, 6, 8, 9]
    eval_losses = [r.get("eval_loss", 0.0) for r in resumed]
    assert eval_losses == pytest.approx([r.get("eval_loss", 0.0) for r in expected], abs=1e-6, rel=0)
    for key, value in weights(full.model).items():
        torch.testing.assert_close(second.model.state_dict()[key], value, atol=1e-6, rtol=0)


def test_ctrl_c_saves_then_returns(tmp_path, corpus):
    tok, _, ids = corpus
    train = SlidingWindowDataset(ids, SEQ_LEN)
    trainer = Trainer(tiny_model(tok.vocab_size), train, config=config(tmp_path, max_steps=50))
    handler = signal.getsignal(signal.SIGINT)

    def press_ctrl_c(trainer, record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    history = trainer.train(callback=press_ctrl_c)
    assert trainer.interrupted and len(history) == 2 == trainer.step
    assert signal.getsignal(signal.SIGINT) is handler
    state = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["batch_in_epoch"] == 2
    assert (tmp_path / "loss.png").is_file()


def test_dataloader_workers_give_the_same_run(corpus):
    tok, _, ids = corpus
    data = SlidingWindowDataset(ids, SEQ_LEN)
    runs = [
        Trainer(tiny_model(tok.vocab_size), data, config=config(max_steps=3, num_workers=workers)).train()
        for workers in (0, 1)
    ]
    assert losses(runs[0]) == losses(runs[1])


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, corpus, monkeypatch):
    tok, _, ids = corpus
    data = SlidingWindowDataset(ids, SEQ_LEN)
    trainer = Trainer(tiny_model(tok.vocab_size), data, config=config(tmp_path, max_steps=2))
    trainer.train()
    saved = weights(trainer.model)

    def write_half_then_crash(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_crash)
    trainer.config.max_steps = 4
    with pytest.raises(OSError, match="simulated"):
        trainer.train()  # trains to step 4, then crashes while saving `last` over the step-2 one
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "loss.png"]

    fresh = Trainer(tiny_model(tok.vocab_size, seed=5), data, config=config(tmp_path))
    assert fresh.load_checkpoint(tmp_path / "last")["step"] == 2
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in saved.items())

    # a crash between the two renames of a save leaves only last.old: it is found and loads
    os.replace(tmp_path / "last", tmp_path / "last.old")
    assert resolve_checkpoint(tmp_path / "last") == tmp_path / "last.old"
    assert fresh.load_checkpoint(tmp_path / "last")["step"] == 2


@pytest.fixture(scope="module")
def one_step_checkpoint(tmp_path_factory, corpus):
    tok, _, ids = corpus
    out = tmp_path_factory.mktemp("one-step")
    Trainer(tiny_model(tok.vocab_size), SlidingWindowDataset(ids, SEQ_LEN), config=config(out, max_steps=1)).train()
    return out / "last"


def test_checkpoint_for_another_config_is_refused(corpus, one_step_checkpoint):
    tok, _, ids = corpus
    data = SlidingWindowDataset(ids, SEQ_LEN)
    other = Trainer(tiny_model(tok.vocab_size, n_embd=48), data, config=config())
    before = weights(other.model)
    with pytest.raises(CheckpointError, match=r"config\.json.*n_embd=32 \(model has 48\)"):
        other.load_checkpoint(one_step_checkpoint)
    with pytest.raises(ValueError, match="batch_size=4, this run has 8"):
        Trainer(tiny_model(tok.vocab_size), data, config=config(batch_size=8)).load_checkpoint(one_step_checkpoint)
    assert all(torch.equal(other.model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "file", ["model.safetensors", "trainer_state.safetensors", "trainer_state.json", "config.json"]
)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_names_the_file(tmp_path, corpus, one_step_checkpoint, file, damage):
    tok, _, ids = corpus
    checkpoint = shutil.copytree(one_step_checkpoint, tmp_path / "last")
    path = checkpoint / file
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-2] ^= 0x55
    path.write_bytes(bytes(raw))
    fresh = Trainer(tiny_model(tok.vocab_size, seed=3), SlidingWindowDataset(ids, SEQ_LEN), config=config())
    before = weights(fresh.model)
    with pytest.raises(CheckpointError, match=file.replace(".", r"\.")):
        fresh.load_checkpoint(checkpoint)
    assert fresh.step == 0 and all(torch.equal(fresh.model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fresh.load_checkpoint(tmp_path / "nowhere")


def test_optimizer_groups_and_schedule(corpus):
    tok, _, ids = corpus
    model = tiny_model(tok.vocab_size)
    trainer = Trainer(
        model,
        SlidingWindowDataset(ids, SEQ_LEN),
        config=config(max_steps=20, warmup_steps=4, learning_rate=1e-2, min_lr_ratio=0.1),
    )
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    counted = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters())  # the tied wte / lm_head once
    assert sum(p is model.transformer.wte.weight for p in decay["params"]) == 1
    assert any(p is model.transformer.ln_f.weight for p in no_decay["params"])
    lrs = [trainer.lr_at(s) for s in range(21)]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert all(a >= b - 1e-12 for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[20] == pytest.approx(1e-3)


def test_bf16_autocast_and_sequences_on_cpu(corpus):
    """bf16 autocast on CPU with a padded SequenceDataset (attention mask, -100 labels) and accumulation."""
    tok, names, _ = corpus
    data = SequenceDataset(names[:64], tok, max_len=SEQ_LEN)
    trainer = Trainer(
        tiny_model(tok.vocab_size),
        data,
        data,
        config(max_steps=8, precision="bf16", grad_accum_steps=2, eval_interval=8, device="cpu"),
    )
    history = trainer.train()
    assert all(math.isfinite(x) for x in losses(history))
    assert history[-1]["eval_loss"] < math.log(tok.vocab_size)
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        Trainer(tiny_model(tok.vocab_size), data, config=config(precision="fp16", device="cpu"))


def test_fine_tune_from_pretrained(tmp_path, corpus):
    tok, _, ids = corpus
    tiny_model(tok.vocab_size, seed=7).save_pretrained(tmp_path / "pretrained")
    model = GPT.from_pretrained(tmp_path / "pretrained")
    assert not model.training
    trainer = Trainer(model, SlidingWindowDataset(ids, SEQ_LEN), config=config(tmp_path / "run", max_steps=15))
    history = trainer.train()
    assert losses(history)[-1] < losses(history)[0] - 0.3
    tuned = GPT.from_pretrained(tmp_path / "run" / "last")  # on the CPU; the trainer's device may be CUDA
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key].cpu())
    with pytest.raises(FileExistsError, match="pretrained.*not a pyminigpt training checkpoint"):
        trainer.save_checkpoint(tmp_path / "pretrained")  # never clobbers a directory it did not write
    assert sorted(p.name for p in (tmp_path / "pretrained").iterdir()) == SAVED_MODEL_FILES


def test_bad_trainer_inputs(corpus):
    tok, _, ids = corpus
    with pytest.raises(ValueError, match="batch_size"):
        TrainerConfig(batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        TrainerConfig(precision="fp8")
    small = SlidingWindowDataset(ids[:40], SEQ_LEN)  # 2 windows
    with pytest.raises(ValueError, match="2 items, fewer than one batch of batch_size=4"):
        Trainer(tiny_model(tok.vocab_size), small, config=config())
    trainer = Trainer(tiny_model(tok.vocab_size), SlidingWindowDataset(ids, SEQ_LEN), config=config())
    with pytest.raises(ValueError, match="eval_dataset"):
        trainer.evaluate()


def test_checkpoints_hold_the_tokenizer_and_verify_it(tmp_path, corpus):
    """With a tokenizer, each checkpoint is a complete transformers directory; its files are checksummed too."""
    transformers = pytest.importorskip("transformers")
    tok, names, ids = corpus
    data = SlidingWindowDataset(ids, SEQ_LEN)
    Trainer(tiny_model(tok.vocab_size), data, config=config(tmp_path, max_steps=2), tokenizer=tok).train()
    last = tmp_path / "last"
    recorded = json.loads((last / "trainer_state.json").read_text())["files"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(recorded)
    hf_tok = transformers.AutoTokenizer.from_pretrained(last, local_files_only=True)
    assert hf_tok(names[0])["input_ids"] == tok.encode(names[0])
    transformers.GPT2LMHeadModel.from_pretrained(last, local_files_only=True)
    (last / "tokenizer.json").write_text((last / "tokenizer.json").read_text().replace('"<EOS>"', '"<END>"'))
    fresh = Trainer(tiny_model(tok.vocab_size), data, config=config(tmp_path))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        fresh.load_checkpoint(last)
