"""patch_hf_gpt2 / unpatch_hf_gpt2: a live transformers GPT2LMHeadModel on pyminigpt's kernels.

The oracle is the same model unpatched: logits and gradients within fp32 tolerance, greedy
and seeded sampling token-for-token equal, and unpatching restores it bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import pyminigpt
from pyminigpt import ops
from pyminigpt.patch import FusedSamplingWarper

VOCAB = 97


def _hf_model(n_layer=2, attn_implementation="eager", dropout=0.0, seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=48, n_head=3, n_layer=n_layer, bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **overrides,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the ops.layer_norm, ops.causal_attention and ops.linear calls (with the query lengths
    attention saw and the rows each linear multiplied)."""
    calls = {"layer_norm": 0, "causal_attention": [], "linear": []}
    layer_norm, causal_attention, linear = ops.layer_norm, ops.causal_attention, ops.linear

    def counting_layer_norm(*args, **kwargs):
        calls["layer_norm"] += 1
        return layer_norm(*args, **kwargs)

    def counting_attention(q, *args, **kwargs):
        calls["causal_attention"].append(q.shape[2])
        return causal_attention(q, *args, **kwargs)

    def counting_linear(x, *args, **kwargs):
        calls["linear"].append(x.numel() // x.shape[-1])
        return linear(x, *args, **kwargs)

    monkeypatch.setattr(ops, "layer_norm", counting_layer_norm)
    monkeypatch.setattr(ops, "causal_attention", counting_attention)
    monkeypatch.setattr(ops, "linear", counting_linear)
    return calls


def _inputs(batch=3, length=11, padded=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB - 1, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        mask[0, :4] = 0  # left padding
        mask[1, :1] = 0
    return input_ids, mask


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("n_layer", [2, 6])  # 6: distilgpt2's depth
def test_patched_logits_match_and_run_the_kernels(attn_implementation, n_layer, kernel_calls):
    model = _hf_model(n_layer, attn_implementation)
    input_ids, mask = _inputs()
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask).logits
        pyminigpt.patch_hf_gpt2(model)
        got = model(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert kernel_calls["layer_norm"] == 2 * n_layer + 1
    assert kernel_calls["causal_attention"] == [input_ids.shape[1]] * n_layer
    assert kernel_calls["linear"] == [input_ids.numel()] * (4 * n_layer + 1)  # 4 Conv1D a block, the LM head


def test_gelu_new_runs_as_torchs_fused_tanh_gelu(monkeypatch):
    model = _hf_model(n_layer=3)
    x = torch.randn(2, 5, 4 * 48)
    expected = [m(x) for m in model.modules() if isinstance(m, transformers.activations.NewGELUActivation)]
    assert len(expected) == 3
    pyminigpt.patch_hf_gpt2(model)
    calls = []
    gelu = torch.nn.functional.gelu
    monkeypatch.setattr(torch.nn.functional, "gelu", lambda t, **kw: calls.append(kw) or gelu(t, **kw))
    patched = [m for m in model.modules() if isinstance(m, transformers.activations.NewGELUActivation)]
    for activation, want in zip(patched, expected):
        torch.testing.assert_close(activation(x), want, rtol=1e-6, atol=1e-6)
    assert calls == [{"approximate": "tanh"}] * 3


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_padding_falls_back_to_the_original_attention(attn_implementation, kernel_calls):
    model = _hf_model(attn_implementation=attn_implementation)
    input_ids, mask = _inputs(padded=True)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask).logits
        pyminigpt.patch_hf_gpt2(model)
        got = model(input_ids, attention_mask=mask).logits
    real = mask.bool()  # padded positions are meaningless and differ between eager and sdpa anyway
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert kernel_calls["causal_attention"] == []
    assert kernel_calls["layer_norm"] > 0


@pytest.mark.parametrize("n_layer", [2, 6])
def test_patched_greedy_generate_is_token_for_token_equal(n_layer, kernel_calls):
    model = _hf_model(n_layer)
    input_ids, mask = _inputs(length=7)
    kwargs = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(input_ids, **kwargs)
    pyminigpt.patch_hf_gpt2(model)
    got = model.generate(input_ids, **kwargs)
    assert torch.equal(got, expected)
    assert 1 in kernel_calls["causal_attention"]  # single-token decode steps over the KV cache ran on the kernel
    assert input_ids.shape[0] in kernel_calls["linear"]  # a row per sequence: the CPU's few-row kernel


@pytest.mark.parametrize(
    "settings",
    [
        {"top_k": 10, "top_p": 0.8, "temperature": 0.7},
        {"top_k": 0, "top_p": 0.5},
        {"top_k": 5, "repetition_penalty": 1.3},
    ],
)
def test_patched_sampling_draws_the_same_tokens(settings):
    model = _hf_model()
    input_ids, mask = _inputs(length=5)
    kwargs = {"attention_mask": mask, "max_new_tokens": 10, "do_sample": True, "pad_token_id": 0, **settings}
    torch.manual_seed(123)
    expected = model.generate(input_ids, **kwargs)
    pyminigpt.patch_hf_gpt2(model)
    torch.manual_seed(123)
    got = model.generate(input_ids, **kwargs)
    assert torch.equal(got, expected)


def test_patched_generate_uses_the_fused_warper(monkeypatch):
    model = _hf_model()
    pyminigpt.patch_hf_gpt2(model)
    seen = []
    call = FusedSamplingWarper.__call__
    monkeypatch.setattr(FusedSamplingWarper, "__call__", lambda self, ids, s: seen.append(self) or call(self, ids, s))
    input_ids, _ = _inputs(batch=1, length=4)
    model.generate(
        input_ids,
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=True,
        top_k=7,
        top_p=0.9,
        temperature=0.5,
        pad_token_id=0,
    )
    assert len(seen) == 3
    assert (seen[0].temperature, seen[0].top_k, seen[0].top_p) == (0.5, 7, 0.9)


def test_fused_warper_keeps_what_transformers_warpers_keep():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 50257, generator=g) * 3
    scores[0, :100] = scores[0, 100]  # ties at the k-th value
    for temperature, top_k, top_p in [(0.7, 50, 0.9), (1.0, 0, 0.3), (1.3, 5, 1.0)]:
        chain = transformers.LogitsProcessorList(
            [transformers.TemperatureLogitsWarper(temperature)]
            + ([transformers.TopKLogitsWarper(top_k)] if top_k else [])
            + ([transformers.TopPLogitsWarper(top_p)] if top_p < 1 else [])
        )
        expected = chain(None, scores.clone())
        got = FusedSamplingWarper(temperature, top_k, top_p)(None, scores.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)], rtol=0, atol=0)


