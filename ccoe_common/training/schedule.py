"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

A pure function of the step, so a resumed run needs no scheduler state to continue exactly:

    lr_at(0, base_lr=1e-3, warmup=10, total=100)   -> 1e-4   (first step already learns)
    lr_at(9, ...)                                    -> 1e-3   (end of warmup)
    lr_at(99, ..., min_ratio=0.1)                    -> ~1e-4  (cosine floor)
"""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup + 1) / decay_steps)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
