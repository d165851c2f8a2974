"""Assisted decoding's speed-up: a target and a smaller draft trained on the same text, greedy.

Both models are trained here with pyminigpt's Trainer on the same character stream (the built-in
names corpus, one name per line, or --text FILE), the draft much smaller, as distilgpt2 is for
gpt2. Then `target.generate(prompt, max_new_tokens=N)` runs with and without
`assistant_model=draft`, interleaved over rounds; the outputs must be equal token for token.
Reported: tokens/s of each, the speed-up (median of per-round ratios), and how many forwards
of the target each prompt took (plain greedy: one per new token).

    python bench/assisted_decode.py [--steps 150] [--draft-steps 1000] [--new-tokens 64] [--rounds 3] [--text FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from pyminigpt import GPT, GPTConfig
from pyminigpt.data import SlidingWindowDataset, load_text, names_corpus
from pyminigpt.tokenizer import CharTokenizer
from pyminigpt.trainer import Trainer, TrainerConfig

CONTEXT = 256
TARGET = {"n_layer": 4, "n_head": 4, "n_embd": 256}
DRAFT = {"n_layer": 1, "n_head": 2, "n_embd": 64}


def train(size: dict, tokens: torch.Tensor, tokenizer, steps: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=CONTEXT, bos_token_id=tokenizer.sos_id,
                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **size)  # fmt: skip
    model = GPT(config)
    trainer = Trainer(
        model, SlidingWindowDataset(tokens, 64, stride=32), None,
        TrainerConfig(max_steps=steps, batch_size=8, learning_rate=2e-3, warmup_steps=steps // 10,
                      weight_decay=0.05, eval_interval=0, seed=seed, device="cpu", progress=False),
    )  # fmt: skip
    history = trainer.train()
    print(f"trained {size}: {model.num_parameters():,} parameters, loss {history[-1]['loss']:.3f}", file=sys.stderr)
    return model.eval()


def count_forwards(target: GPT, ids: list[torch.Tensor], kwargs: dict) -> int:
    """The target's forwards (the prompt's included) over one run per prompt."""
    forwards = 0
    original = target._forward

    def counting(*a, **k):
        nonlocal forwards
        forwards += 1
        return original(*a, **k)

    target._forward = counting
    try:
        for x in ids:
            target.generate(x, **kwargs)
    finally:
        del target._forward
    return forwards


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="the target's training steps")
    parser.add_argument("--draft-steps", type=int, default=1000, help="the draft's (it is cheap to train)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--text", help="a text file to train on instead of the names corpus")
    args = parser.parse_args()

    text = load_text(args.text) if args.text else "\n".join(names_corpus(5000, seed=0)) + "\n"
    tokenizer = CharTokenizer.from_text(text)
    tokens = torch.tensor(tokenizer.encode(text))
    started = time.perf_counter()
    target = train(TARGET, tokens, tokenizer, args.steps, seed=0)
    draft = train(DRAFT, tokens, tokenizer, args.draft_steps, seed=1)
    trained = time.perf_counter() - started

    prompts = [text[i : i + 24] for i in (0, 1000, 5000)]
    ids = [torch.tensor([tokenizer.encode(p)]) for p in prompts]
    kwargs = {"max_new_tokens": args.new_tokens, "eos_token_id": []}
    for x in ids:  # warm-up; and assisted must equal plain greedy
        assert torch.equal(target.generate(x, **kwargs), target.generate(x, assistant_model=draft, **kwargs))
    members = {
        "plain": {},
        "assisted": {"assistant_model": draft},
        "assisted, heuristic": {"assistant_model": draft, "num_assistant_tokens_schedule": "heuristic"},
    }
    per_round = {name: [] for name in members}
    loads = []
    for r in range(args.rounds):
        for name in list(members)[r % 3 :] + list(members)[: r % 3]:
            extra = members[name]
            t0 = time.perf_counter()
            for x in ids:
                target.generate(x, **kwargs, **extra)
            per_round[name].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])

    total = len(ids) * args.new_tokens
    forwards = {name: count_forwards(target, ids, {**kwargs, **extra}) for name, extra in members.items()}
    cpu = cpu_name()
    tps = {name: total / statistics.median(ts) for name, ts in per_round.items()}
    print(f"CPU: {cpu}; torch threads {torch.get_num_threads()}; load average (1 min) {min(loads):.1f} to "
          f"{max(loads):.1f}; training both took {trained:.0f} s")  # fmt: skip
    print(f"target {TARGET} ({target.num_parameters():,} parameters), draft {DRAFT} "
          f"({draft.num_parameters():,}), {args.steps} and {args.draft_steps} steps on the same text; greedy, "
          f"{len(ids)} prompts x {args.new_tokens} new tokens, num_assistant_tokens=20, "
          f"median of {args.rounds} interleaved rounds")  # fmt: skip
    print()
    print("| decoding | tokens/s | speed-up | target forwards per prompt |")
    print("|---|---|---|---|")
    for name in members:
        ratio = statistics.median(p / a for p, a in zip(per_round["plain"], per_round[name]))
        print(f"| {name} | {tps[name]:.1f} | {ratio:.2f} | {forwards[name] / len(ids):.1f} |")


if __name__ == "__main__":
    main()
