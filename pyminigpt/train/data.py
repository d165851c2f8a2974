"""Datasets and corpora.

Every dataset item is a dict of int64 tensors with the labels already aligned to the
inputs: `labels[t]` is the token that should follow `input_ids[:t + 1]`, and -100 marks
positions that carry no loss. The Trainer computes
`cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`.

- `SlidingWindowDataset(tokens_or_path, seq_len, stride)`: windows of `seq_len + 1`
  tokens every `stride` tokens over one long token stream (overlapping when
  `stride < seq_len`); `input_ids = w[:-1]`, `labels = w[1:]`. The stream lives in a
  memory-mapped token file, so a corpus larger than memory works.
- `SequenceDataset(texts, tokenizer, max_len)`: one short text per item,
  `<SOS> text <EOS> <PAD> ...` (max_len tokens), labels -100 where the next token is padding.

Token files (`write_token_file` / `read_token_file`) are a 16-byte header, then the ids:

    b"PMGTOK" | version (u8 = 1) | itemsize (u8: 2 = uint16, 4 = uint32) | count (u64, little endian) | ids

The built-in corpus `names_corpus()` is generated here from a syllable grammar (no
download); any UTF-8 text file read by `load_text` can replace it.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..files import atomic_write
from ..tokenizer import Tokenizer

__all__ = [
    "NAME_STYLES",
    "SequenceDataset",
    "SlidingWindowDataset",
    "load_text",
    "names_corpus",
    "read_token_file",
    "write_token_file",
]

_MAGIC = b"PMGTOK"
_HEADER = struct.Struct("<6sBBQ")  # magic, version, itemsize, count: 16 bytes
_VERSION = 1


# ----------------------------------------------------------------------------- token files


def _dtype_for(max_id: int) -> np.dtype:
    if max_id < 2**16:
        return np.dtype(np.uint16)
    if max_id < 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"token id {max_id} does not fit in uint32")


def write_token_file(
    ids: Sequence[int] | np.ndarray | torch.Tensor | Iterable[np.ndarray],
    path: str | os.PathLike,
    vocab_size: int | None = None,
) -> Path:
    """Write token ids to `path` as uint16 (all ids < 65536) or uint32; returns the path.

    `ids` is a 1-D sequence / array / tensor, or, with `vocab_size` given, any iterable
    of 1-D chunks, which are streamed to disk one at a time (for corpora larger than
    memory). The file is written to a temporary name and moved into place.
    """
    path = Path(path)
    if vocab_size is None:
        if isinstance(ids, torch.Tensor):
            ids = ids.cpu().numpy()
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} and dtype {ids.dtype}")
        if ids.size and int(ids.min()) < 0:
            raise ValueError(f"ids must be non-negative, got {int(ids.min())}")
        dtype = _dtype_for(int(ids.max()) if ids.size else 0)
        chunks: Iterable = [ids]
    else:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        dtype = _dtype_for(vocab_size - 1)
        chunks = [ids] if isinstance(ids, (np.ndarray, torch.Tensor, list, tuple)) else ids

    def write(tmp: Path) -> None:
        count = 0
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, dtype.itemsize, 0))
            for chunk in chunks:
                chunk = np.asarray(chunk.cpu().numpy() if isinstance(chunk, torch.Tensor) else chunk)
                if vocab_size is not None and chunk.size and (chunk.min() < 0 or chunk.max() >= vocab_size):
                    raise ValueError(
                        f"token ids must lie in [0, vocab_size={vocab_size}), got {chunk.min()}..{chunk.max()}"
                    )
                f.write(chunk.astype(dtype, copy=False).tobytes())
                count += chunk.size
            f.seek(0)
            f.write(_HEADER.pack(_MAGIC, _VERSION, dtype.itemsize, count))

    return atomic_write(path, write)


def read_token_file(path: str | os.PathLike) -> np.memmap:
    """Memory-map a file written by `write_token_file` (read-only, 1-D uint16/uint32)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {str(path)!r}")
    with open(path, "rb") as f:
        header = f.read(_HEADER.size)
    if len(header) < _HEADER.size or header[:6] != _MAGIC:
        raise ValueError(f"{str(path)!r} is not a pyminigpt token file (bad header)")
    _, version, itemsize, count = _HEADER.unpack(header)
    if version != _VERSION or itemsize not in (2, 4):
        raise ValueError(f"token file {str(path)!r} has unsupported version {version} / itemsize {itemsize}")
    expected = _HEADER.size + count * itemsize
    if path.stat().st_size != expected:
        raise ValueError(
            f"token file {str(path)!r} is truncated or corrupt: {path.stat().st_size} bytes, "
            f"header says {count} tokens ({expected} bytes)"
        )
    dtype = np.uint16 if itemsize == 2 else np.uint32
    if count == 0:  # mmap cannot map zero bytes
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=_HEADER.size, shape=(count,))


