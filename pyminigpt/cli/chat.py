"""`pyminigpt chat MODEL [--feedback]`: talk to a model; with --feedback, rate its replies and tune it.

MODEL is a run, a checkpoint or a GPT-2 directory (BPE tokenizers included). With
--feedback, each rating is one `FeedbackTrainer` step; at the end the tuned model is saved
as a run directory (`--out`: run.json, tokenizer.json, last/ a transformers model
directory, rewards.png) that `generate`, `perplexity`, `explore` and `chat` read.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from ..quantize import add_weights_argument
from .runs import (
    RUN_FILE,
    UsageError,
    add_sampling_args,
    check_sampling,
    load_model,
    pick_device,
    read_json,
    sampling_kwargs,
    save_model_dir,
)


def _ask_rating(read) -> float | None | str:
    """A rating in [-1, 1], '' to skip, or None to quit (q or end of input)."""
    from ..train.feedback import check_reward

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


def _earlier_tuning(out: Path) -> dict | None:
    """The run.json of the earlier chat --feedback run in `out`, or None; refuses an --out that is a file
    or holds anything else (a training run, a model)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; choose a directory")
    run_file = out / RUN_FILE
    run = read_json(run_file, "run file") if run_file.is_file() else {}
    if "tuned_from" in run:
        return run
    if any(out.iterdir()):
        raise UsageError(
            f"--out {str(out)!r} already holds files that are not an earlier chat --feedback run; "
            f"choose another directory"
        )
    return None


def _check_out(out: Path, loaded) -> dict | None:
    """--out must be new, empty, or the earlier feedback run that MODEL is (which is then continued):
    never a training run, a model, or another feedback run (which would be replaced). Returns the
    earlier run's run.json when continuing it."""
    earlier = _earlier_tuning(out)
    continuing = earlier is not None and out.resolve() in (loaded.path.resolve(), loaded.path.parent.resolve())
    if not continuing and out.resolve() in (loaded.path.resolve(), loaded.path.parent.resolve()):
        raise UsageError(f"--out {str(out)!r} would overwrite the model being tuned; choose another directory")
    if earlier is not None and not continuing:
        raise UsageError(
            f"--out {str(out)!r} already holds a chat --feedback run (tuned from {earlier['tuned_from']!r}); "
            f"continue it with `pyminigpt chat {out} --feedback --out {out}`, or choose another --out"
        )
    return earlier


@contextmanager
def _sigint_deferred():
    """Ctrl-C inside the block takes effect when it ends, so that an update is applied whole or not at all."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _save_tuning(trainer, loaded, out: Path, earlier: dict | None) -> None:
    """Save the tuned model as the run directory `out` (continuing `earlier`'s ratings when given)."""
    from ..plots import plot_curve

    if not trainer.rewards:
        print("no ratings given: nothing saved")
        return
    rewards = (earlier or {}).get("rewards", []) + trainer.rewards
    tuned_from = earlier["tuned_from"] if earlier is not None else None
    model_dir = save_model_dir(loaded, out, tuned_from=tuned_from, rewards=rewards)
    plot = plot_curve(
        rewards,
        out / "rewards.png",
        title="feedback rewards",
        xlabel="rating number (in the order given)",
        ylabel="reward",
    )
    n = len(trainer.rewards)
    print(
        f"{_plural(n, 'rating')} (mean {sum(trainer.rewards) / n:+.2f})"
        + (f", {len(rewards)} since {tuned_from!r}" if earlier is not None else "")
        + f"; tuned model saved to the run directory {str(out)!r} ({str(model_dir)!r} is a transformers "
        f"model directory), rewards plotted in {plot!r}"
    )
    print(f"try: pyminigpt generate {out}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def run(args) -> int:
    """Run `pyminigpt chat`; Ctrl-C ends the chat like q (with --feedback, the tuning so far is saved)."""
    from ..train.feedback import FeedbackTrainer

    out = Path(args.out)
    check_sampling(args)
    if args.feedback and args.weights in ("int8", "int4"):
        raise UsageError(
            f"--weights {args.weights} is for inference: --feedback fine-tunes the model, give fp32 or bf16"
        )
    loaded = load_model(args.model, pick_device(args.device), args.tokenizer, weights=args.weights)
    earlier = _check_out(out, loaded) if args.feedback else None
    trainer = None
    if args.feedback:
        if not (args.lr > 0 and args.kl_coef >= 0):
            raise UsageError(f"--lr must be > 0 and --kl-coef >= 0, got {args.lr} and {args.kl_coef}")
        trainer = FeedbackTrainer(loaded.model, loaded.tokenizer, lr=args.lr, kl_coef=args.kl_coef, sos=loaded.sos)
    if earlier is not None:
        print(f"continuing the feedback run in {str(out)!r}: the new ratings add to its tuning")
    try:
        _talk(args, loaded, trainer)
    except KeyboardInterrupt:
        if trainer is None:
            raise
        print("\nCtrl-C: the chat ends here" + (", saving what the ratings tuned" if trainer.rewards else ""))
    if trainer is not None:
        _save_tuning(trainer, loaded, out, earlier)
    return 0


def _talk(args, loaded, trainer) -> None:
    """The conversation: prompts, replies and (with a trainer) ratings, until q or end of input."""
    from ..analysis import generate_text

    print(f"chatting with {str(loaded.path)!r}" + (" (feedback on: your ratings tune it)" if trainer else ""))
    print("type a prompt and press Enter; q or end of input quits")
    while True:
        prompt = _read_line("> ")
        if prompt is None or prompt.strip().lower() in ("q", "quit"):
            break
        try:
            if not prompt.strip():
                raise ValueError("the prompt is empty (type some text, or q to quit)")
            loaded.tokenizer.encode(prompt)
            kwargs = sampling_kwargs(args, loaded, prompt)
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
        with _sigint_deferred():
            stats = trainer.step(prompt, response, rating)
        print(
            f"  reward {stats['reward']:+.2f}, advantage {stats['advantage']:+.2f}, "
            f"log p/token {stats['logprob']:.3f}, KL {stats['kl']:.4f}"
        )


def add_parser(subparsers) -> None:
    """Add the `chat` sub-command to an argparse sub-parser set."""
    p = subparsers.add_parser(
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
    add_sampling_args(p)
    add_weights_argument(p)
    p.set_defaults(run=run)
