"""Batch decode tokens/s of transformers (unpatched and patched), pyminigpt fp32 and pyminigpt bf16,
members interleaved.

On a shared machine the load drifts over minutes; pytest-benchmark runs one member after the
other, so its ratios drift with it. Here every round runs each member once (and measures the
copy bandwidth), and the medians over rounds are compared. GPT-2-124M shape, random weights,
prompt 32, sampling with top-k 50 / top-p 0.9, no eos.

    OMP_NUM_THREADS=1 python bench/interleaved_decode.py NEW_TOKENS BATCH ROUNDS
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
import transformers
from bench_utils import DEVICE, measure_copy_bandwidth, sync
from test_bench_e2e import weight_bytes

from pyminigpt import GPT, patch_hf_gpt2


def main(new_tokens: int, batch: int, rounds: int) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(config).to(DEVICE).eval()
    hf_patched = patch_hf_gpt2(copy.deepcopy(hf))
    fp32 = GPT.from_hf(hf).eval()
    bf16 = GPT.from_hf(hf).to(torch.bfloat16).eval()
    input_ids = torch.randint(0, config.vocab_size, (batch, 32), device=DEVICE)
    sampling = {"do_sample": True, "top_k": 50, "top_p": 0.9, "max_new_tokens": new_tokens}
    members = {
        "transformers": lambda: hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), **sampling),
        "transformers+patch": lambda: hf_patched.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), **sampling
        ),
        "pyminigpt": lambda: fp32.generate(input_ids, **sampling),
        "pyminigpt-bf16": lambda: bf16.generate(input_ids, **sampling),
    }
    for run in members.values():  # warm-up
        run()
    times, bandwidths = {name: [] for name in members}, []
    for _ in range(rounds):
        bandwidths.append(measure_copy_bandwidth())
        for name, run in members.items():
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    bound = batch * statistics.median(bandwidths) / weight_bytes(fp32)
    print(f"batch {batch}, {new_tokens} new tokens, copy bandwidth {statistics.median(bandwidths) / 1e9:.1f} GB/s, "
          f"fp32 bound {bound:.1f} tokens/s")  # fmt: skip
    reference = statistics.median(times["transformers"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:18s} {batch * new_tokens / median:8.2f} tokens/s  vs transformers {reference / median:.2f}x  "
              f"fraction of the fp32 bound {batch * new_tokens / median / bound:.2f}")  # fmt: skip


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
