"""`pyminigpt bench`: run the benchmark suites and turn them into a report of ratios.

    pyminigpt bench [--ops] [--e2e] [--quick] [--out DIR] [--bench-dir DIR] [-k EXPR]
                    [--from-json BENCH_JSON ...] [--decode-json SUMMARY] [--group-charts]

Runs the pytest-benchmark suites that ship in this package (pyminigpt/bench/) in a pytest subprocess
(`--ops`: every `test_bench_*.py` but the end-to-end one; `--e2e`: `test_bench_e2e.py`;
neither: both) and writes into DIR (default `bench-report/`):

    bench.json    pytest-benchmark's own JSON
    report.md     the headline table (decode tokens/s of every member with its fraction of the
                  bandwidth bound; the training step and each op against its strongest peer),
                  then per group (one op or one end-to-end task at one size) each member's
                  median, its speedup over the group's eager member and over its strongest
                  peer, and the group's extra_info (GB/s, tokens/s, fraction of the bound, ...)
    overview.png  every group's speedup over its baseline and over its strongest peer
    *.png         with --group-charts, also one bar chart per group

A group's baseline is its eager member (named `eager`, or extra_info role "eager"); its peers
are the outside implementations (extra_info role "peer", else a member named one of `PEERS`),
and the strongest peer is the fastest of them (the baseline when a group has no peer: eager
PyTorch is then the torch peer). "pyminigpt" in a group is its fastest own member.
`--from-json` renders earlier pytest-benchmark JSON files instead of running the suites;
`--decode-json` replaces the decode groups with a summary of bench/interleaved_decode.py
(members interleaved across processes). `--quick` runs `QUICK_SELECTION` (one size of each
op, and the end-to-end suite on a tiny model: PYMINIGPT_BENCH_QUICK=1) with few rounds each.

Every report says how loaded the machine was (the load average before and after the run, kept
in bench.json), warns when it was busy, and flags the groups whose rounds spread widely.

The suites are installed with the package, so an install runs them from any folder; `--bench-dir`
points at another copy of them (a checkout's pyminigpt/bench, say).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from .results import (
    DECODE_GROUP,
    NOT_INSTALLED,
    OPTIONAL_MEMBERS,
    Result,
    baseline,
    best_own,
    family,
    load_decode_summary,
    load_results,
    merge_decode_groups,
    strongest_peer,
)
from .run import QUICK_OPTIONS, QUICK_SELECTION, backends, load_average, load_lines, noisy_note, record_load, versions

E2E_FILE = "test_bench_e2e.py"
SUITES_DIR = Path(__file__).resolve().parent  # the suites ship next to this file
# extra_info entries worth a column in the Markdown table.
EXTRA_COLUMNS = ("tokens/s", "bound tokens/s", "fraction_of_bound", "GB/s", "fraction_of_copy", "from", "TFLOP/s")


def _missing_optional(results: list[Result]) -> list[str]:
    present = {r.member for r in results}
    return [
        m for m, package in OPTIONAL_MEMBERS.items() if m not in present and importlib.util.find_spec(package) is None
    ]


def _decode_table(groups: dict[str, list[Result]]) -> list[str]:
    decode = {g: r for g, r in groups.items() if DECODE_GROUP.match(g)}
    if not decode:
        return []
    members: list[str] = []
    for results in decode.values():
        members += [r.member for r in results if r.member not in members]
        members += [m for m in _missing_optional(results) if m not in members]
    titles = [f"{DECODE_GROUP.match(g)['mode']} B{DECODE_GROUP.match(g)['batch']}" for g in decode]
    lines = [
        "Decode tokens/s (fraction of the member's bandwidth bound); " + next(iter(decode)).split(" ", 3)[-1] + ":",
        "",
        "| member | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(titles),
    ]
    for member in members:
        cells = []
        for results in decode.values():
            r = next((r for r in results if r.member == member), None)
            if r is None:
                cells.append(NOT_INSTALLED if member in _missing_optional(results) else "-")
            elif "tokens/s" in r.extra and "fraction_of_bound" in r.extra:
                cells.append(f"{r.extra['tokens/s']:.1f} ({r.extra['fraction_of_bound']:.2f})")
            else:
                cells.append(f"{r.extra.get('tokens/s', '-')}")
        lines.append(f"| `{member}` | " + " | ".join(cells) + " |")
    return lines + [""]


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _speedup_summary(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}x"
    return f"{_geometric_mean(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def render_headline(groups: dict[str, list[Result]]) -> str:
    """The headline: decode tokens/s of every member with its fraction of the bound, then per
    task or op (sizes and dtypes pooled) pyminigpt's speedup over the baseline and over the
    strongest peer: geometric mean (min-max) over the groups."""
    lines = ["## Headline", "", *_decode_table(groups)]
    families: dict[str, list[list[Result]]] = {}
    for group, results in groups.items():
        families.setdefault(family(group), []).append(results)
    lines += [
        "| task / op | groups | strongest peer | pyminigpt vs strongest peer | vs baseline |",
        "|---|---:|---|---:|---:|",
    ]
    for name, members in families.items():
        over_peer, over_baseline, peer_names = [], [], []
        for results in members:
            own, peer, eager = best_own(results), strongest_peer(results), baseline(results, "eager")
            if own is None:
                continue
            if peer is not None and peer is not own:
                over_peer.append(peer.median / own.median)
                peer_names += [peer.member] if peer.member not in peer_names else []
            if eager is not None:
                over_baseline.append(eager.median / own.median)
        if over_peer or over_baseline:
            lines.append(
                f"| {name} | {len(members)} | {', '.join(f'`{p}`' for p in peer_names) or '-'} | "
                f"{_speedup_summary(over_peer)} | {_speedup_summary(over_baseline)} |"
            )
    return "\n".join(lines + [""])


def _ratio(baseline: Result | None, result: Result) -> str:
    return f"{baseline.median / result.median:.2f}x" if baseline is not None else "-"


def _format_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def render_markdown(groups: dict[str, list[Result]], header: str = "") -> str:
    """The headline, then one table per group: member, median (ms), speedup over eager and over the
    strongest peer, extra_info columns."""
    lines = [header] if header else []
    lines += [render_headline(groups), "## Groups", ""]
    for group, results in groups.items():
        eager, peer = baseline(results, "eager"), strongest_peer(results)
        peer = peer if peer is not None and peer.role == "peer" else None
        extras = [c for c in EXTRA_COLUMNS if any(c in r.extra for r in results)]
        peer_title = f"vs {peer.member}" if peer else "vs peer"
        lines += [f"### {group}", ""]
        lines += noisy_note(results)
        lines.append("| member | median (ms) | vs eager | " + peer_title + " |" + "".join(f" {c} |" for c in extras))
        lines.append("|---" * (4 + len(extras)) + "|")
        for r in sorted(results, key=lambda r: r.median):
            cells = [f"`{r.member}`", _format_seconds(r.median), _ratio(eager, r), _ratio(peer, r)]
            cells += [str(r.extra.get(c, "")) for c in extras]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [f"| `{m}` | {NOT_INSTALLED} |" + " |" * (2 + len(extras)) for m in _missing_optional(results)]
        lines.append("")
    return "\n".join(lines)


def _bench_files(bench_dir: Path, ops: bool, e2e: bool) -> list[Path]:
    files = sorted(bench_dir.glob("test_bench_*.py"))
    return [f for f in files if (f.name == E2E_FILE and e2e) or (f.name != E2E_FILE and ops)]


def _command_line(args: argparse.Namespace) -> str:
    flags = [f"--{name}" for name in ("ops", "e2e", "quick") if getattr(args, name)]
    flags += [f"--out {args.out}"] + ([f"--bench-dir {args.bench_dir}"] if args.bench_dir else [])
    flags += [f"--from-json {' '.join(map(str, args.from_json))}"] if args.from_json else []
    flags += [f"--decode-json {args.decode_json}"] if args.decode_json else []
    return " ".join(["pyminigpt bench", *flags, *([f"-k '{args.keyword}'"] if args.keyword else [])])


def _machine_header(benchmark_json: dict, args: argparse.Namespace) -> str:
    info = benchmark_json.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", info.get("processor", "?"))
    import torch  # here, not at the top: `pyminigpt bench --help` stays quick

    if torch.cuda.is_available():
        cpu += f"; GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return (
        "# pyminigpt benchmark report\n\n"
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n"
        f"- versions: python {info.get('python_version', '?')}, {versions()}\n"
        f"- kernel backends: {backends()}\n"
        f"- command: `{_command_line(args)}`\n"
        f"{load_lines(benchmark_json.get('pyminigpt_load'))}"
        f"- date: {benchmark_json.get('datetime', '?')}\n"
        "- `vs eager` / `vs <peer>`: the eager member's (the strongest peer's) median over this member's; >1 is faster\n"
        "- GB/s `from` cache: the working set fits in the last-level cache, so the rate (and a fraction of the DRAM copy "
        "bandwidth above 1) is a cache rate\n"
    )


DESCRIPTION = "Run the benchmarks; write the pytest-benchmark JSON, a Markdown report of ratios and an overview PNG."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pyminigpt bench` (this module's `main` and the `pyminigpt` command share them)."""
    from ..quantize import WEIGHT_CHOICES

    parser.add_argument("--ops", action="store_true", help="the op benchmarks (every test_bench_*.py but e2e)")
    parser.add_argument("--e2e", action="store_true", help="the end-to-end generate / train-step benchmarks")
    quick = "a few representative groups (an op size each, a tiny end-to-end model), few rounds: under a minute"
    parser.add_argument("--quick", action="store_true", help=quick + " (-k replaces the selection)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-report"), help="output directory (default: bench-report)"
    )
    parser.add_argument(
        "--bench-dir", type=Path, default=None, help="the folder of the suites (default: the installed pyminigpt/bench)"
    )
    parser.add_argument("-k", dest="keyword", default=None, help="only benchmarks matching this pytest -k expression")
    parser.add_argument(
        "--from-json", type=Path, nargs="+", default=None, help="render these pytest-benchmark JSON files; run nothing"
    )
    parser.add_argument(
        "--decode-json", type=Path, default=None, help="decode groups from a bench/interleaved_decode.py --json summary"
    )
    parser.add_argument("--group-charts", action="store_true", help="also one PNG per group")
    parser.add_argument(
        "--weights",
        choices=WEIGHT_CHOICES,
        default=None,
        help="the end-to-end suite's pyminigpt member runs with these weights only (default: every one)",
    )


