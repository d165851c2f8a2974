"""`pyminigpt perplexity MODEL [FILE]`: the perplexity of a text under a model."""

from __future__ import annotations

from ..quantize import add_weights_argument
from .runs import UsageError, encode_check, load_model, pick_device


def run(args) -> int:
    from ..analysis import perplexity

    loaded = load_model(args.model, pick_device(args.device), args.tokenizer, weights=args.weights)
    if (args.file is None) == (args.text is None):
        raise UsageError("give a FILE or --text (one of them)")
    if args.file is not None:
        from ..train.data import load_text

        try:
            text, source = load_text(args.file), repr(args.file)
        except (OSError, ValueError) as err:
            raise UsageError(str(err)) from None
    else:
        if not args.text.strip():
            raise UsageError("--text is empty: give some text to score")
        text, source = args.text, "the text"
    texts = [line.strip() for line in text.splitlines() if line.strip()] if loaded.sos else text
    for piece in [texts] if isinstance(texts, str) else texts:
        encode_check(loaded, piece, source)
    try:
        ppl = perplexity(
            loaded.model,
            loaded.tokenizer,
            texts,
            stride=args.stride,
            max_length=args.max_length,
            add_special_tokens=loaded.sos,
        )
    except ValueError as err:
        raise UsageError(f"{source}: {err}") from None
    print(
        f"perplexity {ppl:.3f} of {source} under {str(loaded.path)!r}"
        f" (a uniform guess over the vocabulary scores {loaded.tokenizer.vocab_size})"
    )
    return 0


def add_parser(subparsers) -> None:
    """Add the `perplexity` sub-command to an argparse sub-parser set."""
    p = subparsers.add_parser(
        "perplexity",
        help="perplexity of a text under a model",
        description="exp(mean negative log-likelihood per token), with a strided sliding window for "
        "texts longer than the context. A run trained on lines scores each line as one sequence.",
    )
    p.add_argument("model", help="run directory, checkpoint directory, or GPT-2 directory")
    p.add_argument("file", nargs="?", default=None, help="UTF-8 text file to score")
    p.add_argument("--text", default=None, help="score this text instead of a file")
    p.add_argument("--stride", type=int, default=None, help="window stride in tokens (default: half the window)")
    p.add_argument("--max-length", type=int, default=None, help="window length in tokens (default: the context)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the run's tokenizer.json)")
    add_weights_argument(p)
    p.set_defaults(run=run)
