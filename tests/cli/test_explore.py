"""`pyminigpt explore` on a tiny GPT-2 directory and on a run trained for a few steps: the
printed tables, the PNGs, the self-contained HTML page, the summaries of a prompt or a
model too large for a picture, and the errors. Then the analysis helpers it is built on
(word splits, token-id inputs, per-layer states, the plot layouts)."""

import base64
import math
import re

import matplotlib.image
import pytest
import torch
from tiny_gpt2 import make_tiny_gpt2_dir

from pyminigpt import analysis, plots
from pyminigpt.cli import main
from pyminigpt.model import GPT, GPTConfig
from pyminigpt.tokenizer import BPETokenizer, CharTokenizer

pytestmark = pytest.mark.slow  # explore end to end; `make test-unit` leaves it out

PROMPT = "a strawberry is red and a banana is yellow."
SECTIONS = (
    "1. tokens",
    "2. the next token",
    "3. attention of layer",
    "4. hidden states",
    "5. generations",
    "6. perplexity",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ("--max-new-tokens", 6, "--max-tokens", 8)  # small pictures, short generations: a fast test


def explore(capsys, *argv):
    """(exit code, stdout, stderr) of `pyminigpt explore *argv`."""
    code = main(["explore", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_page(out_dir, n_images):
    """The page exists, references nothing but embedded PNGs, and embeds exactly the PNG files written."""
    page = (out_dir / "explore.html").read_text(encoding="utf-8")
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.IGNORECASE)
    assert len(references) == n_images
    assert all(ref.startswith("data:image/png;base64,") for ref in references), references
    assert not re.search(r"<(?:link|script|iframe|object)\b", page, flags=re.IGNORECASE)
    written = sorted(p.read_bytes() for p in out_dir.glob("*.png"))
    embedded = sorted(base64.b64decode(ref.split(",", 1)[1]) for ref in references)
    assert embedded == written
    return page


def image_size(path):
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


# ----------------------------------------------------------------------------- the command


def test_explore_a_gpt2_directory(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "explore"
    code, printed, err = explore(capsys, tiny_gpt2_dir, "--prompt", PROMPT, "--out", out, "--layer", 0, "--top-n", 5)
    assert code == 0, err
    positions = [printed.index(section) for section in SECTIONS]
    assert positions == sorted(positions)  # every section, in order

    tokenizer = BPETokenizer.from_pretrained(tiny_gpt2_dir)
    ids = tokenizer.encode(PROMPT)
    words = PROMPT.split()
    assert f"{len(PROMPT)} characters, {len(words)} words -> {len(ids)} tokens" in printed
    assert "the model sees 'yellow.' as ' ' + 'y' + 'e' + 'll' + 'ow' + '.': pieces, not letters" in printed
    for word in words:
        assert re.search(rf"^\s*{re.escape(word)}\s+\d+\s", printed, flags=re.MULTILINE), word

    model = GPT.from_pretrained(tiny_gpt2_dir)
    rows = analysis.next_token_table(model, tokenizer, PROMPT, top_n=5)
    assert analysis.format_next_token_table(rows) in printed
    expected_ppl = analysis.perplexity(model, tokenizer, PROMPT)
    assert f"perplexity {expected_ppl:.2f}" in printed
    scored = analysis.token_probabilities(model, tokenizer, PROMPT)
    least = min(scored, key=lambda row: row[2])
    assert re.search(rf"^\s+{least[0]}\s+\S+\s+{least[2]:.4f}$", printed, flags=re.MULTILINE)
    generations = printed[printed.index("5. generations") : printed.index("6. perplexity")]
    for label in ("greedy", "temperature 0.7", "top-k 10", "top-p 0.9"):
        assert f"  {label} " in generations

    for name in ("attention.png", "hidden_states.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
        width, height = image_size(out / name)
        assert 300 < width < 4000 and 200 < height < 4000, (name, width, height)
    page = check_page(out, n_images=2)
    for heading in ("1. Tokens", "2. The next token", "3. Attention of layer 0", "6. Perplexity"):
        assert heading in page


def test_explore_is_reproducible(tiny_gpt2_dir, tmp_path, capsys):
    """One seed: the same command prints the same generations; another seed draws others."""
    runs = [explore(capsys, tiny_gpt2_dir, "--prompt", PROMPT, "--out", tmp_path / str(i), "--seed", seed, *QUICK)[1]
            for i, seed in enumerate((3, 3, 4))]  # fmt: skip

    def grid(printed):
        return printed[printed.index("5. generations") : printed.index("6. perplexity")].split("\n", 1)[1]

    assert grid(runs[0]) == grid(runs[1])
    assert grid(runs[0]) != grid(runs[2])


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_explore_a_trained_run(tokenizer, tmp_path, capsys):
    """A run trained for a few steps: a lines run (prompts after <SOS>) with a character
    tokenizer, and a stream run with a BPE."""
    data = tmp_path / "data.txt"
    data.write_text("\n".join(["a red strawberry", "a yellow banana", "the lazy dog sat"] * 40) + "\n")
    run = tmp_path / "run"
    train = ["train", data, "--tokenizer", tokenizer, "--vocab-size", 300, "--size", "tiny", "--out", run]
    train += ["--steps", 3, "--batch-size", 4, "--eval-interval", 2, "--no-progress"]
    train += ["--lines"] if tokenizer == "char" else []
    assert main(list(map(str, train))) == 0
    capsys.readouterr()
    out = tmp_path / "explore"
    prompt = "a red dog" if tokenizer == "char" else "a red zebra"  # a word the BPE never saw: cut in pieces
    code, printed, err = explore(capsys, run, "--prompt", prompt, "--out", out, *QUICK)
    assert code == 0, err
    assert all(section in printed for section in SECTIONS)
    if tokenizer == "char":
        assert "reads the prompt after <SOS>" in printed
        assert re.search(r"^\s+0\s+1\s+<SOS>$", printed, flags=re.MULTILINE)  # the first token row
        assert "9 characters, 3 words -> 9 tokens" in printed  # the <SOS> is not the prompt's cost
        assert "one token per character: the model sees every letter" in printed
    else:
        assert "the model sees 'zebra' letter by letter (' ' + 'z' + 'e' + 'b' + 'r' + 'a')" in printed
    check_page(out, n_images=2)


def test_a_large_model_and_a_long_prompt_are_summarised(tmp_path, capsys):
    """20 heads, 13 depths and a prompt longer than the context: capped pictures, notes that say so."""
    model_dir = make_tiny_gpt2_dir(tmp_path / "wide", n_head=20, n_embd=40, n_layer=12, n_positions=32)
    prompt = "<b>bold</b> & " + " ".join(["the strawberry is red and the banana is yellow."] * 8)
    out = tmp_path / "explore"
    code, printed, err = explore(
        capsys, model_dir, "--prompt", prompt, "--out", out, "--max-tokens", 24, "--max-new-tokens", 6
    )
    assert code == 0, err
    n_tokens = len(BPETokenizer.from_pretrained(model_dir).encode(prompt))
    assert n_tokens > 32
    for note in (
        f"the pictures show the first 24 of the prompt's {n_tokens} tokens",
        "the layer has 20 heads: the picture shows the first 16",
        "the model has 13 depths: the picture shows 9 of them",
        "the table reads its last 32 (the context)",
        "the generations continue the last 26 tokens of the prompt",
        "scored with a sliding window of 32 tokens",
    ):
        assert note in printed
    for name in ("attention.png", "hidden_states.png"):
        width, height = image_size(out / name)
        assert width < 4000 and height < 4000, (name, width, height)
    page = check_page(out, n_images=2)
    assert "the layer has 20 heads" in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt; &amp;" in page  # the prompt is escaped


def test_a_one_token_prompt_is_explored_without_pca_or_perplexity(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "explore"
    code, printed, err = explore(capsys, tiny_gpt2_dir, "--prompt", "a", "--out", out, *QUICK)
    assert code == 0, err
    assert "needs at least two tokens" in printed
    assert "there is nothing to predict, so no perplexity" in printed
    assert not (out / "hidden_states.png").exists()
    check_page(out, n_images=1)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--layer", "2"], "--layer must be in [-2, 1] (the model has 2), got 2"),
        (["--layer", "-3"], "--layer must be in [-2, 1]"),
        (["--top-n", "0"], "--top-n must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--max-tokens", "1"], "--max-tokens must be >= 2"),
    ],
)
def test_bad_options_are_refused(tiny_gpt2_dir, tmp_path, capsys, argv, message):
    code, _, err = explore(capsys, tiny_gpt2_dir, "--out", tmp_path / "explore", *argv)
    assert code == 2
    assert message in err
    assert not (tmp_path / "explore" / "explore.html").exists()


def test_bad_models_and_prompts_are_refused(tiny_gpt2_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = explore(capsys, empty, "--out", tmp_path / "x")
    assert code == 2 and "(no config.json)" in err
    code, _, err = explore(capsys, tmp_path / "missing", "--out", tmp_path / "x")
    assert code == 2 and "model directory not found" in err

    tokenizer = CharTokenizer.from_text("abc ")
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model_dir = tmp_path / "char-model"
    GPT(config).save_pretrained(model_dir)
    tokenizer_file = tokenizer.save(tmp_path / "tokenizer.json")
    code, _, err = explore(capsys, model_dir, "--tokenizer", tokenizer_file, "--prompt", "xyz", "--out", tmp_path / "x")
    assert code == 2 and "--prompt" in err and "'x'" in err
    code, _, err = explore(capsys, model_dir, "--tokenizer", tokenizer_file, "--out", tmp_path / "x")
    assert code == 2 and "the default prompt (pass --prompt)" in err
    code, _, err = explore(capsys, model_dir, "--out", tmp_path / "x")
    assert code == 2 and "no tokenizer" in err

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    code, _, err = explore(capsys, tiny_gpt2_dir, "--out", not_a_dir)
    assert code == 2 and "--out" in err and "is not a directory" in err


# ----------------------------------------------------------------------------- the analysis helpers


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory):
    return BPETokenizer.from_pretrained(make_tiny_gpt2_dir(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="module")
def tiny_model(tiny_bpe):
    config = GPTConfig(vocab_size=tiny_bpe.vocab_size, n_positions=32, n_embd=32, n_layer=3, n_head=4)
    return GPT(config).eval()


@pytest.mark.parametrize(
    "text",
    [PROMPT, "  two spaces, then\na new line\n", "unknown words: zyxwvut 🍓 épée!", "x", " "],
)
def test_word_split_covers_the_text(tiny_bpe, text):
    splits = analysis.word_split(tiny_bpe, text)
    assert "".join(s.word for s in splits) == text
    assert all("".join(s.pieces) == s.word for s in splits)
    assert sum(s.tokens for s in splits) == len(tiny_bpe.encode(text))
    assert all(s.tokens >= len(s.pieces) >= 1 for s in splits)


def test_word_split_of_a_character_cut_across_byte_tokens(tiny_bpe):
    """🍓 is 4 UTF-8 bytes, unseen by the tiny BPE: several byte tokens, one piece."""
    [_, berry] = analysis.word_split(tiny_bpe, "a 🍓")
    assert berry.word == " 🍓" and "🍓" in berry.pieces and berry.tokens >= 4


def test_word_split_shows_the_strawberry_effect(tiny_bpe):
    chars = CharTokenizer.from_text("a strawberry")
    [a, berry] = analysis.word_split(chars, "a strawberry")
    assert (a.word, a.pieces, a.tokens) == ("a", ["a"], 1)
    assert berry.pieces == list(" strawberry") and berry.tokens == 11
    assert analysis.word_split(chars, "") == []
    with_specials = analysis.word_split(chars, "a", add_special_tokens=True)
    assert [p for s in with_specials for p in s.pieces] == ["<SOS>", "a", "<EOS>"]


def test_helpers_take_token_ids(tiny_model, tiny_bpe):
    ids = tiny_bpe.encode(PROMPT)
    assert analysis.next_token_table(tiny_model, tiny_bpe, ids) == analysis.next_token_table(
        tiny_model, tiny_bpe, PROMPT
    )
    assert torch.equal(
        analysis.attention_maps(tiny_model, tiny_bpe, ids), analysis.attention_maps(tiny_model, tiny_bpe, PROMPT)
    )
    generator = torch.Generator()
    from_ids = analysis.generate_text(tiny_model, tiny_bpe, ids, max_new_tokens=5, generator=generator.manual_seed(1))
    from_text = analysis.generate_text(
        tiny_model, tiny_bpe, PROMPT, max_new_tokens=5, generator=generator.manual_seed(1)
    )
    assert from_ids == from_text
    for bad, error in (([1.5], TypeError), ([True], TypeError), (torch.tensor(ids), TypeError), ([], ValueError)):
        with pytest.raises(error, match="prompt"):
            analysis.next_token_table(tiny_model, tiny_bpe, bad)
    with pytest.raises(ValueError, match="text is empty"):
        analysis.attention_maps(tiny_model, tiny_bpe, [])
    with pytest.raises(ValueError, match="longer than the model's context of 32"):
        analysis.layer_states(tiny_model, tiny_bpe, list(range(33)))


def test_layer_states_are_the_models_hidden_states(tiny_model, tiny_bpe):
    ids = tiny_bpe.encode(PROMPT)
    states = analysis.layer_states(tiny_model, tiny_bpe, PROMPT)
    assert states.shape == (4, len(ids), 32) and states.dtype == torch.float32
    expected = tiny_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for got, want in zip(states, expected):
        torch.testing.assert_close(got, want[0], rtol=0, atol=0)
    pooled = analysis.hidden_states(tiny_model, tiny_bpe, [PROMPT, "a dog"], layer=2)
    torch.testing.assert_close(pooled[0], states[2].mean(0), rtol=0, atol=0)


def test_plot_attention_in_columns_and_pca_panels(tiny_model, tiny_bpe, tmp_path):
    ids = tiny_bpe.encode(PROMPT)
    maps = analysis.attention_maps(tiny_model, tiny_bpe, ids)  # (3, 4, T, T)
    tokens = analysis.token_strings(tiny_bpe, ids)
    wide = plots.plot_attention(maps, tokens, tmp_path / "rows.png")
    wrapped = plots.plot_attention(maps, tokens, tmp_path / "wrapped.png", columns=2)
    (w1, h1), (w2, h2) = image_size(wide), image_size(wrapped)
    assert w2 < w1 and h2 > h1  # 3 x 4 panels against 6 x 2
    with pytest.raises(ValueError, match="panel_titles has 1 entries for 12 panels"):
        plots.plot_attention(maps, tokens, tmp_path / "x.png", panel_titles=["one"])
    with pytest.raises(ValueError, match="columns must be >= 1"):
        plots.plot_attention(maps, tokens, tmp_path / "x.png", columns=0)

    states = analysis.layer_states(tiny_model, tiny_bpe, ids)
    panels = [(states[d], tokens, f"depth {d}") for d in range(4)]
    path = plots.plot_pca_panels(panels, tmp_path / "pca.png", title="states", connect=[False, True, True, True])
    assert image_size(path)[0] > image_size(plots.plot_pca(states[0], tokens, tmp_path / "one.png"))[0]
    with pytest.raises(ValueError, match="connect has 2 entries for 4 panels"):
        plots.plot_pca_panels(panels, tmp_path / "x.png", connect=[True, False])
    with pytest.raises(ValueError, match="panels must not be empty"):
        plots.plot_pca_panels([], tmp_path / "x.png")


def test_token_strings_show_a_partial_character_by_its_bytes(tiny_bpe):
    ids = tiny_bpe.encode("a 🍓 x")
    strings = analysis.token_strings(tiny_bpe, ids)
    assert "".join(strings).replace(" ", "") == "a" + "".join(f"<0x{b:02X}>" for b in "🍓".encode()) + "x"
    assert analysis.token_strings(tiny_bpe, tiny_bpe.encode(" strawberry")) == [" strawberry"]
    assert analysis.token_strings(tiny_bpe, [tiny_bpe.eos_id]) == ["<|endoftext|>"]


@pytest.mark.parametrize("stride,max_length", [(None, None), (5, 10), (10, 10), (3, 6)])
def test_token_probabilities_give_the_perplexity(tiny_model, tiny_bpe, stride, max_length):
    text = " ".join([PROMPT] * 3)  # longer than the context of 32: several windows
    ids = tiny_bpe.encode(text)
    rows = analysis.token_probabilities(tiny_model, tiny_bpe, text, stride=stride, max_length=max_length)
    positions = [position for position, _, _ in rows]
    assert positions == sorted(set(positions)) and positions[0] == 1 and positions[-1] == len(ids) - 1
    if stride is not None and stride == max_length:  # each window's first token has no context
        assert positions == [i for i in range(1, len(ids)) if i % max_length]
    else:
        assert positions == list(range(1, len(ids)))
    assert [token for _, token, _ in rows] == analysis.token_strings(tiny_bpe, [ids[i] for i in positions])
    assert all(0 < p <= 1 for _, _, p in rows)
    mean_nll = -sum(math.log(p) for _, _, p in rows) / len(rows)
    expected = analysis.perplexity(tiny_model, tiny_bpe, text, stride=stride, max_length=max_length)
    assert math.exp(mean_nll) == pytest.approx(expected, rel=1e-9)
    # the first window's probabilities are the model's own, token by token
    logits = tiny_model(torch.tensor([ids[:32]])).logits[0].double().log_softmax(-1)
    first = [(i, p) for i, _, p in rows if i < (max_length or 32)]
    for i, p in first:
        assert p == pytest.approx(math.exp(logits[i - 1, ids[i]].item()), rel=1e-5)
