"""The command as a newcomer meets it (issue 28): `train` explains its batch, its time and its
loss; every error names the user's option; chat keeps (or refuses to replace) what was tuned;
the words agree with the code."""

import json
import re
import shutil
from pathlib import Path

import pytest
from cli_testing import assert_usage_error, run, write_names

from pyminigpt.cli import build_parser, main
from pyminigpt.cli import chat as chat_module
from pyminigpt.cli.demo import DEMO_TRAIN_SECONDS
from pyminigpt.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parents[2]
FLAGS = ["--size", "tiny", "--warmup", "1", "--eval-interval", "2", "--no-progress"]


@pytest.fixture(scope="module")
def names_file(tmp_path_factory):
    return write_names(tmp_path_factory, 40, seed=5)


@pytest.fixture(scope="module")
def few_names(tmp_path_factory):
    """Five names: too few to hold out an evaluation slice (10% of 5 is 0)."""
    return write_names(tmp_path_factory, 5, seed=1, name="five.txt")


@pytest.fixture(scope="module")
def small_run(names_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "names"
    assert (
        main(["train", str(names_file), "--lines", "--steps", "2", "--batch-size", "4", "--out", str(out), *FLAGS]) == 0
    )
    return out


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name]


# ----------------------------------------------------------------------------- train


