"""`pyminigpt export --format gguf`: the file read back with gguf's reader against the model's
weights and config, and (where llama-cpp-python is installed) run in llama.cpp against
transformers' greedy tokens."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import transformers
from cli_testing import assert_usage_error, run
from tiny_gpt2 import make_tiny_gpt2_dir

from pyminigpt import GPT
from pyminigpt.cli.export import BLOCK, export_gguf, gguf_tensors

gguf = pytest.importorskip("gguf")  # in the test extra; the import guard keeps a bare install collecting


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GPT-2 (random weights, byte-level BPE) whose rows fit q8_0 / q4_0 blocks."""
    return make_tiny_gpt2_dir(tmp_path_factory.mktemp("gpt2"), n_embd=64, n_head=4)


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return reader, fields


def as_array(tensor) -> np.ndarray:
    """A GGUF tensor in float32, in pyminigpt's (out, in) shape."""
    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return values.reshape([int(n) for n in reversed(tensor.shape)])


def test_f32_export_holds_every_weight_and_the_config(capsys, model_dir, tmp_path):
    out = tmp_path / "model.gguf"
    code, stdout, _ = run(capsys, "export", model_dir, "--dtype", "f32", "--out", out)
    assert code == 0 and "wrote" in stdout and "gpt2 byte-level BPE" in stdout
    model = GPT.from_pretrained(model_dir)
    reader, fields = read(out)
    c = model.config
    assert fields["general.architecture"] == "gpt2"
    assert fields["gpt2.context_length"] == c.n_positions and fields["gpt2.embedding_length"] == c.n_embd
    assert fields["gpt2.block_count"] == c.n_layer and fields["gpt2.attention.head_count"] == c.n_head
    assert fields["gpt2.feed_forward_length"] == 4 * c.n_embd
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(c.layer_norm_epsilon)
    expected = gguf_tensors(model)
    assert "output.weight" not in expected  # tied: llama.cpp reuses token_embd
    assert sorted(t.name for t in reader.tensors) == sorted(expected)
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
        np.testing.assert_array_equal(as_array(tensor), expected[tensor.name].detach().numpy(), err_msg=tensor.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(tokens) == c.vocab_size
    assert all(tokens[i] == t for t, i in tokenizer.get_vocab().items())
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id


@pytest.mark.parametrize(("dtype", "tolerance"), [("f16", 1e-3), ("q8_0", 1e-2), ("q4_0", 0.2)])
def test_low_precision_exports_round_trip_within_their_step(model_dir, tmp_path, dtype, tolerance):
    model = GPT.from_pretrained(model_dir)
    export_gguf(model, tmp_path / "m.gguf", dtype)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    expected = gguf_tensors(model)
    wanted = gguf.GGMLQuantizationType[dtype.upper()]
    for tensor in reader.tensors:
        ours = expected[tensor.name].detach().numpy()
        assert tensor.tensor_type == (wanted if ours.ndim == 2 else gguf.GGMLQuantizationType.F32), tensor.name
        scale = np.abs(ours).max()
        np.testing.assert_allclose(as_array(tensor), ours, atol=tolerance * scale, rtol=0, err_msg=tensor.name)


def test_rows_that_do_not_fill_a_block_fall_back_to_f16(tmp_path):
    model = GPT.from_hf(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=48, n_layer=1, n_head=2)))
    assert 48 % BLOCK
    export_gguf(model, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 192


def test_untied_head_and_a_model_without_a_tokenizer(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, tie_word_embeddings=False)
    model = GPT.from_hf(transformers.GPT2LMHeadModel(config))
    export_gguf(model, tmp_path / "m.gguf", "f32")
    reader, fields = read(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "none" and fields["gpt2.vocab_size"] == 50
    head = next(t for t in reader.tensors if t.name == "output.weight")
    np.testing.assert_array_equal(as_array(head), model.lm_head.weight.detach().numpy())


def test_bad_arguments(capsys, model_dir, tmp_path):
    model = GPT.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_gguf(model, tmp_path / "m.gguf", "int3")
    model.config.activation_function = "gelu"
    with pytest.raises(ValueError, match="tanh-approximated GELU"):
        export_gguf(model, tmp_path / "m.gguf", "f32")
    assert_usage_error(capsys, ["export", tmp_path / "missing", "--out", tmp_path / "m.gguf"], "not found")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (the bench extra)")
def test_llama_cpp_gives_transformers_greedy_tokens(model_dir, tmp_path):
    import llama_cpp

    path = tmp_path / "m.gguf"
    export_gguf(GPT.from_pretrained(model_dir), path, "f32")
    hf = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    prompt = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt))
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    got = prompt[0].tolist()
    for _ in range(20):
        llm.eval(got[llm.n_tokens :])
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    assert got == want[0].tolist()
