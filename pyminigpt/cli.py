"""The `pyminigpt` command.

    pyminigpt demo                      train a character model on fantasy names and explore it (~90 s on 2 cores)
    pyminigpt train [DATA]              train a model on a text file (or the built-in names)
    pyminigpt generate MODEL            sample text from a trained run, checkpoint or HF GPT-2 directory
    pyminigpt perplexity MODEL [FILE]   score a text
    pyminigpt chat MODEL [--feedback]   talk to a model; with --feedback, rate its replies and tune it
    pyminigpt info                      version, kernel backends (and why others are missing), CPU, GPU
    pyminigpt bench [--ops] [--e2e]     run the benchmarks (from a checkout); JSON, Markdown ratios, PNG charts

A training run is a directory: `run.json` (how it was made), `tokenizer.json`, the
trainer's checkpoints `best/`, `last/`, `step-*/` (each a GPT-2 directory that
transformers loads too) and `loss.png`. MODEL may be a run directory (its best
checkpoint is used), one of its checkpoints, or any GPT-2 directory with its tokenizer
files (config.json + model.safetensors + tokenizer.json or vocab.json/merges.txt).

Bad input (a missing, empty or non-UTF-8 file, a corpus shorter than one window, a
damaged checkpoint, a checkpoint of another config, a prompt the tokenizer cannot
encode) ends with a one-line message naming the problem and the file, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RUN_FILE, TOKENIZER_FILE = "run.json", "tokenizer.json"
# Model presets: GPT-2 shapes from a toy to GPT-2 small, each with its default context.
SIZES = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "context": 64},
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 128, "context": 128},
    "medium": {"n_layer": 6, "n_head": 6, "n_embd": 384, "context": 256},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "context": 1024},
}


class UsageError(Exception):
    """A problem with what the user asked for; reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- shared pieces


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {str(path)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{what} {str(path)!r} is corrupt (not valid JSON: {err})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{what} {str(path)!r} is corrupt (expected a JSON object)")
    return obj


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available here")
    return device


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_model(tokenizer, size: str, context: int, dropout: float):
    """A fresh GPT of preset `size` for `tokenizer`'s vocabulary with `context` positions."""
    from .model import GPT, GPTConfig

    shape = {k: v for k, v in SIZES[size].items() if k != "context"}
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        n_positions=context,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.sos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        **shape,
    )
    return GPT(config)


