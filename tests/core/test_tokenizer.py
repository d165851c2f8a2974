"""Tokenizers: round trips (unicode included), special tokens, batches, save/load, bad input."""

import json

import pytest
import torch

from pyminigpt.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

UNICODE = "héllo wörld 🚀"
CORPUS = ["the quick brown fox jumps over the lazy dog", "héllo wörld 🚀", "naïve café, smörgåsbord"] * 10


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, bpe):
    """A GPT-2 style tokenizer directory: vocab.json + merges.txt with <|endoftext|> last, as GPT-2 has it."""
    path = tmp_path_factory.mktemp("gpt2")
    bpe.tokenizer.model.save(str(path))
    vocab = json.loads((path / "vocab.json").read_text())
    vocab = {t: i for t, i in vocab.items() if t not in ("<PAD>", "<SOS>", "<EOS>")}
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return path


# ----------------------------------------------------------------------------- characters


def test_char_round_trip_unicode_and_specials():
    tok = CharTokenizer.from_text(CORPUS)
    assert (tok.pad_id, tok.sos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 3 + len(set("".join(CORPUS)))
    ids = tok.encode(UNICODE)
    assert len(ids) == len(UNICODE) and min(ids) >= 3
    assert tok.decode(ids) == UNICODE
    framed = tok.encode(UNICODE, add_special_tokens=True)
    assert framed[0] == tok.sos_id and framed[-1] == tok.eos_id and framed[1:-1] == ids
    assert tok.decode(framed) == UNICODE
    assert tok.decode(framed, skip_special_tokens=False) == "<SOS>" + UNICODE + "<EOS>"
    assert tok.decode(torch.tensor(framed)) == UNICODE


def test_char_unknown_characters_raise_naming_them():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'x'.*'z'|'z'.*'x'") as err:
        tok.encode("abxcz")
    assert "unk=True" in str(err.value)


def test_char_unk_policy():
    tok = CharTokenizer.from_text("abc", unk=True)
    assert tok.unk_id == 3 and tok.vocab_size == 7
    ids = tok.encode("aXb")
    assert ids == [tok.encode("a")[0], 3, tok.encode("b")[0]]
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "a<UNK>b"


def test_char_save_load(tmp_path):
    tok = CharTokenizer.from_text(CORPUS, unk=True)
    tok.save(tmp_path / "tok.json")
    for loaded in (CharTokenizer.load(tmp_path / "tok.json"), load_tokenizer(tmp_path / "tok.json")):
        assert isinstance(loaded, CharTokenizer) and loaded.unk
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode(UNICODE + "∑") == tok.encode(UNICODE + "∑")


def test_decode_rejects_out_of_range_ids(bpe):
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="token id 99"):
        tok.decode([3, 99])
    with pytest.raises(ValueError, match="token id -1"):
        bpe.decode([5, -1])


# ----------------------------------------------------------------------------- batches


@pytest.mark.parametrize("make", [lambda bpe: CharTokenizer.from_text(CORPUS), lambda bpe: bpe], ids=["char", "bpe"])
def test_encode_batch_padding(make, bpe):
    tok = make(bpe)
    texts = ["the fox", UNICODE, "a"]
    lengths = [len(tok.encode(t)) for t in texts]
    ids, mask = tok.encode_batch(texts)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, max(lengths))
    assert mask.sum(1).tolist() == lengths
    for row, text, n in zip(ids, texts, lengths):
        assert row[:n].tolist() == tok.encode(text) and (row[n:] == tok.pad_id).all()
    left, left_mask = tok.encode_batch(texts, pad_left=True)
    for row, m, text, n in zip(left, left_mask, texts, lengths):
        assert row[-n:].tolist() == tok.encode(text) and m[-n:].all() and not m[:-n].any()
    framed, _ = tok.encode_batch(texts, add_special_tokens=True)
    assert (framed[:, 0] == tok.sos_id).all()


def test_encode_batch_without_padding_needs_equal_lengths():
    tok = CharTokenizer.from_text("abc")
    ids, mask = tok.encode_batch(["ab", "ca"], padding=False)
    assert ids.shape == (2, 2) and mask.all()
    with pytest.raises(ValueError, match="padding=False"):
        tok.encode_batch(["ab", "c"], padding=False)
    with pytest.raises(TypeError, match="texts"):
        tok.encode_batch("abc")


# ----------------------------------------------------------------------------- BPE


def test_bpe_train_round_trip(bpe):
    assert (bpe.pad_id, bpe.sos_id, bpe.eos_id) == (0, 1, 2)
    assert 259 <= bpe.vocab_size <= 300
    for text in [UNICODE, "the quick brown fox", "never seen: ∮ E⋅da = Q, 日本語 \t\n end", ""]:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert bpe.decode(bpe.encode(text, add_special_tokens=True)) == text
    assert len(bpe.encode("the quick brown fox")) < len("the quick brown fox")  # merges learned


