"""`pyminigpt generate MODEL`: sample text from a trained run, checkpoint or GPT-2 directory."""

from __future__ import annotations

from ..quantize import add_weights_argument
from .runs import UsageError, add_sampling_args, check_sampling, encode_check, load_model, pick_device, sampling_kwargs


def run(args) -> int:
    from ..analysis import generate_text

    check_sampling(args)
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    loaded = load_model(args.model, pick_device(args.device), args.tokenizer, weights=args.weights)
    encode_check(loaded, args.prompt, "prompt")
    kwargs = sampling_kwargs(args, loaded, args.prompt)
    if args.stream:
        for _ in range(args.num_samples):
            print(args.prompt, end="", flush=True)
            generate_text(
                loaded.model,
                loaded.tokenizer,
                args.prompt,
                sos=loaded.sos,
                stream=lambda piece: print(piece, end="", flush=True),
                **kwargs,
            )
            print()
    else:
        texts = generate_text(
            loaded.model, loaded.tokenizer, args.prompt, sos=loaded.sos, num_return_sequences=args.num_samples, **kwargs
        )
        for text in texts:
            print(text)
    return 0


def add_parser(subparsers) -> None:
    """Add the `generate` sub-command to an argparse sub-parser set."""
    p = subparsers.add_parser(
        "generate",
        help="sample text from a model",
        description="Continue a prompt with a trained run, checkpoint or GPT-2 directory.",
    )
    p.add_argument("model", help="run directory, checkpoint directory, or GPT-2 directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start from scratch)")
    p.add_argument("--num-samples", type=int, default=5, help="how many continuations (default 5)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_sampling_args(p)
    add_weights_argument(p)
    p.set_defaults(run=run)
