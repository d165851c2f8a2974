"""The `pyminigpt` command: one table of sub-commands, one module each.

`pyminigpt --help` lists them all. Each module in `COMMANDS` adds its own sub-command with
`add_parser(subparsers)`, which sets `run(args)` as the command's function; running a command
imports its module alone (`--help`, or no command, imports them all to list them).

Bad input (a missing, empty or non-UTF-8 file, a corpus shorter than one window, a
damaged checkpoint, a checkpoint of another config, a prompt the tokenizer cannot
encode) ends with a one-line message naming the problem and the file, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "build_parser", "main"]

# The sub-commands, in the order `pyminigpt --help` lists them: name -> the module that adds and runs it.
COMMANDS = {
    "demo": "pyminigpt.cli.demo",
    "train": "pyminigpt.cli.train",
    "generate": "pyminigpt.cli.generate",
    "perplexity": "pyminigpt.cli.perplexity",
    "chat": "pyminigpt.cli.chat",
    "explore": "pyminigpt.cli.explore",
    "info": "pyminigpt.cli.info",
    "bench": "pyminigpt.cli.bench",
}


def _chosen(argv: list[str]) -> str | None:
    """The sub-command argv names (its first word that is not an option), if it is one of COMMANDS."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `pyminigpt` parser with `command`'s sub-command, or with all of them when command is None."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="pyminigpt", description="A small GPT-2 on fused kernels: train, sample, explore, benchmark."
    )
    parser.add_argument("--version", action="version", version=f"pyminigpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `pyminigpt` command; returns the exit code (2 for bad input, with a one-line message)."""
    from ..train.checkpoint import CheckpointError
    from .runs import UsageError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_chosen(argv)).parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, CheckpointError, OSError) as err:
        print(f"pyminigpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyminigpt {args.command}: interrupted", file=sys.stderr)
        return 130
