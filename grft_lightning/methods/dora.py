"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024, arXiv 2402.09353), through
the peft library.

One idea: split each adapted weight into a magnitude and a direction, ``W = m * V / ||V||`` with
``V = W0 + (alpha / r) B A`` (LoRA's low-rank update on the direction) and ``m`` a trainable
vector initialised to the norms of ``W0``, so the tuned model starts as the pre-trained one.
peft implements it as a LoRA layer with ``use_dora=True``; everything else (targets, rank,
scale, merge) is :class:`~grft_lightning.methods.lora.LoRA`'s. The magnitude vectors are
parameters the method adds, counted as ``selected`` with ``B`` and ``A``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from grft_lightning.methods.lora import LoRA


class DoRA(LoRA):
    """LoRA's low-rank update on the direction of each target weight, plus a trained magnitude.

    Args:
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / r``. None (default) means
            ``alpha = r``.
        dropout: dropout on the low-rank branch's input (training only).
        targets: ``fnmatch`` patterns of the ``nn.Linear``/``nn.Conv2d`` layers to adapt
            (default: ``qkv``, ``proj``, ``fc1``, ``fc2`` of every ViT block).
        exclude: patterns removed from the targets.
        tune_bias: also train the biases of every nn.Linear/nn.Conv2d (off).
        tune_norm: also train normalisation layers' affine parameters.
    """

    tag = "dora"

    def lora_config(self, layers: list[tuple[str, nn.Module]]):
        return dataclasses.replace(super().lora_config(layers), use_dora=True)
