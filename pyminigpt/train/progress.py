"""The training progress bar: tqdm's, or none where tqdm is not installed (it comes with the
`demo` extra); the notes the bar would print are printed then. And the line that train() prints
after its first PACE_STEPS steps: the tokens/s and how long the run will take."""

from __future__ import annotations


class _NoProgressBar:
    """What train() uses of tqdm's bar, drawing nothing (tqdm not installed): notes are printed."""

    def __init__(self, *args, disable: bool = False, **kwargs):
        self.disable = disable

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def write(self, text: str) -> None:
        if not self.disable:
            print(text, flush=True)


def progress_bar(**kwargs):
    """`tqdm.auto.tqdm(**kwargs)`, or a bar that draws nothing when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoProgressBar(**kwargs)
    return tqdm(**kwargs)


PACE_STEPS = 3  # after this many steps, train() prints the tokens/s and the time the run will take


def duration(seconds: float) -> str:
    """`seconds` as people say it: 40 s, 3.5 min, 2.1 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def pace_line(trainer, first_step: int) -> str:
    """The speed of `trainer`'s first PACE_STEPS steps since `first_step` (the very first left out: it
    warms up) and the time that its steps from `first_step` to max_steps take at that speed (the
    evaluations, when it has them, come on top)."""
    timed = trainer.history[-PACE_STEPS + 1 :]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed) / len(timed)
    tokens = sum(r["tokens"] for r in timed) / len(timed)
    steps = trainer.config.max_steps - first_step
    evals = trainer.eval_dataset is not None and trainer.config.eval_interval > 0
    return (
        f"{tokens / seconds:,.0f} tokens/s ({seconds:.2f} s per step): the {steps:,} steps take about "
        f"{duration(steps * seconds)}{' plus the evaluations' if evals else ''}"
    )


def report_pace(trainer, bar, first_step: int) -> None:
    """Write `pace_line` on `bar` once, when `trainer` (a train() call that began at `first_step`) has
    done PACE_STEPS steps and has more to do (rank 0, with progress on)."""
    done, left = trainer.step - first_step, trainer.config.max_steps - trainer.step
    if done == PACE_STEPS and left > 0 and trainer.is_main and trainer.config.progress:
        bar.write(pace_line(trainer, first_step))
