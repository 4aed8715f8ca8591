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

from grft_lightning.deltas import IndexDelta, to_matrix
from grft_lightning.gradients import per_row_top_k
from grft_lightning.heads import DEFAULT, head_spec
from grft_lightning.methods.base import Method
from grft_lightning.selection import LayerSelection, Rule, Selection, allocate


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

    def budget(self) -> dict:
        """The budget as a Selection takes it: ``{"k": k}``."""
        return {"k": self.k}

    def select(self, model: nn.Module, grads: dict[str, torch.Tensor] | None = None, head=DEFAULT,
               seed: int | None = None) -> Selection:
        return select_entries(self, model, grads, head, self.k)

    def inject(self, model: nn.Module, selection: Selection) -> None:
        self._replace(model, selection, lambda name, layer, chosen: IndexDelta(layer, name, chosen.index))


def select_entries(method: Method, model: nn.Module, grads: dict[str, torch.Tensor] | None, head, k: int) -> Selection:
    """GPS's selection (also :class:`~grft_lightning.methods.GPSMasked`'s): per output neuron of
    every eligible layer, the ``k`` input connections with the largest ``|accumulated gradient|``,
    with their scores kept so that the selection can be cut to a smaller ``k``."""
    head = head_spec(model, head, required=True)
    layers = method.required_layers(model, head)
    method._check_grads(layers, grads)
    found = {}
    for name, layer in layers:
        grad = to_matrix(layer, grads[f"{name}.weight"]).float().cpu()
        if not 1 <= k <= grad.shape[1]:
            raise ValueError(f"{name}: {k} input connections per row requested, but this matrix has {grad.shape[1]} "
                             f"(k must be between 1 and {grad.shape[1]})")
        index = per_row_top_k(grad, k)
        scores = {"entry": grad.abs().gather(1, index), "entry_index": index}
        found[name] = LayerSelection(tuple(grad.shape), "entry", index, scores)
    rule = Rule("entry", "per_row", method.backbone_parameters(model, head))
    return allocate(found, rule, {"k": k}, head)