def test_fused_warper_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature"):
        FusedSamplingWarper(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        FusedSamplingWarper(top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        FusedSamplingWarper(top_k=-1)


@pytest.mark.parametrize("batch, length", [(2, 16), (1, 6)])  # 6 rows: the projections run on the CPU kernel
def test_training_through_a_patched_model_gives_the_same_gradients(batch, length, kernel_calls):
    input_ids, _ = _inputs(batch=batch, length=length)
    grads = []
    for patched in (False, True):
        model = _hf_model(n_layer=2).train()  # dropout 0: both runs see the same function
        if patched:
            pyminigpt.patch_hf_gpt2(model)
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert kernel_calls["causal_attention"] and kernel_calls["layer_norm"] and kernel_calls["linear"]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_projections_off_the_cpu_run_their_own_forward(kernel_calls):
    """pyminigpt's linear kernel is CPU-only: elsewhere a patched projection is transformers' own call."""
    model = pyminigpt.patch_hf_gpt2(_hf_model())
    conv1d, lm_head = model.transformer.h[0].mlp.c_fc.to("meta"), model.lm_head.to("meta")
    assert conv1d(torch.empty(2, 5, 48, device="meta")).shape == (2, 5, 4 * 48)
    assert lm_head(torch.empty(2, 5, 48, device="meta")).shape == (2, 5, VOCAB)
    assert kernel_calls["linear"] == []


def test_training_with_attention_dropout_still_runs():
    model = _hf_model(dropout=0.1).train()
    pyminigpt.patch_hf_gpt2(model)
    input_ids, _ = _inputs(batch=2, length=8)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_unpatch_restores_the_original_exactly(attn_implementation):
    model = _hf_model(attn_implementation=attn_implementation)
    input_ids, mask = _inputs(padded=True)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask).logits
        pyminigpt.patch_hf_gpt2(model)
        pyminigpt.unpatch_hf_gpt2(model)
        got = model(input_ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    assert model.config._attn_implementation == attn_implementation
    assert "generate" not in vars(model)
    assert not any("forward" in vars(m) for m in model.modules())
    assert not hasattr(model, "_pyminigpt_patch")


def test_patching_twice_is_idempotent_and_unpatching_an_unpatched_model_raises():
    model = _hf_model()
    assert pyminigpt.patch_hf_gpt2(model) is model
    generate = model.generate
    pyminigpt.patch_hf_gpt2(model)
    assert model.generate is generate
    assert model.config._attn_implementation == "pyminigpt+eager"
    pyminigpt.unpatch_hf_gpt2(model)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="not patched"):
        pyminigpt.unpatch_hf_gpt2(model)


def test_patch_rejects_other_models():
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        pyminigpt.patch_hf_gpt2(torch.nn.Linear(2, 2))
