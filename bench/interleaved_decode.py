"""Decode tokens/s of every member (decode_peers.MEMBERS), interleaved across processes, with
each member's fraction of the bandwidth bound.

On a shared machine the load drifts over minutes, and CTranslate2's OpenMP threads slow
whatever shares a process with them. So every round starts one fresh process per member (the
order rotates from round to round), each process warms up, then times every setting once; the
read bandwidth is measured between the members. The report takes medians over rounds.
GPT-2-124M shape, random weights, prompt 32, greedy and sampling (top-k 50 / top-p 0.9), no eos.

Bound of a decode step: it reads every weight once (the KV cache is small next to them), so
tokens/s <= batch * read bandwidth / weight bytes, with the read bandwidth that of torch.sum
over a tensor far larger than the last-level cache (bench_utils.measure_read_bandwidth).

    python bench/interleaved_decode.py [--rounds 3] [--new-tokens 64] [--batches 1 8] [--prefill 512] [--json FILE]

On a machine whose cores are oversubscribed, run it with OMP_NUM_THREADS=1: with two threads
each member waits at OpenMP barriers for a descheduled partner thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pyminigpt.bench.decode_peers import MEMBERS, build_member, member_status
from pyminigpt.bench.utils import measure_read_bandwidth

PROMPT = 32
MODES = {"greedy": {"do_sample": False}, "sample": {"do_sample": True, "top_k": 50, "top_p": 0.9}}


def setting_name(mode: str, batch: int) -> str:
    return f"{mode} B{batch}"


def run_member(member: str, new_tokens: int, batches: list[int], prefill: int = 0) -> dict:
    """In the member's own process: build, warm up (compiling, for the compiled member), time each setting once.

    prefill > 0 also times one prompt of that many tokens (batch 1) and a single new token: the
    "prefill N" setting, whose tokens/s counts the prompt's tokens."""
    start = time.perf_counter()
    generate, nbytes, close = build_member(member)
    built = time.perf_counter()
    prompts = {b: torch.randint(0, 50257, (b, PROMPT), generator=torch.Generator().manual_seed(b)) for b in batches}
    for batch in batches:  # warm-up at the timed shapes: a compiled member compiles per shape
        generate(prompts[batch], max_new_tokens=new_tokens, **MODES["greedy"])
    warmed = time.perf_counter()
    seconds = {}
    for batch in batches:
        for mode, settings in MODES.items():
            t0 = time.perf_counter()
            out = generate(prompts[batch], max_new_tokens=new_tokens, **settings)
            seconds[setting_name(mode, batch)] = time.perf_counter() - t0
            if tuple(out.shape) != (batch, PROMPT + new_tokens):
                raise RuntimeError(f"{member} returned {tuple(out.shape)}, expected {(batch, PROMPT + new_tokens)}")
    if prefill:
        prompt = torch.randint(0, 50257, (1, prefill), generator=torch.Generator().manual_seed(prefill))
        generate(prompt, max_new_tokens=1, **MODES["greedy"])  # warm-up at this shape
        t0 = time.perf_counter()
        generate(prompt, max_new_tokens=1, **MODES["greedy"])
        seconds[f"prefill {prefill}"] = time.perf_counter() - t0
    close()
    return {"seconds": seconds, "weight_bytes": nbytes, "build_s": built - start, "warmup_s": warmed - built}


def _spawn(member: str, new_tokens: int, batches: list[int], prefill: int = 0) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", member, "--new-tokens", str(new_tokens)]
    command += ["--batches", *map(str, batches), "--prefill", str(prefill)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{member} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict]], members: list[str], bandwidths: list[float], loads: list[float], **setup):
    """Per member: median seconds per setting over its runs so far, weight bytes, warm-up seconds;
    the median read bandwidth and the load average (min, median, max) over the measurements."""
    results = {}
    for m in members:
        if not runs.get(m):
            results[m] = {"status": member_status(m) if member_status(m) != "ok" else "not measured"}
            continue
        settings = runs[m][0]["seconds"]
        results[m] = {
            "seconds": {s: statistics.median(run["seconds"][s] for run in runs[m]) for s in settings},
            "runs": len(runs[m]),
            "seconds_per_round": [run["seconds"] for run in runs[m]],
            "weight_bytes": runs[m][0]["weight_bytes"],
            "warmup_s": statistics.median(run["warmup_s"] for run in runs[m]),
        }
    return {
        "read_bandwidth": statistics.median(bandwidths),
        "load_average": [min(loads), statistics.median(loads), max(loads)],
        "prompt": PROMPT,
        **setup,
        "members": results,
    }


