"""The fast decode loop of `generate`: the static-shape step (the CUDA-graph path, run eagerly on
the CPU), eos read every few steps, and the kernels reading the KV cache in place. The oracle
is the plain dynamic-shape loop, which tests/core/test_generation.py checks against transformers."""

from __future__ import annotations

import pytest
import torch

from pyminigpt import GPT, GPTConfig, generation, ops
from pyminigpt.ops import dispatch

VOCAB = 61


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, n_positions=64, n_embd=48, n_head=3, n_layer=2, eos_token_id=VOCAB - 1)
    return GPT(config).eval()


def _prompts(batch=3, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    return input_ids, mask


def _generate(model, monkeypatch, static=False, check_every=1, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(generation.steps, "static_decoding", lambda device: static)
        m.setattr(generation.steps, "eos_check_interval", lambda device: check_every)
        return model.generate(**kwargs, return_dict_in_generate=True, output_logits=True, output_scores=True)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("do_sample", [False, True])
def test_static_step_equals_the_dynamic_loop(model, monkeypatch, padded, do_sample):
    input_ids, mask = _prompts()
    kwargs = {"input_ids": input_ids, "attention_mask": mask if padded else None, "max_new_tokens": 12,
              "do_sample": do_sample, "top_k": 10, "top_p": 0.9, "eos_token_id": []}  # fmt: skip
    outs = [
        _generate(model, monkeypatch, static, generator=torch.Generator().manual_seed(5), **kwargs)
        for static in (False, True)
    ]
    assert torch.equal(outs[1].sequences, outs[0].sequences)
    for got, expected in zip(outs[1].logits, outs[0].logits, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("check_every", [3, 7, 100])
def test_reading_eos_every_few_steps_gives_the_same_output(model, monkeypatch, static, check_every):
    input_ids, mask = _prompts(batch=4, seed=2)
    # eos = the token greedy decoding reaches early in some row, so rows stop at different steps
    plain = _generate(model, monkeypatch, input_ids=input_ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    eos = int(plain.sequences[1, input_ids.shape[1] + 2])
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "max_new_tokens": 20,
        "eos_token_id": eos,
        "pad_token_id": 0,
    }
    expected = _generate(model, monkeypatch, **kwargs)
    got = _generate(model, monkeypatch, static, check_every, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert (
        len(got.scores) == len(expected.scores) == len(got.logits) == expected.sequences.shape[1] - input_ids.shape[1]
    )


def test_generation_stops_when_every_row_has_stopped(model, monkeypatch):
    input_ids, _ = _prompts(batch=1, seed=3)
    first = int(model.generate(input_ids, max_new_tokens=1, eos_token_id=[])[0, -1])
    out = _generate(model, monkeypatch, check_every=5, input_ids=input_ids, max_new_tokens=20, eos_token_id=first)
    assert out.sequences.shape[1] == input_ids.shape[1] + 1


def test_decode_runs_the_attention_kernel_on_the_cache_in_place(model, monkeypatch):
    """Each decode step's attention reads k, v as strided views of the preallocated cache, and the kernel takes them."""
    seen = []
    attention = ops.causal_attention

    def spy(q, k, v, scale=None):
        seen.append((q.shape[2], k.is_contiguous(), dispatch.choose("causal_attention", q, k, v, 1.0)[0]))
        return attention(q, k, v, scale)

    monkeypatch.setattr(ops, "causal_attention", spy)
    input_ids, _ = _prompts(batch=2)
    model.generate(input_ids, max_new_tokens=4, eos_token_id=[])
    decode = [s for s in seen if s[0] == 1]
    assert len(decode) == 3 * model.config.n_layer
    assert all(not contiguous for _, contiguous, _ in decode)  # views of the cache, never copies
    expected = "cpu" if "cpu" in ops.available_backends() else "reference"
    assert {backend for _, _, backend in decode} == {expected}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("do_sample", [False, True])
def test_cuda_graph_decode_equals_the_eager_loop(model, monkeypatch, do_sample):
    cuda_model = GPT(model.config).cuda().eval()
    cuda_model.load_state_dict(model.state_dict())
    input_ids, mask = (t.cuda() for t in _prompts())
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "max_new_tokens": 12,
        "do_sample": do_sample,
        "eos_token_id": [],
    }
    eager = _generate(cuda_model, monkeypatch, False, generator=torch.Generator("cuda").manual_seed(5), **kwargs)
    graphed = cuda_model.generate(**kwargs, generator=torch.Generator("cuda").manual_seed(5))
    assert generation.steps.static_decoding(input_ids.device)
    assert torch.equal(graphed, eager.sequences)
