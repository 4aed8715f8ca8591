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

from typing import Literal

import torch
from torch import nn

from grft_lightning.core.errors import check_choice
from grft_lightning.core.deltas import IndexDelta

from grft_lightning.core.layers import matrix_shape, to_matrix
from grft_lightning.core.gradients import per_row_top_k, top_k
from grft_lightning.core.heads import DEFAULT, head_spec
from grft_lightning.methods.base import Method
from grft_lightning.core.seeding import run_seed
from grft_lightning.core.selection import LayerSelection, Rule, Selection, allocate


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
        order: ``gradient`` (the default: GPS) or ``random``: per output neuron ``k`` input
            connections drawn at random (the same shapes and budget; no gradient pass). The
            control that separates GPS's spread of entries over every neuron from its gradient.
        seed: seed of the ``random`` draw (one generator walks the layers in model order; per
            row, the ``k`` positions with the largest uniform keys, so that a cut to a smaller
            ``k`` equals a fresh draw). None (the default) takes the run's seed, as ``RandomRows``
            does; ignored by ``gradient``.
    """

    tag = "gps"
    QUIET_DEFAULTS = {"order": "gradient", "seed": None}

    def __init__(
        self,
        k: int | None = None,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        tune_bias: bool = True,
        tune_norm: bool = False,
        tune_params: list[str] | None = None,
        order: Literal["gradient", "random"] = "gradient",
        seed: int | None = None,
    ):
        super().__init__(targets, exclude, tune_bias, tune_norm, tune_params)
        k = 1 if k is None else k
        if k < 1:
            raise ValueError(f"GPS.k must be >= 1, got {k}")
        check_choice("GPS.order", order, ("gradient", "random"))
        self.k = k
        self.order = order
        self.seed = seed

    @property
    def needs_gradients(self) -> bool:  # type: ignore[override]
        """Only ``order="gradient"`` reads gradients."""
        return self.order == "gradient"

    @property
    def name(self) -> str:
        return self.tag if self.order == "gradient" else f"{self.tag}_random"

    def budget(self) -> dict:
        """The budget as a Selection takes it: ``{"k": k}``."""
        return {"k": self.k}

    def select(self, model: nn.Module, grads: dict[str, torch.Tensor] | None = None, head=DEFAULT,
               seed: int | None = None) -> Selection:
        if self.order == "random":
            seed = self.seed if self.seed is not None else seed if seed is not None else run_seed()
            return random_entries(self, model, head, self.k, seed)
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


def random_entries(method: Method, model: nn.Module, head, k: int, seed: int) -> Selection:
    """GPS's shapes with entries drawn at random: per output neuron of every eligible layer, the
    ``k`` input positions with the largest uniform keys (one generator from ``seed``, layers in
    model order). The keys are kept as the entries' scores, so a cut to a smaller ``k`` takes the
    same positions a fresh draw at that ``k`` would."""
    head = head_spec(model, head, required=True)
    generator = torch.Generator().manual_seed(int(seed))
    found = {}
    for name, layer in method.required_layers(model, head):
        out, fan_in = matrix_shape(layer)
        if not 1 <= k <= fan_in:
            raise ValueError(f"{name}: {k} input connections per row requested, but this matrix has {fan_in} "
                             f"(k must be between 1 and {fan_in})")
        keys = torch.rand(out, fan_in, generator=generator, dtype=torch.float64)
        index = top_k(keys, k, dim=1)
        scores = {"entry": keys.gather(1, index).float(), "entry_index": index}
        found[name] = LayerSelection((out, fan_in), "entry", index, scores)
    rule = Rule("entry", "per_row", method.backbone_parameters(model, head))
    return allocate(found, rule, {"k": k}, head)
