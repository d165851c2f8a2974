"""Training checkpoints: one directory per checkpoint, written atomically, never unpickled.

    <name>/config.json                 the model config (GPT.from_pretrained reads the directory,
    <name>/model.safetensors           and so does transformers.GPT2LMHeadModel)
    <name>/generation_config.json      the special token ids for transformers' generate
    <name>/tokenizer.json              the tokenizer, in transformers' layout, when one is given
    <name>/tokenizer_config.json       (so AutoTokenizer and pipeline("text-generation") load it)
    <name>/trainer_state.json          step, data position, best loss, history, optimizer
                                       hyper-parameters, Python/NumPy RNG states, file checksums
    <name>/trainer_state.safetensors   optimizer moments, torch RNG states

Atomicity (`pyminigpt.io.atomic_directory`): everything is written into `<name>.tmp/` and
fsynced; then an existing `<name>` is renamed to `<name>.old`, `<name>.tmp` to `<name>`, and
`<name>.old` removed. At every instant `<name>` or `<name>.old` is a complete checkpoint, and
`resolve_checkpoint` finds it, so a crash (or an exception) mid-save never damages what was
saved before.

Loading checks that every file is present, that its size and SHA-256 match the ones
recorded at save time, and that the model config matches; any failure raises a
ValueError / FileNotFoundError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..files import atomic_directory

__all__ = ["ARCH_FIELDS", "CheckpointError", "load_checkpoint", "resolve_checkpoint", "save_checkpoint"]

WEIGHTS, CONFIG = "model.safetensors", "config.json"
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
FORMAT_VERSION = 1
# Config fields that fix the shape or meaning of the weights (dropout rates may change between runs).
ARCH_FIELDS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
    "activation_function", "layer_norm_epsilon", "tie_word_embeddings",
)  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or made for another model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The complete checkpoint directory for `path`: `path` itself, or `path.old` left by a crash mid-swap."""
    path = Path(path)
    if (path / STATE_JSON).is_file():
        return path
    old = path.with_name(path.name + ".old")
    if not path.exists() and (old / STATE_JSON).is_file():
        return old
    raise FileNotFoundError(
        f"no training checkpoint at {str(path)!r} (missing {STATE_JSON}); "
        f"to start from weights alone, load them with GPT.from_pretrained"
    )


def save_checkpoint(
    path: str | os.PathLike, model, state: dict, tensors: dict[str, torch.Tensor], tokenizer=None
) -> Path:
    """Write model weights + config, `state` (JSON-able), `tensors` and `tokenizer`'s files as checkpoint `path`.

    With a tokenizer (`pyminigpt.tokenizer`), the directory is a complete transformers
    model directory. Every file but trainer_state.json is recorded with its size and SHA-256.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not (path / STATE_JSON).is_file():
        raise FileExistsError(f"refusing to overwrite {str(path)!r}: it is not a pyminigpt training checkpoint")
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp, model_max_length=model.config.n_positions)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        files = {file.name: {"bytes": file.stat().st_size, "sha256": _sha256(file)}
                 for file in sorted(tmp.iterdir()) if file.is_file()}  # fmt: skip
        record = {"format_version": FORMAT_VERSION, "files": files, **state}
        (tmp / STATE_JSON).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return path


def _read_state(path: Path) -> dict:
    file = path / STATE_JSON
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {str(file)!r} is truncated or corrupt: {err}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "files" not in state:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is not a pyminigpt trainer state (format {FORMAT_VERSION})"
        )
    return state


def _verify_files(path: Path, files: dict) -> None:
    for name, expect in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
        size = file.stat().st_size
        if size != expect["bytes"]:
            raise CheckpointError(
                f"checkpoint file {str(file)!r} is truncated or corrupt: {size} bytes, expected {expect['bytes']}"
            )
        if _sha256(file) != expect["sha256"]:
            raise CheckpointError(f"checkpoint file {str(file)!r} is corrupt: its SHA-256 does not match the one saved")


def _check_config(path: Path, model) -> None:
    file = path / CONFIG
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {str(file)!r} is corrupt: {err}") from None
    ours = model.config.to_dict()
    diff = [
        f"{k}={saved.get(k)!r} (model has {ours[k]!r})" for k in ARCH_FIELDS if k in ours and saved.get(k) != ours[k]
    ]
    if diff:
        raise CheckpointError(f"checkpoint {str(file)!r} was saved for another model config: {', '.join(diff)}")


def load_checkpoint(path: str | os.PathLike, model, check=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Verify checkpoint `path`, load its weights into `model` in place; return (state, tensors).

    `check(path, state)` may raise to refuse the checkpoint. Nothing is modified unless
    every file checks out.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..hf.convert import load_hf_state_dict

    path = resolve_checkpoint(path)
    state = _read_state(path)
    _verify_files(path, state["files"])
    _check_config(path, model)
    if check is not None:
        check(path, state)
    try:
        weights = load_file(path / WEIGHTS)
        tensors = load_file(path / STATE_TENSORS)
    except SafetensorError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unreadable safetensors file: {err}") from None
    try:
        load_hf_state_dict(model, weights)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint file {str(path / WEIGHTS)!r} does not fit the model: {err}") from None
    return state, tensors
