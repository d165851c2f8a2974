"""End-to-end benchmarks on a GPT-2-124M-shaped model with random weights: text generation
and a training step, pyminigpt against transformers and the classic eager loop.

Generation (prompt 32 tokens, 128 new, batch 1 and 8; greedy, and sampling with top-k 50 /
top-p 0.9), one group per setting:
    eager                 the no-cache loop of the classic mini-GPT notebooks: the whole sequence
                          through the model for every new token, logits of every position,
                          softmax + torch.multinomial (pyminigpt's model on the reference ops)
    transformers          GPT2LMHeadModel.generate, KV cache on (a peer)
    transformers+compile  the same through generate's torch.compile path: a static KV cache and
                          a compiled decode step (a peer; compiling happens in the warm-up round)
    transformers+patch    the same model after pyminigpt.patch_hf_gpt2
    ctranslate2-float32, ctranslate2-int8    CTranslate2's Generator on the converted weights, in
                          a worker process of its own (a peer; needs `pip install ctranslate2`,
                          else the test is skipped as "not installed" and the report says so)
    pyminigpt             GPT.generate, fp32 weights
    pyminigpt-bf16        GPT.generate, bf16 weights
    transformers-bf16, transformers+patch-bf16    on CUDA only: the peer in bf16, unpatched and patched
Every member reports tokens/s and the memory-bandwidth bound of decoding: each step reads
every weight once (the KV cache is small next to them), so tokens/s <= batch * read
bandwidth / weight bytes, the read bandwidth measured by torch.sum over a tensor far larger
than the last-level cache. All members stop at exactly max_new_tokens (no eos token).
bench/interleaved_decode.py measures the same members interleaved across processes.

Training step (fwd + bwd + AdamW, batch 4 x T=256, dropout 0): eager (pyminigpt's model on
the reference ops), transformers (the peer), transformers+patch, pyminigpt. Every member steps
the fused AdamW, which transformers' Trainer (torch >= 2.8) and pyminigpt's Trainer use by default.

    pytest pyminigpt/bench/test_bench_e2e.py --benchmark-group-by=group
    PYMINIGPT_BENCH_QUICK=1 pytest pyminigpt/bench/test_bench_e2e.py    # a tiny model and few tokens, for CI
"""

from __future__ import annotations

import os

import pytest
import torch

import pyminigpt
from pyminigpt import GPT, ops
from pyminigpt.bench.decode_peers import MEMBERS, PEERS, build_member, member_status, random_gpt2, weight_bytes
from pyminigpt.bench.utils import DEVICE, measure_read_bandwidth, sync
from pyminigpt.ops import reference

QUICK = os.environ.get("PYMINIGPT_BENCH_QUICK", "") not in ("", "0")
if QUICK:
    MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512, "n_positions": 64}
    PROMPT, NEW_TOKENS, TRAIN_BATCH, TRAIN_T, ROUNDS = 8, 8, 2, 32, 1
else:
    MODEL = {}  # GPT2Config's defaults: GPT-2 small, 124M parameters
    PROMPT, NEW_TOKENS, TRAIN_BATCH, TRAIN_T, ROUNDS = 32, 128, 4, 256, 2
SAMPLING = {"greedy": {"do_sample": False}, "sample": {"do_sample": True, "top_k": 50, "top_p": 0.9}}
GENERATE_MEMBERS = ["eager", *MEMBERS]
# `pyminigpt bench --weights W` keeps one pyminigpt member, with those weights (the peers all stay)
WEIGHTS = os.environ.get("PYMINIGPT_BENCH_WEIGHTS")
if WEIGHTS:
    OWN = {"fp32": "pyminigpt", "bf16": "pyminigpt-bf16", "int8": "pyminigpt-int8", "int4": "pyminigpt-int4"}
    GENERATE_MEMBERS = [m for m in GENERATE_MEMBERS if not m.startswith("pyminigpt") or m == OWN[WEIGHTS]]
if DEVICE == "cuda":  # on a GPU both libraries are usually run in bf16: compare them there too
    GENERATE_MEMBERS += ["transformers-bf16", "transformers+patch-bf16"]
TRAIN_MEMBERS = ["eager", "transformers", "transformers+patch", "pyminigpt"]


def _hf_model(patched: bool = False):
    model = random_gpt2(MODEL, DEVICE)
    return pyminigpt.patch_hf_gpt2(model) if patched else model


def _model(member: str):
    """(model, dtype of its weights) for a member; pyminigpt members get the peer's very weights."""
    dtype = torch.bfloat16 if member.endswith("-bf16") else torch.float32
    if member.startswith("transformers"):
        return _hf_model(patched="+patch" in member).to(dtype), dtype
    return GPT.from_hf(_hf_model()).to(dtype), dtype


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


@pytest.fixture(scope="module")
def read_bandwidth() -> float:
    """Bytes per second torch.sum reads from DRAM: the roof of a decode step."""
    return measure_read_bandwidth()


def _decode_member(request, member: str, settings: dict):
    """(generate(ids), weight bytes, dtype name) of a generate member; closed when the test ends."""
    if member == "eager":
        model = GPT.from_hf(_hf_model()).eval()
        return lambda ids: naive_generate(model, ids, NEW_TOKENS, **settings), weight_bytes(model), "float32"
    if member.endswith("-bf16") and member.startswith("transformers"):  # CUDA only
        model = _hf_model(patched="+patch" in member).to(torch.bfloat16).eval()

        def generate(ids):
            with torch.no_grad():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, **settings)

        return generate, weight_bytes(model), "bfloat16"
    if member_status(member) != "ok":
        pytest.skip(f"{member}: {member_status(member)}")
    if DEVICE != "cpu" and member.startswith("ctranslate2"):
        pytest.skip(f"{member}: its worker runs on the CPU only")
    generate, nbytes, close = build_member(member, MODEL, DEVICE)
    request.addfinalizer(close)
    quantized = {"ctranslate2-int8": "int8", "pyminigpt-int8": "int8", "pyminigpt-int4": "int4"}
    quantized.update({"torchao-int8": "int8", "torchao-int4": "int4"})
    dtype = {**quantized, "pyminigpt-bf16": "bfloat16"}.get(member, "float32")
    return lambda ids: generate(ids, max_new_tokens=NEW_TOKENS, **settings), nbytes, dtype


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
def test_generate(benchmark, request, read_bandwidth, member, batch, mode):
    benchmark.group = f"generate {mode} B{batch} prompt{PROMPT} new{NEW_TOKENS}"
    benchmark.extra_info["role"] = "eager" if member == "eager" else "peer" if member in PEERS else "member"
    generate, nbytes, dtype = _decode_member(request, member, SAMPLING[mode])
    vocab_size = MODEL.get("vocab_size", 50257)
    input_ids = torch.randint(0, vocab_size, (batch, PROMPT), device=DEVICE)

    def run():
        out = generate(input_ids)
        sync()
        return out

    out = benchmark.pedantic(run, rounds=1 if member == "eager" else ROUNDS, warmup_rounds=int(member != "eager"))
    assert out.shape == (batch, PROMPT + NEW_TOKENS)
    tokens_per_second = _report_tokens_per_second(benchmark, batch * NEW_TOKENS)
    if tokens_per_second is not None:
        bound = batch * read_bandwidth / nbytes
        benchmark.extra_info["weights"] = dtype
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
