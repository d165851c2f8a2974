"""8-bit and 4-bit weights for inference: the format, the quantizer, the module and the file.

    model.quantize_("int8")                  # or "int4", group_size=32 | 64 | 128
    GPT.from_pretrained(directory, weights="int4")

Every projection of the model (attention, MLP and the tied LM head) becomes a `QuantizedLinear`,
whose product `ops.quantized_linear` computes. The embeddings and layer norms keep their dtype. A
quantized model is for inference: it refuses `model.train()`.

The format (the layout the kernels read; `pyminigpt/ops/reference.py::dequantize` is its definition):

- **int8**, symmetric: `qweight` int8 (N, K), w[n, k] = qweight[n, k] * scales[n, g], g = k // group_size,
  with scales = max |w| over the group / 127 and qweight = round(w / scale) in [-127, 127]. The default
  group is the whole row (one scale per output channel): int8's step is fine enough that smaller groups
  do not change the perplexity (bench/RESULTS.md), and one scale per row keeps the decode loop free of
  per-group work.
- **int4**, with zero points: `qweight` uint8 (N, K / 2), two weights per byte, w[n, k] = q[n, k] *
  scales[n, g] + offsets[n, g] with q in [0, 15], scales = (max - min) / 15 over the group and offsets =
  min. Within each run of 32 weights (16 bytes), byte i holds weight i in its low nibble and weight
  16 + i in its high nibble, so that a vector of 16 bytes unpacks into two vectors of consecutive
  weights with one mask and one shift. The default group is 64 weights (see bench/RESULTS.md for 32 /
  64 / 128); groups are multiples of 32 and must divide the input width.
- scales and offsets are fp32 (N, K / group_size) whatever the model's dtype; the bias keeps the model's.

Quantizing is a deterministic function of the fp32 weights (round to nearest), so every weight is
within half a step (scale / 2) of its original. On disk (`save_pretrained`): config.json with a
`quantization_config` and model.safetensors with the quantized tensors, the format in the safetensors
metadata (`FORMAT_VERSION`); loading reads them back bit for bit, without requantizing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import ops
from .ops.reference import dequantize

FORMATS = ("int8", "int4")
WEIGHT_CHOICES = ("fp32", "bf16", *FORMATS)  # what --weights and from_pretrained(weights=) take
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 64}  # None: one group per output channel (the whole row)
INT4_GROUP_SIZES = (32, 64, 128)
FORMAT_VERSION = 1
METADATA_KEY = "pyminigpt_quantization"


def check_format(weights: str, group_size: int | None = None) -> int | None:
    """The group size for `weights` ("int8" / "int4"): ValueError naming the argument for anything else."""
    if weights not in FORMATS:
        raise ValueError(f"weights must be one of {', '.join(map(repr, FORMATS))}, got {weights!r}")
    if group_size is None:
        return DEFAULT_GROUP_SIZE[weights]
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    if weights == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size for int4 must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if weights == "int8" and (group_size <= 0 or group_size % 32):
        raise ValueError(
            f"group_size for int8 must be a positive multiple of 32 (or None: per channel), got {group_size}"
        )
    return group_size


def quantize_weight(weight: torch.Tensor, weights: str, group_size: int | None = None):
    """(qweight, scales, offsets) of an (N, K) weight in the format above; offsets is None for int8.

    Computed in fp32 from the weight, rounding to nearest: the same weight gives the same bits.
    """
    group_size = check_format(weights, group_size)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    group = k if group_size is None else group_size
    if k == 0 or k % group:
        raise ValueError(
            f"group_size={group_size} does not divide the input width K={k} of a weight {tuple(weight.shape)}"
        )
    w = weight.detach().to(torch.float32).reshape(n, k // group, group)
    if weights == "int8":
        scales = w.abs().amax(dim=-1) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: q = 0 anyway
        q = torch.round(w / scales[..., None]).clamp_(-127, 127).to(torch.int8)
        return q.reshape(n, k).contiguous(), scales.contiguous(), None
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = (hi - lo) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # a constant group: q = 0, w = offset
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8).reshape(n, k // 32, 2, 16)
    packed = q[:, :, 0, :] | (q[:, :, 1, :] << 4)  # byte i: weight i (low nibble), weight 16 + i (high)
    return packed.reshape(n, k // 2).contiguous(), scales.contiguous(), lo.contiguous()


class QuantizedLinear(nn.Module):
    """nn.Linear with 8-bit or 4-bit weights (the format above), computed by `ops.quantized_linear`."""

    def __init__(self, in_features: int, out_features: int, weights: str, group_size: int | None, bias: bool, dtype):
        super().__init__()
        group_size = check_format(weights, group_size)
        group = in_features if group_size is None else group_size
        if in_features % group:
            raise ValueError(f"group_size={group_size} does not divide the input width {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weights, self.group_size = weights, group_size
        packed = in_features if weights == "int8" else in_features // 2
        qdtype = torch.int8 if weights == "int8" else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, packed, dtype=qdtype))
        self.register_buffer("scales", torch.ones(out_features, in_features // group))
        self.register_buffer("offsets", torch.zeros(out_features, in_features // group) if weights == "int4" else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weights: str, group_size: int | None = None) -> QuantizedLinear:
        module = cls(
            linear.in_features, linear.out_features, weights, group_size, linear.bias is not None, linear.weight.dtype
        )
        qweight, scales, offsets = quantize_weight(linear.weight, weights, group_size)
        module.qweight.copy_(qweight)
        module.scales.copy_(scales)
        if offsets is not None:
            module.offsets.copy_(offsets)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module.to(linear.weight.device).train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quantized_linear(x, self.qweight, self.scales, self.offsets, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) fp32 weight this module multiplies by."""
        return dequantize(self.qweight, self.scales, self.offsets)

    def train(self, mode: bool = True) -> QuantizedLinear:
        if mode:
            raise ValueError(
                f"this model's weights are quantized ({self.weights}): it is for inference only. Train the "
                "fp32/bf16 model, then quantize it (or load it with weights='fp32')"
            )
        return super().train(False)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) converts floating buffers: the format's scales and offsets stay fp32 (they only move)
        scales, offsets = self.scales, self.offsets
        super()._apply(fn, recurse)
        device = self.qweight.device
        self.scales = scales.to(device)
        self.offsets = None if offsets is None else offsets.to(device)
        return self

    def extra_repr(self) -> str:
        group = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weights}, {group}"


