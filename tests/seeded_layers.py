"""A layer and an input of a fixed seed, with a random bias (the shared start of the layer tests)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def seeded_layer(make: Callable[[], nn.Module], shape: tuple[int, ...], seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``make()`` under ``seed`` with its bias (if any) drawn from N(0, 1), and an input of ``shape``."""
    torch.manual_seed(seed)
    layer = make()
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
    return layer, torch.randn(shape)
