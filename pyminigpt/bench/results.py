"""The benchmark results as the report reads them: pytest-benchmark JSON (or an interleaved
decode summary) as groups of `Result`s, each member with its role, and who a group's
baseline, strongest peer and best own member are. report.py renders them, charts.py draws them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Member names that are the outside implementation a kernel is measured against.
PEERS = ("transformers", "transformers+compile", "ctranslate2-float32", "ctranslate2-int8", "sdpa", "torch", "compile")
PEERS += tuple(f"llama.cpp-{dtype}" for dtype in ("f32", "f16", "q8_0", "q4_0"))
PEERS += ("torchao-int8", "torchao-int4")
# Members that need an optional package; missing from a decode group without it, they are
# reported as "not installed" rather than left out.
OPTIONAL_MEMBERS = {"ctranslate2-float32": "ctranslate2", "ctranslate2-int8": "ctranslate2"}
OPTIONAL_MEMBERS.update({f"llama.cpp-{dtype}": "llama_cpp" for dtype in ("f32", "f16", "q8_0", "q4_0")})
NOT_INSTALLED = "not installed"
DECODE_GROUP = re.compile(r"^generate (?P<mode>\w+) B(?P<batch>\d+)\b")


@dataclass
class Result:
    group: str
    member: str
    median: float  # seconds
    role: str  # "eager", "peer" or "member"
    extra: dict
    spread: float = 0.0  # the interquartile range of the rounds over their median (0 when unknown)


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
        median, iqr = bench["stats"]["median"], bench["stats"].get("iqr", 0.0)
        spread = iqr / median if median > 0 else 0.0
        result = Result(bench.get("group") or bench["name"], member, median, _role(member, extra), extra, spread)
        groups.setdefault(result.group, []).append(result)
    return groups


def load_decode_summary(summary: dict) -> dict[str, list[Result]]:
    """bench/interleaved_decode.py's JSON summary -> decode groups like the e2e suite's.

    A member the summary marks as not runnable (not installed) is left out here and reported
    by the headline as not installed."""
    groups: dict[str, list[Result]] = {}
    for member, result in summary["members"].items():
        if "seconds" not in result:
            continue
        for setting, seconds in result["seconds"].items():
            if " B" not in setting:  # the prefill: a rate of its own (bench/interleaved_decode.py reports it)
                continue
            mode, batch = setting.split(" B")
            group = f"generate {mode} B{batch} prompt{summary['prompt']} new{summary['new_tokens']}"
            tokens_per_second = int(batch) * summary["new_tokens"] / seconds
            bound = int(batch) * summary["read_bandwidth"] / result["weight_bytes"]
            extra = {
                "tokens/s": round(tokens_per_second, 2),
                "bound tokens/s": round(bound, 2),
                "fraction_of_bound": round(tokens_per_second / bound, 3),
            }
            groups.setdefault(group, []).append(Result(group, member, seconds, _role(member, extra), extra))
    return groups


def merge_decode_groups(groups: dict[str, list[Result]], decode: dict[str, list[Result]]) -> dict[str, list[Result]]:
    """groups with its decode groups replaced by `decode`'s (which come first)."""
    rest = {g: r for g, r in groups.items() if not DECODE_GROUP.match(g)}
    return {**decode, **rest}


def baseline(results: list[Result], role: str) -> Result | None:
    return next((r for r in results if r.role == role), None)


def strongest_peer(results: list[Result]) -> Result | None:
    """The fastest peer of a group; its baseline when it has no peer."""
    peers = [r for r in results if r.role == "peer"]
    return min(peers, key=lambda r: r.median) if peers else baseline(results, "eager")


def best_own(results: list[Result]) -> Result | None:
    """The fastest of a group's own members (pyminigpt's kernels, models and patch)."""
    own = [r for r in results if r.role == "member"]
    return min(own, key=lambda r: r.median) if own else None


def family(group: str) -> str:
    """A group's op or task without its sizes: its leading words up to the first one holding a digit."""
    words = []
    for word in group.split():
        if any(c.isdigit() for c in word):
            break
        words.append(word)
    return " ".join(words) or group
