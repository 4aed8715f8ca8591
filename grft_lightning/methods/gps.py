"""GPS: Gradient-based Parameter Selection (Zhang et al., CVPR 2024, arXiv 2312.10136).

One idea: for every output neuron of every weight matrix, tune the ``k`` input connections with
the largest ``|accumulated gradient|`` (the gradient of a supervised-contrastive loss summed over
one epoch of the training set). Convolution weights are read as ``out x (in/groups*kh*kw)``.
Biases and the head are trained in full; LayerNorm, ``pos_embed`` and ``cls_token`` stay frozen.

Unlike the public code, only the selected entries are parameters here (an index delta of shape
``out x k`` per matrix): untouched weights have no optimizer state, weight decay cannot move them,
and the selection is saved with the model. ``GPSMasked`` (in ``masked.py``) reproduces the public
code's cost for comparison.
"""

from __future__ import annotations

import torch
from torch import nn

from grft_lightning.deltas import IndexDelta, matrix_shape, selectable_layers
from grft_lightning.methods.base import Method, check_count
from grft_lightning.selection import per_row_top_k


class GPS(Method):
    """Per output neuron, tune the top-``k`` input connections by ``|accumulated gradient|``.

    Args:
        k: input connections tuned per output neuron, the same in every matrix (GPS's
            ``times_para``; 1 on ViT-B/16 is 83,712 weights). None (the default) leaves it to
            the task's budget (``budget.k`` in the task configs: GPS's per-task values), and is 1
            where there is none.
        targets: ``fnmatch`` patterns of eligible layer names (None: every nn.Linear/nn.Conv2d
            outside the head, the patch embedding included, as in GPS).
        exclude: patterns removed from the eligible layers.
        tune_bias: train every nn.Linear/nn.Conv2d bias (GPS does).
        tune_norm: train normalisation layers (GPS does not).
        tune_params: ``fnmatch`` patterns of further pre-trained parameters trained in full (e.g.
            ``["*.gamma"]`` layer scales, ``["*.relative_position_bias_table"]`` on Swin, as GPS's
            public code trains them; see ``Method``). None: none.
    """

    needs_gradients = True
    tag = "gps"

    def __init__(
        self,
        k: int | None = None,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        tune_bias: bool = True,
        tune_norm: bool = False,
        tune_params: list[str] | None = None,
    ):
        super().__init__(targets, exclude, tune_bias, tune_norm, tune_params)
        k = 1 if k is None else k
        if k < 1:
            raise ValueError(f"GPS.k must be >= 1, got {k}")
        self.k = k

    def inject(self, model: nn.Module) -> None:
        layers = self.required_layers(model)
        for name, layer in layers:
            check_count(name, "input connections per row", self.k, matrix_shape(layer)[1])
        self._replace(model, layers, lambda name, layer: IndexDelta(layer, name, self.k))

    def select_layer(self, layer: IndexDelta, grad: torch.Tensor | None) -> None:
        layer.set_selection(per_row_top_k(grad, self.k))

    def describe_budget(self, model: nn.Module) -> str:
        layers = [layer for _, layer in selectable_layers(model)]
        entries = sum(layer.num_tuned() for layer in layers)
        return (f"GPS: top-{self.k} input connections per output neuron in {len(layers)} matrices "
                f"= {entries:,} weight entries")
