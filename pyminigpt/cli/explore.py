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
from pathlib import Path

import torch

from ..quantize import add_weights_argument
from .explore_report import TABLE_ROWS, Exploration, build_page, format_report
from .runs import add_tokenizer_file_arg

DEFAULT_PROMPT = "The strawberry is a red fruit. How many r's are in strawberry?"
PAGE_FILE, ATTENTION_FILE, STATES_FILE = "explore.html", "attention.png", "hidden_states.png"
# Caps that keep each picture readable (and each table short) whatever the model and prompt.
MAX_HEADS, MAX_DEPTHS = 16, 9
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
    add_tokenizer_file_arg(p)
    add_weights_argument(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    """`pyminigpt explore`: check the options, explore, print the report, write the page."""
    from ..files import atomic_write
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
    loaded = load_model(args.model, pick_device(args.device), args.tokenizer, weights=args.weights)
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
    from ..analysis import next_token_table, perplexity, prompt_ids, token_probabilities, token_strings, word_split

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
    from ..analysis import attention_maps, token_strings
    from ..plots import plot_attention

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
    from ..analysis import layer_states, token_strings
    from ..plots import plot_pca_panels

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
        color_label="position in the prompt (wte panel: order of first appearance)",
    )
    return STATES_FILE


def _sampling_grid(found: Exploration, model, tokenizer, ids: list[int], max_new_tokens: int, seed: int):
    """(setting, continuation) for each setting of SAMPLING_GRID, each drawn with a generator seeded `seed`."""
    from ..analysis import generate_text

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