def make_datasets(source: str, corpus, tokenizer, lines: bool, context: int, eval_fraction: float = 0.1):
    """(train, eval or None) datasets from `corpus` (a list of short texts when `lines`, else one text).

    lines: one `<SOS> text <EOS>` sequence per text (`SequenceDataset`); the last
    `eval_fraction` of the texts are held out. Otherwise the text is one token stream cut
    into windows of `context` tokens (`SlidingWindowDataset`), its last `eval_fraction` held
    out. Errors name `source`.
    """
    from .data import SequenceDataset, SlidingWindowDataset

    try:
        if lines:
            n_eval = int(len(corpus) * eval_fraction)
            train, held_out = corpus[: len(corpus) - n_eval], corpus[len(corpus) - n_eval :]
            return (
                SequenceDataset(train, tokenizer, context),
                SequenceDataset(held_out, tokenizer, context) if held_out else None,
            )
        tokens = tokenizer.encode(corpus)
        if len(tokens) < context + 1:
            raise ValueError(
                f"has {len(tokens)} tokens, shorter than one window of context + 1 = {context + 1} tokens; "
                f"use a longer text or a smaller --context"
            )
        n_eval = int(len(tokens) * eval_fraction)
        train_ds = SlidingWindowDataset(tokens[: len(tokens) - n_eval], context, stride=max(1, context // 2))
        held_out = tokens[len(tokens) - n_eval :]
        eval_ds = SlidingWindowDataset(held_out, context) if len(held_out) > context else None
        return train_ds, eval_ds
    except ValueError as err:
        raise UsageError(f"{source}: {err}") from None


@dataclass
class Loaded:
    """A model ready to use: the model, its tokenizer, and how prompts start (`sos`)."""

    model: object
    tokenizer: object
    sos: bool
    path: Path  # the weights directory
    tokenizer_path: str


def _find_run_dir(weights: Path) -> Path | None:
    for d in (weights, weights.parent):
        if (d / RUN_FILE).is_file():
            return d
    return None


def load_model(path: str, device: torch.device, tokenizer_path: str | None = None) -> Loaded:
    """Load MODEL (a run directory, a checkpoint, or a GPT-2 directory) with its tokenizer.

    Trainer checkpoints are verified (sizes, SHA-256, config) before any weight is used.
    """
    from safetensors import SafetensorError

    from .checkpoint import load_checkpoint
    from .hf import config_from_hf
    from .model import GPT
    from .tokenizer import BPETokenizer, load_tokenizer

    weights = Path(path)
    if not weights.is_dir():
        raise UsageError(f"model directory not found: {str(weights)!r}")
    if not (weights / "config.json").is_file() and (weights / RUN_FILE).is_file():  # a run: take its best checkpoint
        found = [weights / name for name in ("best", "last") if (weights / name / "config.json").is_file()]
        if not found:
            raise UsageError(f"run directory {str(weights)!r} has no checkpoint yet (best/ or last/)")
        weights = found[0]
    config_file = weights / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{str(weights)!r} is not a model directory (no config.json)")

    run_dir = _find_run_dir(weights)
    run = _read_json(run_dir / RUN_FILE, "run file") if run_dir is not None else {}
    try:
        if tokenizer_path is not None:
            tokenizer = load_tokenizer(tokenizer_path)
        elif run_dir is not None:
            tokenizer_path = str(run_dir / TOKENIZER_FILE)
            tokenizer = load_tokenizer(tokenizer_path)
        else:
            tokenizer_path = str(weights)
            if not ((weights / "tokenizer.json").is_file() or (weights / "vocab.json").is_file()):
                raise UsageError(
                    f"no tokenizer in {str(weights)!r} (tokenizer.json, or vocab.json + merges.txt); "
                    f"pass --tokenizer FILE"
                )
            tokenizer = BPETokenizer.from_pretrained(weights)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the tokenizer: {err}") from None

    try:
        config = config_from_hf(_read_json(config_file, "model config"))
    except (TypeError, ValueError) as err:
        raise UsageError(f"model config {str(config_file)!r} is not a GPT-2 config: {err}") from None
    if (weights / "trainer_state.json").is_file():
        model = GPT(config)
        load_checkpoint(weights, model)  # verifies every file; CheckpointError names it
    else:
        try:
            model = GPT.from_pretrained(weights)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise UsageError(f"cannot load the weights in {str(weights)!r} (truncated or corrupt?): {err}") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"tokenizer {tokenizer_path!r} has {tokenizer.vocab_size} tokens but the model in {str(weights)!r} "
            f"has vocab_size={model.config.vocab_size}: they were not made for each other"
        )
    return Loaded(model.to(device).eval(), tokenizer, run.get("format") == "lines", weights, tokenizer_path)


def _encode_check(loaded: Loaded, text: str, what: str) -> None:
    """Raise a UsageError naming the tokenizer file if `text` has characters it never saw."""
    try:
        loaded.tokenizer.encode(text)
    except ValueError as err:
        raise UsageError(f"{what}: {err} (tokenizer {loaded.tokenizer_path!r})") from None


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int | None = None) -> None:
    g = p.add_argument_group("sampling (transformers' generate semantics)")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help="tokens to generate (default: up to the end of the context, at most 200)",
    )
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    g.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this (> 0; default 1.0)")
    g.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens (0 = all; default 50)")
    g.add_argument(
        "--top-p", type=float, default=1.0, help="keep the smallest set with this much probability (default 1.0 = all)"
    )
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="penalize tokens already present (> 1; default 1.0 = off)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed the draws, for reproducible samples")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--tokenizer", default=None, help="tokenizer file (default: the run's tokenizer.json)")


def _check_sampling(args) -> None:
    """The sampling options, checked before any model is loaded."""
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 disables it), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.repetition_penalty > 0:
        raise UsageError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")


