"""Run directories, and loading a model with its tokenizer: the pieces the commands share.

A training run is a directory:

    run.json          how it was made: format ("lines" or "stream"), data, size, context,
                      tokenizer ("char" or "bpe"); after --init-from also init_from and
                      model_config; a chat --feedback tuning has tuned_from instead
    tokenizer.json    the tokenizer, in pyminigpt's format (`tokenizer.load_tokenizer`)
    best/ last/ step-*/   checkpoints: each a complete transformers model directory
                      (config, weights, generation config, tokenizer files) plus the
                      trainer state (`checkpoint.py`)
    loss.png          (rewards.png after chat --feedback)

MODEL may be a run directory (its best checkpoint is used), one of its checkpoints, or
any GPT-2 directory with its tokenizer files (config.json + model.safetensors +
tokenizer.json or vocab.json/merges.txt).

`load_model(path, device)` returns a `Loaded` record (model, tokenizer, how prompts start);
every problem is a `UsageError` with a one-line message naming the file.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import atomic_write

RUN_FILE, TOKENIZER_FILE = "run.json", "tokenizer.json"
# Model presets: GPT-2 shapes from a toy to GPT-2 small, each with its default context.
SIZES = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "context": 64},
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 128, "context": 128},
    "medium": {"n_layer": 6, "n_head": 6, "n_embd": 384, "context": 256},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "context": 1024},
}


class UsageError(Exception):
    """A problem with what the user asked for; reported as one line, exit code 2."""


def read_json(path: Path, what: str) -> dict:
    """The JSON object in `path`; a missing or corrupt file is a UsageError naming `what` and the file."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {str(path)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{what} {str(path)!r} is corrupt (not valid JSON: {err})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{what} {str(path)!r} is corrupt (expected a JSON object)")
    return obj


def write_json(obj: dict, path: Path) -> None:
    """Write `obj` to `path` as JSON, atomically."""
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def pick_device(name: str) -> torch.device:
    """The torch device for a --device value (auto: CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available here")
    return device


def make_model(tokenizer, size: str, context: int, dropout: float):
    """A fresh GPT of preset `size` for `tokenizer`'s vocabulary with `context` positions."""
    from ..model import GPT, GPTConfig

    shape = {k: v for k, v in SIZES[size].items() if k != "context"}
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        n_positions=context,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.sos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        **shape,
    )
    return GPT(config)


