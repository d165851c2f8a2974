"""The per-call cost of `pyminigpt.ops` (argument checks + backend choice + wrapper) on the CPU.

Each case times three members, interleaved (one batch of calls each per round; medians over
rounds):

- `ops`: the public function (`ops.layer_norm`, ...), as the model calls it;
- `kernel`: the same C++ kernel called directly (`torch.ops.pyminigpt.*`, through the dispatcher
  and, under no_grad, the Python autograd kernel that `torch.library.register_autograd` adds);
- `torch`: PyTorch's own op (`F.layer_norm`, ...).

`ops - kernel` is what the Python layer costs per call; on a tiny tensor it is nearly all of it.

    python bench/dispatch_overhead.py [--rounds N]
    python bench/dispatch_overhead.py --against OLD_TREE [--rounds N] [--runs R]

`--against` compares this tree's `ops` with another source tree's (for example a `git archive`
of an older commit, with the built `pyminigpt/_C*.so` copied in): it runs this script R times in
each tree, alternating, in fresh processes, and reports both trees' `ops - kernel` microseconds
and `ops / torch` ratios per case.
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
import torch.nn.functional as F


def _cases():
    from pyminigpt import ops

    kernels = torch.ops.pyminigpt
    torch.manual_seed(0)
    cases = {}
    for rows, cols in ((512, 768), (1, 8)):
        x, w, b = torch.randn(rows, cols), torch.randn(cols), torch.randn(cols)
        cases[f"layer_norm {rows}x{cols}"] = {
            "ops": lambda x=x, w=w, b=b: ops.layer_norm(x, w, b),
            "kernel": lambda x=x, w=w, b=b: kernels.layer_norm_fwd(x, w, b, 1e-5),
            "torch": lambda x=x, w=w, b=b, c=cols: F.layer_norm(x, (c,), w, b, 1e-5),
        }
    x = torch.randn(1, 8)
    cases["softmax 1x8"] = {
        "ops": lambda: ops.softmax(x, 1.0),
        "kernel": lambda: kernels.softmax_fwd(x, 1.0),
        "torch": lambda: torch.softmax(x, -1),
    }
    x, w, b = torch.randn(1, 64), torch.randn(64, 64), torch.randn(64)
    cases["linear 1x64 -> 64"] = {
        "ops": lambda: ops.linear(x, w, b),
        "kernel": lambda: kernels.linear(x, w, b),
        "torch": lambda: F.linear(x, w, b),
    }
    return cases


def _seconds_per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(rounds: int) -> dict[str, dict[str, float]]:
    """Median microseconds per call of each member of each case, members interleaved per round.

    Every case runs under no_grad (a forward of the model outside `generate`, the op benchmarks)
    and under inference_mode (`generate`), which skips the autograd dispatch key entirely.
    """
    results = {}
    for mode, context in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        with context():
            for name, members in _cases().items():
                for fn in members.values():  # warm-up: the first call imports backends and fills caches
                    fn()
                first = _seconds_per_call(members["torch"], 20)
                calls = max(20, min(20000, int(0.005 / max(first, 1e-9))))
                times = {member: [] for member in members}
                for _ in range(rounds):
                    for member, fn in members.items():
                        times[member].append(_seconds_per_call(fn, calls) * 1e6)
                results[f"{name}, {mode}"] = {member: statistics.median(t) for member, t in times.items()}
    return results


def measure_model(rounds: int) -> dict[str, float]:
    """Milliseconds of a small GPT (2 layers, 128 wide): a sampled decode of 32 tokens
    (`generate`, under inference_mode) and a forward of 64 positions under no_grad, interleaved."""
    from pyminigpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=512, n_positions=128, n_embd=128, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None
    )
    model = GPT(config).eval()
    prompt = torch.randint(0, 512, (1, 8))
    tokens = torch.randint(0, 512, (1, 64))

    def decode():
        model.generate(prompt, max_new_tokens=32, do_sample=True, top_k=50, top_p=0.9)

    def forward():
        with torch.no_grad():
            model(tokens)

    members = {"decode 32 tokens, 2x128 GPT": decode, "forward 64 positions, 2x128 GPT, no_grad": forward}
    for fn in members.values():
        fn()
    times = {name: [] for name in members}
    for _ in range(rounds):
        for name, fn in members.items():
            times[name].append(_seconds_per_call(fn, 3) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _print_one(results) -> None:
    print("| case | ops (us) | kernel (us) | torch (us) | ops - kernel (us) | ops / torch |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "model":
            continue
        print(
            f"| {name} | {r['ops']:.2f} | {r['kernel']:.2f} | {r['torch']:.2f} | "
            f"{r['ops'] - r['kernel']:.2f} | {r['ops'] / r['torch']:.2f} |"
        )
    for name, ms in results["model"].items():
        print(f"{name}: {ms:.2f} ms")


def _run_in(tree: Path, rounds: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--rounds", str(rounds), "--json"],
        env=env,
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.splitlines()[-1])


def compare(other: Path, rounds: int, runs: int) -> None:
    here = Path(__file__).resolve().parents[1]
    trees = {"this tree": here, "other tree": other.resolve()}
    per_tree = {label: [] for label in trees}
    for _ in range(runs):
        for label, tree in trees.items():
            per_tree[label].append(_run_in(tree, rounds))
    print(f"medians over {runs} alternating runs per tree, {rounds} interleaved rounds each")
    print("| case | ops - kernel, other (us) | ops - kernel, this (us) | ops / torch, other | ops / torch, this |")
    print("|---|---|---|---|---|")
    for name in per_tree["this tree"][0]:
        if name == "model":
            continue

        def median(label, stat, name=name):
            return statistics.median(stat(run[name]) for run in per_tree[label])

        def overhead(r):
            return r["ops"] - r["kernel"]

        def ratio(r):
            return r["ops"] / r["torch"]

        print(
            f"| {name} | {median('other tree', overhead):.2f} | {median('this tree', overhead):.2f} | "
            f"{median('other tree', ratio):.2f} | {median('this tree', ratio):.2f} |"
        )
    print("| model | other tree (ms) | this tree (ms) | this / other |")
    print("|---|---|---|---|")
    for name in per_tree["this tree"][0]["model"]:
        this = statistics.median(run["model"][name] for run in per_tree["this tree"])
        other = statistics.median(run["model"][name] for run in per_tree["other tree"])
        print(f"| {name} | {other:.2f} | {this:.2f} | {this / other:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--against", type=Path, help="another source tree to compare with")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.against is not None:
        compare(args.against, args.rounds, args.runs)
        return
    results = measure(args.rounds)
    results["model"] = measure_model(args.rounds)
    if args.json:
        print(json.dumps(results))
    else:
        _print_one(results)


if __name__ == "__main__":
    main()
