"""GRFT: Gradient-based Regularized Fine-Tuning (Liu et al., arXiv 2507.00016, 2025).

One idea: update whole rows or columns of weight matrices, chosen by the sum of squares of the
gradient accumulated over the training set, and regularise towards the pre-trained model.

For a linear map ``W`` (out x in) with accumulated gradient ``G``, a gradient step restricted
to a row set ``S`` lowers the loss by about ``lr * sum_{i in S} ||G[i, :]||^2``; so each row is
scored by ``||G[i, :]||^2`` (each column by ``||G[:, j]||^2``) and the best ones are tuned.
Rows hold ``in`` parameters and columns ``out``, so ``mode="auto"`` compares, per matrix, the
captured gradient energy *per parameter* of the best rows and of the best columns at the same
parameter budget, and keeps the better. The tuned entries live in a small delta (rows:
``y[..., R] += x D^T``; columns: ``y += x[..., C] D^T``) and the regulariser is L2-SP,
``lambda * sum ||W - W0||^2 = lambda * sum ||D||^2``, or a feature distance to the frozen
pre-trained model.

Which matrices get the budget is an option too: ``allocation="global"`` ranks every row (column)
of every eligible matrix by its score per parameter and spends one budget over the whole model
(``selection.py``), where ``uniform`` and ``proportional`` fix the count per matrix.

The paper's exact text was not available when this was written: every choice below is an option,
and the defaults are our reconstruction (docs/methods.md; docs/training.md, "Method defaults").
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from grft_lightning.core.errors import check_choice
from grft_lightning.core.deltas import StructuredDelta, selectable_layers

from grft_lightning.core.layers import AXES, to_matrix
from grft_lightning.core.gradients import column_scores, row_scores
from grft_lightning.core.heads import DEFAULT, head_spec
from grft_lightning.methods.base import Method
from grft_lightning.core.selection import LayerSelection, Rule, Selection, allocate


class GRFT(Method):
    """Tune whole rows or columns chosen by the squared accumulated gradient.

    Args:
        mode: ``row`` (output neurons / output channels), ``column`` (input features / input
            channel x kernel position), or ``auto`` (per matrix, whichever captures more squared
            gradient per parameter at the same budget).
        rows_per_matrix: rows tuned in every eligible matrix (``row``/``auto``; default 4).
        columns_per_matrix: columns tuned in every eligible matrix (``column``; default 3).
        fraction: instead of a count, a target fraction in (0, 1] of the backbone's parameters
            for the selected weight entries (biases and head not included); converted to
            per-matrix counts by ``allocation`` and reported.
        allocation: how ``fraction`` becomes counts: ``uniform`` (the same count in every
            matrix, as for ViTs), ``proportional`` (each matrix gets the fraction of its own
            rows/columns, for CNNs whose layers differ in size) or ``global`` (one ranking of
            every row/column of the model by score per parameter, the budget spent from the top;
            a matrix may get none). ``global`` needs ``fraction``.
        targets: ``fnmatch`` patterns of eligible layer names (None: every nn.Linear/nn.Conv2d,
            subclasses included, outside the head).
        exclude: patterns removed from the eligible layers (default: ``["patch_embed.*"]``).
        tune_bias: train the biases of nn.Linear/nn.Conv2d layers (as GPS does).
        tune_norm: train normalisation layers' affine parameters (helps BatchNorm CNNs).
        regularization: ``none``, ``l2sp`` (``reg_lambda * sum ||delta||^2``) or ``feature``
            (``reg_lambda`` times the mean squared distance between the tuned and the frozen
            pre-trained model's pre-logits features; costs one extra frozen forward per step).
        reg_lambda: weight of the regularizer (0 disables it).
        score: what a row/column is ranked by, from the selection pass: ``gradient`` (the
            default: ``sum_j G[i, j]^2`` of the gradient ``G`` summed over the training split,
            the first-order argument above), ``fisher_batch`` (``sum_b sum_j g_b[i, j]^2``: the
            squared gradients of each selection batch, summed; an empirical Fisher diagonal at
            the batch level) or ``fisher_sample`` (``sum_n sum_j g_n[i, j]^2`` over single
            training samples: the empirical Fisher diagonal; one backward pass per sample, needs
            ``selection.loss: ce``).
        tune_params: ``fnmatch`` patterns of further pre-trained parameters trained in full (e.g.
            ``["*.gamma"]`` layer scales, ``["*.relative_position_bias_table"]`` on Swin, as GPS's
            public code trains them; see ``Method``). None: none.
        order: ``highest`` (the default: the best-scoring rows/columns) or ``lowest`` (the
            lowest-scoring ones, the control that locates the effect: if the score matters, the
            lowest rows should do worse than random rows of the same shapes). With ``uniform`` and
            ``proportional`` the per-matrix counts are unchanged and the lowest rows of each matrix
            are taken; with ``global`` one ranking by the lowest score per parameter over the whole
            model is spent from the bottom (it goes to the matrices with the smallest gradients,
            so the counts per matrix change too). ``mode="auto"`` takes only ``highest``.
    """

    needs_gradients = True
    QUIET_DEFAULTS = {"order": "highest"}
    #: score -> the reduction of accumulate_gradients it needs
    SCORES = {"gradient": "sum", "fisher_batch": "sum_of_squares", "fisher_sample": "per_sample_squares"}
    ALLOCATIONS: tuple[str, ...] = ("uniform", "proportional", "global")
    tag = "grft"

    def __init__(
        self,
        mode: Literal["row", "column", "auto"] = "row",
        rows_per_matrix: int | None = None,
        columns_per_matrix: int | None = None,
        fraction: float | None = None,
        allocation: Literal["uniform", "proportional", "global"] = "uniform",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        tune_bias: bool = True,
        tune_norm: bool = False,
        regularization: Literal["none", "l2sp", "feature"] = "l2sp",
        reg_lambda: float = 1e-4,
        score: Literal["gradient", "fisher_batch", "fisher_sample"] = "gradient",
        tune_params: list[str] | None = None,
        order: Literal["highest", "lowest"] = "highest",
    ):
        super().__init__(targets, ["patch_embed.*"] if exclude is None else exclude, tune_bias, tune_norm,
                         tune_params)
        check_choice(f"{type(self).__name__}.order", order, ("highest", "lowest"))
        if order == "lowest" and mode == "auto":
            raise ValueError(f"{type(self).__name__}: order='lowest' takes mode row or column (auto compares the "
                             "best rows with the best columns)")
        self._check_options(mode, rows_per_matrix, columns_per_matrix, fraction, allocation, regularization)
        check_choice("GRFT.score", score, self.SCORES)
        self.mode = mode
        self.rows_per_matrix = rows_per_matrix
        self.columns_per_matrix = columns_per_matrix
        self.fraction = fraction
        self.allocation = allocation
        self.regularization = regularization
        self.reg_lambda = reg_lambda
        self.score = score
        self.order = order

    def _check_options(self, mode, rows_per_matrix, columns_per_matrix, fraction, allocation, regularization) -> None:
        kind = type(self).__name__
        if mode not in ("row", "column", "auto"):
            raise ValueError(f"{kind}.mode must be row, column or auto, got {mode!r}")
        if fraction is not None and (rows_per_matrix is not None or columns_per_matrix is not None):
            raise ValueError(f"{kind}: give either a per-matrix count or fraction, not both")
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"{kind}.fraction must be in (0, 1], got {fraction}")
        if mode == "column" and rows_per_matrix is not None:
            raise ValueError(f"{kind}: rows_per_matrix does not apply to mode='column' (use columns_per_matrix)")
        if mode in ("row", "auto") and columns_per_matrix is not None:
            raise ValueError(f"{kind}: columns_per_matrix does not apply to mode={mode!r} (use rows_per_matrix)")
        check_choice(f"{kind}.allocation", allocation, self.ALLOCATIONS)
        check_choice(f"{kind}.regularization", regularization, ("none", "l2sp", "feature"))

    @property
    def name(self) -> str:
        return f"{self.tag}_{self.mode}"

    # -- budget -----------------------------------------------------------------------------
    def budget(self) -> dict:
        """The budget as a Selection takes it: ``{"fraction": f}`` or ``{"count": n}`` per matrix."""
        if self.fraction is not None:
            return {"fraction": self.fraction}
        if self.allocation in ("global", "matched"):
            raise ValueError(f"{type(self).__name__}: allocation={self.allocation!r} spends one budget over the "
                             "whole model; give it as `fraction` (or leave the budget to the task's)")
        count = self.columns_per_matrix if self.mode == "column" else self.rows_per_matrix
        return {"count": 3 if count is None and self.mode == "column" else 4 if count is None else count}

    def rule(self, model: nn.Module, head) -> Rule:
        return Rule(self.mode, self.allocation, self.backbone_parameters(model, head), order=self.order)

    # -- select -----------------------------------------------------------------------------
    @property
    def gradient_reduction(self) -> str:
        """The ``accumulate_gradients`` reduction the selection pass must use for ``score``."""
        return self.SCORES[self.score]

    def _scores(self, grad: torch.Tensor, axis: str) -> torch.Tensor:
        """Row or column scores of an accumulated gradient (``out x fan_in``), per ``score``:
        squares of the summed gradient, or sums of the already squared per-batch/per-sample
        gradients."""
        if self.score == "gradient":
            return row_scores(grad) if axis == "row" else column_scores(grad)
        return grad.float().sum(dim=1 if axis == "row" else 0)

    def candidate_scores(self, model: nn.Module, grads: dict[str, torch.Tensor], head) -> dict[str, LayerSelection]:
        """Per eligible layer, the scores of its candidate rows and/or columns (no index yet)."""
        layers = self.required_layers(model, head)
        self._check_grads(layers, grads)
        axes = ("row", "column") if self.mode == "auto" else (self.mode,)
        found = {}
        for name, layer in layers:
            grad = to_matrix(layer, grads[f"{name}.weight"]).float().cpu()
            scores = {axis: self._scores(grad, axis) for axis in axes}
            found[name] = LayerSelection(tuple(grad.shape), axes[0], torch.zeros(0, dtype=torch.long), scores)
        return found

    def select(self, model: nn.Module, grads: dict[str, torch.Tensor] | None = None, head=DEFAULT,
               seed: int | None = None) -> Selection:
        head = head_spec(model, head, required=True)
        return allocate(self.candidate_scores(model, grads, head), self.rule(model, head), self.budget(), head)

    # -- apply ------------------------------------------------------------------------------
    def inject(self, model: nn.Module, selection: Selection) -> None:
        self._replace(model, selection, lambda name, layer, chosen: StructuredDelta(layer, name, AXES[chosen.axis],
                                                                                    chosen.index))

    # -- regularization ---------------------------------------------------------------------
    def needs_reference(self) -> bool:
        return self.regularization == "feature" and self.reg_lambda > 0

    def regularizer(self, model: nn.Module, images: torch.Tensor, features: torch.Tensor,
                    reference: nn.Module | None = None) -> torch.Tensor | None:
        if self.regularization == "none" or self.reg_lambda == 0:
            return None
        if self.regularization == "l2sp":
            total = sum(layer.l2() for _, layer in selectable_layers(model))
            return self.reg_lambda * total
        if reference is None:
            raise ValueError("GRFT(regularization='feature') compares with the frozen pre-trained model: pass it as "
                             "regularizer(..., reference=...) (PEFTModule holds one)")
        if next(reference.parameters()).device != images.device:
            reference.to(images.device)
        with torch.no_grad():
            target = reference.forward_head(reference.forward_features(images), pre_logits=True)
        return self.reg_lambda * (features.float() - target.float()).pow(2).sum(-1).mean()
