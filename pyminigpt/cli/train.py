"""`pyminigpt train [DATA]`: train a model on a text file (or the built-in names), or fine-tune one.

    pyminigpt train [DATA]                 a run from scratch, into --out
    pyminigpt train DATA --init-from DIR   fine-tune a GPT-2 directory (or a run) on a text file
    pyminigpt train --resume --out RUN     continue a run from its newest checkpoint

The run directory's format (run.json, the tokenizer, checkpoints) is in `runs.py`.
"""

from __future__ import annotations

from pathlib import Path

from ..train.rng import seed_all
from .runs import (
    RUN_FILE,
    SIZES,
    TOKENIZER_FILE,
    UsageError,
    load_corpus,
    load_init_model,
    make_datasets,
    make_model,
    pick_device,
    read_json,
    size_name,
    tokenizer_kind,
    with_dropout,
    write_json,
)

DEFAULT_VOCAB_SIZE, DEFAULT_DROPOUT = 1024, 0.1  # train's defaults for a run from scratch


def run(args) -> int:
    from ..model import GPT, GPTConfig
    from ..tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
    from ..train.trainer import Trainer, TrainerConfig

    out = Path(args.out)
    init = None  # the Loaded model that --init-from starts from
    model_config = None  # the architecture of a run that started from --init-from
    if args.resume:
        if args.init_from is not None:
            raise UsageError("--init-from starts a new run and --resume continues the one in --out: give one of them")
        run = read_json(out / RUN_FILE, "run file (needed by --resume)")
        missing = [key for key in ("format", "data", "size", "context", "tokenizer") if key not in run]
        if missing:
            raise UsageError(f"run file {str(out / RUN_FILE)!r} is corrupt: it lacks {', '.join(missing)}")
        data = args.data if args.data is not None else run["data"]
        lines, size, kind = run["format"] == "lines", args.size or run["size"], run["tokenizer"]
        context = args.context or run["context"]
        model_config = run.get("model_config")
        if model_config is not None and args.size is not None and args.size != run["size"]:
            raise UsageError(
                f"--size {args.size} contradicts the run in {str(out)!r}, which started from "
                f"{run.get('init_from')!r} (size {run['size']}): leave --size out"
            )
        try:
            tokenizer = load_tokenizer(out / TOKENIZER_FILE)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load the run's tokenizer: {err}") from None
    else:
        if (out / RUN_FILE).exists() or any(out.glob("last*")) or any(out.glob("step-*")):
            raise UsageError(
                f"{str(out)!r} already holds a training run: pass --resume to continue it, or choose another --out"
            )
        data = args.data
        lines = args.lines or data is None
        context = args.context
        if args.init_from is not None:
            init = load_init_model(args.init_from, args.size, args.vocab_size, args.tokenizer, context)
            tokenizer, kind, size = init.tokenizer, tokenizer_kind(init.tokenizer), size_name(init.model.config)
        else:
            size, kind = args.size or "small", args.tokenizer or "char"
    source, corpus = load_corpus(data)
    if lines and isinstance(corpus, str):
        corpus = [line.strip() for line in corpus.splitlines() if line.strip()]
    if context is not None and context < 3:
        raise UsageError(f"--context must be >= 3, got {context}")
    if model_config is not None and context is not None and context > model_config["n_positions"]:
        raise UsageError(
            f"--context {context} is longer than the context of the run's model ({model_config['n_positions']})"
        )
    if not args.resume and init is None:
        try:
            if kind == "char":
                tokenizer = CharTokenizer.from_text(corpus)
            else:
                tokenizer = BPETokenizer.train(corpus, vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE)
        except ValueError as err:
            raise UsageError(f"{source}: {err}") from None
    if kind == "char" and (init is not None or args.resume):  # a tokenizer not built on this text
        for piece in corpus if lines else [corpus]:
            try:
                tokenizer.encode(piece)
            except ValueError as err:
                raise UsageError(f"{source}: {err}") from None
    if context is None:
        limit = init.model.config.n_positions if init is not None else None
        if lines:  # a sequence run fits its longest text (within the model's context)
            context = max(len(tokenizer.encode(t)) for t in corpus) + 2
            context = min(context, limit) if limit is not None else context
        else:  # a stream run takes the model's context, or the preset's
            context = limit or SIZES[size]["context"]
    train_ds, eval_ds = make_datasets(source, corpus, tokenizer, lines, context)
    seed_all(args.seed)
    try:
        if init is not None:
            model = init.model if args.dropout is None else with_dropout(init.model, args.dropout)
            model_config = model.config.to_dict()
        elif model_config is not None:  # resuming a run that started from --init-from
            model = GPT(GPTConfig(**model_config))
        else:
            model = make_model(tokenizer, size, context, DEFAULT_DROPOUT if args.dropout is None else args.dropout)
        config = TrainerConfig(
            max_steps=args.steps,
            batch_size=args.batch_size,
            grad_accum_steps=args.grad_accum,
            learning_rate=args.lr,
            warmup_steps=max(0, min(args.warmup, args.steps)),
            eval_interval=args.eval_interval,
            save_interval=args.save_interval,
            precision=args.precision,
            out_dir=str(out),
            seed=args.seed,
            device=str(pick_device(args.device)),
            progress=not args.no_progress,
        )
        trainer = Trainer(model, train_ds, eval_ds, config, tokenizer=tokenizer)
    except ValueError as err:  # a GPTConfig / TrainerConfig / Trainer check on the options or the data
        raise UsageError(f"{source}: {err}") from None
    say = print if trainer.is_main else lambda *a, **k: None  # under torchrun, rank 0 alone writes and prints
    if not args.resume and trainer.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out / TOKENIZER_FILE)
        run = {
            "format": "lines" if lines else "stream",
            "data": data and str(Path(data).resolve()),
            "size": size,
            "context": context,
            "tokenizer": kind,
        }
        if init is not None:
            run.update(init_from=str(init.path.resolve()), model_config=model_config)
        write_json(run, out / RUN_FILE)
    start = f"fine-tuning {str(init.path)!r}" if init is not None else f"training a {size} GPT"
    say(
        f"{start} ({model.num_parameters():,} parameters, context {context}) on the {source}: "
        f"{len(train_ds):,} training {'texts' if lines else 'windows'}, {kind} "
        f"tokenizer with {tokenizer.vocab_size} tokens"
    )
    history = trainer.train(resume_from="auto" if args.resume else None)
    if not history:
        say(f"nothing to do: the run in {str(out)!r} is already at step {trainer.step} (raise --steps to go on)")
        return 0
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    summary = f"final train loss {history[-1]['loss']:.3f}"
    if evals:
        summary += f", eval loss {evals[0]:.3f} -> {evals[-1]:.3f}"
    say(summary)
    say(
        f"saved {out / 'last'}"
        + (f" and {out / 'best'}" if (out / "best").is_dir() else "")
        + f"; loss curve {out / 'loss.png'}"
    )
    say(f"each checkpoint is a transformers model directory; try: pyminigpt generate {out}")
    return 0


