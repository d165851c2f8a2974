"""The decode loop of `generate` before and after a change, interleaved in one process.

The "before" loop is the `generate` of an older commit (`git show COMMIT:pyminigpt/generation.py`
or `.../generation/loop.py`), loaded as a module of today's package, so both loops run the same
model object on the same kernels and only the loop differs. GPT-2-124M shape, random weights,
prompt 32, greedy and sampling (top-k 50, top-p 0.9), no eos; every round times each setting
for both loops, in alternating order, and the report takes medians over rounds.

    python bench/generate_loop_ab.py --base 1faff17 [--rounds 5] [--new-tokens 32] [--batches 1 8] [--small]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pyminigpt import GPT, GPTConfig

PROMPT = 32
MODES = {"greedy": {"do_sample": False}, "sample": {"do_sample": True, "top_k": 50, "top_p": 0.9}}


def load_old_generate(commit: str):
    """The `generate` function of `commit`, as a module inside today's `pyminigpt` package."""
    root = Path(__file__).resolve().parent.parent
    for path in ("pyminigpt/generation.py", "pyminigpt/generation/loop.py"):
        shown = subprocess.run(
            ["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, text=True, check=False
        )
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"no generation module at {commit}")
    source = Path(tempfile.mkdtemp()) / "old_generation.py"
    source.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("pyminigpt._old_generation", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    module.__package__ = "pyminigpt"  # its relative imports (`from . import ops`) resolve to today's package
    spec.loader.exec_module(module)
    return module.generate


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit whose generate is 'before'")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--small", action="store_true", help="a 2-layer, 64-wide model with 512 tokens: the loop's own cost shows"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=2) if args.small else GPTConfig()
    model = GPT(config).eval()  # GPT-2-124M shape unless --small
    loops = {"before": load_old_generate(args.base), "after": GPT.generate}
    prompts = {
        b: torch.randint(0, config.vocab_size, (b, PROMPT), generator=torch.Generator().manual_seed(b))
        for b in args.batches
    }
    settings = [(mode, b) for b in args.batches for mode in MODES]
    for name, generate in loops.items():  # warm-up, and the two loops must agree
        out = generate(model, prompts[args.batches[0]], max_new_tokens=4, eos_token_id=[])
        print(f"warm-up {name}: {tuple(out.shape)}", file=sys.stderr)
    same = torch.equal(*(g(model, prompts[1], max_new_tokens=8, eos_token_id=[]) for g in loops.values()))
    times = {(name, mode, b): [] for name in loops for mode, b in settings}
    loads = []
    for r in range(args.rounds):
        order = list(loops) if r % 2 == 0 else list(reversed(loops))
        for mode, b in settings:
            for name in order:
                t0 = time.perf_counter()
                loops[name](model, prompts[b], max_new_tokens=args.new_tokens, eos_token_id=[],
                            generator=torch.Generator().manual_seed(r), **MODES[mode])  # fmt: skip
                times[(name, mode, b)].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done, load {loads[-1]:.1f}", file=sys.stderr, flush=True)

    cpu = cpu_name()
    print(f"CPU: {cpu}; torch threads {torch.get_num_threads()}; load average (1 min) over the rounds: "
          f"{min(loads):.1f} to {max(loads):.1f}; greedy outputs equal: {same}")  # fmt: skip
    shape = "2 layers x 64, vocab 512" if args.small else "GPT-2-124M shape"
    print(f"{shape}, random weights, prompt {PROMPT}, {args.new_tokens} new tokens, "
          f"median of {args.rounds} interleaved rounds; before = {args.base}")  # fmt: skip
    print()
    print("| setting | before tokens/s | after tokens/s | after / before (median of per-round ratios) |")
    print("|---|---|---|---|")
    for mode, b in settings:
        before, after = times[("before", mode, b)], times[("after", mode, b)]
        ratio = statistics.median(x / y for x, y in zip(before, after))
        tokens = b * args.new_tokens
        print(f"| {mode} B{b} | {tokens / statistics.median(before):.1f} | {tokens / statistics.median(after):.1f} "
              f"| {ratio:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
