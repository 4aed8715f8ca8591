"""The Selection: which weight entries a method tunes, decided once, before any delta exists.

A method's selection pass reads the model and the accumulated gradients (or a seed, for the
random ablations) and returns a :class:`Selection`. Deltas are then built from it with exactly its
sizes (``method.apply(model, selection)``). Per eligible layer it holds the axis tuned (``row``,
``column`` or ``entry``), the indices, and the scores they were ranked by, plus the rule that
turned a budget into per-layer counts. Because the scores of every candidate are kept, one
selection can be cut to any smaller budget (:meth:`Selection.cut`): the cuts nest and equal a fresh
selection at the smaller budget, so one pass serves a whole budget curve.

How a budget becomes counts (``Rule.allocation``):

* ``uniform``: the same number of rows (or columns) in every matrix;
* ``proportional``: each matrix the same fraction of its own rows (columns);
* ``global``: one ranking of every candidate row (column) of every eligible matrix, taken from
  the top until the parameter budget is spent (matrices may get none). With ``per_parameter``
  (GRFT) a candidate is ranked by its score divided by the parameters it holds: to first order a
  step on a set ``S`` lowers the loss by ``lr * sum_{i in S} score_i`` and costs ``sum size_i``
  parameters, so the best set under a parameter budget is the greedy one by score per parameter
  (docs/methods.md). Without it (the random draw over all rows) candidates are taken in the order
  of their keys, every row equally likely;
* ``matched``: the per-matrix counts of ``global`` on the scores, with the rows inside each
  matrix taken in the order of separate keys (random): "which matrices" without "which rows";
* ``per_row`` (entries, GPS): the top ``k`` input connections of every output neuron.

Inside a matrix, candidates are taken in the order of their keys (the scores, unless random keys
were drawn), ties broken by the lowest index, so a selection is a pure function of the scores.

``Rule.order="lowest"`` (GRFT's control, ``GRFT(order="lowest")``) takes the candidates with the
*lowest* scores instead: inside a matrix the lowest-scoring rows (columns) first, and under
``global`` the lowest score per parameter first over the whole model. Cuts nest the same way.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import torch

from grft_lightning.core.gradients import captured_energy, top_k

Axis = Literal["row", "column", "entry"]
AXES = ("row", "column", "entry")
ALLOCATIONS = ("uniform", "proportional", "global", "matched", "per_row")


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a budget becomes per-layer counts; kept with the selection so that a cut re-applies it.

    Attributes:
        mode: ``row``, ``column``, ``auto`` (per matrix, rows or columns) or ``entry``.
        allocation: one of :data:`ALLOCATIONS` (module docstring).
        backbone_parameters: the backbone's parameter count a ``fraction`` refers to.
        per_parameter: ``global``/``matched``: rank candidates by score per parameter.
        order: ``highest`` (take the best-scoring candidates first) or ``lowest`` (the worst first:
            a control). Keys drawn at random (``layer.keys``) are always taken highest first.
    """

    mode: str
    allocation: str
    backbone_parameters: int
    per_parameter: bool = True
    order: str = "highest"

    def key(self, layer: LayerSelection, axis: str) -> torch.Tensor:
        """The order candidates are taken in inside ``layer``: its keys, or its scores (negated
        under ``order="lowest"``)."""
        if axis in layer.keys or self.order == "highest":
            return layer.order(axis)
        return -layer.scores[axis].double()


@dataclasses.dataclass
class LayerSelection:
    """One eligible layer's part of a selection.

    Attributes:
        shape: the weight as an ``out x fan_in`` matrix.
        axis: ``row``, ``column`` or ``entry``.
        index: ascending ``int64`` indices: ``(n,)`` rows or columns (``n`` may be 0 under global
            allocation: the layer is left as it is), ``(out, k)`` input positions for entries.
        scores: per candidate axis, the score of every candidate (``row``: ``(out,)``, ``column``:
            ``(fan_in,)``; ``entry``: ``(out, K)`` scores of the ``K`` best entries of each row,
            ``entry_index`` their positions).
        keys: the order of candidates inside the layer where it is not the scores' (random draws).
    """

    shape: tuple[int, int]
    axis: str
    index: torch.Tensor
    scores: dict[str, torch.Tensor]
    keys: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def count(self) -> int:
        """Rows, columns, or entries per row selected."""
        return int(self.index.shape[-1]) if self.index.ndim else 0

    @property
    def entries(self) -> int:
        """Weight entries this layer tunes."""
        out, fan_in = self.shape
        if self.axis == "row":
            return self.count * fan_in
        if self.axis == "column":
            return self.count * out
        return int(self.index.numel())

    def order(self, axis: str) -> torch.Tensor:
        """The keys candidates are taken by inside this layer."""
        return self.keys[axis] if axis in self.keys else self.scores[axis]


