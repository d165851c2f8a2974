"""The perplexity cost of 8-bit and 4-bit weights, on a model that has learned something.

    python bench/quantized_quality.py MODEL_DIR HELD_OUT.txt [--prompts 8] [--new-tokens 64]

For fp32 and each format / group size the API accepts: the perplexity of the held-out text
(pyminigpt.analysis.perplexity, sliding window of the model's context, stride half of it) and the
greedy agreement with fp32: the fraction of 64 greedy tokens equal to fp32's, over prompts taken
from the held-out text (a token counts until the first difference, as a user would see it).
MODEL_DIR: a run, a checkpoint or a GPT-2 directory with its tokenizer (pyminigpt's load_model).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from pyminigpt.analysis import perplexity
from pyminigpt.cli.runs import load_model
from pyminigpt.quantize import INT4_GROUP_SIZES

VARIANTS = [("fp32", None), ("int8", None), ("int8", 32), *(("int4", g) for g in INT4_GROUP_SIZES)]


def weight_errors(model) -> dict:
    """Relative RMS error of the projections' weights, per format: the API's, and symmetric int4
    (q in [-8, 7], scale = max |w| / 7 per group; not offered, measured here to choose)."""
    from pyminigpt.ops.reference import dequantize
    from pyminigpt.quantize import projections, quantize_weight

    weights = [getattr(parent, name).weight.detach().float() for parent, name in projections(model)]
    total = sum(float((w**2).sum()) for w in weights)
    errors = {}
    for fmt, group in VARIANTS[1:]:
        err = sum(float(((dequantize(*quantize_weight(w, fmt, group)) - w) ** 2).sum()) for w in weights)
        errors[f"{fmt}/{group or 'channel'}"] = (err / total) ** 0.5
    for group in INT4_GROUP_SIZES:
        err = 0.0
        for w in weights:
            g = w.reshape(w.shape[0], -1, group)
            scale = (g.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-12)
            err += float(((torch.round(g / scale).clamp(-8, 7) * scale - g) ** 2).sum())
        errors[f"int4-symmetric/{group}"] = (err / total) ** 0.5
    return errors


def greedy(model, prompts, new_tokens):
    return [model.generate(p, max_new_tokens=new_tokens, do_sample=False)[0, p.shape[1] :] for p in prompts]


def agreement(tokens, reference):
    """Mean over prompts of the fraction of tokens before the first difference from the reference."""
    fractions = []
    for got, want in zip(tokens, reference):
        differ = (got != want).nonzero()
        first = differ[0].item() if len(differ) else len(want)
        fractions.append(first / len(want))
    return sum(fractions) / len(fractions)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("held_out")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    loaded = load_model(args.model, torch.device("cpu"))
    text = Path(args.held_out).read_text(encoding="utf-8")
    ids = loaded.tokenizer.encode(text)
    step = len(ids) // args.prompts
    prompts = [torch.tensor([ids[i * step : i * step + 16]]) for i in range(args.prompts)]
    print("relative RMS error of the projection weights:", json.dumps(weight_errors(loaded.model)), flush=True)
    results, reference = [], None
    for weights, group_size in VARIANTS:
        model = copy.deepcopy(loaded.model)
        if weights != "fp32":
            model.quantize_(weights, group_size=group_size)
        t0 = time.perf_counter()
        ppl = perplexity(model, loaded.tokenizer, text)
        tokens = greedy(model, prompts, args.new_tokens)
        reference = tokens if reference is None else reference
        row = {
            "weights": weights,
            "group_size": group_size,
            "perplexity": ppl,
            "greedy_agreement": agreement(tokens, reference),
            "seconds": time.perf_counter() - t0,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    base = results[0]["perplexity"]
    print("| weights | group | held-out perplexity | vs fp32 | greedy agreement (64 tokens) |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        group = "-" if r["weights"] == "fp32" else ("channel" if r["group_size"] is None else r["group_size"])
        print(
            f"| {r['weights']} | {group} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% "
            f"| {r['greedy_agreement']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
