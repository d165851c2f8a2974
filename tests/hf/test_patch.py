"""patch_hf_gpt2 / unpatch_hf_gpt2: a live transformers GPT2LMHeadModel on pyminigpt's kernels.

The oracle is the same model unpatched: logits and gradients within fp32 tolerance, greedy
and seeded sampling token-for-token equal, and unpatching restores it bit for bit.
"""

from __future__ import annotations

import collections
import copy
import functools

import pytest
import torch
import transformers

import pyminigpt
from pyminigpt import ops
from pyminigpt.hf.patch import FusedSamplingWarper

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
    assert model.config._attn_implementation == "eager"  # the config says what the user chose
    assert model.transformer.h[0].attn.config._attn_implementation == "pyminigpt+eager"  # the module's own view
    pyminigpt.unpatch_hf_gpt2(model)
    assert model.transformer.h[0].attn.config is model.config
    with pytest.raises(ValueError, match="not patched"):
        pyminigpt.unpatch_hf_gpt2(model)


def test_patch_rejects_other_models():
    with pytest.raises(TypeError, match="GPT2Model, GPT2LMHeadModel.*got Linear"):
        pyminigpt.patch_hf_gpt2(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="got Linear"):
        pyminigpt.unpatch_hf_gpt2(torch.nn.Linear(2, 2))


# ---- per model, every class, what transformers' users rely on ------------------------------

KERNELS = ("pyminigpt::layer_norm_fwd", "pyminigpt::causal_attention_fwd", "pyminigpt::linear")


