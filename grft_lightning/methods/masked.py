"""GPS as the public code trains it: whole weights in the optimizer, gradients masked.

Same selection as :class:`~grft_lightning.methods.gps.GPS` (Zhang et al., CVPR 2024, arXiv
2312.10136): for every output neuron, the ``k`` input connections with the largest
``|accumulated gradient|``. The difference is how the selection is trained. Here, as in the public
code, every eligible weight is a trainable tensor and a boolean mask (a buffer of the weight's
shape) zeroes the gradient of the unselected entries before each optimizer step
(``Method.on_before_optimizer_step``). So the cost is that of full fine-tuning: full weight
gradients, optimizer state for every entry, the whole weight in exported files. The class exists
to measure that cost next to our index deltas (``benchmarks/cost.py``), and to reproduce results.

Weight decay: AdamW's decoupled decay, ``W <- W - lr * wd * W``, moves *every* entry in the
optimizer, so with ``weight_decay > 0`` the "frozen" entries shrink a little at each step (the
public code's behaviour, reproduced by default). Masked gradients alone cannot stop it (Adam's
update of an entry whose gradient is always zero is exactly zero; the decay is not). Either give
the masked weights ``weight_decay=0`` in the optimizer (the selected entries then get none
either), or set ``restore_unselected=True``: every optimizer step that holds a masked weight
then copies the weight before the step and writes the unselected entries back afterwards
(global ``torch.optim`` step hooks, installed by the first ``on_before_optimizer_step``; exact,
at the price of one transient copy of the weights per step). Unlike the public code, the mask
is applied whatever the precision (it applied it on its AMP path only).

Parameters that are neither an eligible weight, a bias nor the head (LayerNorm, ``pos_embed``,
``cls_token``, layer scales) stay frozen, as in GPS; the counted budget is GPS's (``k`` x rows per
matrix + biases + head). ``save_tuned`` writes the full trained weights (as the public code's
checkpoints do; GPS's index deltas give a file the size of the tuned entries) and, unlike the
public code, the selection as per-row indices, so ``load_tuned`` restores the masks too.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from grft_lightning.deltas import DeltaLayer, delta_layers
from grft_lightning.methods.base import Method, check_count
from grft_lightning.selection import per_row_top_k


class MaskedWeight(DeltaLayer):
    """A layer whose own weight is trained, with a boolean ``mask`` of the entries allowed to move.

    A :class:`DeltaLayer` only so that the selection machinery (gradient targets named as in the
    original model, ``Method.select``, checkpoints' ``selected`` flag) treats it like the others;
    it holds no delta parameter. ``merge`` unwraps it (the trained weight is the merged weight).
    """

    def __init__(self, base_layer: nn.Module, original_name: str, k: int, restore_unselected: bool = False):
        super().__init__(base_layer, original_name)
        base_layer.weight.requires_grad_(True)  # DeltaLayer froze it; here the weight itself trains
        self.k = k
        self.register_buffer("mask", torch.zeros_like(base_layer.weight, dtype=torch.bool))
        self.restore_unselected = restore_unselected
        self._saved: torch.Tensor | None = None

    def set_selection(self, index: torch.Tensor) -> None:
        flat = torch.zeros(self.out_features, self.fan_in, dtype=torch.bool, device=self.mask.device)
        self.mask.copy_(flat.scatter_(1, index.to(self.mask.device), True).view_as(self.mask))
        self.mark_selected()

    def mask_gradient(self) -> None:
        """Zero the gradient of every unselected entry (all of them before selection)."""
        if self.restore_unselected and self not in _RESTORED:  # here, not in __init__: copies too
            _RESTORED.add(self)
            _install_step_hooks()
        grad = self.base_layer.weight.grad
        if grad is not None:
            grad.mul_(self.mask)

    def num_tuned(self) -> int:
        return self.out_features * self.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def dense_delta(self) -> torch.Tensor:
        raise RuntimeError(f"{self.original_name}: a masked weight is trained in place; the pre-trained "
                           "weight is not kept, so there is no separate delta")

    def merged_module(self) -> nn.Module:
        return self.base_layer

    def export_tensors(self) -> dict[str, torch.Tensor]:
        # The selection as GPS's per-row indices; the trained weight is exported under param/.
        index = self.mask.view(self.out_features, -1).nonzero()[:, 1]
        return {"index": index.view(self.out_features, self.k).int()}

    def import_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        index = tensors["index"].long()
        if tuple(index.shape) != (self.out_features, self.k):
            raise ValueError(f"{self.original_name}: file holds indices of shape {tuple(index.shape)}, "
                             f"this method expects {(self.out_features, self.k)}")
        self.set_selection(index)

    # -- restore_unselected: called by the global optimizer step hooks ----------------------------
    def _save(self) -> None:
        self._saved = self.base_layer.weight.detach().clone()

    def _restore(self) -> None:
        if self._saved is None:
            return
        weight, saved = self.base_layer.weight.detach(), self._saved
        torch.where(self.mask, weight, saved, out=saved)
        weight.copy_(saved)
        self._saved = None


_RESTORED: "weakref.WeakSet[MaskedWeight]" = weakref.WeakSet()
_HOOKS: list = []


def _install_step_hooks() -> None:
    if _HOOKS:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    _HOOKS.append(register_optimizer_step_pre_hook(lambda opt, args, kwargs: _each_layer(opt, MaskedWeight._save)))
    _HOOKS.append(register_optimizer_step_post_hook(lambda opt, args, kwargs: _each_layer(opt, MaskedWeight._restore)))


def _each_layer(optimizer: torch.optim.Optimizer, action) -> None:
    if not _RESTORED:
        return
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in list(_RESTORED):
        if id(layer.base_layer.weight) in ids:
            action(layer)


class GPSMasked(Method):
    """GPS's selection trained the public code's way: whole weights, masked gradients.

    Args:
        k: input connections tuned per output neuron (GPS's ``times_para``).
        targets: ``fnmatch`` patterns of eligible layer names (None: every nn.Linear/nn.Conv2d
            outside the head, the patch embedding included, as in GPS).
        exclude: patterns removed from the eligible layers.
        tune_bias: train every nn.Linear/nn.Conv2d bias (GPS does).
        tune_norm: train normalisation layers (GPS does not).
        restore_unselected: write the unselected entries back after every optimizer step, so
            weight decay cannot move them (off: the public code's behaviour; see the module
            docstring).
    """

    needs_gradients = True
    tag = "gps_masked"

    def __init__(
        self,
        k: int = 1,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        tune_bias: bool = True,
        tune_norm: bool = False,
        restore_unselected: bool = False,
    ):
        super().__init__(targets, exclude, tune_bias, tune_norm)
        if k < 1:
            raise ValueError(f"GPSMasked.k must be >= 1, got {k}")
        self.k = k
        self.restore_unselected = restore_unselected

    def inject(self, model: nn.Module) -> None:
        layers = self.required_layers(model)
        for name, layer in layers:
            check_count(name, "input connections per row", self.k, layer.weight[0].numel())
        self._replace(model, layers, lambda name, layer: MaskedWeight(layer, name, self.k, self.restore_unselected))

    def select_layer(self, layer: MaskedWeight, grad: torch.Tensor | None) -> None:
        layer.set_selection(per_row_top_k(grad, self.k))

    def on_before_optimizer_step(self, model: nn.Module) -> None:
        for _, layer in delta_layers(model):
            if isinstance(layer, MaskedWeight):
                layer.mask_gradient()

    def describe_budget(self, model: nn.Module) -> str:
        return f"GPS (masked gradients): top-{self.k} input connections per output neuron"
