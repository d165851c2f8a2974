"""`pyminigpt export MODEL --format gguf --dtype f32|f16|q8_0|q4_0 --out FILE`: a model for llama.cpp.

Writes one GGUF file (llama.cpp's `gpt2` architecture) with the `gguf` package, so a trained or
fine-tuned model runs in llama.cpp, llama-cpp-python, or anything else that reads GGUF.

Layout. pyminigpt's projections are `nn.Linear` weights (out, in): exactly GGUF's row-major
layout (ggml calls the shape (in, out)), so every tensor is written as it is, no transpose.

| pyminigpt | GGUF |
|---|---|
| transformer.wte / wpe | token_embd / position_embd |
| h.N.ln_1, ln_2 | blk.N.attn_norm, blk.N.ffn_norm |
| h.N.attn.c_attn, c_proj | blk.N.attn_qkv, blk.N.attn_output |
| h.N.mlp.c_fc, c_proj | blk.N.ffn_up, blk.N.ffn_down |
| transformer.ln_f | output_norm |
| lm_head (only when untied) | output (llama.cpp reuses token_embd when it is absent) |

dtype: the 2-D weights in f32, f16, q8_0 (int8 in blocks of 32, one f16 scale each) or q4_0
(4 bits in blocks of 32); norms and biases always f32 (what llama.cpp's own converter does).
A quantized type needs rows whose length is a multiple of 32; other rows are written in f16.

Tokenizer. A byte-level BPE tokenizer (GPT-2's, or one `pyminigpt train` learned) is written as
llama.cpp's "gpt2" tokenizer (tokens, merges, special tokens), so llama.cpp encodes text itself.
Any other tokenizer (the character one) is left out: the file says "no vocabulary", and llama.cpp
takes token ids, which pyminigpt's tokenizer gives.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

DTYPES = ("f32", "f16", "q8_0", "q4_0")
FORMATS = ("gguf",)
BLOCK = 32  # the block length of q8_0 and q4_0
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # what llama.cpp's GPT-2 graph computes (ggml_gelu)


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> the model's tensor (as stored: Linear weights (out, in))."""
    t = model.transformer
    tensors = {"token_embd.weight": t.wte.weight, "position_embd.weight": t.wpe.weight}
    for i, block in enumerate(t.h):
        for ours, theirs in (
            (block.ln_1, "attn_norm"),
            (block.attn.c_attn, "attn_qkv"),
            (block.attn.c_proj, "attn_output"),
            (block.ln_2, "ffn_norm"),
            (block.mlp.c_fc, "ffn_up"),
            (block.mlp.c_proj, "ffn_down"),
        ):
            tensors[f"blk.{i}.{theirs}.weight"] = ours.weight
            tensors[f"blk.{i}.{theirs}.bias"] = ours.bias
    tensors["output_norm.weight"], tensors["output_norm.bias"] = t.ln_f.weight, t.ln_f.bias
    if model.lm_head.weight.data_ptr() != t.wte.weight.data_ptr():
        tensors["output.weight"] = model.lm_head.weight
    return tensors


def tensor_type(tensor: torch.Tensor, dtype: str):
    """The GGML type one tensor is written in: f32 for 1-D, else `dtype` (f16 where a row does not fit in blocks)."""
    from gguf import GGMLQuantizationType as Q

    if tensor.dim() == 1 or dtype == "f32":
        return Q.F32
    if dtype == "f16" or tensor.shape[-1] % BLOCK:
        return Q.F16
    return {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[dtype]


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> str:
    """Write the tokenizer (see the module docstring); returns which kind was written."""
    hf = tokenizer.to_tokenizers() if tokenizer is not None else None
    spec = json.loads(hf.to_str()) if hf is not None else {}
    model, pre = spec.get("model") or {}, json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        writer.add_tokenizer_model("none")
        writer.add_vocab_size(vocab_size)
        return "none (token ids only)"
    from gguf import TokenType

    id_to_token = {i: tok for tok, i in hf.get_vocab(with_added_tokens=True).items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):  # a model may have more rows than the tokenizer has tokens: pad them
        tokens.append(id_to_token.get(i, f"[PAD{i}]"))
        types.append(TokenType.CONTROL if i in special else TokenType.NORMAL if i in id_to_token else TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, name in ((writer.add_bos_token_id, "sos_token"), (writer.add_eos_token_id, "eos_token")):
        token = getattr(tokenizer, name, None)
        if token is not None and hf.token_to_id(token) is not None:
            setter(hf.token_to_id(token))
    return f"gpt2 byte-level BPE ({len(id_to_token)} tokens, {len(merges)} merges)"


def export_gguf(model, path, dtype: str = "f32", tokenizer=None, name: str = "pyminigpt") -> dict:
    """Write `model` (pyminigpt's GPT) to a GGUF file at `path`; returns {"tensors", "bytes", "tokenizer"}.

    Raises ValueError for a dtype not in DTYPES, or a model llama.cpp's GPT-2 graph would compute
    differently (an activation other than tanh-approximated GELU)."""
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    config = model.config
    if config.activation_function not in TANH_GELU:
        raise ValueError(
            f"llama.cpp's GPT-2 computes tanh-approximated GELU; this model's activation_function is "
            f"{config.activation_function!r} (supported: {TANH_GELU})"
        )
    path = Path(path)
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_name(name)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner if config.n_inner is not None else 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}[dtype]
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kind = _add_tokenizer(writer, tokenizer, config.vocab_size)
    for tensor_name, tensor in gguf_tensors(model).items():
        qtype = tensor_type(tensor, dtype)
        data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(tensor_name, packed, raw_shape=packed.shape, raw_dtype=qtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": len(gguf_tensors(model)), "bytes": path.stat().st_size, "tokenizer": kind}


def run(args) -> int:
    from .runs import UsageError, load_model

    if importlib.util.find_spec("gguf") is None:
        raise UsageError("export --format gguf needs the gguf package: pip install gguf")
    loaded = load_model(args.model, torch.device("cpu"), args.tokenizer)
    try:
        info = export_gguf(loaded.model.float(), args.out, args.dtype, loaded.tokenizer, name=Path(args.model).name)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(
        f"wrote {args.out}: {info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB, weights {args.dtype}, "
        f"tokenizer {info['tokenizer']}"
    )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `export` on the `pyminigpt` command's subparsers."""
    p = subparsers.add_parser(
        "export",
        help="write a model for another engine (GGUF, for llama.cpp)",
        description="Write MODEL (a run, checkpoint or GPT-2 directory) as one GGUF file that llama.cpp "
        "runs (architecture gpt2). --dtype picks the 2-D weights' type: f32, f16, q8_0 or q4_0 "
        "(norms and biases stay f32).",
    )
    p.add_argument("model", help="run directory, checkpoint directory, or GPT-2 directory")
    p.add_argument("--format", default="gguf", choices=FORMATS, help="file format (default gguf)")
    p.add_argument("--dtype", default="f16", choices=DTYPES, help="weight type (default f16)")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.gguf")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the run's tokenizer.json)")
    p.set_defaults(run=run)
    return p
