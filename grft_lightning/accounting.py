"""The one definition of "tuned parameters" that every table, log and results.json uses."""

from __future__ import annotations

from torch import nn

from grft_lightning.deltas import SelectableLayer
from grft_lightning.heads import DEFAULT, head_parameter_ids


def added_parameter_owners(model: nn.Module) -> dict[int, nn.Module]:
    """``id(param) -> owning module`` for parameters a method added (not pre-trained ones).

    Structural, never by name: the parameters of a module that wraps a ``base_layer`` (our
    selectable layers, peft's LoRA layers, adapters) other than the base layer's own.
    """
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module):
            base_ids = {id(p) for p in base.parameters()}
            owners.update({id(p): module for p in module.parameters() if id(p) not in base_ids})
    return owners


def backbone_parameter_count(model: nn.Module, head=DEFAULT) -> int:
    """``backbone``: the pre-trained parameters outside the head (what a method starts from;
    parameters a method added are not counted). ``head`` as ``heads.head_spec`` takes it (default:
    timm's ``get_classifier()``)."""
    head_ids = head_parameter_ids(model, head)
    added = added_parameter_owners(model)
    return sum(p.numel() for p in model.parameters() if id(p) not in head_ids and id(p) not in added)


def _bias_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False) if n == "bias"}


def count_parameters(model: nn.Module, head=DEFAULT) -> dict[str, float]:
    """Tuned-parameter counts of a model with a method applied.

    Definitions (one place; everything else calls this):

    * ``head``: trainable parameters of the classification head (``heads.py``: ``head`` as the
      selection records it; timm's ``model.get_classifier()`` by default).
    * ``bias``: trainable pre-trained parameters registered as ``bias`` (of linear, conv and,
      when tuned, norm layers), outside the head.
    * ``selected``: every other tuned entry outside the head -- the active entries of delta
      layers (rows x in, out x columns, out x k), trainable pre-trained weights (full
      fine-tuning, norm scales) and parameters a method adds (LoRA, adapters). A trainable
      pre-trained weight that is the base weight of a selectable layer (GPSMasked: the weight is
      trained under a gradient mask) counts that layer's ``num_tuned()`` entries, not its size.
    * ``tuned = selected + bias + head``.
    * ``backbone``: :func:`backbone_parameter_count`.
    * ``tuned_pct = 100 * tuned / backbone`` (head included in the numerator).
    """
    head_ids = head_parameter_ids(model, head)
    added = added_parameter_owners(model)
    biases = _bias_ids(model)
    masked = {id(m.base_layer.weight): m.num_tuned() for m in model.modules() if isinstance(m, SelectableLayer)}
    counts = {"selected": 0, "bias": 0, "head": 0, "backbone": backbone_parameter_count(model, head)}
    for p in model.parameters():
        pid = id(p)
        if not p.requires_grad:
            continue
        if pid in head_ids:
            counts["head"] += p.numel()
        elif pid in added:
            owner = added[pid]
            counts["selected"] += owner.num_tuned() if isinstance(owner, SelectableLayer) else p.numel()
        elif pid in masked:
            counts["selected"] += masked[pid]
        else:
            counts["bias" if pid in biases else "selected"] += p.numel()
    counts["tuned"] = counts["selected"] + counts["bias"] + counts["head"]
    counts["tuned_pct"] = 100.0 * counts["tuned"] / max(counts["backbone"], 1)
    return counts


def format_summary(counts: dict[str, float]) -> str:
    """The summary line of :func:`count_parameters`' counts (logs, the CLI's last lines)."""
    return (f"tuned params: {counts['tuned']:,} || backbone params: {counts['backbone']:,} || "
            f"tuned%: {counts['tuned_pct']:.4f}")


def parameter_summary(model: nn.Module, head=DEFAULT) -> str:
    """``tuned params: N || backbone params: M || tuned%: P`` (see :func:`count_parameters`)."""
    return format_summary(count_parameters(model, head))
