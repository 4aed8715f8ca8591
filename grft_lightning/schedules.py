"""Learning-rate schedule: linear warm-up then cosine decay, stepped every optimizer step."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int, warmup_start_lr: float,
                  min_lr: float) -> LambdaLR:
    """Per-step schedule for every parameter group (each keeps its own base lr).

    Step ``s < warmup_steps``: linear from ``warmup_start_lr`` to the group's lr. Afterwards a
    cosine from the group's lr down to ``min_lr`` at ``total_steps``.
    """
    def factor(base_lr: float):
        def f(step: int) -> float:
            if step < warmup_steps:
                lr = warmup_start_lr + (base_lr - warmup_start_lr) * step / max(1, warmup_steps)
            else:
                progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
                lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
            return lr / base_lr
        return f

    return LambdaLR(optimizer, [factor(group["lr"]) for group in optimizer.param_groups])
