"""How `pyminigpt explore` shows what it found: the printed report and the self-contained HTML page.

`explore.py` computes an `Exploration` (defined here); this module only renders it (text tables, then one page
with the pictures embedded as data: URIs, in the same order).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..analysis import _visible

TABLE_ROWS = 60  # the rows a table shows (explore.py notes what it leaves out)


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
    from ..analysis import format_next_token_table

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