class Selection:
    """What a method tunes: per eligible layer (by its name in the model) a :class:`LayerSelection`.

    Attributes:
        layers: layer name -> its selection, in model order (global allocation keeps layers with
            no row too, so that cuts can rank them).
        rule: how the budget became counts (:class:`Rule`; None for methods without a selection).
        budget: the budget it was made for: ``{"fraction": f}``, ``{"count": n}`` or ``{"k": k}``.
        head: the head spec the method was applied with (``heads.py``).
    """

    def __init__(self, layers: dict[str, LayerSelection], rule: Rule | None, budget: dict[str, Any],
                 head: Any = None):
        self.layers = dict(layers)
        self.rule = rule
        self.budget = dict(budget)
        self.head = head

    # -- what it holds -----------------------------------------------------------------------
    def active(self) -> dict[str, LayerSelection]:
        """The layers with at least one selected row, column or entry (those that get a delta)."""
        return {name: layer for name, layer in self.layers.items() if layer.index.numel()}

    def counts(self) -> dict[str, list]:
        """Per layer ``[axis, count]`` (rows, columns, or entries per row), for results.json."""
        return {name: [layer.axis, layer.count] for name, layer in self.layers.items()}

    def entries(self) -> int:
        """Selected weight entries in all layers."""
        return sum(layer.entries for layer in self.layers.values())

    def describe(self) -> str:
        """One line: mode, allocation, how many rows/columns/entries in how many matrices."""
        if self.rule is None:
            return "no selection"
        active = self.active()
        axes: dict[str, int] = {}
        for layer in active.values():
            axes[layer.axis] = axes.get(layer.axis, 0) + (layer.count if layer.axis != "entry" else layer.entries)
        per_row = {layer.count for layer in active.values() if layer.axis == "entry"}
        parts = []
        for axis, n in axes.items():
            if axis != "entry":
                parts.append(f"{n:,} {axis}{'s' if n != 1 else ''}")
            elif len(per_row) == 1:
                parts.append(f"the top {next(iter(per_row))} entries of every row")
            else:
                parts.append("entries per row")
        what = ", ".join(parts)
        share = 100.0 * self.entries() / max(self.rule.backbone_parameters, 1)
        return (f"{self.rule.mode} ({self.rule.allocation}): {what} in {len(active)} of {len(self.layers)} matrices "
                f"= {self.entries():,} weight entries ({share:.3f} % of the backbone)")

    def figure(self, path: str):
        """Draw ``selection.png`` (``selection_figure.py``); returns the figure, or None when nothing is selected."""
        from grft_lightning.core.selection_figure import save_selection_figure

        return save_selection_figure(self, path)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selection):
            return NotImplemented
        mine, theirs = self.state_dict(), other.state_dict()
        return (mine["meta"] == theirs["meta"] and mine["tensors"].keys() == theirs["tensors"].keys()
                and all(torch.equal(mine["tensors"][k], theirs["tensors"][k]) for k in mine["tensors"]))

    def __repr__(self) -> str:
        return f"Selection({self.describe()})"

    # -- cuts ----------------------------------------------------------------------------------
    def cut(self, fraction: float | None = None, count: int | None = None, k: int | None = None) -> Selection:
        """The selection this rule makes at a smaller budget, from the kept scores (no new pass).

        Give ``fraction`` (of the backbone's parameters), ``count`` (rows or columns per matrix,
        ``uniform`` only) or ``k`` (entries per row). Cuts nest: a smaller cut's indices are a
        subset of a larger one's, and equal a fresh selection at that budget.
        """
        if self.rule is None:
            raise ValueError("this selection has no rule to cut by (a method without a selection)")
        budget = {key: value for key, value in (("fraction", fraction), ("count", count), ("k", k))
                  if value is not None}
        if len(budget) != 1:
            raise ValueError("Selection.cut: give exactly one of fraction, count or k")
        if self.rule.mode == "entry":
            if k is None:
                raise ValueError("Selection.cut: an entry selection is cut by k (entries per row)")
            available = min(layer.scores["entry"].shape[1] for layer in self.layers.values())
            if k > available:
                raise ValueError(f"Selection.cut: k={k} is more than the {available} entries per row this selection "
                                 "ranked; run the selection at the larger budget")
        elif self._budget_size(self.budget) < self._budget_size(budget) - 1e-9:
            raise ValueError(f"Selection.cut: {budget} is larger than the selection's own budget {self.budget}")
        return allocate(self.layers, self.rule, budget, self.head)

    def _budget_size(self, budget: dict[str, Any]) -> float:
        """A budget as weight entries (to refuse cuts larger than the selection)."""
        if "fraction" in budget:
            return budget["fraction"] * self.rule.backbone_parameters
        counts = allocate_counts(self.layers, self.rule, budget)
        return float(sum(_entries(self.layers[name].shape, axis, n) for name, (axis, n) in counts.items()))

    # -- saving --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able ``meta`` and CPU ``tensors``): what checkpoints and tuned files hold."""
        rule = dataclasses.asdict(self.rule) if self.rule else None
        if rule is not None and rule["order"] == "highest":
            del rule["order"]  # the default: files read as before the option existed
        meta = {"rule": rule, "budget": self.budget, "head": self.head,
                "layers": {name: {"shape": list(layer.shape), "axis": layer.axis}
                           for name, layer in self.layers.items()}}
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"{name}/index"] = layer.index.detach().cpu().int().contiguous()  # int32: half the bytes
            for axis, value in layer.scores.items():
                if axis == "entry_index" and torch.equal(value, layer.index):
                    continue  # the pool is the selection itself (rebuilt on load)
                tensors[f"{name}/scores.{axis}"] = value.detach().cpu().contiguous()
            for axis, value in layer.keys.items():
                tensors[f"{name}/keys.{axis}"] = value.detach().cpu().contiguous()
        return {"meta": meta, "tensors": tensors}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], source: str = "the file") -> Selection:
        """Rebuild from :meth:`state_dict` output, checking what a file could get wrong."""
        try:
            meta, tensors = state["meta"], state["tensors"]
            if isinstance(meta, str):
                meta = json.loads(meta)
            rule = Rule(**meta["rule"]) if meta.get("rule") else None
            layers = {}
            for name, info in meta["layers"].items():
                shape = tuple(int(n) for n in info["shape"])
                axis = info["axis"]
                if axis not in AXES or len(shape) != 2:
                    raise ValueError(f"layer {name}: axis {axis!r}, shape {shape}")
                prefix = f"{name}/"
                scores = {k[len(prefix) + 7:]: v for k, v in tensors.items() if k.startswith(prefix + "scores.")}
                keys = {k[len(prefix) + 5:]: v for k, v in tensors.items() if k.startswith(prefix + "keys.")}
                index = _checked_index(name, tensors[prefix + "index"], shape, axis)
                if axis == "entry" and "entry_index" not in scores:
                    scores["entry_index"] = index
                elif "entry_index" in scores:
                    scores["entry_index"] = _checked_index(name, scores["entry_index"], shape, axis)
                layers[name] = LayerSelection(shape, axis, index, scores, keys)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: not a readable selection ({type(err).__name__}: {err})") from err
        if rule is not None and rule.allocation not in ALLOCATIONS:
            raise ValueError(f"{source}: unknown allocation {rule.allocation!r}")
        if rule is not None and rule.order not in ("highest", "lowest"):
            raise ValueError(f"{source}: unknown order {rule.order!r}")
        return cls(layers, rule, meta.get("budget", {}), meta.get("head"))


