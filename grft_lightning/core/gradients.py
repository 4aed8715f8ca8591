"""Accumulated gradients, the scores read from them, and deterministic top-k.

GRFT (arXiv 2507.00016) scores a row of a weight's accumulated gradient ``G`` by
``||G[i, :]||^2`` and a column by ``||G[:, j]||^2``: to first order, one gradient step restricted
to a row set ``S`` lowers the loss by ``lr * sum_{i in S} ||G[i, :]||^2``. GPS (CVPR 2024) keeps,
for every row, the ``k`` entries with the largest ``|G[i, j]|``. Convolution weights are read as
``out x (in/groups * kh * kw)`` matrices.

Ties are broken by the lowest index (a stable sort), so a selection is a pure function of the
gradients: identical on every rank once the gradients are all-reduced.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

from grft_lightning.core.errors import check_choice
from grft_lightning.core.deltas import selectable_layers

from grft_lightning.core.layers import eligible_layers


def as_matrix(grad: torch.Tensor) -> torch.Tensor:
    """``out x fan_in`` view, in fp32 or wider, of a matrix or of a weight stored out-first (linear,
    convolution). ``Method.select`` hands the scores below each layer's gradient already read as
    that matrix (``SelectableLayer.to_matrix``: transformers' ``Conv1D`` stores ``in x out``)."""
    g = grad.reshape(grad.shape[0], -1)
    return g if g.dtype in (torch.float32, torch.float64) else g.float()


def row_scores(grad: torch.Tensor) -> torch.Tensor:
    """Sum of squared accumulated gradient over each row (output neuron / channel)."""
    return as_matrix(grad).pow(2).sum(dim=1)


def column_scores(grad: torch.Tensor) -> torch.Tensor:
    """Sum of squared accumulated gradient over each column (fan-in position)."""
    return as_matrix(grad).pow(2).sum(dim=0)


def top_k(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Indices of the ``k`` largest scores along ``dim``, lowest index first among ties,
    returned in ascending index order."""
    order = torch.sort(scores, dim=dim, descending=True, stable=True).indices
    return torch.sort(order.narrow(dim, 0, k), dim=dim).values


def per_row_top_k(grad: torch.Tensor, k: int) -> torch.Tensor:
    """GPS: for each row, the ``k`` input connections with the largest ``|grad|``."""
    return top_k(as_matrix(grad).abs(), k, dim=1)


def captured_energy(scores: torch.Tensor, k: int) -> float:
    """Sum of the ``k`` best scores: the first-order loss decrease a step on them buys."""
    return float(scores[top_k(scores, k)].sum())


def default_gradient_targets(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights whose gradients a selection needs.

    Before a method is applied (the selection pass runs there): the weight of every eligible layer
    (:func:`~grft_lightning.core.layers.eligible_layers`: ``nn.Linear``/``nn.Conv2d`` and their
    subclasses and transformers' ``Conv1D``, outside the head). After ``method.apply``: the base
    weights of the inserted selectable layers, named as in the original model.
    """
    targets = {f"{layer.original_name}.weight": layer.base_layer.weight for _, layer in selectable_layers(model)}
    if targets:
        return targets
    return {f"{name}.weight": module.weight for name, module in eligible_layers(model)}


Reduction = Literal["sum", "sum_of_squares", "per_sample_squares"]
REDUCTIONS = ("sum", "sum_of_squares", "per_sample_squares")


def _samples(batch: Any) -> Iterable[Any]:
    """The one-sample batches of a batch of tensors sharing the first dimension: a tuple/list, or a
    dict (Hugging Face's ``input_ids``, ``attention_mask``, ``labels``), split along dim 0."""
    tensors = list(batch.values()) if isinstance(batch, dict) else batch
    if (not isinstance(batch, (tuple, list, dict)) or not tensors
            or not all(isinstance(t, torch.Tensor) for t in tensors)):
        raise TypeError("accumulate_gradients(reduction='per_sample_squares') needs batches that are "
                        "tuples or dicts of tensors sharing the first dimension")
    for i in range(len(tensors[0])):
        if isinstance(batch, dict):
            yield {key: t[i:i + 1] for key, t in batch.items()}
        else:
            yield type(batch)(t[i:i + 1] for t in batch)


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    names: Iterable[str] | None = None,
    progress: bool = False,
    description: str = "selection",
    reduction: Reduction = "sum",
) -> dict[str, torch.Tensor]:
    """Sum, over ``batches``, the gradient of ``loss_fn(model, batch)`` w.r.t. eligible weights.

    ``reduction`` chooses what is summed (GRFT's ``score`` option reads it):

    * ``sum``: the gradients themselves, ``G = sum_b g_b`` (the first-order argument: a step
      along ``G`` restricted to a set lowers the loss by about ``lr * sum G^2`` over the set);
    * ``sum_of_squares``: the squared per-batch gradients, ``sum_b g_b^2`` (an empirical Fisher
      diagonal at the batch level);
    * ``per_sample_squares``: the squared per-sample gradients, ``sum_n g_n^2`` (the empirical
      Fisher diagonal); every batch is split into one-sample batches (a backward pass each), so
      the loss must be defined on a single sample (cross-entropy; not SupCon).

    Returns ``{original parameter name: fp32 tensor of the weight's shape}``. Uses
    ``torch.autograd.grad``, so no ``.grad`` attribute is touched, and every parameter's
    ``requires_grad`` flag is restored on exit (also on error). ``names`` restricts the weights
    (default: :func:`default_gradient_targets`).

    Args:
        model: any PyTorch model (timm, Hugging Face transformers, ...), with or without a method
            applied.
        batches: an iterable of batches (e.g. a DataLoader); a batch is whatever ``loss_fn``
            reads (a tuple, a dict of tensors, ...).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``, e.g.
            ``lambda m, b: m(**b).loss`` for a transformers model and dict batches with labels.
        names: original weight names to accumulate (default: every eligible weight).
        progress: show a progress bar.
        description: label of the progress bar.
        reduction: ``sum``, ``sum_of_squares`` or ``per_sample_squares`` (above).
    """
    check_choice("accumulate_gradients: reduction", reduction, REDUCTIONS)
    targets = default_gradient_targets(model)
    if names is not None:
        names = list(names)
        unknown = [n for n in names if n not in targets]
        if unknown:
            raise KeyError(f"accumulate_gradients: not an eligible weight: {unknown[:5]}")
        targets = {n: targets[n] for n in names}
    if not targets:
        raise ValueError("accumulate_gradients: the model has no eligible weight (no nn.Linear/nn.Conv2d, "
                         "subclass of either, or transformers Conv1D, outside the head)")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    params = list(targets.values())
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc=description, leave=False)
        for batch in iterator:
            for part in (_samples(batch) if reduction == "per_sample_squares" else (batch,)):
                grads = torch.autograd.grad(loss_fn(model, part), params, allow_unused=True)
                for total, grad in zip(sums, grads):
                    if grad is not None:
                        total.add_(grad.float() if reduction == "sum" else grad.float().square())
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    return dict(zip(targets.keys(), sums))
