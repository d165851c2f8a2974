"""Where a decode step's time goes: torch.profiler over pyminigpt's GPT.generate (GPT-2-124M
shape, random weights, prompt 32), the top operators by self CPU time, and their share.

    python bench/profile_decode.py [--batch 1] [--new-tokens 32] [--bf16] [--top 12]
"""

from __future__ import annotations

import argparse

import torch

from pyminigpt import GPT
from pyminigpt.bench.decode_peers import random_gpt2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    model = GPT.from_hf(random_gpt2()).eval()
    if args.bf16:
        model = model.to(torch.bfloat16)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, 32), generator=torch.Generator().manual_seed(0))
    settings = {"max_new_tokens": args.new_tokens, "do_sample": True, "top_k": 50, "top_p": 0.9}
    model.generate(input_ids, **settings)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model.generate(input_ids, **settings)
    events = [e for e in profile.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"batch {args.batch}, {args.new_tokens} new tokens, {'bf16' if args.bf16 else 'fp32'}: "
          f"{total / 1e3:.0f} ms self CPU time in operators")  # fmt: skip
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        share = event.self_cpu_time_total / total
        print(f"{share:6.1%}  {event.self_cpu_time_total / 1e3:8.1f} ms  {event.count:6d} calls  {event.key}")


if __name__ == "__main__":
    main()
