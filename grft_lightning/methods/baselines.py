"""The baselines every comparison table needs: full fine-tuning, linear probing and BitFit. They
select nothing; they only choose which of the model's own parameters train."""

from __future__ import annotations

from torch import nn

from grft_lightning.core.selection import Selection
from grft_lightning.methods.base import Method


class Full(Method):
    """Full fine-tuning: every parameter of the backbone and the head is trained."""

    tag = "full"

    def __init__(self):
        super().__init__(tune_bias=True, tune_norm=True)

    def inject(self, model: nn.Module, selection: Selection) -> None:
        for p in model.parameters():
            p.requires_grad_(True)


class Linear(Method):
    """Linear probing: only the new head is trained."""

    tag = "linear"

    def __init__(self):
        super().__init__(tune_bias=False, tune_norm=False)


class BitFit(Method):
    """BitFit: the biases of every nn.Linear/nn.Conv2d and the head are trained.

    Args:
        tune_norm: also train normalisation layers' affine parameters.
        tune_params: ``fnmatch`` patterns of further pre-trained parameters trained in full (e.g.
            ``["*.gamma"]`` layer scales, ``["*.relative_position_bias_table"]`` on Swin, as GPS's
            public code trains them; see ``Method``). None: none.
    """

    tag = "bitfit"

    def __init__(self, tune_norm: bool = False, tune_params: list[str] | None = None):
        super().__init__(tune_bias=True, tune_norm=tune_norm, tune_params=tune_params)
