"""End-to-end benchmarks on a GPT-2-124M-shaped model with random weights: text generation
and a training step, pyminigpt against transformers and the classic eager loop.

Generation (prompt 32 tokens, 128 new, batch 1 and 8; greedy, and sampling with top-k 50 /
top-p 0.9), one group per setting:
    eager                 the no-cache loop of the classic mini-GPT notebooks: the whole sequence
                          through the model for every new token, logits of every position,
                          softmax + torch.multinomial (pyminigpt's model on the reference ops)
    transformers          GPT2LMHeadModel.generate, KV cache on (the peer)
    transformers+patch    the same model after pyminigpt.patch_hf_gpt2
    pyminigpt             GPT.generate, fp32 weights
    pyminigpt-bf16        GPT.generate, bf16 weights
    transformers-bf16, transformers+patch-bf16    on CUDA only: the peer in bf16, unpatched and patched
Every member reports tokens/s and the memory-bandwidth bound of decoding: each step reads
every weight once (the KV cache is small next to them), so tokens/s <= batch * copy
bandwidth / weight bytes. All members stop at exactly max_new_tokens (no eos token).

Training step (fwd + bwd + AdamW, batch 4 x T=256, dropout 0): eager (pyminigpt's model on
the reference ops), transformers (the peer), transformers+patch, pyminigpt. Every member steps
the fused AdamW, which transformers' Trainer (torch >= 2.8) and pyminigpt's Trainer use by default.

    pytest bench/test_bench_e2e.py --benchmark-group-by=group
    PYMINIGPT_BENCH_QUICK=1 pytest bench/test_bench_e2e.py    # a tiny model and few tokens, for CI
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from bench_utils import DEVICE, sync

import pyminigpt
from pyminigpt import GPT, ops
from pyminigpt.ops import reference

QUICK = os.environ.get("PYMINIGPT_BENCH_QUICK", "") not in ("", "0")
if QUICK:
    MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512, "n_positions": 64}
    PROMPT, NEW_TOKENS, TRAIN_BATCH, TRAIN_T, ROUNDS = 8, 8, 2, 32, 1
else:
    MODEL = {}  # GPT2Config's defaults: GPT-2 small, 124M parameters
    PROMPT, NEW_TOKENS, TRAIN_BATCH, TRAIN_T, ROUNDS = 32, 128, 4, 256, 2
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
SAMPLING = {"greedy": {"do_sample": False}, "sample": {"do_sample": True, "top_k": 50, "top_p": 0.9}}
GENERATE_MEMBERS = ["eager", "transformers", "transformers+patch", "pyminigpt", "pyminigpt-bf16"]
if DEVICE == "cuda":  # on a GPU both libraries are usually run in bf16: compare them there too
    GENERATE_MEMBERS += ["transformers-bf16", "transformers+patch-bf16"]
TRAIN_MEMBERS = ["eager", "transformers", "transformers+patch", "pyminigpt"]


def _hf_model(patched: bool = False):
    torch.manual_seed(0)
    config = transformers.GPT2Config(**MODEL, **NO_DROPOUT, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).to(DEVICE)
    return pyminigpt.patch_hf_gpt2(model) if patched else model


def _model(member: str):
    """(model, dtype of its weights) for a member; pyminigpt members get the peer's very weights."""
    dtype = torch.bfloat16 if member.endswith("-bf16") else torch.float32
    if member.startswith("transformers"):
        return _hf_model(patched="+patch" in member).to(dtype), dtype
    return GPT.from_hf(_hf_model()).to(dtype), dtype


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes (pyminigpt's GPT or transformers' GPT2LMHeadModel) of weights one decode step reads: every parameter once, but a single row of the position table."""
    positions = model.transformer.wpe.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - positions.numel() * positions.element_size()


def naive_generate(model: GPT, input_ids: torch.Tensor, max_new_tokens: int, do_sample=False, top_k=0, top_p=1.0):
    """The classic notebook loop: no KV cache, the whole sequence through the model per token."""
    with ops.use_backend("reference"), torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids).logits[:, -1, :]
            if do_sample:
                probs = torch.softmax(reference.top_k_top_p_filter(logits, top_k, top_p), dim=-1)
                next_token = torch.multinomial(probs, 1)
            else:
                next_token = logits.argmax(dim=-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=1)
    return input_ids


def _generator(member: str, model, settings: dict):
    if member == "eager":
        return lambda ids: naive_generate(model, ids, NEW_TOKENS, **settings)
    if member.startswith("transformers"):
        return lambda ids: model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, **settings
        )
    return lambda ids: model.generate(ids, max_new_tokens=NEW_TOKENS, **settings)


def _report_tokens_per_second(benchmark, tokens: int) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return None
    tokens_per_second = tokens / stats.stats.median
    benchmark.extra_info["tokens/s"] = round(tokens_per_second, 2)
    return tokens_per_second


@pytest.mark.parametrize("member", GENERATE_MEMBERS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", list(SAMPLING))
def test_generate(benchmark, copy_bandwidth, member, batch, mode):
    benchmark.group = f"generate {mode} B{batch} prompt{PROMPT} new{NEW_TOKENS}"
    benchmark.extra_info["role"] = {"eager": "eager", "transformers": "peer"}.get(member, "member")
    model, dtype = _model(member)
    model.eval()
    input_ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device=DEVICE)
    generate = _generator(member, model, SAMPLING[mode])

    def run():
        out = generate(input_ids)
        sync()
        return out

    out = benchmark.pedantic(run, rounds=1 if member == "eager" else ROUNDS, warmup_rounds=int(member != "eager"))
    assert out.shape == (batch, PROMPT + NEW_TOKENS)
    tokens_per_second = _report_tokens_per_second(benchmark, batch * NEW_TOKENS)
    if tokens_per_second is not None:
        bound = batch * copy_bandwidth / weight_bytes(model)
        benchmark.extra_info["weights"] = str(dtype).removeprefix("torch.")
        benchmark.extra_info["bound tokens/s"] = round(bound, 2)
        benchmark.extra_info["fraction_of_bound"] = round(tokens_per_second / bound, 3)


@pytest.mark.parametrize("member", TRAIN_MEMBERS)
def test_train_step(benchmark, member):
    benchmark.group = f"train step B{TRAIN_BATCH} T{TRAIN_T} fp32 AdamW"
    benchmark.extra_info["role"] = {"eager": "eager", "transformers": "peer"}.get(member, "member")
    model, _ = _model(member)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # both libraries' trainers' default
    input_ids = torch.randint(0, model.config.vocab_size, (TRAIN_BATCH, TRAIN_T), device=DEVICE)
    backend = "reference" if member == "eager" else "auto"

    def step():
        with ops.use_backend(backend):
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
        sync()
        return loss

    loss = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    assert torch.isfinite(loss)
    _report_tokens_per_second(benchmark, TRAIN_BATCH * TRAIN_T)