def make_datasets(source: str, corpus, tokenizer, lines: bool, context: int, eval_fraction: float = 0.1):
    """(train, eval or None) datasets from `corpus` (a list of short texts when `lines`, else one text).

    lines: one `<SOS> text <EOS>` sequence per text (`SequenceDataset`); the last
    `eval_fraction` of the texts are held out. Otherwise the text is one token stream cut
    into windows of `context` tokens (`SlidingWindowDataset`), its last `eval_fraction` held
    out. Errors name `source`.
    """
    from ..train.data import SequenceDataset, SlidingWindowDataset

    try:
        if lines:
            n_eval = int(len(corpus) * eval_fraction)
            train, held_out = corpus[: len(corpus) - n_eval], corpus[len(corpus) - n_eval :]
            return (
                SequenceDataset(train, tokenizer, context),
                SequenceDataset(held_out, tokenizer, context) if held_out else None,
            )
        tokens = tokenizer.encode(corpus)
        if len(tokens) < context + 1:
            raise ValueError(
                f"has {len(tokens)} tokens, shorter than one window of context + 1 = {context + 1} tokens; "
                f"use a longer text or a smaller --context"
            )
        n_eval = int(len(tokens) * eval_fraction)
        train_ds = SlidingWindowDataset(tokens[: len(tokens) - n_eval], context, stride=max(1, context // 2))
        held_out = tokens[len(tokens) - n_eval :]
        eval_ds = SlidingWindowDataset(held_out, context) if len(held_out) > context else None
        return train_ds, eval_ds
    except ValueError as err:
        raise UsageError(f"{source}: {err}") from None


@dataclass
class Loaded:
    """A model ready to use: the model, its tokenizer, and how prompts start (`sos`)."""

    model: object
    tokenizer: object
    sos: bool
    path: Path  # the weights directory
    tokenizer_path: str


def find_run_dir(weights: Path) -> Path | None:
    """The run directory that holds the model directory `weights` (itself or its parent), or None."""
    for d in (weights, weights.parent):
        if (d / RUN_FILE).is_file():
            return d
    return None


def load_model(
    path: str,
    device: torch.device,
    tokenizer_path: str | None = None,
    argument: str = "MODEL",
    weights: str | None = None,
) -> Loaded:
    """Load MODEL (a run directory, a checkpoint, or a GPT-2 directory) with its tokenizer.

    Trainer checkpoints are verified (sizes, SHA-256, config) before any weight is used.
    `argument` names the command-line argument that gave `path`, in the error messages.
    """
    from safetensors import SafetensorError

    from ..hf.convert import config_from_hf
    from ..model import GPT
    from ..quantize import with_weights
    from ..tokenizer import BPETokenizer, load_tokenizer
    from ..train.checkpoint import load_checkpoint

    weights_format, weights = weights, Path(path)
    if weights.is_file():
        raise UsageError(
            f"{argument}: {str(weights)!r} is a file; {argument} is a directory: a run, a checkpoint, or a GPT-2 "
            f"directory (config.json, model.safetensors, tokenizer files)"
            + (f": give the folder that holds it, {str(weights.parent)!r}" if weights.name in MODEL_FILES else "")
        )
    if not weights.is_dir():
        weights = _from_hub_cache(str(path), argument)
    if not (weights / "config.json").is_file() and (weights / RUN_FILE).is_file():  # a run: take its best checkpoint
        found = [weights / name for name in ("best", "last") if (weights / name / "config.json").is_file()]
        if not found:
            raise UsageError(f"{argument}: run directory {str(weights)!r} has no checkpoint yet (best/ or last/)")
        weights = found[0]
    config_file = weights / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{argument}: {str(weights)!r} is not a GPT-2 model directory (no config.json)")

    run_dir = find_run_dir(weights)
    run = read_json(run_dir / RUN_FILE, "run file") if run_dir is not None else {}
    try:
        if tokenizer_path is not None:
            tokenizer = load_tokenizer(tokenizer_path)
        elif run_dir is not None:
            tokenizer_path = str(run_dir / TOKENIZER_FILE)
            tokenizer = load_tokenizer(tokenizer_path)
        else:
            tokenizer_path = str(weights)
            if not (weights / "tokenizer.json").is_file() and not all(
                (weights / name).is_file() for name in ("vocab.json", "merges.txt")
            ):
                raise UsageError(
                    f"{argument}: no tokenizer in {str(weights)!r} (tokenizer.json, or vocab.json + merges.txt)"
                    + ("; pass --tokenizer-file FILE" if argument == "MODEL" else "")
                )
            tokenizer = BPETokenizer.from_pretrained(weights)
    except (OSError, ValueError) as err:
        raise UsageError(f"{argument}: cannot load the tokenizer: {err}") from None

    try:
        config = config_from_hf(read_json(config_file, "model config"))
    except (TypeError, ValueError) as err:
        raise UsageError(f"{argument}: model config {str(config_file)!r} is not a GPT-2 config: {err}") from None
    if (weights / "trainer_state.json").is_file():
        model = GPT(config)
        load_checkpoint(weights, model)  # verifies every file; CheckpointError names it
    else:
        try:
            model = GPT.from_pretrained(weights)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise UsageError(
                f"{argument}: cannot load the weights in {str(weights)!r} (truncated or corrupt?): {err}"
            ) from None
    if tokenizer.vocab_size <= len({tokenizer.pad_id, tokenizer.sos_id, tokenizer.eos_id}):
        raise UsageError(
            f"{argument}: the tokenizer {tokenizer_path!r} is empty: it has only its special tokens "
            f"({tokenizer.vocab_size} in all), so it cannot encode any text"
        )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"{argument}: tokenizer {tokenizer_path!r} has {tokenizer.vocab_size} tokens but the model in {str(weights)!r} "
            f"has vocab_size={model.config.vocab_size}: they were not made for each other"
        )
    try:  # --weights: fp32 / bf16 / int8 / int4 (pyminigpt.quantize)
        model = with_weights(model, weights_format)
    except ValueError as err:
        raise UsageError(f"--weights: {err}") from None
    return Loaded(model.to(device).eval(), tokenizer, run.get("format") == "lines", weights, tokenizer_path)


HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # distilgpt2, openai-community/gpt2
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.json", "merges.txt")


def _from_hub_cache(name: str, argument: str) -> Path:
    """The local directory of hub model `name` (e.g. distilgpt2): from the Hugging Face cache, or
    downloaded once into it when the network allows; otherwise a UsageError that says what a hub name needs."""
    not_found = f"{argument}: model directory not found: {name!r}"
    if not HUB_NAME.match(name) or Path(name).parent.is_dir() and Path(name).parent != Path("."):
        raise UsageError(not_found)  # a path (its folder exists here), not a hub name
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"{not_found} (a hub name needs the huggingface_hub package)") from None
    patterns = ["config.json", "model.safetensors", "generation_config.json", "tokenizer*", "vocab.json", "merges.txt"]
    for local_only in (True, False):
        try:
            folder = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=local_only))
        except Exception:  # noqa: BLE001, S112 (offline, not cached, no such repository: all mean "not here")
            continue
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    raise UsageError(
        f"{not_found}, and not in the local Hugging Face cache; a hub name such as {name!r} needs the network "
        f"(to download it once) or a local cache: give a directory from save_pretrained instead"
    )


