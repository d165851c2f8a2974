"""Weights and configs to and from transformers: round trips through save_pretrained / from_pretrained."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pyminigpt.hf import convert as hf_convert
from pyminigpt.model import GPT, GPTConfig

ATOL = 1e-5
VOCAB = 97
SAVED_MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors"]  # what save_pretrained writes


def tiny_hf(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = {"vocab_size": VOCAB, "n_positions": 32, "n_embd": 48, "n_layer": 2, "n_head": 3, "n_inner": 40,
                  "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.2}  # fmt: skip
    kwargs.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_model(request):
    return tiny_hf(tie_word_embeddings=request.param)


def ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def assert_same_logits(a, b):
    x = ids()
    torch.testing.assert_close(a(x).logits, b(x).logits, atol=ATOL, rtol=0)


def test_from_hf_copies_config_weights_and_mode(hf_model):
    model = GPT.from_hf(hf_model)
    assert not model.training
    assert model.config == hf_convert.config_from_hf(hf_model.config)
    assert model.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.transformer.wte.weight) == model.config.tie_word_embeddings
    assert_same_logits(model, hf_model)


def test_hf_save_then_from_pretrained(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    assert not model.training
    assert_same_logits(model, hf_model)


def test_save_pretrained_then_hf_loads_it(hf_model, tmp_path):
    model = GPT.from_hf(hf_model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == SAVED_MODEL_FILES  # no temp files left
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    reloaded_hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert (
        reloaded_hf.config.n_inner == 40 and reloaded_hf.config.tie_word_embeddings == model.config.tie_word_embeddings
    )
    assert_same_logits(reloaded_hf, hf_model)
    # and back: ours -> disk -> ours
    assert_same_logits(GPT.from_pretrained(tmp_path), model)


def test_save_pretrained_overwrites_atomically(tmp_path):
    first, second = GPT.from_hf(tiny_hf(seed=0)), GPT.from_hf(tiny_hf(seed=1))
    first.save_pretrained(tmp_path / "nested" / "dir")
    second.save_pretrained(tmp_path / "nested" / "dir")
    assert sorted(p.name for p in (tmp_path / "nested" / "dir").iterdir()) == SAVED_MODEL_FILES
    assert_same_logits(GPT.from_pretrained(tmp_path / "nested" / "dir"), second)


def test_from_pretrained_through_transformers_with_dtype(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    # any transformers keyword makes from_pretrained load through GPT2LMHeadModel.from_pretrained
    model = GPT.from_pretrained(tmp_path, local_files_only=True)
    assert_same_logits(model, hf_model)
    half = GPT.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device == torch.device("cpu")


def test_state_dict_round_trip(hf_model):
    model = GPT.from_hf(hf_model)
    fresh = transformers.GPT2LMHeadModel(hf_model.config).eval()
    fresh.load_state_dict(hf_convert.state_dict_to_hf(model.state_dict()), strict=True)
    assert_same_logits(fresh, hf_model)
    back = hf_convert.state_dict_from_hf(hf_convert.state_dict_to_hf(model.state_dict()))
    for key, tensor in model.state_dict().items():
        assert torch.equal(back[key], tensor), key


def test_base_model_keys_without_prefix_load():
    """Hub GPT-2 checkpoints are GPT2Model state dicts: no `transformer.` prefix, mask buffers, no lm_head."""
    hf_model = tiny_hf()
    base = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if not k.startswith("lm_head")}
    base["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()  # the old causal-mask buffer
    model = GPT(hf_convert.config_from_hf(hf_model.config)).eval()
    hf_convert.load_hf_state_dict(model, base)
    assert_same_logits(model, hf_model)


def test_config_round_trip():
    config = GPTConfig(vocab_size=VOCAB, n_positions=40, n_embd=24, n_layer=3, n_head=3, n_inner=50,
                       activation_function="relu", resid_pdrop=0.0, layer_norm_epsilon=1e-4,
                       tie_word_embeddings=False, bos_token_id=5, eos_token_id=6, pad_token_id=7)  # fmt: skip
    hf_config = transformers.GPT2Config(**config.to_dict())
    assert isinstance(hf_config, transformers.GPT2Config)
    assert hf_config.n_inner == 50 and hf_config.pad_token_id == 7 and hf_config.tie_word_embeddings is False
    assert hf_convert.config_from_hf(hf_config) == config
    assert hf_convert.config_from_hf(hf_convert.config_to_hf_dict(config)) == config


@pytest.mark.parametrize(
    "option", [{"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False}, {"add_cross_attention": True}]
)
def test_unsupported_hf_options_raise(option):
    hf_config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_head=2, n_layer=1, **option)
    with pytest.raises(ValueError, match=next(iter(option))):
        hf_convert.config_from_hf(hf_config)


def test_mismatched_checkpoint_raises():
    model = GPT(GPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=48, n_layer=1, n_head=3, n_inner=40))
    with pytest.raises(ValueError, match="missing|unexpected"):
        hf_convert.load_hf_state_dict(model, tiny_hf().state_dict())  # 2 layers into 1


def test_generation_config_and_refused_model_types(tmp_path):
    model = GPT.from_hf(tiny_hf())
    model.save_pretrained(tmp_path)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
    config = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type='bert' is not a GPT-2 model"):
        hf_convert.config_from_hf({**config, "model_type": "bert"})


def test_tiny_gpt2_dir_fixture(tiny_gpt2_dir):
    """The shared fixture is what a user's save_pretrained directory holds, and pyminigpt loads it exactly."""
    from pyminigpt.tokenizer import BPETokenizer

    names = {p.name for p in tiny_gpt2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt"} <= names
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir, local_files_only=True)
    text = "how many r are there in strawberry?"
    assert hf_tok(text)["input_ids"] == BPETokenizer.from_pretrained(tiny_gpt2_dir).encode(text)
    assert_same_logits(GPT.from_pretrained(tiny_gpt2_dir), hf_model)