# ----------------------------------------------------------------------------- datasets


class SlidingWindowDataset(Dataset):
    """Windows of `seq_len + 1` tokens starting every `stride` tokens of a token stream.

    `tokens_or_path`: a token file path (memory-mapped, see `write_token_file`), or a
    1-D sequence / array / tensor of ids (kept in memory). `stride` defaults to
    `seq_len` (no overlap). Item i: `input_ids = tokens[i*stride : i*stride + seq_len]`,
    `labels = tokens[i*stride + 1 : i*stride + seq_len + 1]`, both (seq_len,) int64.
    """

    def __init__(self, tokens_or_path, seq_len: int, stride: int | None = None):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        stride = seq_len if stride is None else stride
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if isinstance(tokens_or_path, (str, os.PathLike)):
            self.path: Path | None = Path(tokens_or_path)
            self.tokens = read_token_file(self.path)
            source = f"token file {str(self.path)!r}"
        else:
            self.path = None
            tokens = tokens_or_path
            self.tokens = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
            if self.tokens.ndim != 1:
                raise ValueError(f"tokens must be 1-D, got shape {self.tokens.shape}")
            source = "the corpus"
        n = len(self.tokens)
        if n < seq_len + 1:
            raise ValueError(
                f"{source} has {n} tokens, shorter than one window of seq_len + 1 = {seq_len + 1} tokens; "
                f"use a longer corpus or a smaller seq_len"
            )
        self.seq_len, self.stride = seq_len, stride
        self.num_windows = (n - seq_len - 1) // stride + 1

    def __len__(self) -> int:
        return self.num_windows

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn get the file name, not a pickled copy of the corpus
        return {**self.__dict__, "tokens": None} if self.path is not None else self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.path is not None:
            self.tokens = read_token_file(self.path)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.num_windows <= i < self.num_windows:
            raise IndexError(f"window index {i} out of range for {self.num_windows} windows")
        start = (i % self.num_windows) * self.stride
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": window[:-1], "labels": window[1:]}


class SequenceDataset(Dataset):
    """Short texts, one per item: `<SOS> text <EOS>` padded with `<PAD>` to `max_len` tokens.

    Items: `input_ids` (max_len,), `labels` (max_len,) = input_ids shifted left by one
    with -100 wherever the next token is padding (so the model learns to emit <EOS>
    and nothing after it), and `attention_mask` (max_len,), 1 on real tokens.
    A text longer than `max_len - 2` tokens raises a ValueError (or is cut when
    `truncate=True`).
    """

    def __init__(self, texts: Sequence[str], tokenizer: Tokenizer, max_len: int, truncate: bool = False):
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, got a single str")
        if not isinstance(max_len, int) or max_len < 3:
            raise ValueError(f"max_len must be an int >= 3 (<SOS>, one token, <EOS>), got {max_len!r}")
        if len(texts) == 0:
            raise ValueError("texts must not be empty")
        n = len(texts)
        self.input_ids = torch.full((n, max_len), tokenizer.pad_id, dtype=torch.long)
        self.labels = torch.full((n, max_len), -100, dtype=torch.long)
        self.attention_mask = torch.zeros((n, max_len), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = tokenizer.encode(text)
            if len(ids) > max_len - 2:
                if not truncate:
                    raise ValueError(
                        f"text {row} ({text[:40]!r}) has {len(ids)} tokens, more than max_len - 2 = {max_len - 2}; "
                        f"raise max_len or pass truncate=True"
                    )
                ids = ids[: max_len - 2]
            seq = torch.tensor([tokenizer.sos_id, *ids, tokenizer.eos_id], dtype=torch.long)
            L = len(seq)
            self.input_ids[row, :L] = seq
            self.labels[row, : L - 1] = seq[1:]
            self.attention_mask[row, :L] = 1
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "attention_mask": self.attention_mask[i]}


# ----------------------------------------------------------------------------- corpora


def load_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; missing, empty (or whitespace-only) and non-UTF-8 files raise, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {str(path)!r}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"text file {str(path)!r} is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
            f"convert it to UTF-8 first"
        ) from None
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text.removeprefix("\ufeff")


