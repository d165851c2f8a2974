"""Datasets, token files, the built-in names corpus and text loading."""

import pickle

import numpy as np
import pytest
import torch

from pyminigpt.tokenizer import CharTokenizer
from pyminigpt.train.data import (
    NAME_STYLES,
    SequenceDataset,
    SlidingWindowDataset,
    load_text,
    names_corpus,
    read_token_file,
    write_token_file,
)


def random_ids(n, high, seed=0):
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- token files


@pytest.mark.parametrize("high, dtype", [(300, np.uint16), (65536, np.uint16), (70000, np.uint32)])
def test_token_file_round_trip(tmp_path, high, dtype):
    ids = random_ids(1001, high)
    ids[0] = high - 1
    path = write_token_file(ids, tmp_path / "toks.bin")
    mm = read_token_file(path)
    assert isinstance(mm, np.memmap) and mm.dtype == dtype and mm.shape == (1001,)
    assert torch.equal(torch.from_numpy(mm.astype(np.int64)), ids)


def test_token_file_streams_chunks(tmp_path):
    chunks = [np.arange(i * 100, i * 100 + 100) % 1000 for i in range(7)]
    path = write_token_file(iter(chunks), tmp_path / "toks.bin", vocab_size=1000)
    assert np.array_equal(read_token_file(path), np.concatenate(chunks))
    with pytest.raises(ValueError, match="vocab_size=10"):
        write_token_file(iter(chunks), tmp_path / "bad.bin", vocab_size=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toks.bin"]  # no half-written file left


def test_token_file_bad_files_name_the_file(tmp_path):
    path = write_token_file(random_ids(100, 50), tmp_path / "toks.bin")
    data = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="cut.bin.*truncated"):
        read_token_file(tmp_path / "cut.bin")
    (tmp_path / "junk.bin").write_bytes(b"hello world, not tokens")
    with pytest.raises(ValueError, match="junk.bin"):
        read_token_file(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        read_token_file(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="non-negative"):
        write_token_file([1, -2, 3], tmp_path / "neg.bin")


# ----------------------------------------------------------------------------- sliding windows


@pytest.mark.parametrize("seq_len, stride", [(8, 8), (8, 3), (7, 1), (5, 11)])
def test_sliding_windows_and_labels(seq_len, stride):
    tokens = random_ids(97, 1000, seed=seq_len + stride)
    ds = SlidingWindowDataset(tokens, seq_len, stride)
    assert len(ds) == (97 - seq_len - 1) // stride + 1
    for i in range(len(ds)):
        item = ds[i]
        start = i * stride
        assert item["input_ids"].dtype == item["labels"].dtype == torch.long
        assert torch.equal(item["input_ids"], tokens[start : start + seq_len])
        assert torch.equal(item["labels"], tokens[start + 1 : start + seq_len + 1])
    last = len(ds) - 1
    assert last * stride + seq_len + 1 <= 97 < (last + 1) * stride + seq_len + 1
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_sliding_window_over_memmap_equals_in_memory(tmp_path):
    tokens = random_ids(5000, 60000, seed=3)
    path = write_token_file(tokens, tmp_path / "corpus.bin")
    on_disk = SlidingWindowDataset(path, 64, 32)
    in_memory = SlidingWindowDataset(tokens, 64, 32)
    assert isinstance(on_disk.tokens, np.memmap)
    reopened = pickle.loads(pickle.dumps(on_disk))  # as a spawned DataLoader worker gets it
    assert len(pickle.dumps(on_disk)) < 1000 and isinstance(reopened.tokens, np.memmap)
    assert torch.equal(reopened[7]["labels"], in_memory[7]["labels"])
    assert len(on_disk) == len(in_memory)
    for i in (0, 1, len(on_disk) // 2, len(on_disk) - 1):
        assert all(torch.equal(on_disk[i][k], in_memory[i][k]) for k in ("input_ids", "labels"))


def test_sliding_window_short_corpus(tmp_path):
    SlidingWindowDataset(list(range(9)), 8)  # exactly one window
    with pytest.raises(ValueError, match="8 tokens, shorter than one window of seq_len \\+ 1 = 9"):
        SlidingWindowDataset(list(range(8)), 8)
    path = write_token_file([1, 2, 3], tmp_path / "tiny.bin")
    with pytest.raises(ValueError, match="tiny.bin"):
        SlidingWindowDataset(path, 8)
    with pytest.raises(ValueError, match="seq_len"):
        SlidingWindowDataset(list(range(100)), 0)
    with pytest.raises(ValueError, match="stride"):
        SlidingWindowDataset(list(range(100)), 8, stride=0)


# ----------------------------------------------------------------------------- sequences


def test_sequence_dataset_layout():
    tok = CharTokenizer.from_text("abcdé")
    ds = SequenceDataset(["abc", "é", "dddd"], tok, max_len=8)
    assert len(ds) == 3
    item = ds[0]
    abc = tok.encode("abc")
    assert item["input_ids"].tolist() == [tok.sos_id, *abc, tok.eos_id, 0, 0, 0]
    assert item["labels"].tolist() == [*abc, tok.eos_id, -100, -100, -100, -100]
    assert item["attention_mask"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    full = ds[2]  # 4 characters + SOS + EOS, two pads
    assert full["labels"].tolist()[:5] == [*tok.encode("dddd"), tok.eos_id]
    assert (full["labels"][5:] == -100).all()


def test_sequence_dataset_too_long():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="text 1 .* 5 tokens, more than max_len - 2 = 4"):
        SequenceDataset(["ab", "abcab"], tok, max_len=6)
    ds = SequenceDataset(["ab", "abcab"], tok, max_len=6, truncate=True)
    assert ds[1]["input_ids"].tolist() == [tok.sos_id, *tok.encode("abca"), tok.eos_id]
    with pytest.raises(ValueError, match="character"):
        SequenceDataset(["abz"], tok, max_len=6)


# ----------------------------------------------------------------------------- corpora


def test_names_corpus_is_deterministic_and_varied():
    names = names_corpus(3000, seed=0)
    assert names == names_corpus(3000, seed=0)
    assert names != names_corpus(3000, seed=1)
    assert len(names) == len(set(names)) == 3000
    assert all(3 <= len(n) <= 14 and n[0].isupper() and "\n" not in n for n in names)
    assert len(NAME_STYLES) >= 4
    elvish = names_corpus(200, styles=["elvish"])
    dwarvish = names_corpus(200, styles=["dwarvish"])
    assert len(set(elvish) & set(dwarvish)) < 10  # the styles sound different
    with pytest.raises(ValueError, match="styles"):
        names_corpus(10, styles=["klingon"])


def test_load_text(tmp_path):
    (tmp_path / "ok.txt").write_text("\ufeffhéllo wörld 🚀\n", encoding="utf-8")
    assert load_text(tmp_path / "ok.txt") == "héllo wörld 🚀\n"
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    with pytest.raises(ValueError, match="blank.txt"):
        load_text(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*not valid UTF-8.*0xe9 at offset 3"):
        load_text(tmp_path / "latin1.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(tmp_path / "missing.txt")