def main(argv=None) -> int:
    """`pyminigpt bench` with argv (default sys.argv[1:]); returns the exit status."""
    parser = argparse.ArgumentParser(prog="pyminigpt bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the suites (or read --from-json), write bench.json, report.md, overview.png (and the
    per-group PNGs); returns pytest's exit status (2 for bad usage)."""
    if args.from_json:
        missing = [str(p) for p in args.from_json if not p.is_file()]
        if missing:
            print(f"pyminigpt bench: --from-json: no such file {', '.join(missing)}", file=sys.stderr)
            return 2
        benchmark_json = {"benchmarks": []}
        for path in args.from_json:
            data = json.loads(path.read_text())
            benchmark_json["benchmarks"] += data.get("benchmarks", [])
            benchmark_json.setdefault("machine_info", data.get("machine_info", {}))
            benchmark_json.setdefault("datetime", data.get("datetime", "?"))
            if "pyminigpt_load" in data:
                benchmark_json.setdefault("pyminigpt_load", data["pyminigpt_load"])
        status = 0
    else:
        benchmark_json, status = _run_suites(args)
        if benchmark_json is None:
            return status
    groups = load_results(benchmark_json)
    if args.decode_json is not None:
        if not args.decode_json.is_file():
            print(f"pyminigpt bench: --decode-json: no such file {str(args.decode_json)!r}", file=sys.stderr)
            return 2
        groups = merge_decode_groups(groups, load_decode_summary(json.loads(args.decode_json.read_text())))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(render_markdown(groups, _machine_header(benchmark_json, args)))
    from .charts import plot_groups, plot_overview  # matplotlib only when charts are drawn

    charts = [plot_overview(groups, args.out / "overview.png")]
    if args.group_charts:
        charts += plot_groups(groups, args.out)
    print(f"pyminigpt bench: {len(groups)} groups -> {args.out / 'report.md'}, {len(charts)} PNG charts")
    return status


