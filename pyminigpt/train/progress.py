"""The training progress bar: tqdm's, or none where tqdm is not installed (it comes with the
`demo` extra); the notes the bar would print are printed then."""

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
