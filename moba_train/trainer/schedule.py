"""Per-stage learning rate: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

from moba_train.config import LRConfig


def lr_at(step: int, total_steps: int, lr: LRConfig) -> float:
    """LR for the stage's step `step` (0-based) of `total_steps`."""
    warmup = lr.warmup if lr.warmup >= 1 else lr.warmup * total_steps
    if warmup > 0 and step < warmup:
        return lr.peak * (step + 1) / (warmup + 1)
    if lr.schedule == "constant" or total_steps <= warmup + 1:
        return lr.peak
    progress = min(1.0, (step - warmup) / max(1.0, total_steps - 1 - warmup))
    floor = lr.peak * lr.min_ratio
    if lr.schedule == "linear":
        return floor + (lr.peak - floor) * (1 - progress)
    return floor + (lr.peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
