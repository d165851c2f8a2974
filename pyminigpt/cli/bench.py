"""`pyminigpt bench`: run the benchmark suites that ship in `pyminigpt.bench` and report ratios."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    """Add the `bench` sub-command to an argparse sub-parser set."""
    from ..bench import report

    p = subparsers.add_parser(
        "bench", help="run the benchmarks; report ratios (JSON, Markdown, PNG)", description=report.DESCRIPTION
    )
    report.add_arguments(p)
    p.set_defaults(run=report.run)
