"""A tiny GPT-2 directory, written by transformers, for tests that need a "pretrained" model.

`make_tiny_gpt2_dir(path)` writes what a user's `save_pretrained` directory holds:
config.json, model.safetensors, generation_config.json and the tokenizer files. The
weights are random; the tokenizer is a byte-level BPE trained with `tokenizers` on the few
kB of `CORPUS`, with `<|endoftext|>` as its one special token, as in GPT-2. Everything
loads offline (`GPT2LMHeadModel.from_pretrained`, `AutoTokenizer.from_pretrained`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The sentences the tokenizer learns its merges on (and a handy fine-tuning text).
SENTENCES = (
    "the quick brown fox jumps over the lazy dog.",
    "a strawberry is red and a banana is yellow.",
    "how many r are there in the word strawberry?",
    "the cat sat on the mat and looked at the dog.",
    "tokens are pieces of words, and words are made of tokens.",
    "we train a small model on a small text to see what it learns.",
    "attention lets each token look at the tokens before it.",
    "the temperature makes the next token more or less random.",
)
CORPUS = "\n".join(f"{n}: {s}" for n in range(12) for s in SENTENCES) + "\n"

EOT = "<|endoftext|>"
TOKENIZER_FORMATS = ("vocab_merges", "tokenizer_json")
TINY_CONFIG = {"n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}


def train_tiny_bpe(vocab_size: int = 320):
    """A GPT-2-style byte-level BPE (`tokenizers.Tokenizer`) trained on CORPUS; EOT is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def make_tiny_gpt2_dir(
    path: str | os.PathLike, tokenizer_format: str = "vocab_merges", seed: int = 0, **config
) -> Path:
    """Write a tiny random GPT-2 (config, weights, generation config, tokenizer) into `path`.

    tokenizer_format: "vocab_merges" (vocab.json + merges.txt, as GPT-2 on the hub) or
    "tokenizer_json" (one tokenizer.json, as transformers' `save_pretrained` writes it).
    Either way a tokenizer_config.json names the special tokens. `config` overrides
    TINY_CONFIG (n_positions, n_embd, n_layer, n_head, ...). Returns the path.
    """
    import torch
    import transformers

    if tokenizer_format not in TOKENIZER_FORMATS:
        raise ValueError(f"tokenizer_format must be one of {TOKENIZER_FORMATS}, got {tokenizer_format!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_bpe()
    eot_id = tok.token_to_id(EOT)

    hf_config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), bos_token_id=eot_id, eos_token_id=eot_id, **{**TINY_CONFIG, **config}
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    model.save_pretrained(path)  # config.json, model.safetensors, generation_config.json

    if tokenizer_format == "tokenizer_json":
        fast = transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)
        fast.save_pretrained(path)
    else:
        tok.model.save(str(path))  # vocab.json + merges.txt
        tokenizer_config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "bos_token": EOT,
            "eos_token": EOT,
            "unk_token": EOT,
            "model_max_length": hf_config.n_positions,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return path
