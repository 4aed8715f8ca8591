"""The one definition of "tuned parameters" that every table, log and results.json uses."""

from __future__ import annotations

from torch import nn

from grft_lightning.deltas import DeltaLayer
from grft_lightning.methods.base import head_parameter_ids


def added_parameter_owners(model: nn.Module) -> dict[int, nn.Module]:
    """``id(param) -> owning module`` for parameters a method added (not pre-trained ones).

    Structural, never by name: parameters of a module that wraps a ``base_layer`` (our delta
    layers, peft's LoRA layers) other than the base layer's own, and every parameter of a module
    whose class sets ``added_module = True`` (adapters).
    """
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        if getattr(type(module), "added_module", False):
            owners.update({id(p): module for p in module.parameters()})
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module):
            base_ids = {id(p) for p in base.parameters()}
            owners.update({id(p): module for p in module.parameters() if id(p) not in base_ids})
    return owners


def _bias_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False) if n == "bias"}


def count_parameters(model: nn.Module) -> dict[str, float]:
    """Tuned-parameter counts of a model with a method applied.

    Definitions (one place; everything else calls this):

    * ``head``: trainable parameters of the classification head (``model.get_classifier()``).
    * ``bias``: trainable pre-trained parameters registered as ``bias`` (of linear, conv and,
      when tuned, norm layers), outside the head.
    * ``selected``: every other tuned entry outside the head -- the active entries of delta
      layers (rows x in, out x columns, out x k), trainable pre-trained weights (full
      fine-tuning, norm scales) and parameters a method adds (LoRA, adapters). A trainable
      pre-trained weight that is the base weight of a delta layer (GPSMasked: the weight is
      trained under a gradient mask) counts that layer's ``num_tuned()`` entries, not its size.
    * ``tuned = selected + bias + head``.
    * ``backbone``: all pre-trained parameters outside the head (what the method starts from;
      added parameters are not counted).
    * ``tuned_pct = 100 * tuned / backbone`` (head included in the numerator).
    """
    head_ids = head_parameter_ids(model)
    added = added_parameter_owners(model)
    biases = _bias_ids(model)
    masked = {id(m.base_layer.weight): m.num_tuned() for m in model.modules() if isinstance(m, DeltaLayer)}
    counts = {"selected": 0, "bias": 0, "head": 0, "backbone": 0}
    for p in model.parameters():
        pid = id(p)
        if pid in head_ids:
            counts["head"] += p.numel() if p.requires_grad else 0
        elif pid in added:
            owner = added[pid]
            if p.requires_grad:
                counts["selected"] += owner.num_tuned() if isinstance(owner, DeltaLayer) else p.numel()
        else:
            counts["backbone"] += p.numel()
            if p.requires_grad and pid in masked:
                counts["selected"] += masked[pid]
            elif p.requires_grad:
                counts["bias" if pid in biases else "selected"] += p.numel()
    counts["tuned"] = counts["selected"] + counts["bias"] + counts["head"]
    counts["tuned_pct"] = 100.0 * counts["tuned"] / max(counts["backbone"], 1)
    return counts


def parameter_summary(model: nn.Module) -> str:
    """``tuned params: N || backbone params: M || tuned%: P`` (see :func:`count_parameters`)."""
    c = count_parameters(model)
    return f"tuned params: {c['tuned']:,} || backbone params: {c['backbone']:,} || tuned%: {c['tuned_pct']:.4f}"
