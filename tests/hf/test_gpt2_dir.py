"""The command on a GPT-2 directory written by transformers (issue 20): `train --init-from`,
checkpoints that transformers loads (GPT2LMHeadModel, AutoTokenizer, pipeline) for
fine-tuned and from-scratch runs, `--resume`, `chat --feedback` saving a run directory,
and the errors that name the argument."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from cli_testing import assert_usage_error, run
from tiny_gpt2 import CORPUS, make_tiny_gpt2_dir

from pyminigpt.cli import main
from pyminigpt.cli.runs import load_model
from pyminigpt.model import GPT
from pyminigpt.tokenizer import BPETokenizer, load_tokenizer

pytestmark = pytest.mark.slow  # the command end to end on a GPT-2 directory; `make test-unit` leaves it out

REPO = Path(__file__).resolve().parents[1]
STEPS = ["--batch-size", "4", "--warmup", "1", "--eval-interval", "2", "--no-progress"]


def load_in_transformers(model_dir):
    """(model, tokenizer) loaded by transformers from local files only."""
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, tokenizer


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fine_tuned(tiny_gpt2_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fine-tuned"
    assert (
        main(["train", str(text_file), "--init-from", str(tiny_gpt2_dir), "--steps", "4", "--out", str(out), *STEPS])
        == 0
    )
    return out


def test_fine_tune_and_load_the_checkpoint_in_transformers(fine_tuned, tiny_gpt2_dir):
    run_file = json.loads((fine_tuned / "run.json").read_text())
    assert run_file["context"] == 64 and run_file["init_from"] == str(tiny_gpt2_dir.resolve())  # the model's context
    start = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, local_files_only=True).eval()
    for name in ("best", "last"):
        ckpt = fine_tuned / name
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
            p.name for p in ckpt.iterdir()
        }
        model, tokenizer = load_in_transformers(ckpt)
        ours = load_model(str(ckpt), torch.device("cpu"))
        text = "how many r in strawberry?"
        ids = tokenizer(text)["input_ids"]
        assert ids == ours.tokenizer.encode(text) == BPETokenizer.from_pretrained(tiny_gpt2_dir).encode(text)
        assert tokenizer.decode(ids) == text and tokenizer.eos_token == "<|endoftext|>"
        batch = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(ours.model(batch).logits, model(batch).logits, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(model(batch).logits, start(batch).logits)  # it was trained
        assert transformers.GenerationConfig.from_pretrained(ckpt).eos_token_id == tokenizer.eos_token_id
    generator = transformers.pipeline("text-generation", model=str(fine_tuned / "last"), device="cpu")
    [result] = generator("the cat", max_new_tokens=4, do_sample=False)
    assert result["generated_text"].startswith("the cat")


def test_resume_a_fine_tuning_run(capsys, fine_tuned, text_file, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fine_tuned, run_dir)
    assert_usage_error(
        capsys, ["train", "--resume", "--out", run_dir, "--size", "tiny", "--steps", "6", *STEPS], "--size tiny"
    )
    assert_usage_error(
        capsys,
        ["train", text_file, "--resume", "--init-from", fine_tuned, "--out", run_dir, *STEPS],
        "--init-from",
        "--resume",
    )
    assert_usage_error(
        capsys, ["train", "--resume", "--out", run_dir, "--context", "65", *STEPS], "--context 65", "(64)"
    )
    code, out, _ = run(capsys, "train", "--resume", "--out", run_dir, "--steps", "6", *STEPS)
    assert code == 0, out
    assert json.loads((run_dir / "last" / "trainer_state.json").read_text())["step"] == 6
    load_in_transformers(run_dir / "last")


def test_init_from_a_run_and_generate(capsys, fine_tuned, text_file, tmp_path):
    """An earlier run is a start too; its checkpoint copied out of the run is a GPT-2 directory like any other."""
    out = tmp_path / "second"
    code, _, err = run(capsys, "train", text_file, "--init-from", fine_tuned, "--steps", "2", "--out", out, *STEPS)
    assert code == 0, err
    alone = tmp_path / "alone"
    shutil.copytree(out / "last", alone)
    code, text, _ = run(capsys, "generate", alone, "--prompt", "the", "--num-samples", "1", "--max-new-tokens", "4")
    assert code == 0 and text.startswith("the")


def test_tokenizer_json_layout(capsys, tmp_path, text_file):
    gpt2 = make_tiny_gpt2_dir(tmp_path / "gpt2", tokenizer_format="tokenizer_json")
    out = tmp_path / "run"
    assert run(capsys, "train", text_file, "--init-from", gpt2, "--lines", "--steps", "2", "--out", out, *STEPS)[0] == 0
    _, tokenizer = load_in_transformers(out / "last")
    assert tokenizer("the fox")["input_ids"] == load_tokenizer(out / "tokenizer.json").encode("the fox")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_checkpoints_of_runs_from_scratch_load_in_transformers(capsys, tmp_path, text_file, kind):
    out = tmp_path / kind
    flags = ["--tokenizer", kind, "--vocab-size", "300"] if kind == "bpe" else []
    code, _, err = run(
        capsys, "train", text_file, *flags, "--size", "tiny", "--context", "32", "--steps", "2", "--out", out, *STEPS
    )
    assert code == 0, err
    ours = load_tokenizer(out / "tokenizer.json")
    model, tokenizer = load_in_transformers(out / "last")
    text = "the cat sat.\nthe dog?"
    ids = tokenizer(text)["input_ids"]
    assert ids == ours.encode(text) and tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (ours.pad_id, ours.eos_id)
    with torch.no_grad():
        torch.testing.assert_close(
            GPT.from_pretrained(out / "last")(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits
        )
    if kind == "char":  # a character model cannot fine-tune on characters it never saw
        other = tmp_path / "other.txt"
        other.write_text("the cat #1\n", encoding="utf-8")
        capsys.readouterr()  # transformers' progress bars
        assert_usage_error(
            capsys,
            ["train", other, "--init-from", out, "--out", tmp_path / "again"],
            "'#'",
            "not in the vocabulary",
            other,
        )


def test_chat_feedback_on_a_gpt2_directory(capsys, monkeypatch, tiny_gpt2_dir, tmp_path):
    tuned = tmp_path / "tuned"
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\n1\n   \nthe dog\n-0.5\nq\n"))
    code, out, err = run(
        capsys, "chat", tiny_gpt2_dir, "--feedback", "--out", tuned, "--seed", "0", "--max-new-tokens", "6"
    )
    assert code == 0, err
    assert out.count("reward ") == 2 and "2 ratings" in out
    assert "cannot use this prompt: the prompt is empty" in out
    assert json.loads((tuned / "run.json").read_text())["tuned_from"] == str(tiny_gpt2_dir.resolve())
    model, _ = load_in_transformers(tuned / "last")
    start = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, local_files_only=True)
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, start.transformer.h[0].mlp.c_fc.weight)
    # the run directory is a MODEL for the other commands
    code, text, _ = run(capsys, "generate", tuned, "--prompt", "the", "--num-samples", "1", "--max-new-tokens", "3")
    assert code == 0 and text.startswith("the")
    assert run(capsys, "perplexity", tuned, "--text", "the cat sat on the mat")[0] == 0


def test_fine_tune_under_torchrun(tiny_gpt2_dir, text_file, tmp_path):
    """The README's torchrun command: two CPU processes (gloo), one run directory written by rank 0."""
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pyminigpt", "train", str(text_file), "--init-from", str(tiny_gpt2_dir), "--steps", "2",
               "--device", "cpu", "--out", str(out), *STEPS]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("fine-tuning") == 1  # rank 0 alone prints
    assert json.loads((out / "last" / "trainer_state.json").read_text())["world_size"] == 2
    load_in_transformers(out / "last")


