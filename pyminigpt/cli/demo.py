"""`pyminigpt demo`: train a character model on fantasy names for about a minute (DEMO_TRAIN_SECONDS), then explore it."""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from ..train.rng import seed_all
from .runs import RUN_FILE, TOKENIZER_FILE, UsageError, write_json

# The demo trains for about this many seconds (within [DEMO_MIN_STEPS, DEMO_MAX_STEPS] steps) unless --steps says otherwise.
DEMO_TRAIN_SECONDS, DEMO_MIN_STEPS, DEMO_MAX_STEPS = 60.0, 50, 4000


def _seconds_per_step(model, dataset, batch_size: int, repeats: int = 4) -> float:
    """Time of one training step (forward, backward, AdamW) of a copy of `model`, after a warm-up step."""
    import copy

    import torch.nn.functional as F

    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(probe.parameters())
    items = [dataset[i] for i in range(batch_size)]
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    for i in range(repeats + 1):
        if i == 1:
            start = time.perf_counter()
        logits = probe(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return 1.1 * (time.perf_counter() - start) / repeats  # + data loading and bookkeeping


def run(args) -> int:
    """Run `pyminigpt demo`."""
    from ..analysis import (
        attention_maps,
        embeddings,
        format_next_token_table,
        generate_text,
        next_token_table,
        perplexity,
        token_strings,
    )
    from ..model import GPT, GPTConfig
    from ..plots import plot_attention, plot_pca
    from ..tokenizer import CharTokenizer
    from ..train.data import SequenceDataset, names_corpus
    from ..train.trainer import Trainer, TrainerConfig

    started = time.perf_counter()
    out = Path(args.out)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RUN_FILE).is_file())):
        raise UsageError(f"--out {str(out)!r} exists and is not a demo output: choose another directory")
    if args.quick:
        n_names, size, batch = 600, {"n_layer": 1, "n_head": 2, "n_embd": 32}, 32
    else:
        n_names, size, batch = 5000, {"n_layer": 3, "n_head": 4, "n_embd": 64}, 64
    seed_all(args.seed)
    names = names_corpus(n_names, seed=args.seed)
    random.Random(args.seed).shuffle(names)
    n_eval = len(names) // 10
    train_names, eval_names = names[n_eval:], names[:n_eval]
    tokenizer = CharTokenizer.from_text(names)
    context = max(map(len, names)) + 2  # <SOS> name <EOS>
    print(
        f"pyminigpt demo: a character-level GPT learns to invent fantasy names\n"
        f"corpus: {len(names)} names like {', '.join(train_names[:5])} ({len(train_names)} to train on, "
        f"{len(eval_names)} held out); {tokenizer.vocab_size} tokens (characters + <PAD> <SOS> <EOS>)"
    )

    config = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        n_positions=context,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.sos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        **size,
    )
    model = GPT(config)
    train_ds, eval_ds = (
        SequenceDataset(train_names, tokenizer, context),
        SequenceDataset(eval_names, tokenizer, context),
    )
    print(
        f"model: GPT-2 with {config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, "
        f"context {context}: {model.num_parameters():,} parameters"
    )
    if args.steps is not None:
        steps = args.steps
    elif args.quick:
        steps = 30
    else:  # as many steps as fit in the time budget on this machine
        seconds = _seconds_per_step(model, train_ds, batch)
        steps = max(DEMO_MIN_STEPS, min(DEMO_MAX_STEPS, int(DEMO_TRAIN_SECONDS / seconds)))
        print(
            f"this machine trains it at {1 / seconds:.1f} steps/s: {steps} steps of {batch} names "
            f"(about {steps * seconds:.0f} s; --steps sets another number)"
        )
    print()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / TOKENIZER_FILE)
    write_json(
        {"format": "lines", "data": None, "size": "demo", "context": context, "tokenizer": "char"}, out / RUN_FILE
    )

    trainer = Trainer(
        model,
        train_ds,
        eval_ds,
        TrainerConfig(
            max_steps=steps,
            batch_size=batch,
            learning_rate=3e-3,
            warmup_steps=min(50, steps // 5),
            weight_decay=0.05,
            eval_interval=max(1, steps // 6),
            eval_batches=4,
            out_dir=str(out),
            seed=args.seed,
            device="cpu",
            progress=not args.no_progress,
        ),
        tokenizer=tokenizer,  # each checkpoint a complete transformers model directory
    )
    history = trainer.train()
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    print("\nheld-out loss (nats per character): " + "  ".join(f"step {s}: {v:.3f}" for s, v in evals))
    model.eval()

    ppl = perplexity(model, tokenizer, eval_names, add_special_tokens=True)
    print(
        f"perplexity on the held-out names: {ppl:.2f} (a uniform guess: {tokenizer.vocab_size}; "
        f"the model hesitates between about {ppl:.1f} characters at each step)\n"
    )

    print("what comes first? next-character probabilities after <SOS>:")
    print(format_next_token_table(next_token_table(model, tokenizer, "", top_n=5, sos=True)) + "\n")

    generator = torch.Generator().manual_seed(args.seed)
    known = set(train_names)
    generated = []
    settings = [("greedy", {"do_sample": False, "num_return_sequences": 1})]
    settings += [(f"temperature {t}", {"do_sample": True, "temperature": t, "top_k": 0}) for t in (0.5, 0.8, 1.0, 1.5)]
    settings += [
        ("top-k 3", {"do_sample": True, "top_k": 3}),
        ("top-p 0.7", {"do_sample": True, "top_k": 0, "top_p": 0.7}),
    ]
    n_each = 4 if args.quick else 8
    print("generated names (* = also in the training set):")
    for label, kwargs in settings:
        kwargs = {"num_return_sequences": n_each, **kwargs}
        names_out = generate_text(
            model, tokenizer, "", sos=True, max_new_tokens=context - 1, generator=generator, **kwargs
        )
        generated += names_out
        shown = ", ".join(n + ("*" if n in known else "") for n in names_out)
        print(f"  {label:<16} {shown}")
    new = sum(n not in known for n in generated) / len(generated)
    print(f"{new:.0%} of the {len(generated)} generated names are new (not in the training set)")
    prompted = generate_text(
        model,
        tokenizer,
        "Th",
        sos=True,
        max_new_tokens=context - 3,
        do_sample=True,
        temperature=0.8,
        top_k=0,
        num_return_sequences=n_each,
        generator=generator,
    )
    print(f"  starting with 'Th': {', '.join(prompted)}\n")

    example = next((n for n in generated if n and n not in known), generated[0] or "Aragorn")
    maps = attention_maps(model, tokenizer, example, add_special_tokens=True)
    tokens = token_strings(tokenizer, tokenizer.encode(example, add_special_tokens=True))
    attention_png = plot_attention(maps, tokens, out / "attention.png", title=f"attention on {example!r}")
    letters = tokenizer.chars
    embeddings_png = plot_pca(
        embeddings(model, tokenizer, letters), letters, out / "embeddings.png", title="character embeddings (PCA)"
    )
    print(f"wrote the loss curve to {out / 'loss.png'}, the attention maps on {example!r} to {attention_png}")
    print(f"and the learned character embeddings on their two principal components to {embeddings_png}")
    print(f"the trained model is in {out}: try `pyminigpt generate {out}` or `pyminigpt chat {out} --feedback`")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def add_parser(subparsers) -> None:
    """Add the `demo` sub-command to an argparse sub-parser set."""
    p = subparsers.add_parser(
        "demo",
        help=f"train a character model on fantasy names (~{DEMO_TRAIN_SECONDS:.0f} s) and explore it",
        description="Train a character-level GPT on the built-in names corpus, then generate names at "
        "several temperatures and with top-k / top-p, measure perplexity and novelty, and "
        "plot the loss curve and attention maps.",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default: what fits in {DEMO_TRAIN_SECONDS:.0f} s here; 30 with --quick)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="pyminigpt-demo", help="output directory (default ./pyminigpt-demo)")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds; for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