def _sampling_kwargs(args, loaded: Loaded, prompt: str) -> dict:
    from .analysis import prompt_ids

    context = loaded.model.config.n_positions
    room = context - len(prompt_ids(loaded.tokenizer, prompt, loaded.sos))
    if room < 1:
        raise UsageError(f"the prompt fills the model's whole context of {context} tokens")
    max_new = args.max_new_tokens if args.max_new_tokens is not None else min(room, 200)
    if not 1 <= max_new <= room:
        raise UsageError(f"--max-new-tokens must be in [1, {room}] (context {context} minus the prompt), got {max_new}")
    kwargs = {
        "max_new_tokens": max_new,
        "do_sample": not args.greedy,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
    }
    if args.seed is not None:
        kwargs["generator"] = torch.Generator(loaded.model.device).manual_seed(args.seed)
    return kwargs


# ----------------------------------------------------------------------------- train


def _load_corpus(data: str | None) -> tuple[str, object]:
    """(source name, text) of a data file, or the built-in names (as a list)."""
    from .data import load_text, names_corpus

    if data is None:
        return "built-in names corpus", names_corpus()
    try:
        return f"data file {data!r}", load_text(data)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None


def cmd_train(args) -> int:
    from .tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
    from .trainer import Trainer, TrainerConfig

    out = Path(args.out)
    if args.resume:
        run = _read_json(out / RUN_FILE, "run file (needed by --resume)")
        missing = [key for key in ("format", "data", "size", "context", "tokenizer") if key not in run]
        if missing:
            raise UsageError(f"run file {str(out / RUN_FILE)!r} is corrupt: it lacks {', '.join(missing)}")
        data = args.data if args.data is not None else run["data"]
        lines, size, kind = run["format"] == "lines", args.size or run["size"], run["tokenizer"]
        context = args.context or run["context"]
        try:
            tokenizer = load_tokenizer(out / TOKENIZER_FILE)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load the run's tokenizer: {err}") from None
    else:
        if (out / RUN_FILE).exists() or any(out.glob("last*")) or any(out.glob("step-*")):
            raise UsageError(
                f"{str(out)!r} already holds a training run: pass --resume to continue it, or choose another --out"
            )
        data, size, kind = args.data, args.size or "small", args.tokenizer
        lines = args.lines or data is None
        context = args.context
    source, corpus = _load_corpus(data)
    if lines and isinstance(corpus, str):
        corpus = [line.strip() for line in corpus.splitlines() if line.strip()]
    if context is not None and context < 3:
        raise UsageError(f"--context must be >= 3, got {context}")
    if not args.resume:
        try:
            if kind == "char":
                tokenizer = CharTokenizer.from_text(corpus)
            else:
                tokenizer = BPETokenizer.train(corpus, vocab_size=args.vocab_size)
        except ValueError as err:
            raise UsageError(f"{source}: {err}") from None
    if context is None:
        # a sequence run fits its longest text; a stream run takes the preset's context
        context = max(len(tokenizer.encode(t)) for t in corpus) + 2 if lines else SIZES[size]["context"]
    train_ds, eval_ds = make_datasets(source, corpus, tokenizer, lines, context)
    _seed(args.seed)
    try:
        model = make_model(tokenizer, size, context, args.dropout)
        config = TrainerConfig(
            max_steps=args.steps,
            batch_size=args.batch_size,
            grad_accum_steps=args.grad_accum,
            learning_rate=args.lr,
            warmup_steps=max(0, min(args.warmup, args.steps)),
            eval_interval=args.eval_interval,
            save_interval=args.save_interval,
            precision=args.precision,
            out_dir=str(out),
            seed=args.seed,
            device=str(_device(args.device)),
            progress=not args.no_progress,
        )
        trainer = Trainer(model, train_ds, eval_ds, config)
    except ValueError as err:  # a GPTConfig / TrainerConfig / Trainer check on the options or the data
        raise UsageError(f"{source}: {err}") from None
    if not args.resume:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out / TOKENIZER_FILE)
        _write_json(
            {
                "format": "lines" if lines else "stream",
                "data": data and str(Path(data).resolve()),
                "size": size,
                "context": context,
                "tokenizer": kind,
            },
            out / RUN_FILE,
        )
    print(
        f"training a {size} GPT ({model.num_parameters():,} parameters, context {context}) on the {source}: "
        f"{len(train_ds):,} training {'texts' if lines else 'windows'}, {kind} "
        f"tokenizer with {tokenizer.vocab_size} tokens"
    )
    history = trainer.train(resume_from="auto" if args.resume else None)
    if not history:
        print(f"nothing to do: the run in {str(out)!r} is already at step {trainer.step} (raise --steps to go on)")
        return 0
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    summary = f"final train loss {history[-1]['loss']:.3f}"
    if evals:
        summary += f", eval loss {evals[0]:.3f} -> {evals[-1]:.3f}"
    print(summary)
    print(
        f"saved {out / 'last'}"
        + (f" and {out / 'best'}" if (out / "best").is_dir() else "")
        + f"; loss curve {out / 'loss.png'}"
    )
    print(f"try: pyminigpt generate {out}")
    return 0