def _pyminigpt_ops(fn):
    """Run fn() under the profiler; return its result and how many times each pyminigpt:: op ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = fn()
    ran = collections.Counter(e.name for e in profile.events() if e.name.startswith("pyminigpt::"))
    return result, ran


def _config(attn_implementation="sdpa", **overrides):
    settings = {"n_layer": 2, **overrides}
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=48, n_head=3, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
        pad_token_id=VOCAB - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=3, **settings,
    )  # fmt: skip
    config._attn_implementation = attn_implementation
    return config


# class name -> its inputs; few rows (<= 8) so that the projections run on the CPU's linear kernel
CLASSES = {
    "GPT2Model": lambda ids: {"input_ids": ids},
    "GPT2LMHeadModel": lambda ids: {"input_ids": ids},
    "GPT2DoubleHeadsModel": lambda ids: {
        "input_ids": ids[:, :4].expand(2, 4).unsqueeze(0),
        "mc_token_ids": torch.tensor([[3, 2]]),
    },
    "GPT2ForSequenceClassification": lambda ids: {"input_ids": ids},
    "GPT2ForTokenClassification": lambda ids: {"input_ids": ids},
    "GPT2ForQuestionAnswering": lambda ids: {"input_ids": ids},
}


def _output_tensors(output):
    return {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("class_name", list(CLASSES))
def test_every_gpt2_class_patches_runs_the_kernels_and_matches(class_name, attn_implementation):
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(_config(attn_implementation)).eval()
    inputs = CLASSES[class_name](_inputs(batch=1, length=6)[0])
    results = []
    for patched in (False, True):
        if patched:
            pyminigpt.patch_hf_gpt2(model)
        model.zero_grad()

        def forward_backward():
            outputs = _output_tensors(model(**inputs))
            sum(t.float().square().mean() for t in outputs.values()).backward()
            return outputs

        outputs, ran = _pyminigpt_ops(forward_backward)
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((outputs, grads, ran))
    (expected, expected_grads, ran_unpatched), (got, got_grads, ran_patched) = results
    assert not ran_unpatched
    for kernel in KERNELS:
        assert ran_patched[kernel] > 0, (kernel, ran_patched)
    assert expected.keys() == got.keys() and expected_grads.keys() == got_grads.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert model.config._attn_implementation == attn_implementation


def test_patching_is_per_model_whatever_config_object_models_share():
    config = _config()
    first, second = transformers.GPT2LMHeadModel(config).eval(), transformers.GPT2Model(config).eval()
    pyminigpt.patch_hf_gpt2(first)
    # built after patching, from the patched model's own config: a draft model, a copy
    third = transformers.GPT2LMHeadModel(first.config).eval()
    input_ids, _ = _inputs(batch=1, length=5)
    with torch.no_grad():
        for model, patched in ((first, True), (second, False), (third, False)):
            _, ran = _pyminigpt_ops(functools.partial(model, input_ids))
            assert bool(ran) == patched, (type(model).__name__, ran)
        # each can be patched and unpatched on its own
        pyminigpt.patch_hf_gpt2(second)
        pyminigpt.patch_hf_gpt2(third)
        pyminigpt.unpatch_hf_gpt2(first)
        for model, patched in ((first, False), (second, True), (third, True)):
            _, ran = _pyminigpt_ops(functools.partial(model, input_ids))
            assert bool(ran) == patched, (type(model).__name__, ran)
    assert config._attn_implementation == "sdpa"


def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own():
    model = pyminigpt.patch_hf_gpt2(transformers.GPT2LMHeadModel(_config()).eval())
    twin = copy.deepcopy(model)
    assert twin.config is not model.config and twin.transformer.h[0].attn.config.config is twin.config
    pyminigpt.unpatch_hf_gpt2(model)
    input_ids, _ = _inputs(batch=1, length=5)
    with torch.no_grad():
        _, ran = _pyminigpt_ops(lambda: twin(input_ids))
        assert ran["pyminigpt::causal_attention_fwd"] == 2
        torch.testing.assert_close(twin(input_ids).logits, model(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_set_attn_implementation_after_patching_is_followed_and_kept_by_unpatch():
    model = pyminigpt.patch_hf_gpt2(transformers.GPT2LMHeadModel(_config("sdpa")).eval())
    reference = transformers.GPT2LMHeadModel(_config("eager")).eval()
    reference.load_state_dict(model.state_dict())
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    assert model.transformer.h[0].attn.config._attn_implementation == "pyminigpt+eager"
    input_ids, _ = _inputs(batch=2, length=7)
    with torch.no_grad():
        got, ran = _pyminigpt_ops(lambda: model(input_ids).logits)
        torch.testing.assert_close(got, reference(input_ids).logits, rtol=1e-5, atol=1e-5)
    assert ran["pyminigpt::causal_attention_fwd"] == 2  # eager's causal mask is recognised as such
    pyminigpt.unpatch_hf_gpt2(model)
    assert model.config._attn_implementation == "eager"
    assert model.transformer.config._attn_implementation == "eager"


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_output_attentions_returns_the_unpatched_weights(attn_implementation):
    model = transformers.GPT2LMHeadModel(_config(attn_implementation)).eval()
    input_ids, mask = _inputs(batch=2, length=6)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask, output_attentions=True)
        pyminigpt.patch_hf_gpt2(model)
        got = model(input_ids, attention_mask=mask, output_attentions=True)
        _, ran = _pyminigpt_ops(lambda: model(input_ids, attention_mask=mask))  # and without, the kernel
    assert len(got.attentions) == len(expected.attentions)
    for weights, want in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(weights, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert ran["pyminigpt::causal_attention_fwd"] == 2


def test_a_continued_prefill_over_a_cache_runs_the_kernel():
    """SDPA builds a mask when several queries continue a cache; it is purely causal, so the kernel runs."""
    model = transformers.GPT2LMHeadModel(_config("sdpa")).eval()
    input_ids, _ = _inputs(batch=1, length=9)
    with torch.no_grad():
        expected = model(input_ids).logits[:, 5:]
        pyminigpt.patch_hf_gpt2(model)
        cache = model(input_ids[:, :5], use_cache=True).cache
        got, ran = _pyminigpt_ops(lambda: model(input_ids[:, 5:], cache=cache).logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ran["pyminigpt::causal_attention_fwd"] == 2


def _tiny_tokenizer():
    """A word-level tokenizer over the test vocabulary: w0 ... w95 and <eos> (the last id)."""
    import tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<eos>": VOCAB - 1}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", bos_token="<eos>", pad_token="<eos>", unk_token="<eos>"
    )


@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"do_sample": True, "top_k": 10, "temperature": 0.8}])
def test_text_generation_pipeline_gives_the_same_text(sampling):
    tokenizer = _tiny_tokenizer()
    model = transformers.GPT2LMHeadModel(_config()).eval()
    prompts = ["w1 w2 w3", "w40 w7"]
    texts = []
    for patched in (False, True):
        if patched:
            pyminigpt.patch_hf_gpt2(model)
        generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
        torch.manual_seed(7)
        texts.append([out[0]["generated_text"] for out in generator(prompts, max_new_tokens=8, **sampling)])
    assert texts[1] == texts[0]
    assert all(len(text.split()) > len(prompt.split()) for text, prompt in zip(texts[0], prompts))


def test_torch_compile_fullgraph_of_a_patched_model_matches_eager():
    torch._dynamo.reset()
    model = pyminigpt.patch_hf_gpt2(transformers.GPT2LMHeadModel(_config()).eval())
    input_ids, _ = _inputs(batch=1, length=6)
    with torch.no_grad():
        expected = model(input_ids).logits
        compiled = torch.compile(model, fullgraph=True)
        got, ran = _pyminigpt_ops(lambda: compiled(input_ids).logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for kernel in KERNELS:
        assert ran[kernel] > 0, (kernel, ran)


def test_a_mask_tensor_is_read_once_per_forward_and_again_when_it_changes(monkeypatch):
    model = pyminigpt.patch_hf_gpt2(transformers.GPT2LMHeadModel(_config("eager", n_layer=3)).eval())
    reads = []
    check = pyminigpt.hf.patch._blocks_only_the_future
    monkeypatch.setattr(pyminigpt.hf.patch, "_blocks_only_the_future", lambda *a: reads.append(a[1:]) or check(*a))
    input_ids, _ = _inputs(batch=1, length=5)
    with torch.no_grad():
        model(input_ids)
        assert reads == [(5, 5)]  # eager's causal mask, shared by the 3 layers
        mask = torch.zeros(1, 1, 5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -torch.inf)
        _, ran = _pyminigpt_ops(lambda: model(input_ids, attention_mask=mask))
        assert ran["pyminigpt::causal_attention_fwd"] == 3
        mask[..., 0, 0] = -torch.inf  # changed in place: read again, no longer causal
        _, ran = _pyminigpt_ops(lambda: model(input_ids, attention_mask=mask))
        assert ran["pyminigpt::causal_attention_fwd"] == 0
    assert len(reads) == 3
