"""`pyminigpt bench`: run the benchmark suites and turn them into a report of ratios.

    pyminigpt bench [--ops] [--e2e] [--quick] [--out DIR] [--bench-dir DIR] [-k EXPR]

Runs the pytest-benchmark files of the repository's `bench/` folder in a pytest subprocess
(`--ops`: every `test_bench_*.py` but the end-to-end one; `--e2e`: `test_bench_e2e.py`;
neither: both) and writes into DIR (default `bench-report/`):

    bench.json   pytest-benchmark's own JSON
    report.md    per group (one op or one end-to-end task at one size), each member's median,
                 its speedup over the group's eager member and over its peer, and the
                 group's extra_info (GB/s, tokens/s, fraction of the hardware bound, ...)
    *.png        one bar chart per group: each member's speedup over eager

A group's eager member is the one named `eager` (or with extra_info role "eager"); its peer
is the strongest outside implementation (extra_info role "peer", else a member named one of
`PEERS`). `--quick` sets PYMINIGPT_BENCH_QUICK=1, which shrinks the end-to-end suite to a
tiny model and a few tokens (the op suites run as they are).

The benchmarks are not installed with the package: `--bench-dir` defaults to ./bench.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

E2E_FILE = "test_bench_e2e.py"
# Member names that are the outside implementation a kernel is measured against.
PEERS = ("transformers", "sdpa", "torch", "compile")
# extra_info entries worth a column in the Markdown table.
EXTRA_COLUMNS = ("tokens/s", "bound tokens/s", "fraction_of_bound", "GB/s", "fraction_of_copy", "TFLOP/s")


@dataclass
class Result:
    group: str
    member: str
    median: float  # seconds
    role: str  # "eager", "peer" or "member"
    extra: dict


def _member_name(bench: dict) -> str:
    params = bench.get("params") or {}
    if "member" in params:
        return str(params["member"])
    return bench["name"]


def _role(member: str, extra: dict) -> str:
    if extra.get("role") in ("eager", "peer", "member"):
        return extra["role"]
    if member == "eager":
        return "eager"
    return "peer" if member in PEERS else "member"


def load_results(benchmark_json: dict) -> dict[str, list[Result]]:
    """pytest-benchmark JSON -> {group: [Result, ...]} in the order the benchmarks ran."""
    groups: dict[str, list[Result]] = {}
    for bench in benchmark_json.get("benchmarks", []):
        member = _member_name(bench)
        extra = dict(bench.get("extra_info") or {})
        result = Result(
            bench.get("group") or bench["name"], member, bench["stats"]["median"], _role(member, extra), extra
        )
        groups.setdefault(result.group, []).append(result)
    return groups


def _baseline(results: list[Result], role: str) -> Result | None:
    return next((r for r in results if r.role == role), None)


def _ratio(baseline: Result | None, result: Result) -> str:
    return f"{baseline.median / result.median:.2f}x" if baseline is not None else "-"


def _format_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def render_markdown(groups: dict[str, list[Result]], header: str = "") -> str:
    """One table per group: member, median (ms), speedup over eager and over the peer, extra_info columns."""
    lines = [header] if header else []
    for group, results in groups.items():
        eager, peer = _baseline(results, "eager"), _baseline(results, "peer")
        extras = [c for c in EXTRA_COLUMNS if any(c in r.extra for r in results)]
        peer_title = f"vs {peer.member}" if peer else "vs peer"
        lines += [
            f"### {group}",
            "",
            "| member | median (ms) | vs eager | " + peer_title + " |" + "".join(f" {c} |" for c in extras),
        ]
        lines.append("|---" * (4 + len(extras)) + "|")
        for r in sorted(results, key=lambda r: r.median):
            cells = [f"`{r.member}`", _format_seconds(r.median), _ratio(eager, r), _ratio(peer, r)]
            cells += [str(r.extra.get(c, "")) for c in extras]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def plot_groups(groups: dict[str, list[Result]], out_dir: Path) -> list[Path]:
    """One PNG per group: each member's speedup over eager (over the slowest member if there is no eager)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for group, results in groups.items():
        baseline = _baseline(results, "eager") or max(results, key=lambda r: r.median)
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(results), 3.2))
        names = [r.member for r in results]
        speedups = [baseline.median / r.median for r in results]
        colors = [
            "tab:gray" if r.role == "eager" else "tab:orange" if r.role == "peer" else "tab:blue" for r in results
        ]
        ax.bar(names, speedups, color=colors)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"speedup over {baseline.member}")
        ax.set_title(group, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        for i, s in enumerate(speedups):
            ax.text(i, s, f"{s:.2f}x", ha="center", va="bottom", fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{_slug(group)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _bench_files(bench_dir: Path, ops: bool, e2e: bool) -> list[Path]:
    files = sorted(bench_dir.glob("test_bench_*.py"))
    return [f for f in files if (f.name == E2E_FILE and e2e) or (f.name != E2E_FILE and ops)]


def _versions() -> str:
    from importlib import metadata

    found = []
    for package in ("torch", "transformers", "triton"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def _backends() -> str:
    """The kernel backends this install has, and why the others are missing (a missing one has no rows)."""
    from pyminigpt import ops

    status = ops.backend_status()
    found = [name for name, s in status.items() if s["available"] and name != "reference"]
    missing = [f"{name} ({s['reason']})" for name, s in status.items() if not s["available"]]
    return ", ".join(found) + ("; unavailable: " + "; ".join(missing) if missing else "")


def _command_line(args: argparse.Namespace) -> str:
    flags = [f"--{name}" for name in ("ops", "e2e", "quick") if getattr(args, name)]
    flags += [f"--out {args.out}"] + ([f"--bench-dir {args.bench_dir}"] if args.bench_dir else [])
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
        f"- versions: python {info.get('python_version', '?')}, {_versions()}\n"
        f"- kernel backends: {_backends()}\n"
        f"- command: `{_command_line(args)}`\n"
        f"- date: {benchmark_json.get('datetime', '?')}\n"
        "- `vs eager` / `vs <peer>`: the eager member's (the peer's) median over this member's; >1 is faster\n"
    )


DESCRIPTION = "Run the benchmarks; write the pytest-benchmark JSON, a Markdown report of ratios and PNG charts."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pyminigpt bench` (this module's `main` and the `pyminigpt` command share them)."""
    parser.add_argument("--ops", action="store_true", help="the op benchmarks (every bench/test_bench_*.py but e2e)")
    parser.add_argument("--e2e", action="store_true", help="the end-to-end generate / train-step benchmarks")
    parser.add_argument("--quick", action="store_true", help="a tiny end-to-end model and few tokens (CI)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-report"), help="output directory (default: bench-report)"
    )
    parser.add_argument(
        "--bench-dir", type=Path, default=None, help="the repository's bench/ folder (default: ./bench)"
    )
    parser.add_argument("-k", dest="keyword", default=None, help="only benchmarks matching this pytest -k expression")


def main(argv=None) -> int:
    """`pyminigpt bench` with argv (default sys.argv[1:]); returns the exit status."""
    parser = argparse.ArgumentParser(prog="pyminigpt bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the suites, write bench.json, report.md and the PNGs; returns pytest's exit status (2 for bad usage)."""
    bench_dir = args.bench_dir if args.bench_dir is not None else Path("bench")
    if not (bench_dir / "conftest.py").is_file():
        print(
            f"pyminigpt bench: no benchmark folder at {str(bench_dir)!r}: the benchmarks live in the repository's bench/ "
            "folder (not in the installed package); run from a checkout or pass --bench-dir",
            file=sys.stderr,
        )
        return 2
    want_ops, want_e2e = (args.ops, args.e2e) if (args.ops or args.e2e) else (True, True)
    files = _bench_files(bench_dir, want_ops, want_e2e)
    if not files:
        print(f"pyminigpt bench: no test_bench_*.py files selected in {str(bench_dir)!r}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = (args.out / "bench.json").resolve()
    command = [sys.executable, "-m", "pytest", *(str(f.resolve()) for f in files), "-q", "-p", "no:cacheprovider"]
    command += [f"--benchmark-json={json_path}", "--benchmark-group-by=group"]
    if args.keyword:
        command.append(f"-k{args.keyword}")  # one token, so an expression starting with '-' is not an option
    # not an xdist worker's variables: pytest-benchmark turns itself off under xdist
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    package_root = str(Path(__file__).resolve().parent.parent)  # the subprocess imports this very pyminigpt
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    if args.quick:
        env["PYMINIGPT_BENCH_QUICK"] = "1"
    # `python -m` puts its working directory first on sys.path: run in bench/, not in the checkout's
    # root, whose pyminigpt/ source folder (without the built extension) would shadow this one.
    status = subprocess.call(command, env=env, cwd=bench_dir)
    if not json_path.is_file():
        print(f"pyminigpt bench: pytest (exit {status}) wrote no {json_path}", file=sys.stderr)
        return status or 1
    benchmark_json = json.loads(json_path.read_text())
    groups = load_results(benchmark_json)
    (args.out / "report.md").write_text(render_markdown(groups, _machine_header(benchmark_json, args)))
    charts = plot_groups(groups, args.out)
    print(f"pyminigpt bench: {len(groups)} groups -> {json_path}, {args.out / 'report.md'}, {len(charts)} PNG charts")
    return status


if __name__ == "__main__":
    sys.exit(main())
