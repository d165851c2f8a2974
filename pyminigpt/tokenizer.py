"""Tokenizers: characters, byte-level BPE (HF `tokenizers`), and GPT-2's vocabulary.

Both tokenizers share one interface (`Tokenizer`):

    encode(text, add_special_tokens=False) -> list[int]       (<SOS> ... <EOS> when asked)
    decode(ids, skip_special_tokens=True) -> str
    encode_batch(texts, padding=True, pad_left=False) -> (ids (B, T) int64, attention_mask (B, T) int64)
    vocab_size, pad_id, sos_id, eos_id
    save(path) / load(path)                                    one JSON file

`load_tokenizer(path)` reads either kind back from its JSON file.

`save_pretrained(directory)` writes the tokenizer in transformers' layout instead:
`tokenizer.json` (a `tokenizers` file) + `tokenizer_config.json` (the special tokens), which
`transformers.AutoTokenizer.from_pretrained` loads (as a fast tokenizer) and
`BPETokenizer.from_pretrained` reads back. A CharTokenizer is written as a `tokenizers`
word-level model over single characters, so it encodes and decodes the same ids in
transformers; without `unk=True` an unknown character is an error there too.

CharTokenizer ids: <PAD>=0, <SOS>=1, <EOS>=2, then <UNK>=3 when built with `unk=True`,
then the corpus characters in code-point order. Unknown characters: by default
`encode` raises a ValueError naming every character that is not in the vocabulary;
a tokenizer built with `unk=True` maps them to <UNK> instead (and `decode` cannot
give them back).

BPETokenizer: a byte-level BPE, so every string encodes (there are no unknown
characters). `BPETokenizer.train(texts, vocab_size)` learns merges with <PAD>, <SOS>,
<EOS> as ids 0, 1, 2; `BPETokenizer.from_pretrained(dir)` loads GPT-2's vocabulary
(tokenizer.json, or vocab.json + merges.txt), where <|endoftext|> serves as SOS, EOS
and padding, as in GPT-2 itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .files import atomic_write

__all__ = ["BPETokenizer", "CharTokenizer", "Tokenizer", "load_tokenizer"]

PAD, SOS, EOS, UNK = "<PAD>", "<SOS>", "<EOS>", "<UNK>"


def _read_json(path: str | os.PathLike, what: str) -> dict:
    """Read a JSON object from `path`; missing or corrupt files raise an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} file {str(path)!r} is corrupt (not valid JSON: {err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} file {str(path)!r} is corrupt (expected a JSON object)")  # noqa: TRY004 (bad data)
    return obj


def _write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Write `obj` to `path` as JSON, atomically (see `pyminigpt.io`)."""
    return atomic_write(path, json.dumps(obj, ensure_ascii=False, indent=1))


# The files `save_pretrained` writes, in transformers' layout.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer:
    """The shared interface; subclasses implement `encode`, `decode`, `vocab_size`, `save`, `to_tokenizers`."""

    pad_id: int
    sos_id: int
    eos_id: int
    pad_token: str
    sos_token: str
    eos_token: str
    unk_token: str | None = None

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        raise NotImplementedError

    def to_tokenizers(self):
        """This tokenizer as a `tokenizers.Tokenizer` with the same ids."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike, model_max_length: int | None = None) -> list[Path]:
        """Write tokenizer.json + tokenizer_config.json (transformers' layout) into `directory`; returns the paths."""
        directory = Path(directory)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.sos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "clean_up_tokenization_spaces": False,  # decode must give back the text, spaces included
        }
        if self.unk_token is not None:
            config["unk_token"] = self.unk_token
        if model_max_length is not None:
            config["model_max_length"] = int(model_max_length)
        return [
            atomic_write(directory / "tokenizer.json", self.to_tokenizers().to_str()),
            atomic_write(directory / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n"),
        ]

    def __len__(self) -> int:
        return self.vocab_size

    def encode_batch(
        self,
        texts: Sequence[str],
        padding: bool = True,
        pad_left: bool = False,
        add_special_tokens: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode `texts` into `(ids, attention_mask)`, both (B, T) int64.

        With `padding` the rows are padded with `pad_id` to the longest one (on the left
        when `pad_left`, as generation wants; on the right otherwise) and the mask is 0 on
        padding. Without `padding` every text must encode to the same length.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, got a single str")
        if len(texts) == 0:
            raise ValueError("texts must not be empty")
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        width = max(len(r) for r in rows)
        if not padding and any(len(r) != width for r in rows):
            lengths = sorted({len(r) for r in rows})
            raise ValueError(f"padding=False needs texts of equal token length, got lengths {lengths}")
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if pad_left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask

    @staticmethod
    def _as_list(ids: Iterable[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D, got a tensor of shape {tuple(ids.shape)}")
            return ids.tolist()
        return [int(i) for i in ids]


class CharTokenizer(Tokenizer):
    """One token per Unicode character (code point) seen in the corpus, plus special tokens."""

    def __init__(self, chars: Iterable[str], unk: bool = False):
        chars = sorted(set(chars))
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"chars must be single characters, got {c!r}")
        self.unk = bool(unk)
        self.specials = [PAD, SOS, EOS] + ([UNK] if self.unk else [])
        self.pad_id, self.sos_id, self.eos_id = 0, 1, 2
        self.pad_token, self.sos_token, self.eos_token = PAD, SOS, EOS
        self.unk_id = 3 if self.unk else None
        self.unk_token = UNK if self.unk else None
        self.chars = chars
        self._stoi = {c: i + len(self.specials) for i, c in enumerate(chars)}
        self._itos = self.specials + chars

    @classmethod
    def from_text(cls, text: str | Iterable[str], unk: bool = False) -> CharTokenizer:
        """Build the vocabulary from a string or from an iterable of strings (a corpus)."""
        chars: set[str] = set()
        for piece in [text] if isinstance(text, str) else text:
            chars.update(piece)
        if not chars:
            raise ValueError("text is empty: cannot build a character vocabulary")
        return cls(chars, unk=unk)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self._stoi.get(c, self.unk_id) for c in text]
        if not self.unk and None in ids:
            missing = sorted({c for c in text if c not in self._stoi})
            raise ValueError(
                f"text contains {len(missing)} character(s) not in the vocabulary: "
                f"{', '.join(repr(c) for c in missing)} (build the tokenizer with unk=True to map them to <UNK>)"
            )
        return [self.sos_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        out = []
        for i in self._as_list(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i < len(self.specials) and skip_special_tokens:
                continue
            out.append(self._itos[i])
        return "".join(out)

    def save(self, path: str | os.PathLike) -> Path:
        return _write_json({"type": "char", "unk": self.unk, "chars": self.chars}, path)

    def to_tokenizers(self):
        """A word-level `tokenizers.Tokenizer` whose words are single characters; the same ids."""
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer(models.WordLevel({token: i for i, token in enumerate(self._itos)}, unk_token=UNK))
        # Oniguruma's (?m) lets "." match a newline too: every character is one piece
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(self.specials)
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        obj = _read_json(path, "tokenizer")
        if obj.get("type") != "char" or not isinstance(obj.get("chars"), list):
            raise ValueError(f"tokenizer file {str(path)!r} does not hold a character tokenizer")
        return cls(obj["chars"], unk=bool(obj.get("unk", False)))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk={self.unk})"


class BPETokenizer(Tokenizer):
    """Byte-level BPE over a `tokenizers.Tokenizer`; the special tokens are given by name."""

    def __init__(self, tokenizer, pad_token: str = PAD, sos_token: str = SOS, eos_token: str = EOS):
        self.tokenizer = tokenizer
        self.pad_token, self.sos_token, self.eos_token = pad_token, sos_token, eos_token
        for arg, token in (("pad_token", pad_token), ("sos_token", sos_token), ("eos_token", eos_token)):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"{arg}={token!r} is not in the vocabulary")
        self.pad_id = tokenizer.token_to_id(pad_token)
        self.sos_id = tokenizer.token_to_id(sos_token)
        self.eos_id = tokenizer.token_to_id(eos_token)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
        """Learn a byte-level BPE of at most `vocab_size` tokens on `texts` (<PAD>, <SOS>, <EOS> = 0, 1, 2)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if isinstance(texts, str):
            texts = [texts]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 3:
            raise ValueError(
                f"vocab_size must be at least {len(alphabet) + 3} (256 bytes + 3 specials), got {vocab_size}"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[PAD, SOS, EOS],
            initial_alphabet=alphabet,
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, use_transformers: bool | None = None) -> BPETokenizer:
        """Load GPT-2's tokenizer (or any byte-level BPE) from a local directory.

        The directory holds `tokenizer.json`, or `vocab.json` + `merges.txt`. With
        `use_transformers=True` (or None and neither layout present) it goes through
        transformers' `AutoTokenizer` (local files only), which reads any layout that
        transformers knows. The special tokens are those that `tokenizer_config.json`
        names (eos_token, bos_token, pad_token); by default `<|endoftext|>` is SOS, EOS and
        padding, as in GPT-2.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {str(path)!r}")
        vocab, merges, single = path / "vocab.json", path / "merges.txt", path / "tokenizer.json"
        have_files = single.is_file() or (vocab.is_file() and merges.is_file())
        if use_transformers or (use_transformers is None and not have_files):
            return cls._from_transformers(path)
        if not have_files:
            raise FileNotFoundError(
                f"no tokenizer in {str(path)!r}: expected tokenizer.json, or vocab.json and merges.txt"
            )
        try:
            if single.is_file():
                tok = HFTokenizer.from_file(str(single))
            else:
                tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tok.decoder = decoders.ByteLevel()
        except Exception as err:  # noqa: BLE001 (tokenizers raises a bare Exception on malformed files)
            names = "tokenizer.json" if single.is_file() else "vocab.json / merges.txt"
            raise ValueError(f"cannot read the tokenizer in {str(path)!r} ({names}): {err}") from None
        eos, sos, pad = _special_tokens(path)
        for token in {eos, sos, pad}:
            if tok.token_to_id(token) is None:
                raise ValueError(f"the tokenizer in {str(path)!r} has no {token!r} token")
        tok.add_special_tokens(sorted({eos, sos, pad}))
        return cls(tok, pad_token=pad, sos_token=sos, eos_token=eos)

    @classmethod
    def _from_transformers(cls, path: Path) -> BPETokenizer:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise FileNotFoundError(
                f"no tokenizer.json or vocab.json + merges.txt in {str(path)!r}, and transformers is not installed"
            ) from None
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"transformers cannot load a tokenizer from {str(path)!r}: {err}") from None
        eos = hf.eos_token
        if eos is None or not hasattr(hf, "backend_tokenizer"):
            raise ValueError(f"the tokenizer in {str(path)!r} has no EOS token or no fast (tokenizers) backend")
        return cls(hf.backend_tokenizer, pad_token=hf.pad_token or eos, sos_token=hf.bos_token or eos, eos_token=eos)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def to_tokenizers(self):
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.sos_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        ids = self._as_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> Path:
        return _write_json(
            {
                "type": "bpe",
                "pad_token": self.pad_token,
                "sos_token": self.sos_token,
                "eos_token": self.eos_token,
                "tokenizer": json.loads(self.tokenizer.to_str()),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        obj = _read_json(path, "tokenizer")
        if obj.get("type") != "bpe" or not isinstance(obj.get("tokenizer"), dict):
            raise ValueError(f"tokenizer file {str(path)!r} does not hold a BPE tokenizer")
        try:
            tok = HFTokenizer.from_str(json.dumps(obj["tokenizer"]))
        except Exception as err:  # noqa: BLE001 (tokenizers raises a bare Exception on malformed input)
            raise ValueError(f"tokenizer file {str(path)!r} is corrupt: {err}") from None
        return cls(tok, pad_token=obj["pad_token"], sos_token=obj["sos_token"], eos_token=obj["eos_token"])

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r})"


def _special_tokens(directory: Path) -> tuple[str, str, str]:
    """(eos, sos, pad) token strings of a transformers tokenizer directory; GPT-2's by default."""

    def name(value):  # transformers writes a token as a str or as {"content": str, ...}
        return value.get("content") if isinstance(value, dict) else value

    config_file = directory / "tokenizer_config.json"
    config = _read_json(config_file, "tokenizer config") if config_file.is_file() else {}
    eos = name(config.get("eos_token")) or "<|endoftext|>"
    return eos, name(config.get("bos_token")) or eos, name(config.get("pad_token")) or eos


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by `CharTokenizer.save` or `BPETokenizer.save`."""
    kind = _read_json(path, "tokenizer").get("type")
    if kind == "char":
        return CharTokenizer.load(path)
    if kind == "bpe":
        return BPETokenizer.load(path)
    raise ValueError(f"tokenizer file {str(path)!r} has unknown type {kind!r} (expected 'char' or 'bpe')")
