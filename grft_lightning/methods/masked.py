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
either), or set ``restore_unselected=True``: ``on_before_optimizer_step`` then also copies each
masked weight, and ``on_after_optimizer_step`` writes its unselected entries back from that copy
(exact, from the first step on, whatever the optimizer; the price is one transient copy of the
weights per step). ``PEFTModule`` calls both hooks around every optimizer step; a plain loop
calls them itself (see :class:`GPSMasked`). Unlike the public code, the mask is applied whatever
the precision (it applied it on its AMP path only).

Parameters that are neither an eligible weight, a bias nor the head (LayerNorm, ``pos_embed``,
``cls_token``, layer scales) stay frozen, as in GPS; the counted budget is GPS's (``k`` x rows per
matrix + biases + head). ``save_tuned`` writes the full trained weights (as the public code's
checkpoints do; GPS's index deltas give a file the size of the tuned entries) and, unlike the
public code, the selection as per-row indices, so ``load_tuned`` restores the masks too.
"""

from __future__ import annotations

import torch
from torch import nn

from grft_lightning.core.deltas import SelectableLayer, checked_index, selectable_layers
from grft_lightning.core.heads import DEFAULT
from grft_lightning.methods.base import Method
from grft_lightning.methods.gps import select_entries
from grft_lightning.core.selection import Selection


class MaskedWeight(SelectableLayer):
    """A layer whose own weight is trained, with a boolean ``mask`` of the entries allowed to move.

    A :class:`~grft_lightning.core.deltas.SelectableLayer`, so the selection machinery (gradient targets
    named as in the original model, ``Method.select``, checkpoints' ``selected`` flag, export)
    treats it like the delta layers; it holds no delta (no added parameter, no ``dense_delta``):
    the pre-trained weight is not kept. ``merge`` unwraps it (the trained weight is the merged
    weight).
    """

    def __init__(self, base_layer: nn.Module, original_name: str, index: torch.Tensor,
                 restore_unselected: bool = False):
        super().__init__(base_layer, original_name)
        base_layer.weight.requires_grad_(True)  # the weight itself trains (apply() froze it)
        index = checked_index(original_name, index, (self.out_features, index.shape[-1]), self.fan_in, "inputs")
        self.k = index.shape[1]
        flat = torch.zeros(self.out_features, self.fan_in, dtype=torch.bool)
        self.register_buffer("mask", self.from_matrix(flat.scatter_(1, index, True)).to(base_layer.weight.device))
        self.restore_unselected = restore_unselected
        self._saved: torch.Tensor | None = None

    def mask_gradient(self) -> None:
        """Zero the gradient of every unselected entry (all of them before selection)."""
        grad = self.base_layer.weight.grad
        if grad is not None:
            grad.mul_(self.mask)

    def num_tuned(self) -> int:
        return self.out_features * self.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def merged_module(self) -> nn.Module:
        return self.base_layer

    # -- restore_unselected: around each optimizer step (GPSMasked's hooks) -------------------------
    def save_weight(self) -> None:
        """Keep a copy of the weight as it is before the optimizer step.

        Only the first call since the last restore copies: an optimizer that evaluates its
        closure several times within one step (LBFGS) keeps the copy from before the step.
        """
        if self._saved is None:
            self._saved = self.base_layer.weight.detach().clone()

    def restore_unselected_entries(self) -> None:
        """Write the unselected entries back from the copy :meth:`save_weight` took (and drop it)."""
        if self._saved is None:
            raise RuntimeError(
                f"{self.original_name}: no copy of the weight to restore the unselected entries from; call "
                "method.on_before_optimizer_step(model) after backward() and before optimizer.step(), and "
                "method.on_after_optimizer_step(model) after it")
        weight, saved = self.base_layer.weight.detach(), self._saved
        torch.where(self.mask, weight, saved, out=saved)
        weight.copy_(saved)
        self._saved = None


class GPSMasked(Method):
    """GPS's selection trained the public code's way: whole weights, masked gradients.

    Args:
        k: input connections tuned per output neuron (GPS's ``times_para``); None takes the task's
            ``budget.k`` (1 without one).
        targets: ``fnmatch`` patterns of eligible layer names (None: every nn.Linear/nn.Conv2d
            outside the head, the patch embedding included, as in GPS).
        exclude: patterns removed from the eligible layers.
        tune_bias: train every nn.Linear/nn.Conv2d bias (GPS does).
        tune_norm: train normalisation layers (GPS does not).
        restore_unselected: write the unselected entries back after every optimizer step, so
            weight decay cannot move them (off: the public code's behaviour; see the module
            docstring).
        tune_params: ``fnmatch`` patterns of further pre-trained parameters trained in full (e.g.
            ``["*.gamma"]`` layer scales, ``["*.relative_position_bias_table"]`` on Swin, as GPS's
            public code trains them; see ``Method``). None: none.

    Training hooks, called by ``PEFTModule`` around every optimizer step (only the batches that
    step, with gradient accumulation); a plain PyTorch loop calls them itself::

        loss.backward()
        method.on_before_optimizer_step(model)  # mask the gradients (and copy the weights)
        optimizer.step()
        method.on_after_optimizer_step(model)   # restore_unselected: write the unselected entries back
    """

    needs_gradients = True
    tag = "gps_masked"

    def __init__(
        self,
        k: int | None = None,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        tune_bias: bool = True,
        tune_norm: bool = False,
        restore_unselected: bool = False,
        tune_params: list[str] | None = None,
    ):
        super().__init__(targets, exclude, tune_bias, tune_norm, tune_params)
        k = 1 if k is None else k  # None: the task's budget (``budget.k``), as for GPS
        if k < 1:
            raise ValueError(f"GPSMasked.k must be >= 1, got {k}")
        self.k = k
        self.restore_unselected = restore_unselected

    def budget(self) -> dict:
        """The budget as a Selection takes it: ``{"k": k}``."""
        return {"k": self.k}

    def select(self, model: nn.Module, grads: dict[str, torch.Tensor] | None = None, head=DEFAULT,
               seed: int | None = None) -> Selection:
        return select_entries(self, model, grads, head, self.k)

    def inject(self, model: nn.Module, selection: Selection) -> None:
        self._replace(model, selection, lambda name, layer, chosen: MaskedWeight(layer, name, chosen.index,
                                                                                 self.restore_unselected))

    def on_before_optimizer_step(self, model: nn.Module) -> None:
        """Zero the unselected entries' gradients; with ``restore_unselected``, copy the weights."""
        for layer in _masked_layers(model):
            layer.mask_gradient()
            if layer.restore_unselected:
                layer.save_weight()

    def on_after_optimizer_step(self, model: nn.Module) -> None:
        """With ``restore_unselected``: write every unselected entry back to its value before the
        step (so weight decay never moves it); nothing otherwise."""
        for layer in _masked_layers(model):
            if layer.restore_unselected:
                layer.restore_unselected_entries()


def _masked_layers(model: nn.Module) -> list[MaskedWeight]:
    return [layer for _, layer in selectable_layers(model) if isinstance(layer, MaskedWeight)]