def test_bpe_save_load(tmp_path, bpe):
    bpe.save(tmp_path / "bpe.json")
    for loaded in (BPETokenizer.load(tmp_path / "bpe.json"), load_tokenizer(tmp_path / "bpe.json")):
        assert isinstance(loaded, BPETokenizer)
        assert loaded.encode(UNICODE) == bpe.encode(UNICODE) and loaded.vocab_size == bpe.vocab_size
        assert (loaded.pad_id, loaded.sos_id, loaded.eos_id) == (0, 1, 2)


def test_gpt2_vocab_from_local_files(gpt2_dir):
    tok = BPETokenizer.from_pretrained(gpt2_dir)
    eot = json.loads((gpt2_dir / "vocab.json").read_text())["<|endoftext|>"]
    assert tok.eos_id == tok.sos_id == tok.pad_id == eot
    ids = tok.encode(UNICODE, add_special_tokens=True)
    assert ids[0] == ids[-1] == eot and tok.decode(ids) == UNICODE
    assert tok.decode(ids, skip_special_tokens=False) == "<|endoftext|>" + UNICODE + "<|endoftext|>"


def test_gpt2_vocab_matches_transformers(gpt2_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(gpt2_dir), local_files_only=True)
    ours = BPETokenizer.from_pretrained(gpt2_dir)
    via_auto = BPETokenizer.from_pretrained(gpt2_dir, use_transformers=True)
    for text in [UNICODE, "the quick brown fox jumps", "  spaces  and\nnewlines"]:
        expected = hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == expected == via_auto.encode(text)
    assert via_auto.eos_id == ours.eos_id


def test_gpt2_tokenizer_json(tmp_path, gpt2_dir):
    ours = BPETokenizer.from_pretrained(gpt2_dir)
    ours.tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = BPETokenizer.from_pretrained(tmp_path)
    assert loaded.encode(UNICODE) == ours.encode(UNICODE) and loaded.eos_id == ours.eos_id


# ----------------------------------------------------------------------------- bad files


def test_missing_tokenizer_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CharTokenizer.load(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no-dir"):
        BPETokenizer.from_pretrained(tmp_path / "no-dir")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(FileNotFoundError, match="empty"):
        BPETokenizer.from_pretrained(tmp_path / "empty", use_transformers=False)


def test_corrupt_tokenizer_files_name_the_file(tmp_path, bpe):
    bpe.save(tmp_path / "bpe.json")
    text = (tmp_path / "bpe.json").read_text()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="cut.json"):
        load_tokenizer(tmp_path / "cut.json")
    (tmp_path / "other.json").write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(ValueError, match="other.json"):
        load_tokenizer(tmp_path / "other.json")
    CharTokenizer.from_text("ab").save(tmp_path / "char.json")
    with pytest.raises(ValueError, match="char.json"):
        BPETokenizer.load(tmp_path / "char.json")


# ----------------------------------------------------------------------------- transformers' layout


def hf_tokenizer(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


@pytest.mark.parametrize("unk", [False, True])
def test_char_save_pretrained_loads_in_transformers(tmp_path, unk):
    tok = CharTokenizer.from_text("hello world\nçé\U0001f680\r\t", unk=unk)
    paths = tok.save_pretrained(tmp_path, model_max_length=32)
    assert sorted(p.name for p in paths) == ["tokenizer.json", "tokenizer_config.json"]
    hf = hf_tokenizer(tmp_path)
    text = "hello\n wé\U0001f680\r\n\t  "
    assert hf(text)["input_ids"] == tok.encode(text) and hf.decode(tok.encode(text)) == text
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (tok.pad_id, tok.sos_id, tok.eos_id)
    assert hf.model_max_length == 32
    if unk:
        assert hf("hex")["input_ids"] == tok.encode("hex") == [*tok.encode("he"), tok.unk_id]
    # and pyminigpt reads the same directory back, with the same ids and specials
    back = BPETokenizer.from_pretrained(tmp_path)
    assert back.encode(text) == tok.encode(text) and (back.pad_id, back.sos_id, back.eos_id) == (0, 1, 2)


def test_bpe_save_pretrained_round_trip(tmp_path, bpe):
    bpe.save_pretrained(tmp_path)
    text = "Elbereth Gilthoniel, ça va?"
    assert hf_tokenizer(tmp_path)(text)["input_ids"] == bpe.encode(text)
    back = BPETokenizer.from_pretrained(tmp_path)
    assert back.encode(text) == bpe.encode(text)
    assert (back.pad_token, back.sos_token, back.eos_token) == ("<PAD>", "<SOS>", "<EOS>")


def test_special_tokens_from_tokenizer_config(tmp_path, bpe):
    """transformers may write a special token as {"content": ...}; a token the vocabulary lacks is an error."""
    bpe.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "eos_token": {"content": "<SOS>", "special": True}}))
    assert BPETokenizer.from_pretrained(tmp_path).eos_id == bpe.sos_id
    config_file.write_text(json.dumps({**config, "pad_token": "<nope>"}))
    with pytest.raises(ValueError, match="'<nope>'"):
        BPETokenizer.from_pretrained(tmp_path)
