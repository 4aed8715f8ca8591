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

The paper's exact text was not available when this was written: every choice below is an option,
and the defaults are our reconstruction (docs/methods.md; README "Method defaults").
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from grft_lightning.accounting import backbone_parameter_count
from grft_lightning.deltas import COLUMN, ROW, StructuredDelta, matrix_shape, selectable_layers
from grft_lightning.methods.base import Method, check_count
from grft_lightning.selection import captured_energy, column_scores, row_scores, top_k


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
            matrix, as for ViTs) or ``proportional`` (each matrix gets the fraction of its own
            rows/columns, for CNNs whose layers differ in size).
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
    """

    needs_gradients = True
    #: score -> the reduction of accumulate_gradients it needs
    SCORES = {"gradient": "sum", "fisher_batch": "sum_of_squares", "fisher_sample": "per_sample_squares"}
    tag = "grft"

    def __init__(
        self,
        mode: Literal["row", "column", "auto"] = "row",
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
        score: Literal["gradient", "fisher_batch", "fisher_sample"] = "gradient",
        tune_params: list[str] | None = None,
    ):
        super().__init__(targets, ["patch_embed.*"] if exclude is None else exclude, tune_bias, tune_norm,
                         tune_params)
        if score not in self.SCORES:
            raise ValueError(f"GRFT.score must be one of {', '.join(self.SCORES)}, got {score!r}")
        if mode not in ("row", "column", "auto"):
            raise ValueError(f"GRFT.mode must be row, column or auto, got {mode!r}")
        if fraction is not None and (rows_per_matrix is not None or columns_per_matrix is not None):
            raise ValueError("GRFT: give either a per-matrix count or fraction, not both")
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"GRFT.fraction must be in (0, 1], got {fraction}")
        if mode == "column" and rows_per_matrix is not None:
            raise ValueError("GRFT: rows_per_matrix does not apply to mode='column' (use columns_per_matrix)")
        if mode in ("row", "auto") and columns_per_matrix is not None:
            raise ValueError(f"GRFT: columns_per_matrix does not apply to mode={mode!r} (use rows_per_matrix)")
        if allocation not in ("uniform", "proportional"):
            raise ValueError(f"GRFT.allocation must be uniform or proportional, got {allocation!r}")
        if regularization not in ("none", "l2sp", "feature"):
            raise ValueError(f"GRFT.regularization must be none, l2sp or feature, got {regularization!r}")
        if fraction is None and rows_per_matrix is None and columns_per_matrix is None:
            rows_per_matrix, columns_per_matrix = (None, 3) if mode == "column" else (4, None)
        self.mode = mode
        self.rows_per_matrix = rows_per_matrix
        self.columns_per_matrix = columns_per_matrix
        self.fraction = fraction
        self.allocation = allocation
        self.regularization = regularization
        self.reg_lambda = reg_lambda
        self.score = score
        self.budget: dict[str, tuple[int, int]] = {}
        self._frozen: FrozenReference | None = None

    @property
    def name(self) -> str:
        return f"{self.tag}_{self.mode}"

    # -- budget -----------------------------------------------------------------------------
    def _counts(self, model: nn.Module, layers: list[tuple[str, nn.Module]]) -> dict[str, tuple[int, int]]:
        shapes = {name: matrix_shape(layer) for name, layer in layers}
        rows_mode = self.mode in ("row", "auto")
        if self.fraction is None:
            count = self.rows_per_matrix if rows_mode else self.columns_per_matrix
            per_layer = {name: count for name in shapes}
        else:
            target = self.fraction * backbone_parameter_count(model, self.head)
            if self.allocation == "uniform":
                unit = sum(fin if rows_mode else out for out, fin in shapes.values())
                per_layer = dict.fromkeys(shapes, max(1, round(target / unit)))
            else:
                share = target / sum(out * fin for out, fin in shapes.values())
                per_layer = {n: max(1, round(share * (out if rows_mode else fin))) for n, (out, fin) in shapes.items()}
        counts = {}
        for name, (out, fin) in shapes.items():
            n = per_layer[name]
            check_count(name, "rows" if rows_mode else "columns", n, out if rows_mode else fin)
            if self.mode == "row":
                counts[name] = (n, 0)
            elif self.mode == "column":
                counts[name] = (0, n)
            else:  # columns at the same parameter budget as the rows (never more entries)
                counts[name] = (n, min(fin, n * fin // out))
        return counts

    def inject(self, model: nn.Module) -> None:
        layers = self.required_layers(model)
        self.budget = self._counts(model, layers)
        if self.regularization == "feature" and self.reg_lambda > 0:
            self._frozen = FrozenReference(copy.deepcopy(model).eval().requires_grad_(False))
        self._replace(model, layers, lambda name, layer: StructuredDelta(layer, name, self.mode, *self.budget[name]))

    def describe_budget(self, model: nn.Module) -> str:
        counts = list(self.budget.values())
        entries = sum(layer.num_tuned() for _, layer in selectable_layers(model))
        rows = sorted({r for r, _ in counts})
        cols = sorted({c for _, c in counts})
        what = {"row": f"rows per matrix {rows}", "column": f"columns per matrix {cols}",
                "auto": f"row budget per matrix {rows} (or columns {cols})"}[self.mode]
        return f"{type(self).__name__} {self.mode}: {what} in {len(counts)} matrices = {entries:,} weight entries"

    # -- select -----------------------------------------------------------------------------
    @property
    def gradient_reduction(self) -> str:
        """The ``accumulate_gradients`` reduction the selection pass must use for ``score``."""
        return self.SCORES[self.score]

    def _scores(self, grad: torch.Tensor, axis: int) -> torch.Tensor:
        """Row (``axis=ROW``) or column scores of an accumulated gradient (``out x fan_in``), per
        ``score``: squares of the summed gradient, or sums of the already squared
        per-batch/per-sample gradients."""
        if self.score == "gradient":
            return row_scores(grad) if axis == ROW else column_scores(grad)
        return grad.float().sum(dim=1 if axis == ROW else 0)

    def select_layer(self, layer: StructuredDelta, grad: torch.Tensor | None) -> None:
        if self.mode == "row" or (self.mode == "auto" and not self._columns_win(layer, grad)):
            layer.set_selection(ROW, top_k(self._scores(grad, ROW), layer.rows))
        else:
            layer.set_selection(COLUMN, top_k(self._scores(grad, COLUMN), layer.columns))

    def _columns_win(self, layer: StructuredDelta, grad: torch.Tensor) -> bool:
        if layer.columns == 0:
            return False
        per_row = captured_energy(self._scores(grad, ROW), layer.rows) / (layer.rows * layer.fan_in)
        per_col = captured_energy(self._scores(grad, COLUMN), layer.columns) / (layer.columns * layer.out_features)
        return per_col > per_row

    # -- regularization ---------------------------------------------------------------------
    def regularizer(self, model: nn.Module, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        if self.regularization == "none" or self.reg_lambda == 0:
            return None
        if self.regularization == "l2sp":
            total = sum(layer.l2() for _, layer in selectable_layers(model))
            return self.reg_lambda * total
        frozen = self._frozen_model(images.device)
        with torch.no_grad():
            target = frozen.forward_head(frozen.forward_features(images), pre_logits=True)
        return self.reg_lambda * (features.float() - target.float()).pow(2).sum(-1).mean()

    def _frozen_model(self, device: torch.device) -> nn.Module:
        frozen = None if self._frozen is None else self._frozen.model
        if frozen is None:
            raise RuntimeError("GRFT feature regularization: no frozen pre-trained copy is held (apply() was not "
                               "called, or the model was unpickled, which drops it); apply the method to a fresh "
                               "pre-trained model")
        if next(frozen.parameters()).device != device:
            frozen.to(device)
        return frozen


class FrozenReference:
    """The frozen pre-trained copy the feature regulariser compares with, held outside the model.

    The method hangs on the model (``model.peft_method``), so whatever the method holds travels
    with every copy of the model. This holder keeps the frozen copy from travelling twice: it is
    no ``nn.Module`` attribute (``state_dict`` and checkpoints never see it), ``copy.deepcopy``
    shares it (it is never trained), and pickling (``torch.save(model)``) leaves it out.
    """

    def __init__(self, model: nn.Module):
        self.model: nn.Module | None = model

    def __deepcopy__(self, memo: dict) -> FrozenReference:
        return self

    def __getstate__(self) -> dict:
        return {"model": None}