def _run_suites(args: argparse.Namespace) -> tuple[dict | None, int]:
    """Runs the selected bench files under pytest: (their pytest-benchmark JSON, pytest's exit
    status), or (None, status) when there is nothing to report."""
    bench_dir = args.bench_dir if args.bench_dir is not None else SUITES_DIR
    if not (bench_dir / "conftest.py").is_file():
        print(
            f"pyminigpt bench: no benchmark suites at {str(bench_dir)!r} (a folder with conftest.py and "
            "test_bench_*.py, like pyminigpt/bench/)",
            file=sys.stderr,
        )
        return None, 2
    want_ops, want_e2e = (args.ops, args.e2e) if (args.ops or args.e2e) else (True, True)
    files = _bench_files(bench_dir, want_ops, want_e2e)
    if not files:
        print(f"pyminigpt bench: no test_bench_*.py files selected in {str(bench_dir)!r}", file=sys.stderr)
        return None, 2
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = (args.out / "bench.json").resolve()
    # importlib mode: pytest's default would put the folder above the suites' package on sys.path, a
    # checkout's root, whose kernels/ folder shadows the `kernels` package that transformers looks for
    command = [sys.executable, "-m", "pytest", *(str(f.resolve()) for f in files), "-q", "-p", "no:cacheprovider"]
    command += ["--import-mode=importlib"]
    command += [f"--benchmark-json={json_path}", "--benchmark-group-by=group", "-rs"]
    keyword = args.keyword or (QUICK_SELECTION if args.quick else None)
    if keyword:
        command.append(f"-k{keyword}")  # one token, so an expression starting with '-' is not an option
    if args.quick:
        command += QUICK_OPTIONS
    # not an xdist worker's variables: pytest-benchmark turns itself off under xdist
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    # the same interpreter imports this very pyminigpt (installed, or editable); no PYTHONPATH is
    # added: a checkout's root there would shadow the `kernels` package with the Triton kernels' folder
    if args.quick:
        env["PYMINIGPT_BENCH_QUICK"] = "1"
    if args.weights:  # test_bench_e2e.py keeps the pyminigpt member with these weights
        env["PYMINIGPT_BENCH_WEIGHTS"] = args.weights
    # `python -m` puts its working directory first on sys.path: run in the output folder, not in a
    # checkout's root, whose pyminigpt/ source folder (without the built extension) would shadow this one.
    load_before = load_average()
    status = subprocess.call(command, env=env, cwd=args.out)
    if not json_path.is_file():
        print(f"pyminigpt bench: pytest (exit {status}) wrote no {json_path}", file=sys.stderr)
        return None, status or 1
    return record_load(json_path, load_before), status


if __name__ == "__main__":
    sys.exit(main())
