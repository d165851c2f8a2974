"""Switch a live transformers GPT-2 model to pyminigpt's kernels, in place, and back.

    patch_hf_gpt2(model)    # projections, layer norms, attention, the GELU and sampling on our kernels
    unpatch_hf_gpt2(model)  # exactly the model it was before

Every GPT-2 class patches: the trunk `GPT2Model` and every head on it (`GPT2LMHeadModel`,
`GPT2DoubleHeadsModel`, `GPT2ForSequenceClassification`, `GPT2ForTokenClassification`,
`GPT2ForQuestionAnswering`). Patching is per model: only the modules of `model` change, never
its config, which may be shared with other models (a draft model, a second head, a copy); a
model that was not patched never runs pyminigpt's kernels. What changes (the weights are not
touched or copied):

- Projections: every transformers `Conv1D` (GPT-2's attention and MLP projections, y = x W + b
  with W stored (in, out)) and every plain `nn.Linear` (the LM head, the classification and
  multiple-choice heads) get an instance `forward` that calls `ops.linear` on CPU tensors
  (Conv1D's with `W.t()`, a view in nn.Linear's layout): a decode step's few rows then run on
  the kernel that streams each weight once (csrc/cpu/linear.cpp, which reads Conv1D's layout in
  place); more rows run on torch's matmul, the same call transformers makes. On other devices,
  where pyminigpt has no linear kernel, the module's own forward runs.
- Layer norms: every `nn.LayerNorm` of the model gets an instance `forward` that calls
  `ops.layer_norm` (forward and backward kernels).
- Attention: each `GPT2Attention` module of the model gets its own view of the config
  (`_AttentionConfig`): the model's config, read live, except that the implementation it names
  is pyminigpt's wrapper of the one the config names now (`eager` or `sdpa`; a later
  `model.set_attn_implementation(...)` is followed, and any other implementation runs as it is).
  The wrapper runs `ops.causal_attention` where the mask the model built is purely causal: None
  (SDPA's mask when there is no padding and the queries end at the last key), or a mask tensor
  that blocks exactly the future keys (eager's mask, or SDPA's when a prefill continues a cache).
  Otherwise (padding, cross-attention, attention dropout while training, torch.compile of an
  eager-mask model, or a call that records attention weights with `output_attentions=True`) the
  original implementation runs, so the weights returned are the unpatched model's.
- MLP activation: every `NewGELUActivation` (GPT-2's `gelu_new`, transformers' tanh GELU
  written as eight elementwise ops, each a kernel launch and, when training, a saved tensor)
  gets an instance `forward` that calls `F.gelu(x, approximate="tanh")`: torch's one fused
  kernel for the same function, which pyminigpt's own model uses (the two differ by fp32
  rounding).
- Sampling in `generate` (the models that generate): `model.generate` becomes a wrapper that,
  for multinomial sampling (do_sample, one beam, no top-h), replaces transformers' temperature,
  top-k and top-p warpers by one `FusedSamplingWarper` placed where they would have been (after
  every other logits processor). It keeps exactly the logits those three warpers keep, with the
  same values, so HF's own softmax + `torch.multinomial` draw, which stays, gives the same
  tokens for the same seed. Greedy and beam search are left to transformers.

A module that already has an instance `forward` (another patch, a hook library) is left as it
is. What was changed is recorded on the model (`model._pyminigpt_patch`), so `unpatch_hf_gpt2`
restores exactly that; patching a patched model does nothing.
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

PATCH_ATTRIBUTE = "_pyminigpt_patch"
IMPLEMENTATION_PREFIX = "pyminigpt+"
# the implementations the wrapper knows how to fall back to and whose masks it reads
WRAPPED_IMPLEMENTATIONS = ("eager", "sdpa")


class FusedSamplingWarper:
    """transformers' Temperature -> TopK -> TopP warpers as one `LogitsProcessor` on `ops.top_k_top_p_filter`.

    scores (B, V) -> scores / temperature with every entry those warpers remove set to -inf.
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_tokens_to_keep: int = 1):
        self.temperature = ops.validate.positive_float("temperature", temperature)
        self.top_k = ops.validate.top_k(top_k)
        self.top_p = ops.validate.top_p(top_p)
        self.min_tokens_to_keep = ops.validate.min_tokens_to_keep(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            scores = scores / self.temperature
        return ops.top_k_top_p_filter(scores, self.top_k, self.top_p, self.min_tokens_to_keep)


# ---- projections ------------------------------------------------------------------------


def _projection_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`ops.linear` on the CPU, the only device with a linear kernel of ours; elsewhere the module's
    own forward, which is what `ops.linear` would end in anyway, without its dispatch."""
    if x.device.type != "cpu":
        return type(module).forward(module, x)
    weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()  # Conv1D stores (in, out)
    return ops.linear(x, weight, module.bias)


def _is_projection(module: nn.Module) -> bool:
    """transformers' Conv1D layers and nn.Linear ones, of exactly those types: a subclass (a
    quantized Linear, say) computes something else."""
    from transformers.pytorch_utils import Conv1D

    return type(module) in (Conv1D, nn.Linear)


# ---- layer norm -------------------------------------------------------------------------


def _layer_norm_forward(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return ops.layer_norm(x, module.weight, module.bias, module.eps)


def _is_patchable_layer_norm(module: nn.Module) -> bool:
    """The layer norms ops.layer_norm computes: affine with a bias, over the last dim only."""
    return (
        isinstance(module, nn.LayerNorm)
        and len(module.normalized_shape) == 1
        and module.weight is not None
        and module.bias is not None
    )


# ---- activation -------------------------------------------------------------------------


def _gelu_tanh_forward(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _is_gelu_new(module: nn.Module) -> bool:
    """GPT-2's gelu_new activation (transformers' NewGELUActivation)."""
    from transformers.activations import NewGELUActivation

    return isinstance(module, NewGELUActivation)


# ---- attention --------------------------------------------------------------------------


class _AttentionConfig:
    """A patched `GPT2Attention`'s `config`: the model's config object, read and written live, except
    that `_attn_implementation` names pyminigpt's wrapper of the implementation the config names.

    Only this module sees the wrapper's name; the config itself, and every other model that shares
    it, keep what the user chose.
    """

    __slots__ = ("config",)

    def __init__(self, config):
        object.__setattr__(self, "config", config)

    @property
    def _attn_implementation(self):
        chosen = self.config._attn_implementation
        return IMPLEMENTATION_PREFIX + chosen if chosen in WRAPPED_IMPLEMENTATIONS else chosen

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "config"), name)

    def __setattr__(self, name, value):
        setattr(self.config, name, value)

    def __delattr__(self, name):
        delattr(self.config, name)

    def __reduce__(self):  # pickling a patched model: a view of the unpickled config
        return (type(self), (self.config,))

    def __copy__(self):
        return type(self)(self.config)

    def __deepcopy__(self, memo):  # copy.deepcopy(model): a view of the copied config
        return type(self)(copy.deepcopy(self.config, memo))

    def __repr__(self):
        return f"_AttentionConfig({self.config!r})"


def _is_attention(module: nn.Module) -> bool:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    return isinstance(module, GPT2Attention)


def _recording_attention_weights() -> bool:
    """Whether the running forward collects attention weights (`output_attentions=True`)."""
    from transformers.utils.output_capturing import _active_collector

    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _blocks_only_the_future(mask: torch.Tensor, tq: int, tk: int) -> bool:
    """Whether `mask` (B or 1, 1, Tq, Tk) is the causal mask: query i sees exactly keys j <= i + Tk - Tq.

    A bool mask marks the keys seen with True; a float mask adds 0 there and its dtype's lowest
    value (or -inf) elsewhere, so that those keys get exactly zero weight. One read to the host.
    """
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (tq, tk):
        return False
    causal = torch.ones(tq, tk, dtype=torch.bool, device=mask.device).tril(tk - tq)
    if mask.dtype == torch.bool:
        return bool((mask == causal).all())
    if not mask.is_floating_point():
        return False
    seen, blocked = mask == 0, mask <= torch.finfo(mask.dtype).min
    return bool(((seen == causal) & (blocked != causal)).all())


# the last mask `_is_causal_mask` read and its answer: every layer of a forward gets the same mask
_last_mask_checked: list = [lambda: None, None, False]  # weakref to the mask, (its _version, Tq, Tk), the answer


def _is_causal_mask(mask: torch.Tensor, tq: int, tk: int) -> bool:
    """`_blocks_only_the_future`, read once per mask tensor (one host read a forward, not one a layer)."""
    ref, key, answer = _last_mask_checked
    if ref() is mask and key == (mask._version, tq, tk):
        return answer
    answer = _blocks_only_the_future(mask, tq, tk)
    _last_mask_checked[:] = [weakref.ref(mask), (mask._version, tq, tk), answer]
    return answer


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *, original: str, **kwargs):
    """transformers' attention-function signature: q (B, H, Tq, D), k/v (B, H, Tk, D) -> ((B, Tq, H, D), weights).

    Weights are None from the kernel (as from SDPA); the original implementation gives its own.
    """
    tq, tk = query.shape[2], key.shape[2]
    if (
        dropout == 0.0
        and getattr(module, "is_causal", False)
        and tq <= tk
        and not _recording_attention_weights()
        and (attention_mask is None or (not torch.compiler.is_compiling() and _is_causal_mask(attention_mask, tq, tk)))
    ):
        return ops.causal_attention(query, key, value, scaling).transpose(1, 2), None
    if original == "eager" and getattr(module, "reorder_and_upcast_attn", False):
        return module._upcast_and_reordered_attn(query, key, value, attention_mask)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    fallback = ALL_ATTENTION_FUNCTIONS.get_interface(original, eager_attention_forward)
    return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _register_attention() -> None:
    """Register 'pyminigpt+<original>' for each wrapped implementation in transformers' AttentionInterface.

    Only an `_AttentionConfig` names them, so only patched modules reach them.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for original in WRAPPED_IMPLEMENTATIONS:
        if IMPLEMENTATION_PREFIX + original not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(
                IMPLEMENTATION_PREFIX + original, functools.partial(_attention, original=original)
            )


