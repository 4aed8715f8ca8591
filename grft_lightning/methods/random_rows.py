"""The random-rows ablation of GRFT: GRFT's shapes and budget with rows (or columns) drawn at
random from the run's seed, so that a comparison with GRFT isolates the gradient rule from the
budget and the shapes. ``allocation: matched`` draws inside each matrix as many rows as a given
GRFT selection took there; ``global`` draws over every row of the model."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from grft_lightning.core.errors import check_choice
from grft_lightning.core.heads import DEFAULT, head_spec
from grft_lightning.core.layers import matrix_shape
from grft_lightning.core.seeding import run_seed
from grft_lightning.core.selection import LayerSelection, Rule, Selection, allocate
from grft_lightning.methods.grft import GRFT

class RandomRows(GRFT):
    """GRFT's shapes and budget, with rows (or columns) drawn at random.

    Takes every GRFT argument (the regularizer too) plus ``seed``. Four draws, by ``allocation``:

    * ``uniform`` / ``proportional``: GRFT's per-matrix counts, rows drawn at random inside each
      matrix (no gradient pass);
    * ``global``: rows drawn uniformly from all rows of the model (every row equally likely)
      until the budget is spent, so larger matrices get more (no gradient pass);
    * ``matched``: the per-matrix counts that GRFT's ``global`` allocation gives on this run's
      gradients, rows drawn at random inside each matrix (needs the gradient pass). With
      ``global`` it separates "which matrices" from "which rows".

    Args:
        mode: ``row`` or ``column`` (``auto`` has no meaning without gradients).
        rows_per_matrix: rows per eligible matrix (default 4 in row mode).
        columns_per_matrix: columns per eligible matrix (default 3 in column mode).
        fraction: target fraction of backbone parameters instead of a count (needed by
            ``global`` and ``matched``).
        allocation: ``uniform``, ``proportional``, ``global`` or ``matched`` (above).
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

    ALLOCATIONS = ("uniform", "proportional", "global", "matched")
    tag = "random"

    def __init__(
        self,
        mode: Literal["row", "column"] = "row",
        rows_per_matrix: int | None = None,
        columns_per_matrix: int | None = None,
        fraction: float | None = None,
        allocation: Literal["uniform", "proportional", "global", "matched"] = "uniform",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        tune_bias: bool = True,
        tune_norm: bool = False,
        regularization: Literal["none", "l2sp", "feature"] = "l2sp",
        reg_lambda: float = 1e-4,
        seed: int | None = None,
        tune_params: list[str] | None = None,
    ):
        check_choice("RandomRows.mode", mode, ("row", "column"))
        super().__init__(mode, rows_per_matrix, columns_per_matrix, fraction, allocation, targets, exclude,
                         tune_bias, tune_norm, regularization, reg_lambda, tune_params=tune_params)
        self.seed = seed

    @property
    def needs_gradients(self) -> bool:  # type: ignore[override]
        """Only ``matched`` reads gradients (GRFT's global counts)."""
        return self.allocation == "matched"

    def rule(self, model: nn.Module, head) -> Rule:
        # global: candidates taken in the order of their random keys, not by key per parameter
        return Rule(self.mode, self.allocation, self.backbone_parameters(model, head),
                    per_parameter=self.allocation == "matched")

    def select(self, model: nn.Module, grads: dict[str, torch.Tensor] | None = None, head=DEFAULT,
               seed: int | None = None) -> Selection:
        head = head_spec(model, head, required=True)
        seed = self.seed if self.seed is not None else seed if seed is not None else run_seed()
        generator = torch.Generator().manual_seed(seed)
        axis = self.mode
        if self.allocation == "matched":
            layers = self.candidate_scores(model, grads, head)
        else:
            layers = {name: LayerSelection(matrix_shape(layer), axis, torch.zeros(0, dtype=torch.long), {})
                      for name, layer in self.required_layers(model, head)}
        for layer in layers.values():
            size = layer.shape[0] if axis == "row" else layer.shape[1]
            if self.allocation == "global":
                # every row of the model equally likely: independent uniform keys, one ranking
                layer.scores[axis] = torch.rand(size, generator=generator, dtype=torch.float64)
            else:
                # a random order inside the matrix: the i-th drawn candidate gets key size - i
                keys = torch.empty(size, dtype=torch.float64)
                keys[torch.randperm(size, generator=generator)] = torch.arange(size, 0, -1, dtype=torch.float64)
                layer.keys[axis] = keys
        return allocate(layers, self.rule(model, head), self.budget(), head)
