"""GPT-2 hyperparameters (`GPTConfig`) and the activations they name.

A module of its own so that weight and config conversion (`hf.py`) and checkpoint code can
use the config without importing the model, which imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

# The HF `ACT2FN` names this model supports for `activation_function`.
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


@dataclass
class GPTConfig:
    """GPT-2 hyperparameters, with transformers' `GPT2Config` names and defaults (GPT-2 small)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        n_inner = self.n_inner
        if n_inner is not None and (isinstance(n_inner, bool) or not isinstance(n_inner, int) or n_inner < 1):
            raise ValueError(f"GPTConfig.n_inner must be None or a positive int, got {n_inner!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"GPTConfig.activation_function must be one of {sorted(ACTIVATIONS)}, got {self.activation_function!r}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GPTConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("layer_norm_epsilon", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GPTConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