def interleaved(
    members: list[str], rounds: int, new_tokens: int, batches: list[int], json_path=None, prefill: int = 0
) -> dict:
    """Runs the rounds; after every member run, writes the summary so far to json_path (if given)."""
    runnable = [m for m in members if member_status(m) == "ok"]
    runs: dict[str, list[dict]] = {m: [] for m in runnable}
    bandwidths, loads = [measure_read_bandwidth()], [os.getloadavg()[0]]
    setup = {"new_tokens": new_tokens, "batches": batches, "prefill": prefill}
    summary = summarize(runs, members, bandwidths, loads, rounds=0, **setup)
    for r in range(rounds):
        order = runnable[r % len(runnable) :] + runnable[: r % len(runnable)]
        for member in order:
            runs[member].append(_spawn(member, new_tokens, batches, prefill))
            bandwidths.append(measure_read_bandwidth())
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}/{rounds} {member}: {runs[member][-1]}", file=sys.stderr, flush=True)
            summary = summarize(runs, members, bandwidths, loads, rounds=r + 1, **setup)
            if json_path is not None:
                json_path.write_text(json.dumps(summary, indent=1))
    return summary


def tokens_per_second(summary: dict, member: str, setting: str) -> float:
    if setting.startswith("prefill"):
        return int(setting.split()[1]) / summary["members"][member]["seconds"][setting]
    batch = int(setting.rsplit("B", 1)[1])
    return batch * summary["new_tokens"] / summary["members"][member]["seconds"][setting]


def fraction_of_bound(summary: dict, member: str, setting: str) -> float:
    """tokens/s over batch * read bandwidth / the member's weight bytes."""
    batch = int(setting.rsplit("B", 1)[1])
    bound = batch * summary["read_bandwidth"] / summary["members"][member]["weight_bytes"]
    return tokens_per_second(summary, member, setting) / bound


def markdown(summary: dict) -> str:
    """One row per member: tokens/s and fraction of its bound for each setting."""
    settings = [setting_name(mode, b) for b in summary["batches"] for mode in MODES]
    prefill = [f"prefill {summary['prefill']}"] if summary.get("prefill") else []
    lines = [
        "| member | weights MB | "
        + " | ".join([f"{s} tok/s (of bound)" for s in settings] + [f"{s} tok/s" for s in prefill])
        + " | warm-up s |",
        "|---|---:|" + "---:|" * (len(settings) + len(prefill)) + "---:|",
    ]
    for member, result in summary["members"].items():
        if "seconds" not in result:
            lines.append(f"| {member} | | " + " | ".join([result["status"]] * (len(settings) + len(prefill))) + " | |")
            continue
        cells = [
            f"{tokens_per_second(summary, member, s):.1f} ({fraction_of_bound(summary, member, s):.2f})"
            for s in settings
        ] + [f"{tokens_per_second(summary, member, s):.0f}" for s in prefill]
        lines.append(
            f"| {member} | {result['weight_bytes'] / 1e6:.0f} | " + " | ".join(cells) + f" | {result['warmup_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--members", nargs="+", default=MEMBERS, choices=MEMBERS)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here, after every member run")
    parser.add_argument("--prefill", type=int, default=0, help="also time one prompt of this many tokens (0: no)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one member, in this process
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_member(args.worker, args.new_tokens, args.batches, args.prefill)))
        return
    summary = interleaved(args.members, args.rounds, args.new_tokens, args.batches, args.json, args.prefill)
    print(
        f"prompt {PROMPT}, {args.new_tokens} new tokens, {summary['rounds']} rounds, read bandwidth "
        f"{summary['read_bandwidth'] / 1e9:.1f} GB/s, load average min/median/max {summary['load_average']}"
    )
    print(markdown(summary))


if __name__ == "__main__":
    main()
