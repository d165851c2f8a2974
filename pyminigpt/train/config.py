"""TrainerConfig: the training hyper-parameters, checked when made."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRECISIONS", "TrainerConfig"]

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainerConfig:
    """Training hyper-parameters. Sizes are per process; see the module docstring."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 3e-4  # peak learning rate, reached after the warm-up
    min_lr_ratio: float = 0.1  # the cosine decays to learning_rate * min_lr_ratio at max_steps
    warmup_steps: int = 100  # linear warm-up from learning_rate / warmup_steps
    weight_decay: float = 0.1  # on 2-D weights only (not biases, layer norms)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "fp32"  # "fp32", "bf16" (autocast, CPU or GPU), "fp16" (autocast + GradScaler, GPU)
    eval_interval: int = 100  # evaluate every this many steps (and at the last step); 0 = never
    eval_batches: int | None = None  # evaluate on this many batches per process; None = the whole eval set
    save_interval: int = 0  # write step-NNNNNNN every this many steps; 0 = never
    keep_checkpoints: int = 2  # how many step-NNNNNNN checkpoints to keep
    out_dir: str | None = None  # where checkpoints and loss.png go; None = write nothing
    seed: int = 0  # seeds the data order and (offset by rank) every RNG
    shuffle: bool = True
    num_workers: int = 0  # DataLoader workers
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    progress: bool = True  # tqdm progress bar on rank 0

    def __post_init__(self):
        def check(name, ok, what):
            if not ok:
                raise ValueError(f"TrainerConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("max_steps", "batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            check(name, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "a positive int")
        for name in ("warmup_steps", "eval_interval", "save_interval", "keep_checkpoints", "num_workers"):
            value = getattr(self, name)
            check(name, isinstance(value, int) and not isinstance(value, bool) and value >= 0, "an int >= 0")
        check("learning_rate", self.learning_rate > 0, "> 0")
        check("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        check("weight_decay", self.weight_decay >= 0, ">= 0")
        check("grad_clip", self.grad_clip >= 0, ">= 0")
        check("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two floats in [0, 1)")
        check("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}")
        check("eval_batches", self.eval_batches is None or self.eval_batches >= 1, "None or >= 1")
        self.betas = tuple(self.betas)