def _checked_index(name: str, index: torch.Tensor, shape: tuple[int, int], axis: str) -> torch.Tensor:
    """Index tensors from a file: integers, in range, ascending without repeats (per row for entries)."""
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"layer {name}: indices must be integers, got {index.dtype}")
    index = index.long()
    limit = shape[0] if axis == "row" else shape[1]
    if axis == "entry" and (index.ndim != 2 or index.shape[0] != shape[0]):
        raise ValueError(f"layer {name}: entry indices of shape {tuple(index.shape)} for a {shape} matrix")
    if axis != "entry" and index.ndim != 1:
        raise ValueError(f"layer {name}: {axis} indices must be 1-D, got shape {tuple(index.shape)}")
    if index.numel():
        if int(index.min()) < 0 or int(index.max()) >= limit:
            raise ValueError(f"layer {name}: an index is out of range [0, {limit})")
        if bool((index[..., 1:] <= index[..., :-1]).any()):
            raise ValueError(f"layer {name}: indices must be ascending without repeats")
    return index


# -- the rule: budget -> counts -> indices -------------------------------------------------------
def _entries(shape: tuple[int, int], axis: str, n: int) -> int:
    out, fan_in = shape
    return n * (fan_in if axis == "row" else out if axis == "column" else out)


def _check_count(name: str, what: str, count: int, limit: int) -> None:
    if count < 1 or count > limit:
        raise ValueError(f"{name}: {count} {what} requested, but this matrix has {limit} {what} "
                         f"(the budget must be between 1 and {limit})")


