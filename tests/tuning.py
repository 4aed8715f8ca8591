"""The two library stages in one call for tests: select on the pre-trained model, then apply."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning import accumulate_gradients
from grft_lightning.core.heads import DEFAULT
from grft_lightning.core.selection import Selection


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def random_grads(model: nn.Module, method, head: Any = DEFAULT, seed: int | None = None) -> dict[str, torch.Tensor]:
    """N(0, 1) gradients of the weights ``method.select`` reads (a fixed ``seed`` when given)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    names = method.gradient_names(model, head)
    params = dict(model.named_parameters())
    return {n: torch.randn(params[n].shape, generator=gen) for n in names}


def tune(model: nn.Module, method, batches=None, loss_fn: Callable = cross_entropy,
         grads: dict[str, torch.Tensor] | None = None, head: Any = DEFAULT, seed: int | None = None,
         edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Selection:
    """Select (gradients from ``batches`` unless ``grads`` are given; ``edit`` may change them
    first), then apply; returns the selection. A gradient method given neither gets random
    gradients."""
    if method.needs_gradients and grads is None:
        if batches is None:
            grads = random_grads(model, method, head)
        else:
            grads = accumulate_gradients(model, batches, loss_fn, names=method.gradient_names(model, head),
                                         reduction=method.gradient_reduction)
    if edit is not None:
        edit(grads)
    selection = method.select(model, grads, head=head, seed=seed)
    method.apply(model, selection)
    return selection


def zero_grads(model: nn.Module, method, head: Any = DEFAULT) -> dict[str, torch.Tensor]:
    """Zero gradients without memory (stride-0 views), for counts that do not depend on the values
    (models on the meta device, full-size shapes)."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    return {n: torch.zeros(()).expand(shapes[n]) for n in method.gradient_names(model, head)}
