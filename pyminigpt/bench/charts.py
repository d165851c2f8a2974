"""The charts of `pyminigpt bench`: one overview PNG of every group's speedups, and optionally one PNG per group.

The numbers come from `results.py` (its `Result` groups); this module only draws them.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator

from .results import Result, baseline, best_own, strongest_peer


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def plot_overview(groups: dict[str, list[Result]], path: Path) -> Path:
    """One PNG: per group, pyminigpt's speedup over the baseline and over the strongest peer, as
    horizontal bars from the 1.0 line (as fast) on a log axis: right of it faster, left slower."""
    rows = []  # (label, speedup over baseline or None, speedup over strongest peer or None)
    for group, results in groups.items():
        own, peer, eager = best_own(results), strongest_peer(results), baseline(results, "eager")
        if own is None:
            continue
        over_peer = peer.median / own.median if peer is not None and peer is not own else None
        over_eager = eager.median / own.median if eager is not None else None
        label = f"{group}  [{own.member} vs {peer.member}]" if peer is not None else f"{group}  [{own.member}]"
        rows.append((label, over_eager, over_peer))
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.3 * max(len(rows), 1)))
    positions = range(len(rows))
    height = 0.38
    for offset, index, color, name in ((-height / 2, 1, "tab:gray", "over baseline (eager)"),
                                       (height / 2, 2, "tab:blue", "over strongest peer")):  # fmt: skip
        drawn = [(p + offset, r[index]) for p, r in zip(positions, rows) if r[index] is not None]
        ys, values = [y for y, _ in drawn], [v for _, v in drawn]
        ax.barh(ys, [v - 1.0 for v in values], left=1.0, height=height, color=color, label=name)
        for y, value in drawn:
            align = "left" if value >= 1 else "right"
            ax.text(value, y, f" {value:.2f}x ", va="center", ha=align, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1.2)
    ax.set_xscale("log")
    every = [v for r in rows for v in r[1:] if v is not None] or [1.0]
    ax.set_xlim(min(0.5, min(every) / 1.6), max(2.0, max(every) * 1.8))
    ax.set_yticks(list(positions), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of pyminigpt's fastest member (log scale; right of 1.0 = faster, left = slower)")
    ax.set_title("pyminigpt: speedup per benchmark group", fontsize=10, loc="right")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_groups(groups: dict[str, list[Result]], out_dir: Path) -> list[Path]:
    """One PNG per group: each member's speedup over eager (over the slowest member if there is no eager)."""
    paths = []
    for group, results in groups.items():
        base = baseline(results, "eager") or max(results, key=lambda r: r.median)
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(results), 3.2))
        names = [r.member for r in results]
        speedups = [base.median / r.median for r in results]
        colors = [
            "tab:gray" if r.role == "eager" else "tab:orange" if r.role == "peer" else "tab:blue" for r in results
        ]
        ax.bar(names, speedups, color=colors)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"speedup over {base.member}")
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
