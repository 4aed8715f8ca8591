"""Learning-rate schedule: linear warm-up then cosine decay, stepped every optimizer step.

The schedule is timm's :class:`~timm.scheduler.CosineLRScheduler` (warm-up as a prefix, one
cosine cycle, positions in optimizer steps). Every parameter group keeps its own base lr (the
head's ``head_lr`` included); the warm-up start and the final lr are absolute, the same for all
groups. Step ``s < warmup_steps``: linear from ``warmup_start_lr`` to the group's lr; afterwards a
cosine from the group's lr down to ``min_lr`` at ``total_steps``, and ``min_lr`` beyond.

A timm scheduler is not a torch ``LRScheduler``: :meth:`PEFTModule.lr_scheduler_step
<grft_lightning.training.module.PEFTModule.lr_scheduler_step>` steps it with Lightning's global step, so
the lr is a function of the step count alone and a resumed run continues it exactly. (torch's
``LinearLR`` has one start factor for all groups, so it cannot start every group at the same
absolute lr, and ``CosineAnnealingLR`` updates the lr recursively, which drifts from the closed
form near the end of a long run.)
"""

from __future__ import annotations

from typing import Any

from timm.scheduler import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer


class WarmupCosine(CosineLRScheduler):
    """timm's warm-up + cosine over ``total_steps`` optimizer steps (see the module docstring).

    Its settings come from the run's config, not from a checkpoint: :meth:`load_state_dict`
    keeps them (the position is Lightning's global step, restored with the trainer), so a run
    resumed with more epochs follows its own, longer cosine.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int, warmup_start_lr: float,
                 min_lr: float):
        super().__init__(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr,
                         warmup_t=warmup_steps, warmup_lr_init=warmup_start_lr, warmup_prefix=True,
                         t_in_epochs=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep this run's settings (a checkpoint of an older layout, or of a shorter run, loads too)."""


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int, warmup_start_lr: float,
                  min_lr: float) -> WarmupCosine:
    """The default per-step schedule of :class:`~grft_lightning.training.module.PEFTModule`."""
    return WarmupCosine(optimizer, total_steps, warmup_steps, warmup_start_lr, min_lr)


def step_scheduler(scheduler: Any, global_step: int) -> bool:
    """Step a timm scheduler to ``global_step`` optimizer steps; False for any other kind."""
    if not isinstance(scheduler, Scheduler):
        return False
    scheduler.step_update(global_step)
    return True
