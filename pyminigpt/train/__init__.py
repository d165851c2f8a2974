"""Training: the trainer (trainer.py: AdamW, mixed precision, DDP), its checkpoints
(checkpoint.py), the datasets (data.py) and tuning from ratings (feedback.py).

The names below are imported on first use (trainer.py brings torch.distributed)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Trainer": "trainer",
    "TrainerConfig": "trainer",
    "FeedbackTrainer": "feedback",
    "SequenceDataset": "data",
    "SlidingWindowDataset": "data",
    "load_text": "data",
    "names_corpus": "data",
    "write_token_file": "data",
}

__all__ = [
    "FeedbackTrainer",
    "SequenceDataset",
    "SlidingWindowDataset",
    "Trainer",
    "TrainerConfig",
    "load_text",
    "names_corpus",
    "write_token_file",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyminigpt.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
