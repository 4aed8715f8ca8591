"""LoRA: Low-Rank Adaptation (Hu et al., ICLR 2022, arXiv 2106.09685), through the peft library.

One idea: keep ``W0`` frozen and learn a low-rank update, ``y = x W0^T + b + (alpha / r) x A^T B^T``
with ``A`` (r x in) random and ``B`` (out x r) zero at the start, so the tuned model starts as the
pre-trained one. ``merge`` folds ``(alpha / r) B A`` into ``W0`` (peft's ``merge()``), leaving a
plain layer with no inference overhead.

peft does the wrapping (``peft.inject_adapter_in_model`` with a ``LoraConfig``), for
``nn.Linear`` and ``nn.Conv2d`` (a conv's ``A`` is a conv with the layer's kernel and ``r``
output channels, ``B`` a 1x1 conv). Our ``fnmatch`` ``targets``/``exclude`` patterns are
resolved to the exact module names first and handed to peft as an anchored regular expression
(peft matches a *list* of names by suffix, so ``conv1`` would also catch ``layer1.0.conv1``).
"""

from __future__ import annotations

import re

from torch import nn

from grft_lightning.core.layers import has_plain_forward, is_transposed
from grft_lightning.methods.base import Method
from grft_lightning.core.selection import Selection

#: qkv, proj, fc1 and fc2 of every timm ViT block.
VIT_TARGETS = ["*.attn.qkv", "*.attn.proj", "*.mlp.fc1", "*.mlp.fc2"]


class LoRA(Method):
    """Low-rank updates ``(alpha / r) B A`` on the target layers, via peft.

    Args:
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / r``. None (default) means
            ``alpha = r``, a scale of 1 whatever the rank, so changing ``r`` does not change the
            effective learning rate of the update.
        dropout: dropout on the LoRA branch's input (training only).
        targets: ``fnmatch`` patterns of the ``nn.Linear``/``nn.Conv2d`` layers to adapt
            (default: ``qkv``, ``proj``, ``fc1``, ``fc2`` of every ViT block; for a CNN pass
            e.g. ``["*conv*"]``). The head is never a target.
        exclude: patterns removed from the targets.
        tune_bias: also train the biases of every nn.Linear/nn.Conv2d (off in LoRA).
        tune_norm: also train normalisation layers' affine parameters.
    """

    tag = "lora"

    def __init__(
        self,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        tune_bias: bool = False,
        tune_norm: bool = False,
    ):
        super().__init__(list(VIT_TARGETS) if targets is None else targets, exclude, tune_bias, tune_norm)
        if r < 1:
            raise ValueError(f"LoRA.r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA.dropout must be in [0, 1), got {dropout}")
        self.r = r
        self.alpha = alpha
        self.dropout = dropout

    @property
    def scaling(self) -> float:
        return (self.r if self.alpha is None else self.alpha) / self.r

    def inject(self, model: nn.Module, selection: Selection) -> None:
        from peft import inject_adapter_in_model

        layers = self.required_layers(model, selection.head)
        transformed = [f"{name} ({type(layer).__name__})" for name, layer in layers if not has_plain_forward(layer)]
        if transformed:
            # peft adds B A x beside the layer's forward and merges B A into the weight: for a
            # layer that transforms its weight (StdConv2d standardises it) or its input
            # (Conv2dSame pads it) the two are not what the layer computes with W0 + B A.
            raise ValueError(f"{type(self).__name__}: {', '.join(transformed[:3])} compute more than a plain linear "
                             "map or convolution of their weight (weight standardisation, dynamic padding), which peft's "
                             "LoRA layer does not follow; leave them out with `exclude`, or use GRFT/GPS, whose "
                             "deltas go through the layer's own forward")
        names = [name for name, _ in layers]
        inject_adapter_in_model(self.lora_config(layers), model)
        wrapped = {name for name, module in model.named_modules() if _is_lora_layer(module)}
        if wrapped != set(names):
            missing = sorted(set(names) - wrapped)
            raise RuntimeError(f"{type(self).__name__}: peft did not wrap {missing[:5]} (layers of an unsupported "
                               "type?)")

    def lora_config(self, layers: list[tuple[str, nn.Module]]):
        """peft's ``LoraConfig`` for ``layers`` (a subclass adds its own options, e.g. DoRA's)."""
        from peft import LoraConfig

        transposed = {is_transposed(layer) for _, layer in layers}
        if len(transposed) > 1:
            raise ValueError(f"{type(self).__name__}: the targets mix transformers' Conv1D with nn.Linear/nn.Conv2d "
                             "layers; peft takes one weight layout (fan_in_fan_out) per config: target one kind")
        return LoraConfig(
            r=self.r,
            lora_alpha=self.r if self.alpha is None else self.alpha,
            lora_dropout=self.dropout,
            target_modules="^(?:" + "|".join(re.escape(name) for name, _ in layers) + ")$",
            bias="none",
            fan_in_fan_out=transposed == {True},
        )


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)