# A style is a syllable grammar: a syllable is onset + nucleus + coda, a name has
# `syllables` of them (a range), then one of `endings` with probability `ending_p`.
NAME_STYLES: dict[str, dict] = {
    "elvish": {
        "onsets": ["", "l", "th", "f", "s", "n", "r", "v", "gl", "el", "c", "m", "ar", "g"],
        "nuclei": ["a", "e", "i", "ae", "ie", "ia", "ea", "o", "ë", "í"],
        "codas": ["", "", "", "l", "n", "r", "th", "s", "nd", "ss"],
        "endings": ["iel", "wen", "dil", "ion", "riel", "as", "ndir", "thas"],
        "syllables": (2, 3),
        "ending_p": 0.5,
    },
    "dwarvish": {
        "onsets": ["b", "d", "g", "k", "th", "dr", "gr", "br", "kh", "t", "n", "f", "bal", "dur"],
        "nuclei": ["a", "o", "u", "i", "ö", "ur", "ar"],
        "codas": ["r", "n", "k", "m", "rin", "rk", "nd", "g", "ln", "zd"],
        "endings": ["in", "ur", "ak", "im", "grim", "dain", "bur", "ok"],
        "syllables": (1, 2),
        "ending_p": 0.6,
    },
    "orcish": {
        "onsets": ["g", "gr", "k", "kr", "sh", "z", "m", "ug", "b", "dr", "r", "n"],
        "nuclei": ["a", "u", "o", "ag", "uk"],
        "codas": ["k", "g", "sh", "z", "th", "rk", "gg", "zh", "l", ""],
        "endings": ["ash", "gul", "nak", "rog", "uk", "bag", "ash"],
        "syllables": (1, 2),
        "ending_p": 0.5,
    },
    "human": {
        "onsets": ["", "al", "b", "c", "d", "ed", "h", "j", "m", "r", "s", "th", "w", "st", "ger"],
        "nuclei": ["a", "e", "i", "o", "ar", "ol", "ad", "el"],
        "codas": ["", "n", "r", "d", "m", "s", "l", "nd", "ck", "ld"],
        "endings": ["ric", "win", "mund", "bert", "wald", "ton", "a", "en", "ard", "wyn"],
        "syllables": (1, 2),
        "ending_p": 0.7,
    },
    "halfling": {
        "onsets": ["b", "p", "m", "f", "t", "l", "w", "d", "h", "mer", "pip"],
        "nuclei": ["i", "o", "a", "e", "u", "ee"],
        "codas": ["", "", "b", "p", "l", "m", "d", "ng"],
        "endings": ["bo", "wise", "foot", "y", "kin", "do", "ric", "gold"],
        "syllables": (1, 2),
        "ending_p": 0.6,
    },
}


def _make_name(rng: random.Random, style: dict) -> str:
    """Open syllables (onset + nucleus), a coda on the last one, then maybe an ending."""
    parts = [rng.choice(style["onsets"]) + rng.choice(style["nuclei"]) for _ in range(rng.randint(*style["syllables"]))]
    coda = rng.choice(style["codas"])
    if rng.random() < style["ending_p"]:
        ending = rng.choice(style["endings"])
        coda = "" if ending[0] not in _VOWELS else coda  # no consonant pile-up before the ending
        parts += [coda, ending]
    else:
        parts.append(coda)
    return "".join(parts).capitalize()


_VOWELS = set("aeiouyëíö")


def names_corpus(n: int = 5000, seed: int = 0, styles: Sequence[str] | None = None) -> list[str]:
    """`n` distinct fantasy names from the syllable grammars in `NAME_STYLES`, deterministic in `seed`.

    The styles take turns (elvish, dwarvish, ...), so every style is equally represented.
    Join them with newlines for a `SlidingWindowDataset`, or use them as the texts of a
    `SequenceDataset`.
    """
    styles = list(NAME_STYLES) if styles is None else list(styles)
    unknown = [s for s in styles if s not in NAME_STYLES]
    if unknown or not styles:
        raise ValueError(f"styles must be a non-empty subset of {list(NAME_STYLES)}, got {styles}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(names) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"the styles {styles} cannot make {n} distinct names (got {len(names)})")
        name = _make_name(rng, NAME_STYLES[styles[len(names) % len(styles)]])
        if 3 <= len(name) <= 14 and name not in seen:
            seen.add(name)
            names.append(name)
    return names
