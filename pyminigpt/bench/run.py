"""How `pyminigpt bench` runs: what `--quick` selects, how loaded the machine was, which results are noisy.

`--quick` runs QUICK_SELECTION (a pytest -k expression) with QUICK_OPTIONS (few rounds each).
A ratio of two medians means something only when both members had the cores to themselves.
The report's header gives the 1-minute load average before and after the run (`load_lines`)
and warns when the machine was busy (`busy`); each group whose rounds spread by more than
NOISY_SPREAD of their median (interquartile range) is flagged in its table.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# `--quick`: one representative group per suite (an op at one GPT-2 size, the end-to-end suite on a
# tiny model), a few rounds each: a check that everything runs and a first idea, in under a minute.
QUICK_SELECTION = (
    "(layer_norm_forward and not backward and 8192x768-float32)"
    " or (softmax_forward and not backward and 64x50257-float32)"
    " or (test_sample and k50-p0.9)"
    " or attention_decode"
    " or (test_linear and 8-mlp-float32)"
    " or ((test_generate and sample-1-) or test_train_step) and not compile"
)
QUICK_OPTIONS = ("--benchmark-max-time=0.2", "--benchmark-min-rounds=3", "--benchmark-warmup=off")
NOISY_SPREAD = 0.25  # a member whose rounds' interquartile range exceeds this fraction of its median is noisy


def busy(load: dict) -> bool:
    """Whether other processes shared the cores: a 1-minute load average above half the logical CPUs
    before the run, or above all of them after it (which counts the benchmark's own threads too)."""
    return load["before"] > load["cpus"] / 2 or load["after"] > load["cpus"]


def load_lines(load: dict | None) -> str:
    """The header's lines on how loaded the machine was while the benchmarks ran."""
    if not load:
        return "- machine load: not recorded (a report from JSON that `pyminigpt bench` did not write)\n"
    line = (
        f"- machine load: 1-minute load average {load['before']:.2f} before the run, {load['after']:.2f} after it, "
        f"on {load['cpus']} logical CPUs\n"
    )
    if busy(load):
        line += (
            "- **busy machine**: other processes shared the cores while the benchmarks ran, so the ratios below can "
            "be far off (a member timed while another process ran looks slower than it is); rerun on a quiet "
            "machine before quoting them\n"
        )
    return line


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def record_load(json_path: Path, load_before: float) -> dict:
    """pytest-benchmark's JSON in `json_path` with the load before and after the run added (written back,
    so that a report rendered from it later says so too); warns on stderr when the machine was busy."""
    benchmark_json = json.loads(json_path.read_text())
    benchmark_json["pyminigpt_load"] = {"before": load_before, "after": load_average(), "cpus": os.cpu_count()}
    json_path.write_text(json.dumps(benchmark_json, indent=1))
    if busy(benchmark_json["pyminigpt_load"]):
        print("pyminigpt bench: the machine was busy while the benchmarks ran: see report.md", file=sys.stderr)
    return benchmark_json


def noisy_note(results: list) -> list[str]:
    """Lines that flag a group whose noisiest member's rounds spread more than NOISY_SPREAD of its median."""
    noisy = max(results, key=lambda r: r.spread)
    if noisy.spread <= NOISY_SPREAD:
        return []
    note = (
        f"Noisy: the rounds of `{noisy.member}` spread {noisy.spread:.0%} of its median (interquartile range); "
        "the ratios of this group are uncertain by about as much."
    )
    return [note, ""]


def versions() -> str:
    from importlib import metadata

    found = []
    for package in ("torch", "transformers", "triton", "ctranslate2"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def backends() -> str:
    """The kernel backends this install has, and why the others are missing (a missing one has no rows)."""
    from pyminigpt import ops

    status = ops.backend_status()
    found = [name for name, s in status.items() if s["available"] and name != "reference"]
    missing = [f"{name} ({s['reason']})" for name, s in status.items() if not s["available"]]
    return ", ".join(found) + ("; unavailable: " + "; ".join(missing) if missing else "")
