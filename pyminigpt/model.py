"""The GPT-2 model, built on the five operations of `pyminigpt.ops`.

    tokens (B, T) -> wte + wpe -> n_layer x [x += attn(ln_1(x)); x += mlp(ln_2(x))] -> ln_f -> lm_head -> logits (B, T, V)

Parameter names and shapes follow transformers' `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`, ...)
except that the projections are `nn.Linear` (HF stores them transposed, as `Conv1D`); `pyminigpt.hf`
converts. Layer norm, causal attention and the projections (`ops.linear`) go through `pyminigpt.ops`,
so the kernels of the active backend run them; attention falls back to plain PyTorch only where the
kernel's contract does not reach: padding in `attention_mask`, attention dropout while training, or
`output_attentions=True`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .cache import KVCache
from .config import ACTIVATIONS, GPTConfig
from .generation import GenerationConfig, generate
from .loss import deferred_lm_head, next_token_targets

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass
class GPTOutput:
    """What `GPT.forward` returns. Optional fields are None unless asked for.

    `logits` (B, T, V), or (B, logits_to_keep, V). With labels the loss does not need them
    (`ops.linear_cross_entropy`), so they are computed on first access (`pyminigpt.loss`).
    """

    _logits: torch.Tensor | Callable[[], torch.Tensor] = field(repr=False)  # the logits, or what computes them
    loss: torch.Tensor | None = None  # mean next-token cross entropy over labels != -100
    past_key_values: KVCache | None = None  # with use_cache=True
    hidden_states: tuple[torch.Tensor, ...] | None = None  # n_layer + 1 of (B, T, C); the last after ln_f
    attentions: tuple[torch.Tensor, ...] | None = None  # n_layer of (B, H, T, Tk)

    @property
    def logits(self) -> torch.Tensor:
        if not isinstance(self._logits, torch.Tensor):
            self._logits = self._logits()
        return self._logits


class LayerNorm(nn.Module):
    """nn.LayerNorm's parameters, computed by `ops.layer_norm`."""

    def __init__(self, n_embd: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class Linear(nn.Linear):
    """nn.Linear computed by `ops.linear` (decoding's few-row matmuls stream the weights once on the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


def _check_index_range(name: str, ids: torch.Tensor, bound_name: str, bound: int) -> None:
    """Raises unless every value of `ids` is in [0, bound); one read to the host (one sync on a GPU).

    Under torch.compile a host read cannot be traced, so the check becomes a tensor assert that the
    compiled graph runs (a RuntimeError naming the argument, without the values).
    """
    if ids.numel() == 0:
        return
    if torch.compiler.is_compiling():
        in_range = (ids >= 0).all() & (ids < bound).all()
        torch._assert_async(in_range, f"{name} must be in [0, {bound_name}={bound})")
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name} must be in [0, {bound_name}={bound}), got values in [{lo}, {hi}]")


def allowed_keys(tq: int, tk: int, device, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask, True where query i may see key j: causal (j <= i + Tk - Tq) and attention_mask[:, j] != 0.

    (Tq, Tk) without attention_mask, else (B, 1, Tq, Tk) for attention_mask (B, Tk). A padded query
    would see no key at all (a NaN softmax row), so with padding every query also sees itself;
    that changes only the (meaningless) outputs at padded positions.
    """
    query_pos = torch.arange(tq, device=device).unsqueeze(-1) + (tk - tq)
    key_pos = torch.arange(tk, device=device)
    causal = key_pos <= query_pos
    if attention_mask is None:
        return causal
    return (causal & attention_mask[:, None, None, :].bool()) | (key_pos == query_pos)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, allowed=None, cache=None, layer=0, need_weights=False):
        """x (B, T, C) -> (out (B, T, C), weights (B, H, T, Tk) or None).

        allowed: None for plain causal attention, else the (B, 1, T, Tk) mask of `allowed_keys`.
        """
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, H, T, D) views of it in one reshape (no copies)
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            if q.dtype != cache.dtype:  # under autocast q, k, v come out in its dtype; the cache keeps its own
                q, k, v = q.to(cache.dtype), k.to(cache.dtype), v.to(cache.dtype)
            k, v = cache.update(layer, k, v)
        dropout_p = self.attn_pdrop if self.training else 0.0
        weights = None
        if allowed is None and dropout_p == 0.0 and not need_weights:
            y = ops.causal_attention(q, k, v)
        else:
            if allowed is None:
                allowed = allowed_keys(T, k.shape[2], x.device)
            if need_weights:
                scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
                weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
                y = F.dropout(weights, dropout_p, self.training) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y)), weights


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, inner)
        self.act = ACTIVATIONS[config.activation_function]
        self.c_proj = Linear(inner, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, allowed=None, cache=None, layer=0, need_weights=False):
        attn_out, weights = self.attn(self.ln_1(x), allowed, cache, layer, need_weights)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class GPT(nn.Module):
    """GPT-2 language model. `forward`, `generate`, `from_pretrained`, `from_hf` and `save_pretrained`
    follow transformers' `GPT2LMHeadModel` names and semantics."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # generate's settings (transformers' `model.generation_config`): the special tokens of the config,
        # replaced by generation_config.json in `from_pretrained`, written by `save_pretrained`
        self.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.n_positions, config.n_embd),
                "drop": nn.Dropout(config.embd_pdrop),
                "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                "ln_f": LayerNorm(config.n_embd, config.layer_norm_epsilon),
            }
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections into the residual stream by 1/sqrt(number of residual layers)
        for block in self.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (tied weights counted once), optionally without wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty KV cache for `batch_size` rows and up to `capacity` positions, on the model's device and dtype."""
        return KVCache(self.config, batch_size, capacity, self.device, self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        shift_labels: torch.Tensor | None = None,
    ) -> GPTOutput:
        """Logits (B, T, V) for input_ids (B, T); like `GPT2LMHeadModel.forward`.

        attention_mask (B, past + T): 1 for tokens, 0 for padding. labels (B, T): the loss is the
        mean cross entropy of logits[:, :-1] against labels[:, 1:], ignoring -100; shift_labels
        (B, T), as in transformers, are the next tokens already (logits[:, t] against shift_labels[:, t]).
        The loss runs on `ops.linear_cross_entropy` (never the full logits); `out.logits` is then
        computed on first access (`pyminigpt.loss`).
        past_key_values: a `KVCache` to continue from (written in place); `use_cache=True` returns
        the cache (a new one if none was given). position_ids (B or 1, T) default to
        past + arange(T). logits_to_keep > 0 computes the LM head for the last that many positions only.
        """
        self._check_inputs(input_ids, attention_mask, labels, past_key_values, position_ids, logits_to_keep)
        if shift_labels is not None and tuple(shift_labels.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"shift_labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(shift_labels.shape)}"
            )
        labels = next_token_targets(labels, shift_labels)
        # no padding: the causal kernel path (a host read; compiled, the mask path serves all-ones masks too)
        if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask = None
        return self._forward(
            input_ids, attention_mask, labels, past_key_values, use_cache,
            output_attentions, output_hidden_states, position_ids, logits_to_keep,
        )  # fmt: skip

    def _check_inputs(
        self, input_ids, attention_mask=None, labels=None, cache=None, position_ids=None, logits_to_keep=0
    ):
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"past_key_values must be a KVCache (see GPT.new_cache), got {type(cache).__name__}")
        past = cache.length if cache is not None else 0
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in INDEX_DTYPES:
            raise TypeError(
                f"input_ids must be an integer torch.Tensor, got {getattr(input_ids, 'dtype', type(input_ids).__name__)}"
            )
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must have shape (batch, seq_len) with seq_len >= 1, got {tuple(input_ids.shape)}"
            )
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {self.device}")
        B, T = input_ids.shape
        if past + T > self.config.n_positions:
            raise ValueError(
                f"sequence length {past + T} (past {past} + input_ids {T}) exceeds n_positions={self.config.n_positions}"
            )
        _check_index_range("input_ids", input_ids, "vocab_size", self.config.vocab_size)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype not in (*INDEX_DTYPES, torch.bool):
                raise TypeError(
                    f"attention_mask must be an integer or bool torch.Tensor, got {getattr(attention_mask, 'dtype', type(attention_mask).__name__)}"
                )
            if tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(
                    f"attention_mask must have shape (batch, past + seq_len) = {(B, past + T)}, got {tuple(attention_mask.shape)}"
                )
            if attention_mask.device != input_ids.device:
                raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}")
        if labels is not None and tuple(labels.shape) != (B, T):
            raise ValueError(f"labels must have the shape of input_ids {(B, T)}, got {tuple(labels.shape)}")
        if labels is not None and logits_to_keep:
            raise ValueError(f"labels need the logits of every position, but logits_to_keep={logits_to_keep}")
        if cache is not None and cache.keys[0].shape[0] != B:
            raise ValueError(f"past_key_values holds batch {cache.keys[0].shape[0]} but input_ids has batch {B}")
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[1] != T or position_ids.shape[0] not in (1, B):
                raise ValueError(f"position_ids must have shape ({B} or 1, {T}), got {tuple(position_ids.shape)}")
            _check_index_range("position_ids", position_ids, "n_positions", self.config.n_positions)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 keeps all), got {logits_to_keep!r}")

    def _forward(
        self, input_ids, attention_mask=None, labels=None, cache=None, use_cache=False,
        output_attentions=False, output_hidden_states=False, position_ids=None, logits_to_keep=0,
    ) -> GPTOutput:  # fmt: skip
        """`forward` without the argument checks; attention_mask, if given, is taken to have padding, and
        labels are the next token of each position (`loss.next_token_targets`), -100 for none."""
        B, T = input_ids.shape
        if use_cache and cache is None:
            cache = self.new_cache(B, T)
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)
        allowed = allowed_keys(T, past + T, input_ids.device, attention_mask) if attention_mask is not None else None
        x, hidden_states, attentions = self._trunk(input_ids, position_ids, allowed, cache, output_attentions)
        if cache is not None:
            cache.advance(T)

        loss = None
        if labels is None:
            logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        elif torch.compiler.is_compiling():  # a compiled graph returns tensors, not a function to call later
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().to(x.device), ignore_index=-100)
        else:  # labels: the next token of each position (-100: none), see forward
            logits = deferred_lm_head(self.lm_head, x)
            loss = ops.linear_cross_entropy(x, self.lm_head.weight, labels.to(x.device), self.lm_head.bias)
        return GPTOutput(
            logits,
            loss=loss,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def _trunk(self, input_ids, position_ids, allowed=None, cache=None, need_weights=False):
        """Embeddings -> every block -> ln_f: (x (B, T, C) after ln_f, hidden states, attention weights).

        The one trunk of the model: `_forward` and the static decode step (`generation.StaticDecoder`,
        the CUDA-graph step) both run it. allowed: None (causal) or a (B, 1, T, Tk) bool mask.
        """
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        hidden_states, attentions = [], []
        for layer, block in enumerate(self.transformer.h):
            hidden_states.append(x)
            x, weights = block(x, allowed, cache, layer, need_weights)
            attentions.append(weights)
        x = self.transformer.ln_f(x)
        hidden_states.append(x)
        return x, hidden_states, attentions

    generate = generate

    @classmethod
    def from_pretrained(cls, name_or_path, weights: str | None = None, **kwargs) -> GPT:
        """Load a GPT-2 checkpoint: a local directory (config.json + model.safetensors) or a hub name.

        weights: None keeps the checkpoint's; "fp32" / "bf16" set the dtype; "int8" / "int4" quantize
        the projections (`quantize_`). A directory saved quantized loads as saved, without requantizing.
        """
        from .quantize import load_pretrained

        return load_pretrained(cls, name_or_path, weights, **kwargs)

    def quantize_(self, weights: str, group_size: int | None = None) -> GPT:
        """Replace every projection (attention, MLP, the tied LM head) by 8-bit or 4-bit weights, in place.

        weights: "int8" (default: one scale per output channel) or "int4" (groups of 32, 64 or 128
        weights, default 64). For inference: a quantized model refuses `train()`. See `pyminigpt.quantize`.
        """
        from .quantize import quantize_

        return quantize_(self, weights, group_size)

    @classmethod
    def from_hf(cls, hf_model) -> GPT:
        """Convert a live transformers `GPT2LMHeadModel` (weights and config)."""
        from .hf.convert import from_hf

        return from_hf(cls, hf_model)

    def save_pretrained(self, directory) -> None:
        """Write config.json + model.safetensors that `transformers.GPT2LMHeadModel.from_pretrained` loads."""
        from .hf.convert import save_pretrained
        from .quantize import quantization_of, save_quantized

        if quantization_of(self) is not None:  # a quantized model keeps its format (pyminigpt reads it back)
            save_quantized(self, directory)
            return
        save_pretrained(self, directory)

    def can_generate(self):
        """Raise a TypeError that says what to do instead: transformers' `pipeline(...)` asks this first,
        and a `GPT` is not a transformers model (no `GenerationConfig`, no `PreTrainedModel` machinery).
        The pipeline path is transformers' own GPT-2 switched to the kernels with `patch_hf_gpt2`."""
        raise TypeError(
            "pyminigpt.GPT is not a transformers model, so transformers' pipeline() cannot drive it. "
            "For a pipeline, load the weights with transformers and switch that model to pyminigpt's kernels: "
            "model.save_pretrained(DIR); hf = pyminigpt.patch_hf_gpt2(transformers.GPT2LMHeadModel.from_pretrained(DIR)); "
            "pipeline('text-generation', model=hf, tokenizer=DIR). Or call GPT.generate directly."
        )