# ----------------------------------------------------------------------------- generate, perplexity


def cmd_generate(args) -> int:
    from .analysis import generate_text

    _check_sampling(args)
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    loaded = load_model(args.model, _device(args.device), args.tokenizer)
    _encode_check(loaded, args.prompt, "prompt")
    kwargs = _sampling_kwargs(args, loaded, args.prompt)
    if args.stream:
        for _ in range(args.num_samples):
            print(args.prompt, end="", flush=True)
            generate_text(
                loaded.model,
                loaded.tokenizer,
                args.prompt,
                sos=loaded.sos,
                stream=lambda piece: print(piece, end="", flush=True),
                **kwargs,
            )
            print()
    else:
        texts = generate_text(
            loaded.model, loaded.tokenizer, args.prompt, sos=loaded.sos, num_return_sequences=args.num_samples, **kwargs
        )
        for text in texts:
            print(text)
    return 0


def cmd_perplexity(args) -> int:
    from .analysis import perplexity

    loaded = load_model(args.model, _device(args.device), args.tokenizer)
    if (args.file is None) == (args.text is None):
        raise UsageError("give a FILE or --text (one of them)")
    if args.file is not None:
        from .data import load_text

        try:
            text, source = load_text(args.file), repr(args.file)
        except (OSError, ValueError) as err:
            raise UsageError(str(err)) from None
    else:
        text, source = args.text, "the text"
    texts = [line.strip() for line in text.splitlines() if line.strip()] if loaded.sos else text
    for piece in [texts] if isinstance(texts, str) else texts:
        _encode_check(loaded, piece, source)
    try:
        ppl = perplexity(
            loaded.model,
            loaded.tokenizer,
            texts,
            stride=args.stride,
            max_length=args.max_length,
            add_special_tokens=loaded.sos,
        )
    except ValueError as err:
        raise UsageError(f"{source}: {err}") from None
    print(
        f"perplexity {ppl:.3f} of {source} under {str(loaded.path)!r}"
        f" (a uniform guess over the vocabulary scores {loaded.tokenizer.vocab_size})"
    )
    return 0


# ----------------------------------------------------------------------------- chat


def _ask_rating(read) -> float | None | str:
    """A rating in [-1, 1], '' to skip, or None to quit (q or end of input)."""
    from .feedback import check_reward

    while True:
        answer = read("rate it from -1 (bad) to 1 (good), Enter to skip, q to quit: ")
        if answer is None or answer.strip().lower() in ("q", "quit"):
            return None
        answer = answer.strip()
        if not answer:
            return ""
        try:
            return check_reward(float(answer))
        except ValueError:
            print(f"  {answer!r} is not a number in [-1, 1]")


