"""analysis.py on a tiny random model: generation (streamed and not), perplexity against
its definition and against transformers' strided recipe, next-token tables, attention
maps, hidden states, PCA and the PNG plots."""

import math

import pytest
import torch
import torch.nn.functional as F

from pyminigpt import analysis, plots
from pyminigpt.model import GPT, GPTConfig
from pyminigpt.tokenizer import CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.from_text(TEXT)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        n_positions=24,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.sos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    model = GPT(config).eval()
    with torch.no_grad():  # larger logits than the 0.02-std init, so that distributions are not flat
        model.lm_head.weight.normal_(0, 0.5)
    return model


def mean_nll(model, ids):
    logits = model(torch.tensor([ids])).logits[0]
    return F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:])).item()


def test_perplexity_is_exp_of_mean_nll(model, tok):
    ids = tok.encode("the lazy fox")
    expected = math.exp(mean_nll(model, ids))
    assert analysis.perplexity(model, tok, "the lazy fox") == pytest.approx(expected, rel=1e-5)
    # a text within one window scores the same whatever the stride
    assert analysis.perplexity(model, tok, "the lazy fox", stride=3) == pytest.approx(expected, rel=1e-5)
    # with <SOS> ... <EOS> the first character and the end are scored too
    with_specials = math.exp(mean_nll(model, tok.encode("the lazy fox", add_special_tokens=True)))
    assert analysis.perplexity(model, tok, "the lazy fox", add_special_tokens=True) == pytest.approx(
        with_specials, rel=1e-5
    )


def hf_recipe_perplexity(model, ids, stride, max_length):
    """transformers' "Perplexity of fixed-length models" loop, token-weighted, with labels=-100 masking."""
    input_all = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = input_all[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        loss = model(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())  # the model shifts the labels by one
        nll_sum += loss.item() * n
        n_tokens += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("stride,max_length", [(4, 10), (5, 10), (10, 10), (2, 6), (7, 24)])
def test_strided_perplexity_matches_the_recipe(model, tok, stride, max_length):
    text = TEXT + " " + TEXT  # 87 tokens, far longer than the context of 24
    ids = tok.encode(text)
    got = analysis.perplexity(model, tok, text, stride=stride, max_length=max_length)
    assert got == pytest.approx(hf_recipe_perplexity(model, ids, stride, max_length), rel=1e-5)


def test_perplexity_of_several_texts_pools_tokens(model, tok):
    a, b = "the fox", "a lazy dog jumps"
    na, nb = len(tok.encode(a)) - 1, len(tok.encode(b)) - 1
    pooled = math.exp((mean_nll(model, tok.encode(a)) * na + mean_nll(model, tok.encode(b)) * nb) / (na + nb))
    assert analysis.perplexity(model, tok, [a, b]) == pytest.approx(pooled, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"text": "t"}, "at least 2 tokens"),
        ({"text": TEXT, "stride": 0}, "stride"),
        ({"text": TEXT, "max_length": 25}, "max_length"),
        ({"text": "Q!"}, "not in the vocabulary"),
    ],
)
def test_perplexity_bad_input(model, tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        analysis.perplexity(model, tok, **kwargs)


def test_generate_text_greedy_and_stream_agree(model, tok):
    [plain] = analysis.generate_text(model, tok, "the", max_new_tokens=12)
    pieces = []
    [streamed] = analysis.generate_text(model, tok, "the", stream=pieces.append, max_new_tokens=12)
    assert plain == streamed
    assert plain.startswith("the") and "".join(pieces) == plain[3:]
    # greedy = the argmax of the model, step by step
    ids = tok.encode("the")
    for _ in range(len(plain) - 3):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert tok.decode(ids) == plain


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.7},
        {"temperature": 1.3, "top_k": 5},
        {"top_p": 0.8, "repetition_penalty": 1.3},
    ],
)
def test_generate_text_sampling_stream_draws_like_generate(model, tok, kwargs):
    texts = []
    for stream in (None, lambda piece: None):
        generator = torch.Generator().manual_seed(7)
        texts += analysis.generate_text(
            model, tok, "a", stream=stream, max_new_tokens=15, do_sample=True, generator=generator, **kwargs
        )
    assert texts[0] == texts[1]


