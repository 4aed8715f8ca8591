"""The one definition of "tuned parameters" that every table, log and results.json uses."""

from __future__ import annotations

import torch
from torch import nn

from grft_lightning.core.deltas import DeltaLayer, SelectableLayer, selectable_layers
from grft_lightning.core.heads import DEFAULT, head_parameter_ids
from grft_lightning.core.layers import AXIS_NAMES


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


def parameter_groups(model: nn.Module, head=DEFAULT, head_lr: float | None = None) -> list[dict]:
    """The optimizer's parameter groups: only tuned tensors; weight decay on tensors with ndim >= 2
    only (``weight_decay: 0.0`` on the others); the head at ``head_lr`` (None: the optimizer's lr).
    Empty groups are left out. ``PEFTModule.configure_optimizers`` and the cost benchmarks use it."""
    head_ids = head_parameter_ids(model, head)
    groups = {(h, d): [] for h in (False, True) for d in (True, False)}
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in head_ids, p.ndim >= 2)].append(p)
    out = []
    for (is_head, decay), params in groups.items():
        group = {"params": params}
        if not decay:
            group["weight_decay"] = 0.0
        if is_head and head_lr is not None:
            group["lr"] = head_lr
        if params:
            out.append(group)
    return out


def format_summary(counts: dict[str, float]) -> str:
    """The summary line of :func:`count_parameters`' counts (logs, the CLI's last lines)."""
    return (f"tuned params: {counts['tuned']:,} || backbone params: {counts['backbone']:,} || "
            f"tuned%: {counts['tuned_pct']:.4f}")


def parameter_summary(model: nn.Module, head=DEFAULT) -> str:
    """``tuned params: N || backbone params: M || tuned%: P`` (see :func:`count_parameters`)."""
    return format_summary(count_parameters(model, head))


# -- how far the tuned entries moved ---------------------------------------------------------------
def update_ratios(delta: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, axis: str) -> torch.Tensor:
    """Per tuned group, ``||delta of the group|| / ||W0 restricted to the group's entries||``.

    A group is one selected row (``axis="row"``: ``delta`` is ``(n, fan_in)``, ``index`` the
    ``n`` rows), one selected column (``"column"``: ``delta`` is ``(out, n)``), or one output
    neuron's ``k`` entries (``"entry"``: ``delta`` and ``index`` are ``(out, k)``). ``weight`` is
    the pre-trained ``out x fan_in`` matrix. Groups whose pre-trained entries are all zero have no
    ratio and are left out. Returns a 1-D float64 tensor.
    """
    delta, weight = delta.detach().double(), weight.detach().double()
    index = index.detach().long().to(weight.device)
    if axis == "row":
        num, den = delta.norm(dim=1), weight[index].norm(dim=1)
    elif axis == "column":
        num, den = delta.norm(dim=0), weight[:, index].norm(dim=0)
    elif axis == "entry":
        num, den = delta.norm(dim=1), weight.gather(1, index).norm(dim=1)
    else:
        raise ValueError(f"update_ratios: axis must be row, column or entry, got {axis!r}")
    keep = den > 0
    return (num[keep] / den[keep]).cpu()


def update_size(model: nn.Module) -> dict[str, float] | None:
    """How far training moved the tuned rows, columns or entry groups (results.json ``update_size``).

    Over every group of every delta layer (:func:`update_ratios`: GRFT's and random rows' rows or
    columns, GPS's output neurons), the median and the 90th percentile (linear interpolation
    between order statistics, ``torch.quantile``) of ``||delta|| / ||W0 on the same entries||``,
    and the number of groups. 1.0 means a group moved as far as its own pre-trained norm. None for
    a model without such layers (full fine-tuning, LoRA, adapters, masked GPS).
    """
    ratios = [update_ratios(layer.delta, layer.to_matrix(layer.base_layer.weight), layer.index,
                            AXIS_NAMES[layer.selected_axis])
              for _, layer in selectable_layers(model) if isinstance(layer, DeltaLayer) and layer.delta.numel()]
    values = torch.cat(ratios) if ratios else torch.zeros(0, dtype=torch.float64)
    if values.numel() == 0:
        return None
    return {"median": float(torch.quantile(values, 0.5)),
            "p90": float(torch.quantile(values, 0.9)), "groups": int(values.numel())}