def test_train_help_shows_every_default(capsys):
    train = _subparser("train")
    for action in train._actions:
        if action.dest == "help":
            continue
        assert action.help and "default" in action.help, f"{action.option_strings or action.dest} says no default"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE sequences per micro-batch" in text and "(default 32" in text
    assert "--precision {fp32,bf16,fp16} fp32; bf16" in text


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--steps", "-10"], ["--steps must be >= 1, got -10"]),
        (["--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
        (["--grad-accum", "0"], ["--grad-accum must be >= 1"]),
        (["--warmup", "-1"], ["--warmup must be >= 0"]),
        (["--lr", "0"], ["--lr must be > 0"]),
    ],
)
def test_train_options_are_checked_by_their_names(capsys, names_file, tmp_path, flags, needles):
    err = assert_usage_error(capsys, ["train", names_file, "--out", tmp_path / "out", *flags], *needles)
    assert "TrainerConfig" not in err and "max_steps" not in err
    assert not (tmp_path / "out").exists()


def test_out_on_an_existing_file(capsys, names_file, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("not a run")
    err = assert_usage_error(capsys, ["train", names_file, "--out", file], "--out", "is a file", str(file))
    assert "Errno" not in err
    assert file.read_text() == "not a run"


def test_a_batch_size_that_does_not_fit_names_the_largest_that_does(capsys, names_file, tmp_path):
    # 40 names, --lines: 36 to train on (10% held out)
    err = assert_usage_error(
        capsys,
        ["train", names_file, "--lines", "--batch-size", "100", "--out", tmp_path / "out", *FLAGS],
        "--batch-size 100",
        "36 training texts",
        "pass --batch-size 36 or less",
    )
    assert "train_dataset" not in err and "world_size" not in err


def test_a_short_text_gets_a_batch_that_fits_best_as_last_and_a_warning(capsys, few_names, tmp_path):
    out = tmp_path / "run"
    code, text, err = run(capsys, "train", few_names, "--lines", "--steps", "3", "--out", out, *FLAGS)
    assert code == 0, err
    assert "batches of 5 instead of the default 32" in text
    assert "too short to hold out an evaluation slice" in text
    assert "not a measure of quality" in text and "memorisation" in text and "5 texts" in text
    assert (out / "best" / "model.safetensors").read_bytes() == (out / "last" / "model.safetensors").read_bytes()
    assert "evaluation slice" in json.loads((out / "run.json").read_text())["best"]
    assert f"and {out / 'best'}" in text
    # the run loads (its best/ is there), and --resume goes on and refreshes best/
    assert run(capsys, "generate", out, "--num-samples", "1", "--max-new-tokens", "2")[0] == 0
    code, text, err = run(capsys, "train", "--resume", "--steps", "4", "--out", out, *FLAGS)
    assert code == 0, err
    assert json.loads((out / "best" / "trainer_state.json").read_text())["step"] == 4


# ----------------------------------------------------------------------------- MODEL errors


def test_a_file_given_as_model(capsys, small_run):
    weights = small_run / "last" / "model.safetensors"
    err = assert_usage_error(capsys, ["generate", weights], "MODEL", "is a file", str(small_run / "last"))
    assert "not found" not in err
    assert_usage_error(capsys, ["train", small_run / "run.json", "--init-from", weights], "--init-from", "is a file")


def test_an_empty_tokenizer_is_refused_at_load(capsys, small_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    CharTokenizer([]).save(run_dir / "tokenizer.json")
    for command in (["generate", run_dir], ["perplexity", run_dir, "--text", "abc"], ["explore", run_dir]):
        assert_usage_error(capsys, command, "MODEL", "tokenizer", "is empty", str(run_dir / "tokenizer.json"))


def test_a_hub_name_without_network_or_cache(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)
    err = assert_usage_error(capsys, ["generate", "distilgpt2"], "MODEL", "'distilgpt2'", "network", "local cache")
    assert "hub name" in err
    # a path whose folder exists is a path, not a hub name
    (tmp_path / "runs").mkdir()
    err = assert_usage_error(capsys, ["generate", "runs/typo"], "model directory not found", "runs/typo")
    assert "network" not in err


def test_tokenizer_file_and_its_old_spelling(capsys, small_run, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(small_run / "last" / name, plain / name)
    assert_usage_error(capsys, ["generate", plain], "no tokenizer", "--tokenizer-file FILE")
    tokenizer = small_run / "tokenizer.json"
    for spelling in ("--tokenizer-file", "--tokenizer"):
        assert run(capsys, "generate", plain, spelling, tokenizer, "--num-samples", "1")[0] == 0
    assert "--tokenizer-file FILE" in _subparser("generate").format_help()


# ----------------------------------------------------------------------------- chat


def _script(monkeypatch, *lines):
    """Feed chat these input lines; a KeyboardInterrupt instance is raised where it stands (Ctrl-C)."""
    answers = iter(lines)

    def read(prompt):
        answer = next(answers, None)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(chat_module, "_read_line", read)


def test_ctrl_c_in_chat_saves_what_was_tuned(capsys, monkeypatch, small_run, tmp_path):
    tuned = tmp_path / "tuned"
    _script(monkeypatch, "Ba", "1", "Da", KeyboardInterrupt())
    code, text, err = run(capsys, "chat", small_run, "--feedback", "--out", tuned, "--max-new-tokens", "3")
    assert code == 0, err
    assert "Ctrl-C" in text and "1 rating " in text and "1 ratings" not in text
    assert (tuned / "last" / "model.safetensors").is_file()
    assert json.loads((tuned / "run.json").read_text())["rewards"] == [1.0]
    # Ctrl-C at the rating prompt, before any rating: nothing to save, said so
    _script(monkeypatch, "Ba", KeyboardInterrupt())
    code, text, _ = run(capsys, "chat", small_run, "--feedback", "--out", tmp_path / "none", "--max-new-tokens", "3")
    assert code == 0 and "nothing saved" in text and not (tmp_path / "none").exists()
    # without --feedback, Ctrl-C ends the command as an interruption
    _script(monkeypatch, KeyboardInterrupt())
    code, _, err = run(capsys, "chat", small_run, "--max-new-tokens", "3")
    assert code == 130 and "interrupted" in err


def test_an_earlier_feedback_run_is_continued_or_refused(capsys, monkeypatch, small_run, tmp_path):
    tuned = tmp_path / "tuned"
    _script(monkeypatch, "Ba", "1", "q")
    assert run(capsys, "chat", small_run, "--feedback", "--out", tuned, "--max-new-tokens", "3")[0] == 0
    first = (tuned / "last" / "model.safetensors").read_bytes()
    # another model into the same --out: refused, with the command that continues it
    _script(monkeypatch, "Ba", "1", "q")
    assert_usage_error(
        capsys,
        ["chat", small_run, "--feedback", "--out", tuned, "--max-new-tokens", "3"],
        "already holds a chat --feedback run",
        f"pyminigpt chat {tuned} --feedback --out {tuned}",
    )
    assert (tuned / "last" / "model.safetensors").read_bytes() == first
    # the run itself as MODEL: continued, its ratings kept, tuned_from still the start
    _script(monkeypatch, "Ba", "-0.5", "q")
    code, text, err = run(capsys, "chat", tuned, "--feedback", "--out", tuned, "--max-new-tokens", "3")
    assert code == 0, err
    assert "continuing the feedback run" in text and "2 since" in text
    saved = json.loads((tuned / "run.json").read_text())
    assert saved["rewards"] == [1.0, -0.5] and saved["tuned_from"] == str((small_run / "best").resolve())
    assert (tuned / "last" / "model.safetensors").read_bytes() != first


# ----------------------------------------------------------------------------- words


def test_one_demo_time_everywhere():
    seconds = f"{DEMO_TRAIN_SECONDS:.0f} s"
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"the steps that fit in {seconds} on the machine at hand" in readme
    assert "three PNGs" in readme
    demo_help = " ".join(_subparser("demo").format_help().split())
    for text in (readme, demo_help, build_parser().format_help()):
        times = set(re.findall(r"(\d+) (?:s|seconds)\b", text))
        assert times <= {f"{DEMO_TRAIN_SECONDS:.0f}"}, times
    assert seconds in demo_help


def test_pipeline_refuses_a_gpt_with_the_way_to_a_pipeline():
    transformers = pytest.importorskip("transformers")
    from tiny_gpt2 import EOT, train_tiny_bpe

    from pyminigpt import GPT, GPTConfig

    tokenizer = transformers.GPT2TokenizerFast(tokenizer_object=train_tiny_bpe(), eos_token=EOT)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match=r"not a transformers model.*patch_hf_gpt2"):
        transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
