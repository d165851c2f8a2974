"""GPT against transformers' GPT2LMHeadModel built from the same random tiny config (fp32, atol 1e-5)."""

import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pyminigpt.model import GPT, GPTConfig, KVCache

ATOL = 1e-5
VOCAB = 97

# Small configs covering: odd head count, n_inner, other activations, untied LM head.
CONFIGS = {
    "base": {"n_embd": 32, "n_head": 4},
    "odd_heads_n_inner": {"n_embd": 48, "n_head": 3, "n_inner": 40},
    "gelu_untied": {"n_embd": 32, "n_head": 2, "activation_function": "gelu", "tie_word_embeddings": False},
    "relu_eps": {"n_embd": 40, "n_head": 5, "activation_function": "relu", "layer_norm_epsilon": 1e-3},
}


def tiny_hf(seed=0, **overrides):
    """A random GPT2LMHeadModel (eager attention, so it can return attentions) and its GPT twin.

    initializer_range=0.2 makes activations large enough that a wrong detail shows in the logits.
    """
    torch.manual_seed(seed)
    kwargs = {
        "vocab_size": VOCAB,
        "n_positions": 64,
        "n_layer": 2,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.2,
    }
    kwargs.update(overrides)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs, attn_implementation="eager")).eval()
    return hf, GPT.from_hf(hf)


def random_ids(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padding_mask(lengths, total):
    """(B, total) int64 mask with each row's `lengths[i]` tokens at the right."""
    return (torch.arange(total) >= total - torch.tensor(lengths).unsqueeze(1)).long()


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request):
    return tiny_hf(**CONFIGS[request.param])


@torch.no_grad()
def test_logits_and_loss_match_hf(pair):
    hf, model = pair
    ids = random_ids(3, 13)
    labels = ids.clone()
    labels[0, 5:] = -100  # ignored positions
    expected, got = hf(ids, labels=labels), model(ids, labels=labels)
    assert got.logits.shape == (3, 13, VOCAB)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)


@torch.no_grad()
def test_padding_mask_matches_hf_on_real_tokens(pair):
    hf, model = pair
    ids = random_ids(3, 9)
    mask = left_padding_mask([9, 4, 1], 9)
    expected, got = hf(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    assert torch.isfinite(got).all(), "fully padded query rows must stay finite"
    # a mask of all ones is the same as no mask
    torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(mask)).logits, model(ids).logits)


@torch.no_grad()
def test_padding_anywhere_stays_finite_and_ignores_pads(pair):
    _, model = pair
    ids = random_ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 3] = 0
    mask[1, 6:] = 0
    changed = ids.clone()
    changed[0, 3], changed[1, 6:] = (changed[0, 3] + 1) % VOCAB, (changed[1, 6:] + 1) % VOCAB
    a, b = model(ids, attention_mask=mask).logits, model(changed, attention_mask=mask).logits
    assert torch.isfinite(a).all()
    # real tokens never see the pads, so changing a pad token changes no real token's logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=ATOL, rtol=0)


@torch.no_grad()
def test_hidden_states_and_attentions_match_hf(pair):
    hf, model = pair
    ids = random_ids(2, 10)
    expected = hf(ids, output_hidden_states=True, output_attentions=True)
    got = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == model.config.n_layer + 1
    assert len(got.attentions) == model.config.n_layer
    for g, e in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
    for g, e in zip(got.attentions, expected.attentions, strict=True):
        assert g.shape == (2, model.config.n_head, 10, 10)
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    plain = model(ids)
    assert plain.hidden_states is None and plain.attentions is None and plain.past_key_values is None


@torch.no_grad()
def test_attentions_with_padding_match_hf_on_real_queries(pair):
    hf, model = pair
    ids = random_ids(2, 7)
    mask = left_padding_mask([7, 3], 7)
    expected = hf(ids, attention_mask=mask, output_attentions=True).attentions
    got = model(ids, attention_mask=mask, output_attentions=True).attentions
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.transpose(1, 2)[mask.bool()], e.transpose(1, 2)[mask.bool()], atol=ATOL, rtol=0)