# ----------------------------------------------------------------------------- bad input


def test_not_a_gpt2_directory(capsys, tmp_path, text_file, tiny_gpt2_dir):
    out = tmp_path / "out"
    assert_usage_error(
        capsys, ["train", text_file, "--init-from", tmp_path / "nowhere", "--out", out], "--init-from", "not found"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_usage_error(
        capsys, ["train", text_file, "--init-from", empty, "--out", out], "--init-from", "no config.json", empty
    )
    bert = tmp_path / "bert"
    shutil.copytree(tiny_gpt2_dir, bert)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    assert_usage_error(
        capsys, ["train", text_file, "--init-from", bert, "--out", out], "--init-from", "not a GPT-2", "'bert'"
    )
    assert_usage_error(capsys, ["chat", bert], "MODEL", "not a GPT-2")
    assert not out.exists(), "a refused run left files behind"


def test_missing_tokenizer(capsys, tmp_path, text_file, tiny_gpt2_dir):
    broken = tmp_path / "no-merges"
    shutil.copytree(tiny_gpt2_dir, broken)
    (broken / "merges.txt").unlink()
    assert_usage_error(
        capsys,
        ["train", text_file, "--init-from", broken, "--out", tmp_path / "out"],
        "--init-from",
        "no tokenizer",
        broken,
    )
    assert_usage_error(capsys, ["chat", broken, "--feedback"], "MODEL", "no tokenizer", "--tokenizer FILE")


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--size", "tiny"], ["--size tiny", "contradicts", "width 32"]),
        (["--vocab-size", "1024"], ["--vocab-size 1024", "vocab_size 320"]),
        (["--tokenizer", "char"], ["--tokenizer char", "bpe"]),
        (["--context", "65"], ["--context 65", "context 64"]),
    ],
)
def test_init_from_with_contradicting_options(capsys, tmp_path, text_file, tiny_gpt2_dir, flags, needles):
    out = tmp_path / "out"
    assert_usage_error(capsys, ["train", text_file, "--init-from", tiny_gpt2_dir, *flags, "--out", out], *needles)
    assert not out.exists()


def test_empty_prompt_and_text(capsys, tiny_gpt2_dir):
    assert_usage_error(capsys, ["perplexity", tiny_gpt2_dir, "--text", " "], "--text", "empty")


def test_chat_feedback_never_overwrites_a_training_run(capsys, fine_tuned, tiny_gpt2_dir):
    before = sorted(p.name for p in fine_tuned.rglob("*"))
    assert_usage_error(capsys, ["chat", tiny_gpt2_dir, "--feedback", "--out", fine_tuned], "--out", "choose another")
    assert_usage_error(capsys, ["chat", fine_tuned, "--feedback", "--out", tiny_gpt2_dir], "--out", "choose another")
    assert sorted(p.name for p in fine_tuned.rglob("*")) == before
