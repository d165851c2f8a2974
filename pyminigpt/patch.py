"""Switch a live transformers `GPT2LMHeadModel` to pyminigpt's kernels, in place, and back.

    patch_hf_gpt2(model)    # projections, layer norms, attention, the GELU and sampling on our kernels
    unpatch_hf_gpt2(model)  # exactly the model it was before

What changes (nothing else does; the weights are not touched or copied):

- Projections: every transformers `Conv1D` (GPT-2's attention and MLP projections, y = x W + b
  with W stored (in, out)) and the `nn.Linear` LM head get an instance `forward` that calls
  `ops.linear` on CPU tensors (Conv1D's with `W.t()`, a view in nn.Linear's layout): a decode
  step's few rows then run on the kernel that streams each weight once (csrc/cpu/linear.cpp,
  which reads Conv1D's layout in place); more rows run on torch's matmul, the same call
  transformers makes (`F.linear(x, W.t(), b)` is `addmm(b, x, W)`). On other devices, where
  pyminigpt has no linear kernel, the module's own forward runs.
- Layer norms: every `nn.LayerNorm` of the model gets an instance `forward` that calls
  `ops.layer_norm` (forward and backward kernels).
- Attention: the model's `config._attn_implementation` is set to `"pyminigpt+<original>"`,
  an implementation registered in transformers' `AttentionInterface` (and its mask in
  `AttentionMaskInterface`). Its mask is SDPA's, which is None when the mask would be purely
  causal (no padding; prefill or single-token decode); then `ops.causal_attention` runs.
  Otherwise (padding, a prefill that continues a cache) the original implementation runs
  with its own mask; attention dropout while training (no mask) runs on transformers' SDPA. Like SDPA it
  returns no attention weights (`output_attentions` needs the unpatched, eager model).
- MLP activation: every `NewGELUActivation` (GPT-2's `gelu_new`, transformers' tanh GELU
  written as eight elementwise ops, each a kernel launch and, when training, a saved tensor)
  gets an instance `forward` that calls `F.gelu(x, approximate="tanh")`: torch's one fused
  kernel for the same function, which pyminigpt's own model uses (the two differ by fp32
  rounding, at most 2.4e-7 over 3M normal inputs). Forward + backward over (4, 256, 3072)
  on the 2-core CPU: 22 ms -> 6 ms per layer.
- Sampling in `generate`: `model.generate` becomes a wrapper that, for multinomial sampling
  (do_sample, one beam, no top-h), replaces transformers' temperature, top-k and top-p
  warpers by one `FusedSamplingWarper` placed where they would have been (after every other
  logits processor). It keeps exactly the logits those three warpers keep, with the same
  values, so HF's own softmax + `torch.multinomial` draw, which stays, gives the same tokens
  for the same seed. Greedy and beam search are left to transformers.

The originals are kept on the model (`model._pyminigpt_patch`), so `unpatch_hf_gpt2` restores
them exactly; patching a patched model does nothing.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

PATCH_ATTRIBUTE = "_pyminigpt_patch"
IMPLEMENTATION_PREFIX = "pyminigpt+"


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
    own forward, which is what `ops.linear` would end in anyway (minus its dispatch, ~6 us a call)."""
    if x.device.type != "cpu":
        return type(module).forward(module, x)
    weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()  # Conv1D stores (in, out)
    return ops.linear(x, weight, module.bias)


def _patchable_projections(model: nn.Module) -> list[nn.Module]:
    """transformers' Conv1D layers and the nn.Linear ones (the LM head), of exactly those types:
    a subclass (a quantized Linear, say) computes something else."""
    from transformers.pytorch_utils import Conv1D

    return [m for m in model.modules() if type(m) in (Conv1D, nn.Linear)]


# ---- layer norm -------------------------------------------------------------------------