def encode_check(loaded: Loaded, text: str, what: str) -> None:
    """Raise a UsageError naming the tokenizer file if `text` has characters it never saw."""
    try:
        loaded.tokenizer.encode(text)
    except ValueError as err:
        raise UsageError(f"{what}: {err} (tokenizer {loaded.tokenizer_path!r})") from None


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int | None = None) -> None:
    """The sampling, --device and --tokenizer-file options that generate and chat share."""
    g = p.add_argument_group("sampling (transformers' generate semantics)")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help="tokens to generate (default: up to the end of the context, at most 200)",
    )
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    g.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this (> 0; default 1.0)")
    g.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens (0 = all; default 50)")
    g.add_argument(
        "--top-p", type=float, default=1.0, help="keep the smallest set with this much probability (default 1.0 = all)"
    )
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="penalize tokens already present (> 1; default 1.0 = off)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed the draws, for reproducible samples")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    add_tokenizer_file_arg(g)


def add_tokenizer_file_arg(p) -> None:
    """--tokenizer-file FILE of the commands that load a MODEL (`train --tokenizer` is char|bpe instead)."""
    p.add_argument(
        "--tokenizer-file",
        "--tokenizer",  # the earlier spelling, still accepted
        dest="tokenizer",
        metavar="FILE",
        default=None,
        help="tokenizer file, for a model directory without one (default: the run's tokenizer.json, or the "
        "directory's tokenizer files; --tokenizer FILE is the same option's earlier name)",
    )


def check_sampling(args) -> None:
    """The sampling options, checked before any model is loaded."""
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 disables it), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.repetition_penalty > 0:
        raise UsageError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")


def sampling_kwargs(args, loaded: Loaded, prompt: str) -> dict:
    """`generate_text` keyword arguments from the sampling options; --max-new-tokens fits the context."""
    from ..analysis import prompt_ids

    context = loaded.model.config.n_positions
    room = context - len(prompt_ids(loaded.tokenizer, prompt, loaded.sos))
    if room < 1:
        raise UsageError(f"the prompt fills the model's whole context of {context} tokens")
    max_new = args.max_new_tokens if args.max_new_tokens is not None else min(room, 200)
    if not 1 <= max_new <= room:
        raise UsageError(f"--max-new-tokens must be in [1, {room}] (context {context} minus the prompt), got {max_new}")
    kwargs = {
        "max_new_tokens": max_new,
        "do_sample": not args.greedy,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
    }
    if args.seed is not None:
        kwargs["generator"] = torch.Generator(loaded.model.device).manual_seed(args.seed)
    return kwargs


