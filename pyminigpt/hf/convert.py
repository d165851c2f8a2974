"""GPT-2 weights and configs to and from transformers.

pyminigpt's parameter names are transformers' `GPT2LMHeadModel` names; the only difference
is that the four projections of a block are `nn.Linear` (weight (out, in)) where HF uses
`Conv1D` (weight (in, out)), so converting is a transpose of those four weights. A checkpoint
saved by `save_pretrained` (config.json + model.safetensors) loads in transformers and back
without transformers being imported; hub names go through `transformers.GPT2LMHeadModel`.

The model's `from_pretrained` / `from_hf` / `save_pretrained` call the functions here with the
model class or model (`cls`, `model`); this module never imports the model, so the two are no knot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from ..config import GPTConfig

# The block weights HF stores as Conv1D, i.e. transposed relative to nn.Linear.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF GPT-2 options this model implements only at these values.
FIXED_HF_OPTIONS = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
# Buffers of older HF checkpoints (the causal mask), not weights.
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


def config_from_hf(hf_config) -> GPTConfig:
    """GPTConfig from a transformers GPT2Config, or from the dict of its config.json."""
    values = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    if values.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type={values['model_type']!r} is not a GPT-2 model (expected 'gpt2')")
    for name, supported in FIXED_HF_OPTIONS.items():
        if values.get(name, supported) != supported:
            raise ValueError(f"HF config {name}={values[name]!r} is not supported (only {supported!r})")
    return GPTConfig(**{f.name: values[f.name] for f in fields(GPTConfig) if f.name in values})


def config_to_hf_dict(config: GPTConfig) -> dict:
    """The config.json contents transformers reads as a GPT2Config."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **config.to_dict()}


def generation_config_dict(config: GPTConfig, generation_config=None) -> dict:
    """The generation_config.json contents: the model's `generation_config` (the special token ids
    transformers' `generate` uses, and any setting the user gave it)."""
    ids = {name: getattr(config, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {name: value for name, value in ids.items() if value is not None}
    settings = generation_config.to_dict() if generation_config is not None else ids
    return {"_from_model_config": True, **ids} if settings == ids else settings


def load_generation_config(model, source) -> None:
    """model.generation_config from a directory's generation_config.json or a transformers GenerationConfig."""
    from ..generation.config import GenerationConfig

    if isinstance(source, Path):
        if (source / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(source)
    elif source is not None:
        model.generation_config = GenerationConfig.from_any(source)


def state_dict_from_hf(hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pyminigpt names and layouts for a GPT2LMHeadModel (or GPT2Model) state dict.

    Keys without the `transformer.` prefix (hub GPT-2 checkpoints) get it; mask buffers are dropped.
    """
    out = {}
    for key, tensor in hf_state_dict.items():
        if key.endswith(HF_BUFFERS):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = tensor.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else tensor
    return out


def state_dict_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel names and layouts (Conv1D weights transposed) for a pyminigpt state dict."""
    return {
        key: tensor.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else tensor for key, tensor in state_dict.items()
    }


def load_hf_state_dict(model: nn.Module, hf_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy HF-layout weights into model; every weight must be there (lm_head may be left out when tied)."""
    missing, unexpected = model.load_state_dict(state_dict_from_hf(hf_state_dict), strict=False)
    if model.config.tie_word_embeddings:
        missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing}, unexpected {unexpected}")


def from_hf(cls: type[nn.Module], hf_model) -> nn.Module:
    """A `cls` (GPT) with the config, weights, device, dtype and train/eval mode of a GPT2LMHeadModel."""
    model = cls(config_from_hf(hf_model.config))
    load_hf_state_dict(model, hf_model.state_dict())
    load_generation_config(model, getattr(hf_model, "generation_config", None))
    return model.to(device=hf_model.device, dtype=hf_model.dtype).train(hf_model.training)


def from_pretrained(
    cls: type[nn.Module], name_or_path, dtype: torch.dtype | None = None, device=None, **hf_kwargs
) -> nn.Module:
    """Load a checkpoint in eval mode, like `GPT2LMHeadModel.from_pretrained`.

    A local directory with config.json + model.safetensors is read directly. Anything else
    (a hub name, sharded or .bin checkpoints), or any `hf_kwargs` (revision=, cache_dir=, ...),
    goes through `transformers.GPT2LMHeadModel.from_pretrained(name_or_path, **hf_kwargs)`.
    """
    path = Path(name_or_path)
    if not hf_kwargs and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        model = cls(config_from_hf(json.loads((path / "config.json").read_text())))
        load_hf_state_dict(model, load_file(path / "model.safetensors"))
        load_generation_config(model, path)
    else:
        import transformers

        model = from_hf(cls, transformers.GPT2LMHeadModel.from_pretrained(name_or_path, **hf_kwargs))
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(model: nn.Module, directory) -> None:
    """Write config.json, model.safetensors (HF layout) and generation_config.json into directory, each atomically."""
    from safetensors.torch import save_file

    from ..files import atomic_write

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_to_hf(model.state_dict())
    if model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]  # the same tensor as transformer.wte.weight
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    for name, contents in (
        ("config.json", config_to_hf_dict(model.config)),
        ("generation_config.json", generation_config_dict(model.config, model.generation_config)),
    ):
        atomic_write(directory / name, json.dumps(contents, indent=2, sort_keys=True) + "\n")
