"""One fine-tuning step with the loss on the full logits (before) and on ops.linear_cross_entropy (after).

    python bench/linear_cross_entropy.py                      # both models, 2 rounds, interleaved
    python bench/linear_cross_entropy.py --models tiny --rounds 3
    python bench/linear_cross_entropy.py --chunks             # the CPU kernel's chunk rows, and its row pass vs torch ops

Members, each in a fresh process (so that its peak RSS is its own), interleaved round by round:

- before: `model(ids).logits` then `F.cross_entropy(logits.float().flatten(0, 1), labels)`, what the
  Trainer did: the (B, T, V) logits, their log-softmax and their gradient are all in memory.
- after: `model(ids, shift_labels=labels).loss`, what the Trainer does now (the fused op).

A step is forward + backward + fused AdamW, fp32, on random tokens. Each process runs `--warmup`
steps, then `--steps` timed ones (the median is reported), then reads its peak RSS
(resource.getrusage). Models: `tiny` (2 layers x 64 wide, GPT-2's 50257 words, 1024 positions;
batch 8 x 1024) and `gpt2` (GPT-2-124M's shape; batch 4 x 1024).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODELS = {
    "tiny": ({"n_layer": 2, "n_embd": 64, "n_head": 2}, 8),
    "gpt2": ({"n_layer": 12, "n_embd": 768, "n_head": 12}, 4),
}
CONTEXT = 1024


def run_member(member: str, model_name: str, warmup: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from pyminigpt import GPT, GPTConfig

    torch.manual_seed(0)
    shape, batch = MODELS[model_name]
    model = GPT(GPTConfig(vocab_size=50257, n_positions=CONTEXT, **shape))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, 50257, (batch, CONTEXT + 1))
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    rss_model_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def step() -> float:
        start = time.perf_counter()
        if member == "before":
            logits = model(ids).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        else:
            loss = model(ids, shift_labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    return {
        "member": member,
        "model": model_name,
        "step_s": statistics.median(times),
        "tokens_per_s": batch * CONTEXT / statistics.median(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_model_mib": rss_model_mib,
        "user_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime,
        "system_s": resource.getrusage(resource.RUSAGE_SELF).ru_stime,
    }


def chunk_sweep() -> None:
    """The CPU kernel at several chunk sizes, and its fused row pass against the same chunk loop in torch ops."""
    import torch

    from pyminigpt import ops

    n, k, v = 2048, 64, 50257
    x, weight = torch.randn(n, k, requires_grad=True), (torch.randn(v, k) / 8).requires_grad_()
    labels = torch.randint(0, v, (n,))

    def torch_ops_chunks(chunk: int) -> None:
        """The same chunk loop with the softmax / gradient pass in torch ops (what the kernel replaces)."""
        with torch.no_grad():
            gx, gw = torch.empty_like(x), torch.zeros_like(weight)
            for s in range(0, n, chunk):
                z = x[s : s + chunk] @ weight.t()
                lse = torch.logsumexp(z, dim=-1, keepdim=True)
                g = torch.exp_(z.sub_(lse)).div_(n)
                g[torch.arange(g.shape[0]), labels[s : s + chunk]] -= 1.0 / n
                gx[s : s + chunk] = g @ weight
                gw.addmm_(g.t(), x[s : s + chunk])

    def timed(fn, rounds=2) -> float:
        return min(_time(fn) for _ in range(rounds))

    for chunk in (16, 64, 166, 512, 1335):
        fused = timed(lambda c=chunk: ops.linear_cross_entropy(x, weight, labels, chunk_rows=c).backward())
        plain = timed(lambda c=chunk: torch_ops_chunks(c))
        print(f"chunk {chunk:5d} rows: C++ row pass {fused:.3f} s, torch ops {plain:.3f} s per forward+backward")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunks", action="store_true", help="sweep the CPU kernel's chunk rows instead")
    parser.add_argument("--member", help=argparse.SUPPRESS)  # one member in this process (the driver's child)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunks:
        chunk_sweep()
        return
    if args.member:
        print(json.dumps(run_member(args.member, args.model, args.warmup, args.steps)))
        return
    results = []
    for model_name in args.models:
        for round_index in range(args.rounds):
            for member in ("before", "after") if round_index % 2 == 0 else ("after", "before"):
                command = [sys.executable, __file__, "--member", member, "--model", model_name]
                command += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
                out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
                result = json.loads(out.strip().splitlines()[-1])
                result["load"] = os.getloadavg()[0]
                print(json.dumps(result), flush=True)
                results.append(result)
    print("\n| model | member | step (s, median of rounds) | tokens/s | peak RSS (MiB) | load (1 min) |")
    print("|---|---|---|---|---|---|")
    for model_name in args.models:
        by_member = {}
        for member in ("before", "after"):
            rows = [r for r in results if r["model"] == model_name and r["member"] == member]
            step = statistics.median(r["step_s"] for r in rows)
            rss = statistics.median(r["peak_rss_mib"] for r in rows)
            loads = f"{min(r['load'] for r in rows):.1f}-{max(r['load'] for r in rows):.1f}"
            by_member[member] = (step, rss)
            print(
                f"| {model_name} | {member} | {step:.2f} | {MODELS[model_name][1] * CONTEXT / step:.0f} | {rss:.0f} | {loads} |"
            )
        (b_step, b_rss), (a_step, a_rss) = by_member["before"], by_member["after"]
        print(
            f"| {model_name} | after / before | {a_step / b_step:.3f} ({b_step / a_step:.1f}x faster) | | {a_rss / b_rss:.3f} | |"
        )


if __name__ == "__main__":
    main()