def _read_line(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        print()
        return None


def save_model_dir(loaded: Loaded, out: Path) -> None:
    """Write model + tokenizer + run file as a model directory that `load_model` reads."""
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save(out / TOKENIZER_FILE)
    _write_json({"format": "lines" if loaded.sos else "stream", "tuned_from": str(loaded.path)}, out / RUN_FILE)


def cmd_chat(args) -> int:
    from .analysis import generate_text, plot_curve
    from .feedback import FeedbackTrainer

    out = Path(args.out)
    _check_sampling(args)
    loaded = load_model(args.model, _device(args.device), args.tokenizer)
    if args.feedback and out.resolve() in (loaded.path.resolve(), loaded.path.parent.resolve()):
        raise UsageError(f"--out {str(out)!r} would overwrite the model being tuned; choose another directory")
    trainer = None
    if args.feedback:
        if not (args.lr > 0 and args.kl_coef >= 0):
            raise UsageError(f"--lr must be > 0 and --kl-coef >= 0, got {args.lr} and {args.kl_coef}")
        trainer = FeedbackTrainer(loaded.model, loaded.tokenizer, lr=args.lr, kl_coef=args.kl_coef, sos=loaded.sos)
    print(f"chatting with {str(loaded.path)!r}" + (" (feedback on: your ratings tune it)" if trainer else ""))
    print("type a prompt and press Enter; q or end of input quits")
    while True:
        prompt = _read_line("> ")
        if prompt is None or prompt.strip().lower() in ("q", "quit"):
            break
        try:
            loaded.tokenizer.encode(prompt)
            kwargs = _sampling_kwargs(args, loaded, prompt)
        except (ValueError, UsageError) as err:
            print(f"  cannot use this prompt: {err}")
            continue
        print(prompt, end="", flush=True)
        [text] = generate_text(
            loaded.model,
            loaded.tokenizer,
            prompt,
            sos=loaded.sos,
            stream=lambda piece: print(piece, end="", flush=True),
            **kwargs,
        )
        print()
        if trainer is None:
            continue
        response = text[len(prompt) :]
        if not response:
            print("  (empty reply: nothing to rate)")
            continue
        rating = _ask_rating(_read_line)
        if rating is None:
            break
        if rating == "":
            continue
        stats = trainer.step(prompt, response, rating)
        print(
            f"  reward {stats['reward']:+.2f}, advantage {stats['advantage']:+.2f}, "
            f"log p/token {stats['logprob']:.3f}, KL {stats['kl']:.4f}"
        )
    if trainer is not None:
        if not trainer.rewards:
            print("no ratings given: nothing saved")
            return 0
        save_model_dir(loaded, out)
        plot = plot_curve(
            trainer.rewards, out / "rewards.png", title="feedback rewards", xlabel="rating", ylabel="reward"
        )
        print(
            f"{len(trainer.rewards)} ratings (mean {sum(trainer.rewards) / len(trainer.rewards):+.2f}); "
            f"tuned model saved to {str(out)!r}, rewards plotted in {plot!r}"
        )
    return 0


# ----------------------------------------------------------------------------- info


def cmd_info(args) -> int:
    from . import __version__, ops
    from .ops import dispatch

    print(f"pyminigpt {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    for name in ("transformers", "triton"):
        try:
            module = __import__(name)
            print(f"{name} {module.__version__}")
        except ImportError as err:
            print(f"{name}: not installed ({err})")
    print(
        f"CPU: {platform.machine()}, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} logical cores"
    )
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    elif torch.version.cuda is None:
        print("GPU: none (this torch is a CPU-only build)")
    else:
        print(f"GPU: none found (torch built with CUDA {torch.version.cuda})")
    print("kernel backends:")
    for name, status in ops.backend_status().items():
        state = "available" if status["available"] else "unavailable"
        detail = f"ops: {', '.join(status['ops'])}" if status["available"] else status["reason"]
        print(f"  {name:<10} {state:<12} {detail}")
    env = os.environ.get("PYMINIGPT_BACKEND")
    try:
        active = dispatch.current_backend()
    except ValueError as err:
        active = f"invalid: {err}"
    print(f"active backend: {active}" + (f" (from PYMINIGPT_BACKEND={env})" if env else ""))
    return 0


# ----------------------------------------------------------------------------- demo


# The demo trains for about this many seconds (within [DEMO_MIN_STEPS, DEMO_MAX_STEPS] steps) unless --steps says otherwise.
DEMO_TRAIN_SECONDS, DEMO_MIN_STEPS, DEMO_MAX_STEPS = 60.0, 50, 4000


def _seconds_per_step(model, dataset, batch_size: int, repeats: int = 4) -> float:
    """Time of one training step (forward, backward, AdamW) of a copy of `model`, after a warm-up step."""
    import copy

    import torch.nn.functional as F

    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(probe.parameters())
    items = [dataset[i] for i in range(batch_size)]
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    for i in range(repeats + 1):
        if i == 1:
            start = time.perf_counter()
        logits = probe(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return 1.1 * (time.perf_counter() - start) / repeats  # + data loading and bookkeeping


def cmd_demo(args) -> int:
    from .analysis import (
        attention_maps,
        embeddings,
        format_next_token_table,
        generate_text,
        next_token_table,
        perplexity,
        plot_attention,
        plot_pca,
        token_strings,
    )
    from .data import SequenceDataset, names_corpus
    from .model import GPT, GPTConfig
    from .tokenizer import CharTokenizer
    from .trainer import Trainer, TrainerConfig

    started = time.perf_counter()
    out = Path(args.out)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RUN_FILE).is_file())):
        raise UsageError(f"--out {str(out)!r} exists and is not a demo output: choose another directory")
    if args.quick:
        n_names, size, batch = 600, {"n_layer": 1, "n_head": 2, "n_embd": 32}, 32
    else:
        n_names, size, batch = 5000, {"n_layer": 3, "n_head": 4, "n_embd": 64}, 64
    _seed(args.seed)
    names = names_corpus(n_names, seed=args.seed)
    random.Random(args.seed).shuffle(names)
    n_eval = len(names) // 10
    train_names, eval_names = names[n_eval:], names[:n_eval]
    tokenizer = CharTokenizer.from_text(names)
    context = max(map(len, names)) + 2  # <SOS> name <EOS>
    print(
        f"pyminigpt demo: a character-level GPT learns to invent fantasy names\n"
        f"corpus: {len(names)} names like {', '.join(train_names[:5])} ({len(train_names)} to train on, "
        f"{len(eval_names)} held out); {tokenizer.vocab_size} tokens (characters + <PAD> <SOS> <EOS>)"
    )

    config = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        n_positions=context,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.sos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        **size,
    )
    model = GPT(config)
    train_ds, eval_ds = (
        SequenceDataset(train_names, tokenizer, context),
        SequenceDataset(eval_names, tokenizer, context),
    )
    print(
        f"model: GPT-2 with {config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, "
        f"context {context}: {model.num_parameters():,} parameters"
    )
    if args.steps is not None:
        steps = args.steps
    elif args.quick:
        steps = 30
    else:  # as many steps as fit in the time budget on this machine
        seconds = _seconds_per_step(model, train_ds, batch)
        steps = max(DEMO_MIN_STEPS, min(DEMO_MAX_STEPS, int(DEMO_TRAIN_SECONDS / seconds)))
        print(
            f"this machine trains it at {1 / seconds:.1f} steps/s: {steps} steps of {batch} names "
            f"(about {steps * seconds:.0f} s; --steps sets another number)"
        )
    print()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / TOKENIZER_FILE)
    _write_json(
        {"format": "lines", "data": None, "size": "demo", "context": context, "tokenizer": "char"}, out / RUN_FILE
    )

    trainer = Trainer(
        model,
        train_ds,
        eval_ds,
        TrainerConfig(
            max_steps=steps,
            batch_size=batch,
            learning_rate=3e-3,
            warmup_steps=min(50, steps // 5),
            weight_decay=0.05,
            eval_interval=max(1, steps // 6),
            eval_batches=4,
            out_dir=str(out),
            seed=args.seed,
            device="cpu",
            progress=not args.no_progress,
        ),
    )
    history = trainer.train()
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    print("\nheld-out loss (nats per character): " + "  ".join(f"step {s}: {v:.3f}" for s, v in evals))
    model.eval()

    ppl = perplexity(model, tokenizer, eval_names, add_special_tokens=True)
    print(
        f"perplexity on the held-out names: {ppl:.2f} (a uniform guess: {tokenizer.vocab_size}; "
        f"the model hesitates between about {ppl:.1f} characters at each step)\n"
    )

    print("what comes first? next-character probabilities after <SOS>:")
    print(format_next_token_table(next_token_table(model, tokenizer, "", top_n=5, sos=True)) + "\n")

    generator = torch.Generator().manual_seed(args.seed)
    known = set(train_names)
    generated = []
    settings = [("greedy", {"do_sample": False, "num_return_sequences": 1})]
    settings += [(f"temperature {t}", {"do_sample": True, "temperature": t, "top_k": 0}) for t in (0.5, 0.8, 1.0, 1.5)]
    settings += [
        ("top-k 3", {"do_sample": True, "top_k": 3}),
        ("top-p 0.7", {"do_sample": True, "top_k": 0, "top_p": 0.7}),
    ]
    n_each = 4 if args.quick else 8
    print("generated names (* = also in the training set):")
    for label, kwargs in settings:
        kwargs = {"num_return_sequences": n_each, **kwargs}
        names_out = generate_text(
            model, tokenizer, "", sos=True, max_new_tokens=context - 1, generator=generator, **kwargs
        )
        generated += names_out
        shown = ", ".join(n + ("*" if n in known else "") for n in names_out)
        print(f"  {label:<16} {shown}")
    new = sum(n not in known for n in generated) / len(generated)
    print(f"{new:.0%} of the {len(generated)} generated names are new (not in the training set)")
    prompted = generate_text(
        model,
        tokenizer,
        "Th",
        sos=True,
        max_new_tokens=context - 3,
        do_sample=True,
        temperature=0.8,
        top_k=0,
        num_return_sequences=n_each,
        generator=generator,
    )
    print(f"  starting with 'Th': {', '.join(prompted)}\n")

    example = next((n for n in generated if n and n not in known), generated[0] or "Aragorn")
    maps = attention_maps(model, tokenizer, example, add_special_tokens=True)
    tokens = token_strings(tokenizer, tokenizer.encode(example, add_special_tokens=True))
    attention_png = plot_attention(maps, tokens, out / "attention.png", title=f"attention on {example!r}")
    letters = tokenizer.chars
    embeddings_png = plot_pca(
        embeddings(model, tokenizer, letters), letters, out / "embeddings.png", title="character embeddings (PCA)"
    )
    print(f"wrote the loss curve to {out / 'loss.png'}, the attention maps on {example!r} to {attention_png}")
    print(f"and the learned character embeddings on their two principal components to {embeddings_png}")
    print(f"the trained model is in {out}: try `pyminigpt generate {out}` or `pyminigpt chat {out} --feedback`")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pyminigpt", description="A small GPT-2 on fused kernels: train, sample, explore."
    )
    parser.add_argument("--version", action="version", version=f"pyminigpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo",
        help="train a character model on fantasy names and explore it (~90 s)",
        description="Train a character-level GPT on the built-in names corpus, then generate names at "
        "several temperatures and with top-k / top-p, measure perplexity and novelty, and "
        "plot the loss curve and attention maps.",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default: what fits in {DEMO_TRAIN_SECONDS:.0f} s here; 30 with --quick)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="pyminigpt-demo", help="output directory (default ./pyminigpt-demo)")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds; for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser(
        "train",
        help="train a model on a text file or the built-in names",
        description="Train a GPT on DATA (a UTF-8 text file; default: the built-in names corpus). "
        "The run directory gets the tokenizer, checkpoints (best/, last/) and loss.png.",
    )
    p.add_argument("data", nargs="?", default=None, help="UTF-8 text file (default: built-in names, one per sequence)")
    p.add_argument("--lines", action="store_true", help="each line of DATA is one sequence (<SOS> line <EOS>)")
    p.add_argument(
        "--tokenizer", choices=("char", "bpe"), default="char", help="character or byte-level BPE (default char)"
    )
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (default 1024)")
    p.add_argument(
        "--size",
        choices=tuple(SIZES),
        default=None,
        help="model preset: "
        + ", ".join(f"{k} ({v['n_layer']}x{v['n_embd']})" for k, v in SIZES.items())
        + " (default small)",
    )
    p.add_argument(
        "--context", type=int, default=None, help="context length (default: the preset's, or the longest line + 2)"
    )
    p.add_argument("--dropout", type=float, default=0.1, help="dropout rate (default 0.1)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps (default 100)")
    p.add_argument("--eval-interval", type=int, default=100, help="evaluate every N steps (default 100)")
    p.add_argument(
        "--save-interval", type=int, default=0, help="also checkpoint every N steps (default 0: best and last only)"
    )
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/pyminigpt", help="run directory (default runs/pyminigpt)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser(
        "generate",
        help="sample text from a model",
        description="Continue a prompt with a trained run, checkpoint or GPT-2 directory.",
    )
    p.add_argument("model", help="run directory, checkpoint directory, or GPT-2 directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start from scratch)")
    p.add_argument("--num-samples", type=int, default=5, help="how many continuations (default 5)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _add_sampling_args(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser(
        "perplexity",
        help="perplexity of a text under a model",
        description="exp(mean negative log-likelihood per token), with a strided sliding window for "
        "texts longer than the context. A run trained on lines scores each line as one sequence.",
    )
    p.add_argument("model", help="run directory, checkpoint directory, or GPT-2 directory")
    p.add_argument("file", nargs="?", default=None, help="UTF-8 text file to score")
    p.add_argument("--text", default=None, help="score this text instead of a file")
    p.add_argument("--stride", type=int, default=None, help="window stride in tokens (default: half the window)")
    p.add_argument("--max-length", type=int, default=None, help="window length in tokens (default: the context)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the run's tokenizer.json)")
    p.set_defaults(run=cmd_perplexity)

    p = sub.add_parser(
        "chat",
        help="talk to a model; --feedback to rate and tune it",
        description="Read prompts from stdin and print the model's replies. With --feedback, rate each "
        "reply in [-1, 1]: every rating is a policy-gradient step (with a KL leash to the "
        "starting model); at the end the tuned model and a plot of the rewards are saved.",
    )
    p.add_argument("model", help="run directory, checkpoint directory, or GPT-2 directory")
    p.add_argument("--feedback", action="store_true", help="rate the replies and fine-tune on the ratings")
    p.add_argument("--lr", type=float, default=3e-4, help="feedback learning rate (default 3e-4)")
    p.add_argument("--kl-coef", type=float, default=0.1, help="weight of the KL penalty (default 0.1)")
    p.add_argument(
        "--out", default="pyminigpt-feedback", help="where the tuned model goes (default ./pyminigpt-feedback)"
    )
    _add_sampling_args(p)
    p.set_defaults(run=cmd_chat)

    from . import explore

    explore.add_parser(sub)

    p = sub.add_parser(
        "info",
        help="version, kernel backends, CPU and GPU",
        description="Show the version, which kernel backends this install has (and why the others are "
        "missing), the CPU capability and the GPUs.",
    )
    p.set_defaults(run=cmd_info)

    from . import bench_report

    p = sub.add_parser(
        "bench", help="run the benchmarks; report ratios (JSON, Markdown, PNG)", description=bench_report.DESCRIPTION
    )
    bench_report.add_arguments(p)
    p.set_defaults(run=bench_report.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `pyminigpt` command; returns the exit code (2 for bad input, with a one-line message)."""
    from .checkpoint import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, CheckpointError, OSError) as err:
        print(f"pyminigpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyminigpt {args.command}: interrupted", file=sys.stderr)
        return 130
