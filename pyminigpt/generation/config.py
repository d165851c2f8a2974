"""`GenerationConfig` and how `generate` resolves its arguments, as transformers does.

Precedence (transformers' `_prepare_generation_config`): transformers' global defaults, then the
model's `generation_config` (from generation_config.json), then a `generation_config=` argument,
each overriding only the fields it sets (not None); then the keyword arguments of the call, which
override even with None. A field left None at the end is "off": no top-k, no temperature, ...,
exactly as transformers reads it (so `top_k=None` disables top-k, while an unset top_k is 50).

Every other name transformers' `generate` or `GenerationConfig` accepts raises a ValueError that
names it, unless its value is None or transformers' no-op default (e.g. `num_beam_groups=1`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

# transformers' `GenerationConfig._get_default_generation_params()`, for the fields we support.
# (max_length: unset, generate makes 20 new tokens, at most up to n_positions, as transformers does.)
DEFAULTS = {
    "min_length": 0,
    "do_sample": False,
    "use_cache": True,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
}

# What transformers accepts and pyminigpt does not, with the values that change nothing (None always
# changes nothing). Keys of `GenerationConfig` and arguments of `generate` itself.
UNSUPPORTED = {
    "max_time": (), "stop_strings": (), "use_mtp": (False,), "cache_implementation": (), "cache_config": (),
    "max_cache_len": (), "top_h": (), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,),
    "encoder_repetition_penalty": (1.0,), "renormalize_logits": (False,), "forced_bos_token_id": (),
    "forced_eos_token_id": (), "remove_invalid_values": (False,), "exponential_decay_length_penalty": (),
    "suppress_tokens": (), "begin_suppress_tokens": (), "sequence_bias": (), "token_healing": (False,),
    "guidance_scale": (1.0,), "watermarking_config": (), "output_attentions": (False,),
    "output_hidden_states": (False,), "encoder_no_repeat_ngram_size": (0,), "decoder_start_token_id": (),
    "is_assistant": (False,), "assistant_confidence_threshold": (0.4,), "prompt_lookup_num_tokens": (),
    "max_matching_ngram_size": (), "assistant_early_exit": (), "assistant_lookbehind": (10,),
    "target_lookbehind": (10,), "assistant_ensemble_weight": (), "speculation_type": (), "compile_config": (),
    "disable_compile": (False, True), "continuous_batching_config": (), "low_memory": (False,),
    "penalty_alpha": (), "dola_layers": (), "diversity_penalty": (0.0,), "num_beam_groups": (1,),
    "constraints": (), "force_words_ids": (), "prefill_chunk_size": (),
    # arguments of transformers' generate that are not GenerationConfig fields
    "logits_processor": (), "stopping_criteria": (), "prefix_allowed_tokens_fn": (), "synced_gpus": (False,),
    "negative_prompt_ids": (), "negative_prompt_attention_mask": (), "custom_generate": (), "tokenizer": (),
    "assistant_tokenizer": (), "past_key_values": (), "inputs_embeds": (), "position_ids": (),
    "token_type_ids": (), "trust_remote_code": (),
}  # fmt: skip

# Keys of a saved generation_config.json that are metadata, not settings.
METADATA = ("transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash")


@dataclass
class GenerationConfig:
    """The generation settings pyminigpt supports, with transformers' names; None means "not set".

    `model.generation_config` is one (loaded from generation_config.json by `from_pretrained`,
    written by `save_pretrained`); `generate(generation_config=...)` takes one, a transformers
    `GenerationConfig` or a dict. Settings of a loaded file that pyminigpt does not support are
    kept in `unsupported` and refused by `generate`, never ignored.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    min_length: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    bad_words_ids: list[list[int]] | None = None
    num_beams: int | None = None
    early_stopping: bool | str | None = None
    length_penalty: float | None = None
    num_return_sequences: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    use_cache: bool | None = None
    return_dict_in_generate: bool | None = None
    output_scores: bool | None = None
    output_logits: bool | None = None
    num_assistant_tokens: int | None = None
    num_assistant_tokens_schedule: str | None = None
    unsupported: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, values: dict) -> GenerationConfig:
        """From generation_config.json contents (or `transformers.GenerationConfig.to_dict()`)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"unsupported"}
        known = {k: v for k, v in values.items() if k in names}
        others = {k: v for k, v in values.items() if k not in names and k not in METADATA and not k.startswith("_")}
        return cls(**known, unsupported={k: v for k, v in others.items() if not _no_op(k, v)})

    @classmethod
    def from_any(cls, value) -> GenerationConfig:
        """A GenerationConfig from ours, a transformers GenerationConfig (anything with to_dict) or a dict."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if hasattr(value, "to_dict"):
            return cls.from_dict(value.to_dict())
        raise TypeError(f"generation_config must be a GenerationConfig or a dict, got {type(value).__name__}")

    def __repr__(self) -> str:
        return f"GenerationConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def set_fields(self) -> dict:
        """The settings that are not None."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "unsupported" and getattr(self, f.name) is not None
        }

    def to_dict(self) -> dict:
        return {**self.set_fields(), **self.unsupported}

    def save_pretrained(self, directory) -> None:
        from ..files import atomic_write

        atomic_write(
            Path(directory) / "generation_config.json", json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        )

    @classmethod
    def from_pretrained(cls, directory) -> GenerationConfig:
        return cls.from_dict(json.loads((Path(directory) / "generation_config.json").read_text()))


def _no_op(name: str, value) -> bool:
    return value is None or (
        name in UNSUPPORTED and any(value == v and type(value) is type(v) for v in UNSUPPORTED[name])
    )


def check_supported(kwargs: dict, where: str = "") -> None:
    """ValueError naming every setting in kwargs that pyminigpt's generate does not support."""
    refused = sorted(name for name, value in kwargs.items() if not _no_op(name, value))
    if refused:
        known = [n for n in refused if n in UNSUPPORTED]
        what = "transformers' generate option" if known == refused else "argument"
        raise ValueError(
            f"{where}{', '.join(refused)}: {what}{'s' if len(refused) > 1 else ''} not supported by pyminigpt's "
            "generate (see README: Generation)"
        )