def projections(model) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every projection: the four of each block and the LM head."""
    out = []
    for block in model.transformer.h:
        out += [(block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")]
    return out + [(model, "lm_head")]


def quantization_of(model) -> dict | None:
    """{"format", "group_size", "version"} of a quantized model, None for an fp32/bf16 one."""
    return getattr(model, "quantization", None)


def quantize_(model, weights: str, group_size: int | None = None):
    """Replace every projection of `model` by a QuantizedLinear, in place; returns the model, in eval mode.

    The tied LM head gets its own quantized copy of the token embedding (which stays as it was, for
    the lookup). ValueError for an unknown format, a group size that does not divide a projection's
    input width, or a model that is already quantized.
    """
    asked = group_size
    group_size = check_format(weights, group_size)
    done = quantization_of(model)
    if done is not None:
        raise ValueError(
            f"weights: this model is already quantized ({done['format']}); quantize the fp32/bf16 model once"
        )
    widths = [getattr(parent, name).in_features for parent, name in projections(model)]
    if asked is None and weights == "int4" and any(w % group_size for w in widths):
        group_size = INT4_GROUP_SIZES[0]  # the default group does not fit this model's widths: the smallest
    for (_parent, name), width in zip(projections(model), widths):  # check every width before changing anything
        if group_size is not None and width % group_size:
            raise ValueError(f"group_size={group_size} does not divide the input width {width} of {name}")
    for parent, name in projections(model):
        setattr(parent, name, QuantizedLinear.from_linear(getattr(parent, name), weights, group_size))
    model.quantization = {"format": weights, "group_size": group_size, "version": FORMAT_VERSION}
    return model.eval()


def save_quantized(model, directory) -> None:
    """config.json (with `quantization_config`) + model.safetensors holding the quantized tensors."""
    from safetensors.torch import save_file

    from .files import atomic_write
    from .hf.convert import config_to_hf_dict, generation_config_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = quantization_of(model)
    tensors = {key: t.detach().cpu().contiguous() for key, t in model.state_dict().items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(info, sort_keys=True)}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    config = {**config_to_hf_dict(model.config), "quantization_config": {"quant_method": "pyminigpt", **info}}
    for name, contents in (("config.json", config), ("generation_config.json", generation_config_dict(model.config))):
        atomic_write(directory / name, json.dumps(contents, indent=2, sort_keys=True) + "\n")


def saved_quantization(directory) -> dict | None:
    """The quantization recorded in a directory's model.safetensors, None for an fp32/bf16 checkpoint.

    ValueError for a format version this pyminigpt does not know.
    """
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        return None
    info = json.loads(raw)
    if info.get("version") != FORMAT_VERSION or info.get("format") not in FORMATS:
        raise ValueError(
            f"{str(path)!r} holds quantized weights of format {info.get('format')!r} version {info.get('version')!r}; "
            f"this pyminigpt reads version {FORMAT_VERSION} of {', '.join(FORMATS)}: re-quantize it from the fp32 model"
        )
    return info


def load_quantized(cls, directory, info: dict, device=None, dtype=None):
    """The quantized model saved in `directory` (its tensors read as saved: no requantizing)."""
    from safetensors.torch import load_file

    from .hf.convert import config_from_hf

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config", None)
    with torch.device("meta"):
        model = cls(config_from_hf(config))
    quantize_structure(model, info)
    state = load_file(directory / "model.safetensors")
    model.load_state_dict(state, strict=True, assign=True)
    model.quantization = dict(info)
    return model.to(device=device, dtype=dtype).eval()


def quantize_structure(model, info: dict) -> None:
    """Swap the projections for empty QuantizedLinear modules of the recorded format (for loading)."""
    for parent, name in projections(model):
        linear = getattr(parent, name)
        dtype = linear.weight.dtype
        with torch.device("meta"):
            module = QuantizedLinear(
                linear.in_features,
                linear.out_features,
                info["format"],
                info["group_size"],
                linear.bias is not None,
                dtype,
            )
        setattr(parent, name, module)


def load_pretrained(cls, name_or_path, weights: str | None = None, dtype=None, device=None, **kwargs):
    """`GPT.from_pretrained` with `weights`: None (as saved), "fp32", "bf16", "int8" or "int4"."""
    from .hf.convert import from_pretrained

    if weights is not None and weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHT_CHOICES))}, got {weights!r}")
    if weights in ("fp32", "bf16"):
        wanted = torch.float32 if weights == "fp32" else torch.bfloat16
        if dtype is not None and dtype != wanted:
            raise ValueError(f"weights={weights!r} contradicts dtype={dtype}")
        dtype = wanted
    info = saved_quantization(name_or_path) if not kwargs and Path(name_or_path).is_dir() else None
    if info is not None:
        if weights not in (None, info["format"]):
            raise ValueError(
                f"weights={weights!r}: {str(name_or_path)!r} is saved quantized as {info['format']}, which "
                "loads only as itself (load the fp32 checkpoint to choose another format)"
            )
        return load_quantized(cls, name_or_path, info, device=device, dtype=dtype)
    model = from_pretrained(cls, name_or_path, dtype=dtype, device=device, **kwargs)
    if weights in FORMATS:
        quantize_(model, weights)
    return model


def with_weights(model, weights: str | None):
    """model with its weights as `weights` says: None keeps them, "fp32" / "bf16" cast, "int8" / "int4" quantize.

    The one place the commands' --weights flag is applied (after loading, on the model's device).
    """
    if weights is None:
        return model
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHT_CHOICES))}, got {weights!r}")
    done = quantization_of(model)
    if done is not None:
        if weights != done["format"]:
            raise ValueError(
                f"weights={weights!r}: the model is saved quantized as {done['format']}, which loads only so"
            )
        return model
    if weights in FORMATS:
        return quantize_(model, weights)
    return model.to(torch.float32 if weights == "fp32" else torch.bfloat16)


def add_weights_argument(parser) -> None:
    """--weights fp32|bf16|int8|int4, for the commands that load a model (generate, chat, perplexity, ...)."""
    parser.add_argument(
        "--weights",
        choices=WEIGHT_CHOICES,
        default=None,
        help="run the model with fp32, bf16, int8 or int4 weights (int8/int4 quantize every projection "
        "on load; default: as saved)",
    )
