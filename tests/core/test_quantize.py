"""8-bit and 4-bit weights (pyminigpt/quantize.py): the quantizer, model.quantize_, saving and loading,
generation, --weights on the commands, every bad input's error, and the perplexity cost on a tiny
model that has learned something."""

from __future__ import annotations

import json

import pytest
import torch
from cli_testing import assert_usage_error, run

from pyminigpt import GPT, GPTConfig, ops
from pyminigpt.ops.reference import dequantize
from pyminigpt.quantize import FORMAT_VERSION, INT4_GROUP_SIZES, METADATA_KEY, QuantizedLinear, quantize_weight

CONFIG = {"vocab_size": 97, "n_positions": 64, "n_embd": 128, "n_layer": 2, "n_head": 2}
FORMAT_CASES = [("int8", None), ("int8", 32), *(("int4", g) for g in INT4_GROUP_SIZES)]


def tiny_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CONFIG, **overrides})).eval()


@pytest.mark.parametrize("weights, group_size", FORMAT_CASES)
def test_dequantize_is_within_half_a_step_per_group(weights, group_size):
    k = 256
    w = torch.randn(40, k) * torch.rand(40, 1) * 3  # rows of different magnitudes
    w[3] = 0.0  # an all-zero row: scale 1, exact zeros
    w[5, :128] = 0.7  # a constant group
    qweight, scales, offsets = quantize_weight(w, weights, group_size)
    group = k if group_size is None else group_size
    step = scales.repeat_interleave(group, dim=1)
    err = (dequantize(qweight, scales, offsets) - w).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert (dequantize(qweight, scales, offsets)[3] == 0).all()
    # deterministic: the same weight, the same bits
    again = quantize_weight(w.clone(), weights, group_size)
    assert torch.equal(again[0], qweight) and torch.equal(again[1], scales)


@pytest.mark.parametrize("weights, group_size", FORMAT_CASES)
def test_quantize_replaces_every_projection(weights, group_size):
    model = tiny_model()
    x = torch.randint(0, 97, (2, 9))
    before = model(x).logits
    assert model.quantize_(weights, group_size=group_size) is model
    modules = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(modules) == 4 * CONFIG["n_layer"] + 1  # the blocks' four projections and the LM head
    assert not any(type(m) is torch.nn.Linear or type(m).__name__ == "Linear" for m in model.modules())
    after = model(x).logits
    tolerance = 0.05 if weights == "int8" else 0.5
    assert (after - before).abs().max() < tolerance * before.abs().max()
    # the token embedding keeps fp32 for the lookup; the LM head has its own quantized copy
    assert model.transformer.wte.weight.dtype == torch.float32
    assert not model.training


def test_quantized_bf16_model_keeps_fp32_scales():
    model = tiny_model().quantize_("int4", group_size=32).to(torch.bfloat16)
    head = model.lm_head
    assert head.scales.dtype == torch.float32 and head.offsets.dtype == torch.float32
    assert model.transformer.h[0].attn.c_attn.bias.dtype == torch.bfloat16
    logits = model(torch.randint(0, 97, (1, 5))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_bad_inputs_name_the_argument():
    model = tiny_model(n_embd=64)
    with pytest.raises(ValueError, match="weights must be one of 'int8', 'int4', got 'int2'"):
        model.quantize_("int2")
    with pytest.raises(ValueError, match="group_size for int4 must be one of"):
        model.quantize_("int4", group_size=48)
    with pytest.raises(ValueError, match="group_size=128 does not divide the input width 64"):
        model.quantize_("int4", group_size=128)
    with pytest.raises(ValueError, match="group_size for int8 must be a positive multiple of 32"):
        model.quantize_("int8", group_size=20)
    with pytest.raises(TypeError, match="group_size must be an int"):
        model.quantize_("int8", group_size=32.0)
    model.quantize_("int8")
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize_("int4")
    with pytest.raises(ValueError, match="for inference only"):
        model.train()
    with pytest.raises(ValueError, match="weights must be one of"):
        GPT.from_pretrained("unused", weights="fp8")


def test_training_a_quantized_model_is_refused():
    from pyminigpt import Trainer, TrainerConfig
    from pyminigpt.train.data import SlidingWindowDataset

    model = tiny_model().quantize_("int8")
    data = SlidingWindowDataset(torch.randint(0, 97, (200,)), 16)
    with pytest.raises(ValueError, match="inference only"):
        Trainer(model, data, data, TrainerConfig(max_steps=1, batch_size=2, device="cpu", progress=False)).train()


@pytest.mark.parametrize("weights, group_size", FORMAT_CASES)
def test_save_and_load_round_trip_exactly(tmp_path, weights, group_size):
    model = tiny_model().quantize_(weights, group_size=group_size)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["format"] == weights
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.quantization == model.quantization
    want = model.state_dict()
    got = loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
    x = torch.randint(0, 97, (1, 7))
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert GPT.from_pretrained(tmp_path, weights=weights).quantization["format"] == weights
    other = "int4" if weights == "int8" else "int8"
    with pytest.raises(ValueError, match=f"saved quantized as {weights}"):
        GPT.from_pretrained(tmp_path, weights=other)


def test_unknown_format_version_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model().quantize_("int8").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    info = {"format": "int8", "group_size": None, "version": FORMAT_VERSION + 1}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={METADATA_KEY: json.dumps(info)})
    with pytest.raises(ValueError, match=f"version {FORMAT_VERSION + 1}"):
        GPT.from_pretrained(tmp_path)