def test_generate_text_several_sequences_and_sos(model, tok):
    texts = analysis.generate_text(
        model,
        tok,
        "",
        num_return_sequences=3,
        do_sample=True,
        max_new_tokens=8,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    with pytest.raises(ValueError, match="num_return_sequences=1"):
        analysis.generate_text(model, tok, "a", stream=print, num_return_sequences=2)
    with pytest.raises(ValueError, match="exceeds n_positions"):
        analysis.generate_text(model, tok, "a", stream=print, max_new_tokens=30)


def test_stream_with_byte_level_bpe_sends_whole_characters():
    """A character of several UTF-8 bytes may take several tokens: the stream sends it once complete."""
    from pyminigpt.tokenizer import BPETokenizer

    bpe = BPETokenizer.train(["h\u00e9 w\u00f6rld \u00f1 \u263a"] * 4, vocab_size=262)
    torch.manual_seed(1)
    bpe_model = GPT(GPTConfig(vocab_size=bpe.vocab_size, n_positions=40, n_embd=32, n_layer=1, n_head=2)).eval()
    for seed in range(3):
        pieces = []
        generator = torch.Generator().manual_seed(seed)
        [text] = analysis.generate_text(
            bpe_model,
            bpe,
            "h\u00e9",
            stream=pieces.append,
            max_new_tokens=30,
            do_sample=True,
            top_k=0,
            generator=generator,
        )
        assert "".join(pieces) == text[len("h\u00e9") :]
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_next_token_table(model, tok):
    rows = analysis.next_token_table(model, tok, "the q", top_n=5)
    probs = torch.softmax(model(torch.tensor([tok.encode("the q")])).logits[0, -1], -1)
    top = probs.topk(5)
    assert [r[0] for r in rows] == [tok.decode([i]) for i in top.indices.tolist()]
    assert [r[1] for r in rows] == pytest.approx(top.values.tolist(), rel=1e-5)
    table = analysis.format_next_token_table(rows)
    assert len(table.splitlines()) == 6 and "#" in table


def test_attention_maps(model, tok):
    maps = analysis.attention_maps(model, tok, "the fox", add_special_tokens=True)
    T = len("the fox") + 2
    assert maps.shape == (2, 4, T, T)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, T))
    assert bool((maps.triu(1) == 0).all()), "a token attends to a later one"


def test_hidden_states_and_embeddings(model, tok):
    h = analysis.hidden_states(model, tok, ["the fox", "dog"], layer=-1, pool="last")
    states = model(torch.tensor([tok.encode("dog")]), output_hidden_states=True).hidden_states
    assert h.shape == (2, 32)
    torch.testing.assert_close(h[1], states[-1][0, -1])
    mean0 = analysis.hidden_states(model, tok, ["dog"], layer=0)
    torch.testing.assert_close(mean0[0], states[0][0].mean(0))
    e = analysis.embeddings(model, tok, ["t", "h"])
    torch.testing.assert_close(e, model.transformer.wte.weight[tok.encode("th")])
    with pytest.raises(ValueError, match="layer"):
        analysis.hidden_states(model, tok, ["dog"], layer=3)


def test_pca_recovers_the_main_directions():
    g = torch.Generator().manual_seed(0)
    n = 200
    basis = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))[0]
    scales = torch.tensor([5.0, 2.0] + [0.1] * 8, dtype=torch.float64)
    x = (torch.randn(n, 10, generator=g, dtype=torch.float64) * scales) @ basis.T + 3.0
    coords, ratio = analysis.pca(x, k=2)
    assert coords.shape == (n, 2)
    assert ratio[0] > ratio[1] > 0.05 and float(ratio.sum()) > 0.95
    # the coordinates are the centred data on the top two directions (up to sign)
    expected = ((x - x.mean(0)) @ basis[:, :2]).float()
    for j in range(2):
        sign = torch.sign((coords[:, j] * expected[:, j]).sum())
        torch.testing.assert_close(coords[:, j] * sign, expected[:, j], atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="k must be"):
        analysis.pca(x, k=11)


def test_plots_write_pngs(model, tok, tmp_path):
    maps = analysis.attention_maps(model, tok, "fox")
    tokens = analysis.token_strings(tok, tok.encode("fox"))
    vectors = analysis.embeddings(model, tok, list("thequickbrown"))
    paths = [
        plots.plot_attention(maps, tokens, tmp_path / "attention.png"),
        plots.plot_pca(vectors, list("thequickbrown"), tmp_path / "pca.png"),
        plots.plot_curve([0.5, -1, 1], tmp_path / "sub" / "rewards.png", ylabel="reward"),
    ]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="tokens has 2 entries"):
        plots.plot_attention(maps, tokens[:2], tmp_path / "bad.png")
