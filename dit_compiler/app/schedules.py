"""What a training step does beyond one batch and one AdamW update: its learning rate (warm-up, then constant
or cosine) and how its micro-batches split the global batch (gradient accumulation). Pure functions of the
run's settings, so every backend and rank applies the same ones (gradient-norm clipping's scale is
`compiler.targets.base.clip_scale`, which the backends apply)."""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

def lr_at(step: int, lr: float, schedule: str = "constant", warmup_steps: int = 0, steps: int = 1) -> float:
    """The learning rate of step `step` (0-based) of a run of `steps`: lr (step + 1) / warmup_steps during
    the warm-up; then lr (`constant`) or lr (1 + cos(pi p)) / 2, p = (step - warmup_steps) / (steps -
    warmup_steps) (`cosine`, from lr down towards 0 at the last step)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def micro_batches(global_batch: int, accumulation: int, mine: slice) -> Iterator[np.ndarray]:
    """The rows of a step's global draws (`global_batch` images) each micro-batch of this rank takes: the
    global batch in `accumulation` consecutive parts, each split over the ranks as one step without
    accumulation splits its batch (`mine`: this rank's rows of a part)."""
    part = global_batch // accumulation
    for k in range(accumulation):
        yield np.arange(k * part, (k + 1) * part)[mine]