def load_corpus(data: str | None) -> tuple[str, object]:
    """(source name, text) of a data file, or the built-in names (as a list)."""
    from ..train.data import load_text, names_corpus

    if data is None:
        return "built-in names corpus", names_corpus()
    try:
        return f"data file {data!r}", load_text(data)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None


def save_model_dir(
    loaded: Loaded, out: Path, name: str = "last", tuned_from: str | None = None, rewards: list | None = None
) -> Path:
    """Write `loaded` as a run directory that `load_model` reads; returns the model directory `out/name`.

    out/run.json (format, tokenizer kind, where it was tuned from: `tuned_from`, default `loaded`'s
    path; the feedback `rewards` when given), out/tokenizer.json, and
    out/name/: a complete transformers model directory (config, weights, generation
    config, tokenizer files), written atomically.
    """
    from ..files import atomic_directory

    out.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out / name) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp, model_max_length=loaded.model.config.n_positions)
    loaded.tokenizer.save(out / TOKENIZER_FILE)
    run = {
        "format": "lines" if loaded.sos else "stream",
        "tokenizer": tokenizer_kind(loaded.tokenizer),
        "context": loaded.model.config.n_positions,
        "tuned_from": tuned_from or str(Path(loaded.path).resolve()),
    }
    if rewards is not None:
        run["rewards"] = list(rewards)
    write_json(run, out / RUN_FILE)
    return out / name


def tokenizer_kind(tokenizer) -> str:
    """'char' or 'bpe', as `train --tokenizer` names them."""
    from ..tokenizer import CharTokenizer

    return "char" if isinstance(tokenizer, CharTokenizer) else "bpe"


def size_name(config) -> str:
    """The preset (`SIZES`) with the shape of `config`, or its shape as LAYERSxWIDTH."""
    shape = (config.n_layer, config.n_head, config.n_embd)
    for name, preset in SIZES.items():
        if (preset["n_layer"], preset["n_head"], preset["n_embd"]) == shape:
            return name
    return f"{config.n_layer}x{config.n_embd}"


def load_init_model(path: str, size: str | None, vocab_size: int | None, tokenizer: str | None, context: int | None):
    """`train --init-from`: load the model and tokenizer at `path`, refusing options that contradict them.

    size, vocab_size, tokenizer, context: the `train` options as given (None: not given).
    """
    loaded = load_model(path, torch.device("cpu"), argument="--init-from")
    config = loaded.model.config
    model_desc = (
        f"the model in --init-from {str(loaded.path)!r} ({config.n_layer} layers, {config.n_head} heads, "
        f"width {config.n_embd}, vocab_size {config.vocab_size}, context {config.n_positions})"
    )
    if size is not None and size_name(config) != size:
        preset = SIZES[size]
        raise UsageError(
            f"--size {size} ({preset['n_layer']} layers, {preset['n_head']} heads, width {preset['n_embd']}) "
            f"contradicts {model_desc}: leave --size out"
        )
    if vocab_size is not None and vocab_size != config.vocab_size:
        raise UsageError(f"--vocab-size {vocab_size} contradicts {model_desc}: leave --vocab-size out")
    if tokenizer is not None and tokenizer != tokenizer_kind(loaded.tokenizer):
        raise UsageError(
            f"--tokenizer {tokenizer} contradicts {model_desc}, whose tokenizer is "
            f"{tokenizer_kind(loaded.tokenizer)}: leave --tokenizer out"
        )
    if context is not None and context > config.n_positions:
        raise UsageError(f"--context {context} is longer than the context of {model_desc}")
    return loaded


def with_dropout(model, dropout: float):
    """A copy of GPT `model` with its three dropout rates set to `dropout` (same weights)."""
    from dataclasses import replace

    from ..model import GPT

    config = replace(model.config, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    copy = GPT(config)
    copy.load_state_dict(model.state_dict())
    return copy