def add_parser(subparsers) -> None:
    """Add the `train` sub-command to an argparse sub-parser set."""
    p = subparsers.add_parser(
        "train",
        help="train a model on a text file or the built-in names",
        description="Train a GPT on DATA (a UTF-8 text file; default: the built-in names corpus). "
        "The run directory gets the tokenizer, checkpoints (best/, last/) and loss.png; each checkpoint is "
        "a transformers model directory. With --init-from DIR, fine-tune the weights and tokenizer of a GPT-2 "
        "directory (or an earlier run) instead of starting from scratch.",
    )
    p.add_argument("data", nargs="?", default=None, help="UTF-8 text file (default: built-in names, one per sequence)")
    p.add_argument("--lines", action="store_true", help="each line of DATA is one sequence (<SOS> line <EOS>)")
    p.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="start from the weights and tokenizer of a GPT-2 directory, a run or a checkpoint, and fine-tune "
        "them (the context defaults to the model's; --size, --vocab-size and --tokenizer must agree with it)",
    )
    p.add_argument(
        "--tokenizer", choices=("char", "bpe"), default=None, help="character or byte-level BPE (default char)"
    )
    p.add_argument("--vocab-size", type=int, default=None, help=f"BPE vocabulary size (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument(
        "--size",
        choices=tuple(SIZES),
        default=None,
        help="model preset: "
        + ", ".join(f"{k} ({v['n_layer']}x{v['n_embd']})" for k, v in SIZES.items())
        + " (default small)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="context length (default: the preset's or the --init-from model's, or the longest line + 2)",
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=None,
        help=f"dropout rate (default {DEFAULT_DROPOUT}; with --init-from, the model's own rates)",
    )
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps (default 100)")
    p.add_argument("--eval-interval", type=int, default=100, help="evaluate every N steps (default 100)")
    p.add_argument(
        "--save-interval", type=int, default=0, help="also checkpoint every N steps (default 0: best and last only)"
    )
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/pyminigpt", help="run directory (default runs/pyminigpt)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