def resolve(model, generation_config, kwargs: dict) -> GenerationConfig:
    """The settings of one `generate` call: defaults < model.generation_config < generation_config < kwargs.

    kwargs must hold only GenerationConfig field names (the caller refuses the others first).
    """
    merged = dict(DEFAULTS)
    for layer, where in (
        (getattr(model, "generation_config", None), "model.generation_config sets "),
        (generation_config, "generation_config sets "),
    ):
        if layer is None:
            continue
        layer = GenerationConfig.from_any(layer)
        check_supported(layer.unsupported, where)
        merged.update(layer.set_fields())
    merged.update(kwargs)  # explicit arguments win, None included (transformers' `update`)
    if merged.get("max_new_tokens") is not None:
        merged["max_length"] = None  # max_new_tokens takes precedence, as in transformers
    if merged.get("min_new_tokens") is not None:
        merged["min_length"] = None  # so does min_new_tokens
    config = GenerationConfig(**merged)
    _check(config)
    return config


def _int(config, name: str, low: int, optional: bool = True) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _float(config, name: str, low: float, high: float, low_open: bool = True, high_open: bool = False) -> None:
    value = getattr(config, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above or math.isnan(value):
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")


def _check(c: GenerationConfig) -> None:
    """Types and ranges of the resolved settings (transformers' `GenerationConfig.validate`, raised)."""
    _int(c, "max_new_tokens", 1)
    _int(c, "max_length", 1)
    _int(c, "min_new_tokens", 0)
    _int(c, "min_length", 0)
    _int(c, "top_k", 0)
    _int(c, "no_repeat_ngram_size", 0)
    _int(c, "num_beams", 1)
    _int(c, "num_return_sequences", 1)
    _int(c, "num_assistant_tokens", 1)
    _float(c, "top_p", 0.0, 1.0)
    _float(c, "min_p", 0.0, 1.0, low_open=False)
    _float(c, "typical_p", 0.0, 1.0)
    _float(c, "repetition_penalty", 0.0, float("inf"))
    _float(c, "length_penalty", float("-inf"), float("inf"))
    if c.do_sample:
        _float(c, "temperature", 0.0, float("inf"))
    if c.early_stopping not in (None, True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {c.early_stopping!r}")
    if c.num_assistant_tokens_schedule not in (None, "constant", "heuristic"):
        raise ValueError(
            f"num_assistant_tokens_schedule must be 'constant' or 'heuristic', got {c.num_assistant_tokens_schedule!r}"
        )
    if (c.num_return_sequences or 1) > (c.num_beams or 1) and not c.do_sample:
        raise ValueError(
            f"num_return_sequences={c.num_return_sequences} needs do_sample=True or num_beams >= it "
            f"(greedy search gives one sequence per prompt, beam search num_beams={c.num_beams or 1})"
        )
    if c.bad_words_ids is not None and not (
        isinstance(c.bad_words_ids, (list, tuple))
        and c.bad_words_ids
        and all(isinstance(w, (list, tuple)) and w and all(_is_token(t) for t in w) for w in c.bad_words_ids)
    ):
        raise ValueError(
            f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {c.bad_words_ids!r}"
        )


def _is_token(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def token_ids(name: str, value) -> list[int]:
    """[] for None, [value] for an int, the list otherwise; ValueError unless all are ids >= 0."""
    if value is None:
        return []
    ids = [value] if isinstance(value, numbers.Integral) else list(value)
    if not all(_is_token(i) for i in ids):
        raise ValueError(f"{name} must be a non-negative int or a list of them, got {value!r}")
    return [int(i) for i in ids]
