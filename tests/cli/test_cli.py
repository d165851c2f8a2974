"""The `pyminigpt` command end to end on tiny settings: demo --quick, train + generate +
perplexity + resume, chat --feedback on scripted stdin, info, and every bad input ending
in a one-line message (exit code 2) that names the file, with nothing saved damaged."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_testing import assert_usage_error, run, write_names

from pyminigpt.cli import main
from pyminigpt.train.data import names_corpus

pytestmark = pytest.mark.slow  # the command end to end (a training run per module); `make test-unit` leaves it out

REPO = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ["--size", "tiny", "--batch-size", "4", "--warmup", "2", "--eval-interval", "3", "--no-progress"]


def digests(directory: Path) -> dict:
    return {
        p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def names_file(tmp_path_factory):
    return write_names(tmp_path_factory, 60, seed=3)


@pytest.fixture(scope="module")
def names_run(names_file, tmp_path_factory):
    """A tiny model trained for a few steps on one name per line."""
    out = tmp_path_factory.mktemp("runs") / "names"
    assert main(["train", str(names_file), "--lines", "--steps", "6", "--out", str(out), *TRAIN_FLAGS]) == 0
    return out


def test_help_of_every_command(capsys):
    for command in ("demo", "train", "generate", "perplexity", "chat", "info"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: pyminigpt {command}" in capsys.readouterr().out


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    for needle in ("pyminigpt 0.", "torch", "capability", "kernel backends", "reference", "available", "GPU"):
        assert needle in out


def test_demo_quick(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    code, out, _ = run(capsys, "demo", "--quick", "--out", out_dir, "--no-progress")
    assert code == 0
    for needle in (
        "held-out loss",
        "perplexity",
        "temperature 0.5",
        "top-k",
        "top-p",
        "are new (not in the training set)",
    ):
        assert needle in out
    for png in ("loss.png", "attention.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(out_dir / png) in out
    assert (out_dir / "last" / "tokenizer.json").is_file()  # a transformers model directory
    # the demo's model is a run that the other commands use
    code, out, _ = run(capsys, "generate", out_dir, "--num-samples", "2", "--seed", "0")
    assert code == 0 and len(out.splitlines()) == 2


def test_train_writes_a_run(names_run):
    assert {"run.json", "tokenizer.json", "last", "loss.png"} <= {p.name for p in names_run.iterdir()}
    assert (names_run / "best" / "model.safetensors").is_file()  # evaluations ran


def test_generate(capsys, names_run):
    outputs = [
        run(capsys, "generate", names_run, "--num-samples", "3", "--seed", "5", "--top-k", "10") for _ in range(2)
    ]
    assert outputs[0][0] == 0 and outputs[0] == outputs[1], "the same seed must give the same samples"
    assert len(outputs[0][1].splitlines()) == 3
    code, out, _ = run(
        capsys,
        "generate",
        names_run / "last",
        "--prompt",
        "Ba",
        "--greedy",
        "--stream",
        "--num-samples",
        "1",
        "--max-new-tokens",
        "5",
    )
    assert code == 0 and out.startswith("Ba") and len(out.strip()) <= 7
    code, out, _ = run(
        capsys,
        "generate",
        names_run,
        "--prompt",
        "Ba",
        "--top-p",
        "0.5",
        "--temperature",
        "0.7",
        "--repetition-penalty",
        "1.2",
        "--num-samples",
        "2",
    )
    assert code == 0 and all(line.startswith("Ba") for line in out.splitlines())


def test_perplexity(capsys, names_run, names_file, tmp_path):
    code, out, _ = run(capsys, "perplexity", names_run, names_file)
    assert code == 0 and "perplexity" in out and str(names_file) in out
    value = float(out.split()[1])
    assert 1.0 < value < 100
    code, out, _ = run(capsys, "perplexity", names_run, "--text", "Bilbo")
    assert code == 0


def test_resume_continues_and_refuses_another_config(capsys, names_run, names_file, tmp_path):
    run_dir = tmp_path / "names"
    shutil.copytree(names_run, run_dir)
    before = digests(run_dir)
    assert_usage_error(
        capsys,
        ["train", names_file, "--lines", "--out", run_dir, *TRAIN_FLAGS],
        "already holds a training run",
        run_dir,
    )
    assert_usage_error(
        capsys,
        ["train", "--resume", "--out", run_dir, "--steps", "9", *TRAIN_FLAGS, "--size", "small"],
        "another model config",
        run_dir / "last" / "config.json",
    )
    assert digests(run_dir) == before, "a refused command changed the saved run"
    code, _out, _ = run(capsys, "train", "--resume", "--out", run_dir, "--steps", "9", *TRAIN_FLAGS)
    assert code == 0
    import json

    assert json.loads((run_dir / "last" / "trainer_state.json").read_text())["step"] == 9


def test_stream_corpus_with_bpe(capsys, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text(" ".join(names_corpus(120, seed=1)), encoding="utf-8")
    out = tmp_path / "story"
    code, _, _ = run(
        capsys,
        "train",
        text,
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "300",
        "--context",
        "16",
        "--steps",
        "3",
        "--out",
        out,
        *TRAIN_FLAGS,
    )
    assert code == 0
    code, gen, _ = run(capsys, "generate", out, "--prompt", "Thor", "--num-samples", "1", "--max-new-tokens", "6")
    assert code == 0 and gen.startswith("Thor")
    code, _ppl, _ = run(capsys, "perplexity", out, text, "--stride", "8")
    assert code == 0


def test_chat_feedback_with_scripted_stdin(names_run, tmp_path):
    tuned = tmp_path / "tuned"
    script = "Ba\n1\nDu\n-1\nGa\nnot a number\n0.5\nGo\n\nq\n"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyminigpt",
            "chat",
            str(names_run),
            "--feedback",
            "--out",
            str(tuned),
            "--seed",
            "0",
            "--lr",
            "1e-3",
        ],
        check=False,
        input=script,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("reward ") == 3  # 1, -1 and 0.5; the empty answer skipped one
    assert "'not a number' is not a number in [-1, 1]" in result.stdout
    assert "3 ratings" in result.stdout
    assert (tuned / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the tuned model is a run directory, its model a transformers model directory
    assert (tuned / "last" / "model.safetensors").is_file() and (tuned / "tokenizer.json").is_file()
    assert (tuned / "run.json").is_file() and (tuned / "last" / "tokenizer_config.json").is_file()
    assert main(["generate", str(tuned), "--num-samples", "1", "--seed", "0"]) == 0


def test_chat_without_feedback_and_bad_prompt(names_run, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Ba\n\u263a\n"))
    code, out, _ = run(capsys, "chat", names_run, "--max-new-tokens", "3")
    assert code == 0
    assert "cannot use this prompt" in out and "'\u263a'" in out


# ----------------------------------------------------------------------------- bad input


def test_bad_data_files(capsys, tmp_path):
    empty, binary, short = tmp_path / "empty.txt", tmp_path / "latin1.txt", tmp_path / "short.txt"
    empty.write_text("   \n")
    binary.write_bytes("Éowyn\n".encode("latin-1"))
    short.write_text("hello")
    out = tmp_path / "out"
    assert_usage_error(capsys, ["train", empty, "--out", out], "empty", empty)
    assert_usage_error(capsys, ["train", binary, "--out", out], "not valid UTF-8", binary)
    assert_usage_error(capsys, ["train", short, "--size", "tiny", "--out", out], "shorter than one window", short)
    assert_usage_error(capsys, ["train", tmp_path / "missing.txt", "--out", out], "not found", "missing.txt")
    assert not out.exists(), "a refused run left files behind"


@pytest.mark.parametrize("damage", ["truncate", "flip", "config"])
def test_damaged_checkpoint(capsys, names_run, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(names_run, run_dir)
    weights = run_dir / "best" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
        needle = "truncated or corrupt"
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        needle = "SHA-256"
    else:
        weights = run_dir / "best" / "config.json"
        weights.write_text('{"n_embd": ')
        needle = "corrupt"
    before = digests(run_dir)
    assert_usage_error(capsys, ["generate", run_dir], needle, weights)
    assert_usage_error(capsys, ["perplexity", run_dir, "--text", "Bilbo"], needle, weights)
    assert digests(run_dir) == before


def test_plain_model_directory_errors(capsys, names_run, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(names_run / "last" / name, plain / name)
    assert_usage_error(capsys, ["generate", plain], "no tokenizer", plain)
    tokenizer = names_run / "tokenizer.json"
    assert run(capsys, "generate", plain, "--tokenizer", tokenizer, "--num-samples", "1")[0] == 0
    (plain / "model.safetensors").write_bytes((names_run / "last" / "model.safetensors").read_bytes()[:100])
    assert_usage_error(capsys, ["generate", plain, "--tokenizer", tokenizer], "truncated or corrupt", plain)
    assert_usage_error(capsys, ["generate", tmp_path / "nowhere"], "model directory not found", "nowhere")


def test_missing_tokenizer_and_unknown_characters(capsys, names_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(names_run, run_dir)
    (run_dir / "tokenizer.json").unlink()
    assert_usage_error(capsys, ["generate", run_dir], "tokenizer file not found", run_dir / "tokenizer.json")
    assert_usage_error(
        capsys, ["generate", names_run, "--prompt", "Q#7"], "not in the vocabulary", "'#'", names_run / "tokenizer.json"
    )
    assert_usage_error(capsys, ["perplexity", names_run, "--text", "Ba#"], "not in the vocabulary", "'#'")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--temperature", "0"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--max-new-tokens", "500"], "--max-new-tokens"),
        (["--num-samples", "0"], "--num-samples"),
    ],
)
def test_bad_sampling_options(capsys, names_run, flags, needle):
    assert_usage_error(capsys, ["generate", names_run, *flags], needle)