def test_from_pretrained_quantizes_an_fp32_checkpoint(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    for weights in ("int8", "int4"):
        loaded = GPT.from_pretrained(tmp_path, weights=weights)
        reference = tiny_model().quantize_(weights)
        for key, value in reference.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    assert GPT.from_pretrained(tmp_path, weights="bf16").dtype == torch.bfloat16


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_matches_the_reference_path(weights, batch):
    model = tiny_model(initializer_range=0.2).quantize_(weights, group_size=32 if weights == "int4" else None)
    prompt = torch.randint(0, 97, (batch, 6))
    got = model.generate(prompt, max_new_tokens=20, do_sample=False)
    with ops.use_backend("reference"):
        want = model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert got.shape == (batch, 26)
    assert torch.equal(got, want)


# ---- the command's --weights ----------------------------------------------------------------


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8", "int4"])
def test_weights_flag_on_the_commands(capsys, tiny_gpt2_dir, tmp_path, weights):
    code, out, err = run(capsys, "generate", tiny_gpt2_dir, "--prompt", "hello", "--num-samples", "1",
                         "--max-new-tokens", "5", "--greedy", "--weights", weights)  # fmt: skip
    assert code == 0, err
    code, out, err = run(capsys, "perplexity", tiny_gpt2_dir, "--text", "hello world, hello", "--weights", weights)
    assert code == 0 and out.startswith("perplexity"), err


def test_weights_flag_errors(capsys, tiny_gpt2_dir, tmp_path):
    with pytest.raises(SystemExit):
        run(capsys, "generate", tiny_gpt2_dir, "--weights", "int3")
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    saved = tmp_path / "q"
    GPT.from_pretrained(tiny_gpt2_dir, weights="int8").save_pretrained(saved)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        if (tiny_gpt2_dir / name).is_file():
            (saved / name).write_bytes((tiny_gpt2_dir / name).read_bytes())
    assert_usage_error(capsys, ["perplexity", saved, "--text", "hello", "--weights", "int4"], "--weights", "int8")
    assert_usage_error(capsys, ["chat", tiny_gpt2_dir, "--feedback", "--weights", "int8"], "for inference")


# ---- the perplexity cost, on a tiny model that has learned something -------------------------------


def test_int8_perplexity_within_half_a_percent_of_fp32():
    from pyminigpt.analysis import perplexity
    from pyminigpt.tokenizer import CharTokenizer

    text = " ".join(["the quick brown fox jumps over the lazy dog and runs away."] * 40)
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):  # a few seconds: enough to learn the sentence well past a uniform guess
        starts = torch.randint(0, len(ids) - 65, (16,))
        batch = torch.stack([ids[s : s + 64] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    fp32 = perplexity(model, tokenizer, text, stride=32)
    assert fp32 < tokenizer.vocab_size / 4  # it has learned something
    int8 = perplexity(model.quantize_("int8"), tokenizer, text, stride=32)
    assert abs(int8 / fp32 - 1) < 0.005, (fp32, int8)
