"""`pyminigpt explore MODEL`: the exploration notebook in one command.

For a run, a checkpoint or a GPT-2 directory and one prompt, it prints, in this order:

1. the token table: how the tokenizer splits each word (tokens per word, the
   "strawberry" effect: the model sees ' str' 'aw' 'berry', not letters) and what the
   prompt costs in tokens;
2. the next-token probability table after the prompt;
3. the attention heatmaps of every head of one layer (`--layer`);
4. the prompt's hidden states at every depth on two principal components (the
   embeddings first), with the token embeddings of the prompt's words;
5. continuations under a small grid of sampling settings, all with one seed;
6. the prompt's perplexity, and the tokens the model expected least.

The pictures go to `--out` as PNG, and `explore.html` there shows everything in order
with the pictures embedded (data: URIs), so the page is one file to open or send.

A prompt or model too large for a readable picture is summarised, and the page says
how: the pictures show the first `--max-tokens` tokens, at most 16 heads and 9 depths;
the tables list their first rows; the next-token table and the generations read the
last tokens that fit in the context; the perplexity scores the whole prompt with a
sliding window.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .analysis import _visible

DEFAULT_PROMPT = "The strawberry is a red fruit. How many r's are in strawberry?"
PAGE_FILE, ATTENTION_FILE, STATES_FILE = "explore.html", "attention.png", "hidden_states.png"
# Caps that keep each picture readable (and each table short) whatever the model and prompt.
MAX_HEADS, MAX_DEPTHS, TABLE_ROWS = 16, 9, 60
SURPRISES = 5  # rows of the table of the prompt's least expected tokens
# The sampling grid: one row per setting, each drawn with the same seed.
SAMPLING_GRID = (
    ("greedy", {"do_sample": False}),
    ("temperature 0.7", {"do_sample": True, "temperature": 0.7, "top_k": 0}),
    ("temperature 1.0", {"do_sample": True, "temperature": 1.0, "top_k": 0}),
    ("temperature 1.5", {"do_sample": True, "temperature": 1.5, "top_k": 0}),
    ("top-k 10", {"do_sample": True, "top_k": 10}),
    ("top-p 0.9", {"do_sample": True, "top_k": 0, "top_p": 0.9}),
    ("T 0.8, top-k 40, top-p 0.95", {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95}),
)


@dataclass
class Exploration:
    """Everything `explore` found out, for the printed report and the HTML page."""

    model_path: str
    out_dir: str  # where the pictures are
    model_summary: str
    prompt: str
    token_ids: list[int]  # the prompt as the model reads it (after <SOS> for a lines run)
    tokens: list[str]  # the text of each token id
    words: list  # analysis.WordSplit per word of the prompt
    context: int
    next_tokens: list[tuple[str, float]]
    layer: int
    attention_png: str
    states_png: str | None
    generations: list[tuple[str, str]]  # (setting, continuation)
    seed: int
    perplexity: float | None
    surprises: list[tuple[int, str, float]]  # (position, token, probability) of the least expected tokens
    notes: dict[str, list[str]] = field(default_factory=dict)  # section -> what was summarised, and why

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)


# ----------------------------------------------------------------------------- the command


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `explore` on the `pyminigpt` command's subparsers."""
    p = subparsers.add_parser(
        "explore",
        help="the exploration notebook: tokens, next-token table, attention, PCA, sampling, perplexity",
        description="Explore a model on one prompt: the token table (how each word is split), the "
        "next-token probabilities, the attention heatmaps of one layer, the hidden states on two "
        "principal components, continuations under a grid of sampling settings (one seed) and the "
        "perplexity. Prints the tables, writes the pictures and one self-contained HTML page.",
    )
    p.add_argument("model", help="run directory, checkpoint directory, or GPT-2 directory")
    p.add_argument("--prompt", default=None, help=f"the text to explore (default {DEFAULT_PROMPT!r})")
    p.add_argument(
        "--out",
        default="pyminigpt-explore",
        help="where the pictures and explore.html go (default ./pyminigpt-explore)",
    )
    p.add_argument("--layer", type=int, default=None, help="the layer whose heads are drawn (default: the last)")
    p.add_argument("--top-n", type=int, default=10, help="rows of the next-token table (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens per generation (default 30)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens shown in the pictures (default 32)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every generation (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the run's tokenizer.json)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    """`pyminigpt explore`: check the options, explore, print the report, write the page."""
    from .io import atomic_write
    from .runs import UsageError, encode_check, load_model, pick_device

    given = args.prompt is not None
    prompt = args.prompt if given else DEFAULT_PROMPT
    if prompt == "":
        raise UsageError("--prompt is empty: give a text to explore")
    for name, value, low in (("--top-n", args.top_n, 1), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    if args.max_tokens < 2:
        raise UsageError(f"--max-tokens must be >= 2 (a picture needs two tokens), got {args.max_tokens}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory")
    loaded = load_model(args.model, pick_device(args.device), args.tokenizer)
    encode_check(loaded, prompt, "--prompt" if given else "the default prompt (pass --prompt)")
    n_layer = loaded.model.config.n_layer
    layer = n_layer - 1 if args.layer is None else args.layer
    if not -n_layer <= layer < n_layer:
        raise UsageError(f"--layer must be in [{-n_layer}, {n_layer - 1}] (the model has {n_layer}), got {args.layer}")
    found = explore(
        loaded,
        prompt,
        out,
        layer=layer % n_layer,
        top_n=args.top_n,
        max_new_tokens=args.max_new_tokens,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    print(format_report(found))
    page = out / PAGE_FILE
    atomic_write(page, build_page(found))
    pictures = ", ".join(str(out / name) for name in (found.attention_png, found.states_png) if name)
    print(f"\nwrote {pictures} and the page {page} (open it in a browser)")
    return 0


# ----------------------------------------------------------------------------- the exploration


def explore(
    loaded, prompt: str, out: Path, layer: int, top_n: int, max_new_tokens: int, max_tokens: int, seed: int
) -> Exploration:
    """Run every part of the exploration on `prompt` with `loaded` (a `Loaded` model);
    the pictures are written to `out`."""
    from .analysis import next_token_table, perplexity, prompt_ids, token_probabilities, token_strings, word_split

    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.model.config
    ids = prompt_ids(tokenizer, prompt, loaded.sos)
    context = config.n_positions
    found = Exploration(
        model_path=str(loaded.path),
        out_dir=str(out),
        model_summary=(
            f"GPT-2 with {config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, context {context}, "
            f"vocabulary {config.vocab_size}: {model.num_parameters():,} parameters; {tokenizer!r}"
        ),
        prompt=prompt,
        token_ids=ids,
        tokens=token_strings(tokenizer, ids),
        words=word_split(tokenizer, prompt),
        context=context,
        next_tokens=[],
        layer=layer,
        attention_png="",
        states_png=None,
        generations=[],
        seed=seed,
        perplexity=None,
        surprises=[],
    )
    if loaded.sos:
        found.note("tokens", "this model was trained on <SOS> text <EOS> sequences: it reads the prompt after <SOS>")
    if len(ids) > TABLE_ROWS:
        found.note("tokens", f"the token table lists the first {TABLE_ROWS} of the {len(ids)} tokens")
    if len(found.words) > TABLE_ROWS:
        found.note("tokens", f"the word table lists the first {TABLE_ROWS} of the {len(found.words)} words")

    tail = ids[-context:]
    if len(tail) < len(ids):
        found.note("next", f"the prompt is {len(ids)} tokens: the table reads its last {context} (the context)")
    found.next_tokens = next_token_table(model, tokenizer, tail, top_n=min(top_n, config.vocab_size))

    window = ids[: min(max_tokens, context)]
    if len(window) < len(ids):
        found.note("pictures", f"the pictures show the first {len(window)} of the prompt's {len(ids)} tokens")
    found.attention_png = _attention_picture(found, model, tokenizer, window, out)
    found.states_png = _states_picture(found, model, tokenizer, window, out)

    found.generations = _sampling_grid(found, model, tokenizer, ids, max_new_tokens, seed)

    try:
        found.perplexity = perplexity(model, tokenizer, prompt, add_special_tokens=loaded.sos)
        scored = token_probabilities(model, tokenizer, prompt, add_special_tokens=loaded.sos)
        found.surprises = sorted(scored, key=lambda row: row[2])[:SURPRISES]
    except ValueError:  # a one-token prompt: nothing to predict
        found.note("perplexity", "the prompt has a single token: there is nothing to predict, so no perplexity")
    if len(ids) > context:
        found.note(
            "perplexity", f"scored with a sliding window of {context} tokens (the context), stride {context // 2}"
        )
    return found


def _attention_picture(found: Exploration, model, tokenizer, window: list[int], out: Path) -> str:
    """Draw every head (at most MAX_HEADS) of `found.layer` on the `window` of tokens; returns the file name."""
    from .analysis import attention_maps, plot_attention, token_strings

    maps = attention_maps(model, tokenizer, window)[found.layer]  # (heads, T, T)
    heads = maps.shape[0]
    if heads > MAX_HEADS:
        found.note("attention", f"the layer has {heads} heads: the picture shows the first {MAX_HEADS}")
        maps = maps[:MAX_HEADS]
    if len(window) > 48:
        found.note("attention", "the maps cover more than 48 tokens: the axes are left unlabelled")
    plot_attention(
        maps[None],
        token_strings(tokenizer, window),
        out / ATTENTION_FILE,
        title=f"attention of layer {found.layer} (query rows, key columns)",
        columns=min(4, maps.shape[0]),
        panel_titles=[f"head {h}" for h in range(maps.shape[0])],
    )
    return ATTENTION_FILE


WTE_TITLE = "token embeddings (wte rows of the prompt's tokens)"


def _states_picture(found: Exploration, model, tokenizer, window: list[int], out: Path) -> str | None:
    """PCA panels of the token embeddings and of the hidden states at (at most MAX_DEPTHS)
    depths, over the `window` of tokens; returns the file name, or None for a one-token window."""
    from .analysis import layer_states, plot_pca_panels, token_strings

    if len(window) < 2:
        found.note("pca", "a principal-component picture needs at least two tokens: the prompt has one")
        return None
    labels = token_strings(tokenizer, window)
    states = layer_states(model, tokenizer, window)  # (n_layer + 1, T, C)
    depths = list(range(states.shape[0]))
    if len(depths) > MAX_DEPTHS:  # evenly spaced, the embeddings and the output always in
        depths = sorted({round(i * (len(depths) - 1) / (MAX_DEPTHS - 1)) for i in range(MAX_DEPTHS)})
        found.note("pca", f"the model has {states.shape[0]} depths: the picture shows {len(depths)} of them")
    last = states.shape[0] - 1
    names = {0: "embeddings (token + position)", last: "output (after the final layer norm)"}
    panels = []
    distinct = list(dict.fromkeys(window))
    if len(distinct) >= 2:
        table = model.transformer.wte.weight[distinct].detach().float().cpu()
        panels.append((table, token_strings(tokenizer, distinct), WTE_TITLE))
    panels += [(states[d], labels, names.get(d, f"after block {d - 1}")) for d in depths]
    plot_pca_panels(
        panels,
        out / STATES_FILE,
        title="the prompt's tokens on two principal components, layer by layer (each panel its own PCA)",
        columns=min(3, len(panels)),
        connect=[title != WTE_TITLE for _, _, title in panels],  # the embedding table has no order to show
    )
    return STATES_FILE


def _sampling_grid(found: Exploration, model, tokenizer, ids: list[int], max_new_tokens: int, seed: int):
    """(setting, continuation) for each setting of SAMPLING_GRID, each drawn with a generator seeded `seed`."""
    from .analysis import generate_text

    context = found.context
    new = min(max_new_tokens, max(context - len(ids), context // 2), context - 1)  # the prompt keeps half, at least
    if new < 1:
        found.note("sampling", f"the context of {context} token leaves no room to generate")
        return []
    if new < max_new_tokens:
        found.note("sampling", f"{new} new tokens per generation: the context is {context}")
    start = ids[-(context - new) :]
    if len(start) < len(ids):
        found.note("sampling", f"the generations continue the last {len(start)} tokens of the prompt")
    prefix = tokenizer.decode(start)
    rows = []
    for label, kwargs in SAMPLING_GRID:
        generator = torch.Generator(model.device).manual_seed(seed)
        [text] = generate_text(model, tokenizer, start, max_new_tokens=new, generator=generator, **kwargs)
        rows.append((label, text[len(prefix) :]))
    return rows


# ----------------------------------------------------------------------------- the report


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def strawberry_sentence(found: Exploration) -> str | None:
    """What the split of the prompt's words means for the model (the strawberry effect), or None for no words."""
    words = [w for w in found.words if w.word.strip()]
    if not words:
        return None
    if all(len(piece) <= 1 for w in words for piece in w.pieces):
        return "one token per character: the model sees every letter, at the cost of many tokens per word"
    split = [w for w in words if w.tokens > 1]
    if not split:
        return "every word is one token: the model never sees the letters inside a word"

    def merged(w) -> bool:
        return any(len(piece.strip()) > 1 for piece in w.pieces)

    worst = max(split, key=lambda w: (any(c.isalpha() for c in w.word), merged(w), w.tokens, len(w.word)))
    head = f"{_plural(len(split), 'word')} of {len(words)} are cut into several tokens; the model sees "
    pieces = " + ".join(map(repr, worst.pieces))
    if merged(worst):
        return (
            f"{head}{worst.word.strip()!r} as {pieces}: pieces, not letters, which is why counting the letters "
            f"of a word (the strawberry effect) is hard for it"
        )
    return f"{head}{worst.word.strip()!r} letter by letter ({pieces}): a word its tokenizer never merged"


def cost_summary(found: Exploration) -> str:
    """One line: what the prompt costs in tokens (its own tokens; a <SOS> before it is not counted)."""
    n_chars, n_tokens = len(found.prompt), sum(w.tokens for w in found.words)
    n_words = sum(1 for w in found.words if w.word.strip())
    return (
        f"{_plural(n_chars, 'character')}, {_plural(n_words, 'word')} -> {_plural(n_tokens, 'token')} "
        f"({n_tokens / max(n_words, 1):.2f} tokens per word, {n_chars / max(n_tokens, 1):.2f} characters per token; "
        f"the context holds {found.context} tokens)"
    )


def format_report(found: Exploration) -> str:
    """The printed report: every table in the page's order."""
    from .analysis import format_next_token_table

    lines = [f"model: {found.model_path}", found.model_summary, f"prompt: {found.prompt!r}", ""]

    lines += ["1. tokens", cost_summary(found)]
    lines.append(f"{'#':>4}  {'id':>6}  token")
    for i, (token_id, token) in enumerate(zip(found.token_ids[:TABLE_ROWS], found.tokens)):
        lines.append(f"{i:>4}  {token_id:>6}  {_visible(token)}")
    lines.append(f"{'word':>20}  tokens  pieces")
    for w in found.words[:TABLE_ROWS]:
        lines.append(
            f"{_visible(w.word.strip()) or _visible(w.word):>20}  {w.tokens:>6}  {' | '.join(map(_visible, w.pieces))}"
        )
    sentence = strawberry_sentence(found)
    if sentence:
        lines.append(sentence)
    lines += _notes(found, "tokens")

    lines += ["", f"2. the next token after the prompt (top {len(found.next_tokens)})"]
    lines.append(format_next_token_table(found.next_tokens))
    lines += _notes(found, "next")

    lines += ["", f"3. attention of layer {found.layer}: {found.attention_png}"]
    lines += _notes(found, "pictures") + _notes(found, "attention")
    lines += ["", f"4. hidden states on two principal components: {found.states_png or 'none'}"]
    lines += _notes(found, "pca")

    lines += ["", f"5. generations (seed {found.seed}; the prompt, then each setting's continuation)"]
    width = max((len(label) for label, _ in found.generations), default=0)
    for label, text in found.generations:
        lines.append(f"  {label:<{width}}  {text!r}")
    lines += _notes(found, "sampling")

    lines += ["", "6. perplexity"]
    if found.perplexity is not None:
        lines.append(f"{_perplexity_sentence(found)}")
        lines.append(f"the {len(found.surprises)} least expected tokens:")
        lines.append(f"{'#':>6}  {'token':>12}  probability")
        lines += [f"{i:>6}  {_visible(token):>12}  {prob:.4f}" for i, token, prob in found.surprises]
    lines += _notes(found, "perplexity")
    return "\n".join(lines)


def _notes(found: Exploration, section: str) -> list[str]:
    return [f"  (note: {note})" for note in found.notes.get(section, [])]


def _perplexity_sentence(found: Exploration) -> str:
    return (
        f"perplexity {found.perplexity:.2f}: at each token the model hesitates as if between about "
        f"{found.perplexity:.1f} equally likely tokens (log2: {math.log2(found.perplexity):.2f} bits per token)"
    )


# ----------------------------------------------------------------------------- the page

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1300px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 2px 8px; text-align: left; }
tr:nth-child(even) { background: #f6f6f6; } th { border-bottom: 1px solid #aaa; }
code, .tok { font-family: ui-monospace, monospace; }
.tok { padding: 1px 2px; margin: 1px 0; border-radius: 3px; white-space: pre; line-height: 2; }
.tok.a { background: #cfe3ff; } .tok.b { background: #ffe1b8; }
.bar { background: #4a7fd6; height: 0.9em; display: inline-block; }
.note { color: #8a5a00; } img { max-width: 100%; border: 1px solid #eee; }
"""


def _embedded_png(out: Path, name: str | None) -> str:
    if name is None:
        return ""
    data = base64.b64encode((out / name).read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></p>'


def _chips(pieces, ids=None) -> str:
    """Token texts as alternately coloured chips (the id in a tooltip when `ids` are given)."""
    return "".join(
        f'<span class="tok {"ab"[i % 2]}"'
        + (f' title="id {ids[i]}"' if ids else "")
        + f">{html.escape(_visible(p))}</span>"
        for i, p in enumerate(pieces)
    )


def build_page(found: Exploration) -> str:
    """The HTML page of `found`, self-contained: the pictures (read from `found.out_dir`)
    are embedded as data: URIs, and nothing else is referenced."""
    e = html.escape
    directory = Path(found.out_dir)

    def notes(section: str) -> str:
        return "".join(f'<p class="note">Note: {e(n)}</p>' for n in found.notes.get(section, []))

    chips = _chips(found.tokens[:TABLE_ROWS], found.token_ids)
    word_rows = "".join(
        f"<tr><td><code>{e(w.word.strip() or _visible(w.word))}</code></td><td>{w.tokens}</td>"
        f"<td>{_chips(w.pieces)}</td></tr>"
        for w in found.words[:TABLE_ROWS]
    )
    sentence = strawberry_sentence(found)
    strawberry = f"<p>{e(sentence)}.</p>" if sentence else ""
    next_rows = "".join(
        f"<tr><td><code>{e(_visible(token))}</code></td><td>{prob:.3f}</td>"
        f'<td><span class="bar" style="width: {max(prob * 300, 1):.0f}px"></span></td></tr>'
        for token, prob in found.next_tokens
    )
    shown_prompt = found.prompt if len(found.prompt) <= 120 else "\u2026" + found.prompt[-100:]
    generation_rows = "".join(
        f"<tr><td>{e(label)}</td><td><code>{e(shown_prompt)}<b>{e(text)}</b></code></td></tr>"
        for label, text in found.generations
    )
    perplexity = ""
    if found.perplexity is not None:
        surprise_rows = "".join(
            f"<tr><td>{i}</td><td><code>{e(_visible(token))}</code></td><td>{prob:.4f}</td></tr>"
            for i, token, prob in found.surprises
        )
        perplexity = (
            f"<p>{e(_perplexity_sentence(found))}.</p><p>The tokens the model expected least:</p>"
            f"<table><tr><th>position</th><th>token</th><th>probability</th></tr>{surprise_rows}</table>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pyminigpt explore: {e(found.model_path)}</title>
<style>{_STYLE}</style></head><body>
<h1>pyminigpt explore</h1>
<p>Model <code>{e(found.model_path)}</code>: {e(found.model_summary)}</p>
<p>Prompt: <code>{e(found.prompt)}</code></p>

<h2>1. Tokens</h2>
<p>{e(cost_summary(found))}</p>
<p>{chips}</p>
<table><tr><th>word</th><th>tokens</th><th>pieces</th></tr>{word_rows}</table>
{strawberry}{notes("tokens")}

<h2>2. The next token</h2>
<table><tr><th>token</th><th>probability</th><th></th></tr>{next_rows}</table>
{notes("next")}

<h2>3. Attention of layer {found.layer}</h2>
<p>Each panel is one head: row i shows how much token i attends to each earlier token.</p>
{notes("pictures")}{notes("attention")}{_embedded_png(directory, found.attention_png)}

<h2>4. Hidden states on two principal components</h2>
<p>The prompt's tokens at each depth, from the embeddings to the output, each panel on its own two
principal components; the grey line joins the tokens in order, the colour goes from the first token
(dark) to the last (light).</p>
{notes("pca")}{_embedded_png(directory, found.states_png)}

<h2>5. Sampling settings side by side</h2>
<p>Every row continues the prompt with the same seed ({found.seed}).</p>
<table><tr><th>setting</th><th>prompt + <b>continuation</b></th></tr>{generation_rows}</table>
{notes("sampling")}

<h2>6. Perplexity</h2>
{perplexity}{notes("perplexity")}
</body></html>
"""