def _layer_norm_forward(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return ops.layer_norm(x, module.weight, module.bias, module.eps)


def _patchable_layer_norms(model: nn.Module) -> list[nn.LayerNorm]:
    """The layer norms ops.layer_norm computes: affine with a bias, over the last dim only."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and m.weight is not None and m.bias is not None
    ]


# ---- activation -------------------------------------------------------------------------


def _gelu_tanh_forward(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _patchable_activations(model: nn.Module) -> list[nn.Module]:
    """GPT-2's gelu_new activations (transformers' NewGELUActivation)."""
    from transformers.activations import NewGELUActivation

    return [m for m in model.modules() if isinstance(m, NewGELUActivation)]


# ---- attention --------------------------------------------------------------------------


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *, original: str, **kwargs):
    """transformers' attention-function signature: q (B, H, Tq, D), k/v (B, H, Tk, D) -> ((B, Tq, H, D), None)."""
    if attention_mask is None:  # purely causal (see _mask)
        if dropout == 0.0 and getattr(module, "is_causal", False):
            return ops.causal_attention(query, key, value, scaling).transpose(1, 2), None
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        # attention dropout while training: SDPA reads a None mask as causal (eager would need a mask)
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if original == "eager" and getattr(module, "reorder_and_upcast_attn", False):
        return module._upcast_and_reordered_attn(query, key, value, attention_mask)
    fallback = _attention_function(original)
    return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _attention_function(name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager_attention_forward)


def _mask_function(name: str):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[name]


def _mask(*, original: str, **kwargs):
    """None where the mask is purely causal (SDPA's test), else the original implementation's mask."""
    from transformers.masking_utils import sdpa_mask

    if sdpa_mask(**kwargs) is None:
        return None
    return _mask_function(original)(**kwargs)


def _register_attention(original: str) -> str:
    """Register 'pyminigpt+<original>' with transformers (once per original); return the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = IMPLEMENTATION_PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, functools.partial(_attention, original=original))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, functools.partial(_mask, original=original))
    return name


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
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "gpt2" or not hasattr(model, "generate"):
        raise TypeError(f"model must be a transformers GPT2LMHeadModel (a GPT-2 config), got {type(model).__name__}")


def patch_hf_gpt2(model):
    """Run `model` (a transformers GPT2LMHeadModel) on pyminigpt's kernels, in place; returns model.

    Patching an already patched model does nothing. See the module docstring for what changes.
    """
    _check_gpt2(model)
    if hasattr(model, PATCH_ATTRIBUTE):
        return model
    original_attention = model.config._attn_implementation or "eager"
    if original_attention.startswith(IMPLEMENTATION_PREFIX):
        raise ValueError(
            f"model.config._attn_implementation is already {original_attention!r} but the model has no patch record"
        )
    projections = _patchable_projections(model)
    for projection in projections:
        projection.forward = functools.partial(_projection_forward, projection)
    norms = _patchable_layer_norms(model)
    for norm in norms:
        norm.forward = functools.partial(_layer_norm_forward, norm)
    activations = _patchable_activations(model)
    for activation in activations:
        activation.forward = _gelu_tanh_forward
    model.config._attn_implementation = _register_attention(original_attention)
    had_own_generate = "generate" in vars(model)
    original_generate = model.generate
    model.generate = functools.wraps(original_generate)(functools.partial(_patched_generate, model, original_generate))
    setattr(
        model,
        PATCH_ATTRIBUTE,
        {
            "attention": original_attention,
            "projections": projections,
            "norms": norms,
            "activations": activations,
            "generate": original_generate if had_own_generate else None,
        },
    )
    return model


def unpatch_hf_gpt2(model):
    """Undo `patch_hf_gpt2`: the original projections, layer norms, activations, attention and generate; returns model."""
    _check_gpt2(model)
    record = getattr(model, PATCH_ATTRIBUTE, None)
    if record is None:
        raise ValueError("model is not patched by pyminigpt.patch_hf_gpt2")
    for module in (*record["projections"], *record["norms"], *record["activations"]):
        del module.forward
    model.config._attn_implementation = record["attention"]
    if record["generate"] is None:
        del model.generate
    else:
        model.generate = record["generate"]
    delattr(model, PATCH_ATTRIBUTE)
    return model