@torch.no_grad()
def test_position_ids_match_hf(pair):
    hf, model = pair
    ids = random_ids(2, 6)
    positions = torch.tensor([[0, 0, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10]])
    expected = hf(ids, position_ids=positions).logits
    torch.testing.assert_close(model(ids, position_ids=positions).logits, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_kv_cache_equals_no_cache(pair):
    _, model = pair
    ids = random_ids(2, 12)
    full = model(ids).logits
    # prefill 5 positions into a cache that must grow, then chunks of 1, 2 and 4
    out = model(ids[:, :5], use_cache=True)
    cache, pieces = out.past_key_values, [out.logits]
    assert isinstance(cache, KVCache) and cache.length == 5
    for start, stop in ((5, 6), (6, 8), (8, 12)):
        out = model(ids[:, start:stop], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        pieces.append(out.logits)
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)
    k, v = cache[0]
    assert k.shape == v.shape == (2, model.config.n_head, 12, model.config.n_embd // model.config.n_head)


@torch.no_grad()
def test_kv_cache_with_padding_and_preallocation(pair):
    hf, model = pair
    ids = random_ids(2, 10)
    mask = left_padding_mask([10, 6], 10)
    expected = hf(ids, attention_mask=mask).logits
    cache = model.new_cache(batch_size=2, capacity=10)
    first = model(ids[:, :7], attention_mask=mask[:, :7], past_key_values=cache, use_cache=True).logits
    rest = model(ids[:, 7:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    assert cache.capacity == 10  # preallocated: written in place, never grown
    got = torch.cat([first, rest], dim=1)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=ATOL, rtol=0)


@torch.no_grad()
def test_logits_to_keep(pair):
    _, model = pair
    ids = random_ids(2, 9)
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:])
    torch.testing.assert_close(model(ids, logits_to_keep=3).logits, full[:, -3:])


def test_backward_and_training_mode(pair):
    _, model = pair
    model.train()
    try:
        ids = random_ids(2, 8)
        out = model(ids, labels=ids)  # dropout everywhere, attention dropout through SDPA
        out.loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_num_parameters_device_dtype(pair):
    hf, model = pair
    assert model.num_parameters() == hf.num_parameters()
    assert (
        model.num_parameters(exclude_embeddings=True)
        == model.num_parameters() - model.transformer.wte.weight.numel() - model.transformer.wpe.weight.numel()
    )
    assert model.device == torch.device("cpu") and model.dtype == torch.float32


def test_gpt2_init():
    config = GPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=4, n_head=4)
    torch.manual_seed(0)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)
    assert block.attn.c_attn.bias.abs().sum() == 0
    assert torch.equal(block.ln_1.weight, torch.ones(64)) and torch.equal(block.ln_1.bias, torch.zeros(64))
    untied = GPT(GPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2, tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_config_defaults_are_gpt2_small():
    defaults = GPTConfig()
    hf_defaults = transformers.GPT2Config()
    for name in GPTConfig.__dataclass_fields__:
        assert getattr(defaults, name) == getattr(hf_defaults, name), name


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_embd": 30, "n_head": 4}, "n_head"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -3}, "vocab_size"),
        ({"n_inner": 0}, "n_inner"),
        ({"activation_function": "gelu_fancy"}, "activation_function"),
        ({"attn_pdrop": 1.5}, "attn_pdrop"),
        ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


@torch.no_grad()
def test_bad_inputs():
    _, model = tiny_hf(**CONFIGS["base"])
    ids = random_ids(2, 5)
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.float())
    with pytest.raises(TypeError, match="input_ids"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])  # 1-D
    with pytest.raises(ValueError, match=rf"vocab_size={VOCAB}\), got values in \[0, {VOCAB}\]"):
        model(torch.tensor([[0, VOCAB, 1]]))
    with pytest.raises(ValueError, match=r"input_ids .* got values in \[-1, 2\]"):
        model(torch.tensor([[2, -1]], dtype=torch.int8))
    with pytest.raises(ValueError, match="n_positions"):
        model(random_ids(1, 65))
    cache = model(random_ids(1, 60), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="n_positions"):
        model(random_ids(1, 5), past_key_values=cache, use_cache=True)  # 60 cached + 5 > 64
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(4).unsqueeze(0))
    with pytest.raises(ValueError, match=r"position_ids must be in \[0, n_positions=64\), got values in \[60, 64\]"):
        model(ids, position_ids=torch.arange(60, 65).unsqueeze(0))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)
    with pytest.raises(TypeError, match="past_key_values"):
        model(ids, past_key_values=((ids, ids),))


def _no_dropout_model(seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT(config)


def test_torch_compile_fullgraph_inference_matches_eager_and_keeps_the_checks():
    torch._dynamo.reset()
    model = _no_dropout_model().eval()
    compiled = torch.compile(model, fullgraph=True)
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=ATOL)
        # the eager path drops an all-ones mask after a host read; compiled, the mask path runs
        mask = torch.ones_like(ids)
        torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, model(ids).logits, rtol=1e-5, atol=ATOL)
        bad = ids.clone()
        bad[1, 3] = VOCAB
        with pytest.raises(RuntimeError, match=rf"input_ids must be in \[0, vocab_size={VOCAB}\)"):
            compiled(bad)
        with pytest.raises(ValueError, match=rf"vocab_size={VOCAB}\), got values in \[\d+, {VOCAB}\]"):
            model(bad)  # outside compilation, the clear error with the values


def test_torch_compile_fullgraph_training_matches_eager():
    torch._dynamo.reset()
    ids = random_ids(2, 8)
    results = []
    for compile_it in (False, True):
        model = _no_dropout_model().train()
        forward = torch.compile(model, fullgraph=True) if compile_it else model
        output = forward(ids, labels=ids)
        output.loss.backward()
        results.append((output.logits.detach(), output.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits, loss, grads), (c_logits, c_loss, c_grads) = results
    torch.testing.assert_close(c_logits, logits, rtol=1e-5, atol=ATOL)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=ATOL)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=ATOL, msg=name)


def test_torch_compile_fullgraph_works_before_any_eager_call():
    """In a fresh process the first op call imports its backend; under compilation that must trace."""
    script = (
        "import torch\n"
        "from pyminigpt.model import GPT, GPTConfig\n"
        "model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()\n"
        "ids = torch.randint(0, 50, (1, 6))\n"
        "with torch.no_grad():\n"
        "    with torch.profiler.profile() as profile:\n"
        "        got = torch.compile(model, fullgraph=True)(ids).logits\n"
        "    torch.testing.assert_close(got, model(ids).logits, rtol=1e-5, atol=1e-5)\n"
        "ran = {e.name for e in profile.events()}\n"
        "assert {'pyminigpt::layer_norm_fwd', 'pyminigpt::causal_attention_fwd', 'pyminigpt::linear'} <= ran, ran\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