# ---- generate ---------------------------------------------------------------------------


def _patched_generate(model, original_generate, *args, generation_config=None, logits_processor=None, **kwargs):
    """model.generate with the sampling warpers fused (see the module docstring); the rest is transformers'."""
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    if not config.do_sample or (config.num_beams or 1) > 1 or config.top_h is not None:
        return original_generate(
            *args, generation_config=generation_config, logits_processor=logits_processor, **kwargs
        )
    warper = FusedSamplingWarper(config.temperature or 1.0, config.top_k or 0, config.top_p or 1.0)
    config.temperature, config.top_k, config.top_p = 1.0, 0, 1.0  # transformers adds none of the three
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList([*(logits_processor or []), warper])
    return original_generate(*args, generation_config=config, logits_processor=processors, **model_kwargs)


# ---- patch / unpatch ----------------------------------------------------------------------


def _check_gpt2(model) -> None:
    from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel

    if not isinstance(model, GPT2PreTrainedModel):
        raise TypeError(
            "model must be a transformers GPT-2 model (GPT2Model, GPT2LMHeadModel, GPT2DoubleHeadsModel or a "
            f"GPT2For* head), got {type(model).__name__}"
        )


def patch_hf_gpt2(model):
    """Run `model` (a transformers GPT-2 model of any class) on pyminigpt's kernels, in place; returns model.

    Patching an already patched model does nothing. See the module docstring for what changes.
    """
    _check_gpt2(model)
    if hasattr(model, PATCH_ATTRIBUTE):
        return model
    _register_attention()
    forwards, attentions = [], []
    for module in model.modules():
        if _is_attention(module) and not isinstance(module.config, _AttentionConfig):
            module.config = _AttentionConfig(module.config)
            attentions.append(module)
        if "forward" in vars(module):  # patched already (a patched submodel), or someone else's forward
            continue
        if _is_projection(module):
            module.forward = functools.partial(_projection_forward, module)
        elif _is_patchable_layer_norm(module):
            module.forward = functools.partial(_layer_norm_forward, module)
        elif _is_gelu_new(module):
            module.forward = _gelu_tanh_forward
        else:
            continue
        forwards.append(module)
    wraps_generate = hasattr(model, "generate")  # the heads that generate (LM, double heads)
    own_generate = vars(model).get("generate")  # an instance generate of the user's, restored on unpatch
    if wraps_generate:
        original_generate = model.generate
        model.generate = functools.wraps(original_generate)(
            functools.partial(_patched_generate, model, original_generate)
        )
    record = {"forwards": forwards, "attentions": attentions, "generate": wraps_generate, "own_generate": own_generate}
    setattr(model, PATCH_ATTRIBUTE, record)
    return model


def unpatch_hf_gpt2(model):
    """Undo `patch_hf_gpt2`: the original projections, layer norms, activations, attention and generate; returns model.

    The config is not touched, so whatever implementation the user has set since stays set.
    """
    _check_gpt2(model)
    record = getattr(model, PATCH_ATTRIBUTE, None)
    if record is None:
        raise ValueError(f"model ({type(model).__name__}) is not patched by pyminigpt.patch_hf_gpt2")
    for module in record["forwards"]:
        del module.forward
    for module in record["attentions"]:
        module.config = module.config.config
    if record["generate"]:
        if record["own_generate"] is None:
            del model.generate
        else:
            model.generate = record["own_generate"]
    delattr(model, PATCH_ATTRIBUTE)
    return model
