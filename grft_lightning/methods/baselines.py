"""Baselines every comparison table needs: full fine-tuning, linear probing, BitFit, and the
random-rows ablation of GRFT (same shapes and budget, rows drawn at random: shows that the
gradient rule, not the budget, makes the difference)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from grft_lightning.deltas import COLUMN, ROW, StructuredDelta
from grft_lightning.methods.base import Method
from grft_lightning.methods.grft import GRFT
from grft_lightning.seeding import run_seed


class Full(Method):
    """Full fine-tuning: every parameter of the backbone and the head is trained."""

    tag = "full"

    def __init__(self):
        super().__init__(tune_bias=True, tune_norm=True)

    def inject(self, model: nn.Module) -> None:
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


class RandomRows(GRFT):
    """GRFT's exact shapes and budget, with rows (or columns) drawn uniformly at random.

    Takes every GRFT argument (the regularizer too) plus ``seed``; needs no gradient pass.

    Args:
        mode: ``row`` or ``column`` (``auto`` has no meaning without gradients).
        rows_per_matrix: rows per eligible matrix (default 4 in row mode).
        columns_per_matrix: columns per eligible matrix (default 3 in column mode).
        fraction: target fraction of backbone parameters instead of a count.
        allocation: ``uniform`` or ``proportional`` (see GRFT).
        targets: eligible layer patterns (see GRFT).
        exclude: excluded layer patterns (default ``["patch_embed.*"]``).
        tune_bias: train nn.Linear/nn.Conv2d biases.
        tune_norm: train normalisation layers.
        regularization: ``none``, ``l2sp`` or ``feature`` (see GRFT).
        reg_lambda: weight of the regularizer.
        seed: seed of the draw (one generator walks the layers in model order). ``None`` (the
            default) takes the run's seed (``seed_everything``, the same on every DDP rank; 0
            outside a seeded run), so that seeds of a sweep draw different rows; the draw is
            saved in the checkpoint like any selection.
        tune_params: ``fnmatch`` patterns of further pre-trained parameters trained in full (e.g.
            ``["*.gamma"]`` layer scales, ``["*.relative_position_bias_table"]`` on Swin, as GPS's
            public code trains them; see ``Method``). None: none.
    """

    needs_gradients = False
    tag = "random"

    def __init__(
        self,
        mode: Literal["row", "column"] = "row",
        rows_per_matrix: int | None = None,
        columns_per_matrix: int | None = None,
        fraction: float | None = None,
        allocation: Literal["uniform", "proportional"] = "uniform",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        tune_bias: bool = True,
        tune_norm: bool = False,
        regularization: Literal["none", "l2sp", "feature"] = "l2sp",
        reg_lambda: float = 1e-4,
        seed: int | None = None,
        tune_params: list[str] | None = None,
    ):
        if mode == "auto":
            raise ValueError("RandomRows.mode must be row or column")
        super().__init__(mode, rows_per_matrix, columns_per_matrix, fraction, allocation, targets, exclude,
                         tune_bias, tune_norm, regularization, reg_lambda, tune_params=tune_params)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def select(self, model: nn.Module, grads: dict[str, torch.Tensor] | None = None, reselect: bool = False) -> None:
        seed = self.seed if self.seed is not None else run_seed()
        # Held only during the draw: a torch.Generator cannot be pickled or deep-copied with the model.
        self._generator = torch.Generator().manual_seed(seed)
        try:
            super().select(model, grads, reselect)
        finally:
            self._generator = None

    def select_layer(self, layer: StructuredDelta, grad: torch.Tensor | None) -> None:
        if self.mode == "row":
            pick = torch.randperm(layer.out_features, generator=self._generator)[: layer.rows]
            layer.set_selection(ROW, pick.sort().values.to(layer.row_index.device))
        else:
            pick = torch.randperm(layer.fan_in, generator=self._generator)[: layer.columns]
            layer.set_selection(COLUMN, pick.sort().values.to(layer.col_index.device))