def allocate_counts(layers: dict[str, LayerSelection], rule: Rule, budget: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Per layer ``(axis, count)`` for ``budget`` under ``rule`` (module docstring)."""
    shapes = {name: layer.shape for name, layer in layers.items()}
    if rule.mode == "entry":
        k = int(budget["k"])
        for name, (out, fan_in) in shapes.items():
            _check_count(name, "input connections per row", k, fan_in)
        return {name: ("entry", k) for name in shapes}
    if rule.allocation in ("global", "matched"):
        if "fraction" not in budget:
            raise ValueError(f"allocation {rule.allocation!r} takes the budget as a fraction of the backbone")
        return _global_counts(layers, rule, budget["fraction"] * rule.backbone_parameters)
    rows_first = rule.mode in ("row", "auto")
    if "count" in budget:
        per_layer = dict.fromkeys(shapes, int(budget["count"]))
    else:
        target = budget["fraction"] * rule.backbone_parameters
        if rule.allocation == "uniform":
            unit = sum(fan_in if rows_first else out for out, fan_in in shapes.values())
            per_layer = dict.fromkeys(shapes, max(1, round(target / unit)))
        else:  # proportional
            share = target / sum(out * fan_in for out, fan_in in shapes.values())
            per_layer = {n: max(1, round(share * (out if rows_first else fan_in))) for n, (out, fan_in) in shapes.items()}
    counts = {}
    for name, (out, fan_in) in shapes.items():
        n = per_layer[name]
        _check_count(name, "rows" if rows_first else "columns", n, out if rows_first else fan_in)
        if rule.mode == "row":
            counts[name] = ("row", n)
        elif rule.mode == "column":
            counts[name] = ("column", n)
        else:  # auto: columns at the same parameter budget as the rows (never more entries)
            columns = min(fan_in, n * fan_in // out)
            counts[name] = ("column", columns) if _columns_win(layers[name], n, columns) else ("row", n)
    return counts


def _columns_win(layer: LayerSelection, rows: int, columns: int) -> bool:
    """``auto``: whether the best ``columns`` columns capture more squared gradient per parameter
    than the best ``rows`` rows."""
    if columns == 0:
        return False
    out, fan_in = layer.shape
    per_row = captured_energy(layer.scores["row"], rows) / (rows * fan_in)
    per_col = captured_energy(layer.scores["column"], columns) / (columns * out)
    return per_col > per_row


def _global_axis(layer: LayerSelection, rule: Rule) -> str:
    """The axis a matrix offers to the global ranking: its mode's, or for ``auto`` the axis whose
    best candidate holds the most score per parameter."""
    if rule.mode != "auto":
        return rule.mode
    out, fan_in = layer.shape
    best_row = float(layer.scores["row"].max()) / fan_in
    best_column = float(layer.scores["column"].max()) / out
    return "column" if best_column > best_row else "row"


def _global_counts(layers: dict[str, LayerSelection], rule: Rule, target: float) -> dict[str, tuple[str, int]]:
    """One ranking over every candidate of every matrix; the longest prefix within ``target``
    entries (at least one candidate). Ties: model order, then the lowest index."""
    values, costs, owners = [], [], []
    axes = {}
    for i, (name, layer) in enumerate(layers.items()):
        axis = axes[name] = _global_axis(layer, rule)
        cost = _entries(layer.shape, axis, 1)
        if rule.per_parameter:
            key = layer.scores[axis].double() / cost
            key = -key if rule.order == "lowest" else key
        else:
            key = layer.order(axis).double()
        values.append(key)
        costs.append(torch.full_like(key, cost))
        owners.append(torch.full(key.shape, i, dtype=torch.long))
    value, cost, owner = torch.cat(values), torch.cat(costs), torch.cat(owners)
    order = torch.sort(value, descending=True, stable=True).indices
    spent = torch.cumsum(cost[order], 0)
    taken = max(1, int((spent <= target + 1e-6).sum()))
    per_owner = torch.bincount(owner[order[:taken]], minlength=len(layers))
    return {name: (axes[name], int(per_owner[i])) for i, name in enumerate(layers)}


def allocate(layers: dict[str, LayerSelection], rule: Rule, budget: dict[str, Any], head: Any = None) -> Selection:
    """The selection ``rule`` makes at ``budget`` from the layers' scores and keys."""
    counts = allocate_counts(layers, rule, budget)
    chosen = {}
    for name, layer in layers.items():
        axis, n = counts[name]
        if axis == "entry":
            # The pool shrinks to the kept entries (a cut to a smaller k equals a fresh selection at
            # that k); ``top_k`` returns positions in ascending order, and the pool is ascending.
            pool, scores = layer.scores["entry_index"], layer.scores["entry"]
            keep = top_k(scores, n, dim=1)
            index = torch.gather(pool, 1, keep)
            chosen[name] = LayerSelection(layer.shape, axis, index.long().cpu(),
                                          {"entry": torch.gather(scores, 1, keep), "entry_index": index.long().cpu()})
            continue
        index = top_k(rule.key(layer, axis), n) if n else torch.zeros(0, dtype=torch.long)
        chosen[name] = LayerSelection(layer.shape, axis, index.long().cpu(), layer.scores, layer.keys)
    return Selection(chosen, rule, budget, head)
