"""Frozen pre-trained weights plus small trainable deltas of exactly the selected sizes.

A delta layer wraps an ``nn.Linear`` or ``nn.Conv2d``, or a subclass of either, or Hugging Face's
``Conv1D`` -- the *base layer*, frozen -- and adds a trainable tensor of exactly the size a
selection (``core/selection.py``) gave this layer: deltas are built after the selection, from its
indices. Two kinds (docs/methods.md, "How tuned parameters are held"):

* :class:`StructuredDelta` (GRFT): rows ``R``, ``y = base(x); y[..., R] += x D^T``, or columns
  ``C``, ``y += x[..., C] D^T``;
* :class:`IndexDelta` (GPS): per-row entries, ``W = W0 + scatter(D)`` for the selected
  ``(row, col)`` pairs.

The optimizer only ever sees ``D``; the autograd functions are in ``core/kernels.py``.
:class:`SelectableLayer` is what every layer built from a selection shares (export of its values,
counts, ``merged_module``); :class:`DeltaLayer` adds the delta. GPS's masked weights
(``methods/masked.py``) are selectable layers without a delta. :func:`merge` folds every tuned
part back into plain layers.

Subclasses (timm's ``StdConv2d`` in BiT ResNets, ``ScaledStdConv2d``, ...) often transform the
weight or the input in their own ``forward``: ``StdConv2d`` standardises each output channel of
its weight before the convolution. The skinny corrections above would add the delta *outside* that
transform, so for a layer whose ``forward`` is not ``nn.Linear``'s or ``nn.Conv2d``'s own, a delta
layer instead calls the layer's own ``forward`` with ``W0 + delta`` as its weight
(``torch.func.functional_call``): ``StdConv2d`` then standardises ``W0 + delta``, exactly what the
merged layer computes. The price is a weight-sized temporary per layer (and a dense weight gradient
in backward), as for GPS's entries on convolutions.
"""

from __future__ import annotations

import abc
import copy
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning.core.kernels import ConvDelta, DeltaLinear, conv_padding
from grft_lightning.core.layers import (COLUMN, ENTRY, ROW, from_matrix, has_plain_forward, is_layer,
                                        is_transposed, matrix_shape, to_matrix)
from grft_lightning.core.recompute import input_source, untrack_layer_inputs


def checked_index(name: str, index: torch.Tensor, shape: tuple[int, ...], limit: int, what: str) -> torch.Tensor:
    """``index`` as int64 after checking what a file (tuned file, checkpoint) could get wrong: an
    integer dtype, the ``shape`` the layer expects, values in ``[0, limit)`` and no value twice
    (along the last dimension); a ``ValueError`` naming the layer otherwise."""
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{name}: {what} indices must be integers, got {index.dtype}")
    if tuple(index.shape) != tuple(shape):
        raise ValueError(f"{name}: {what} indices of shape {tuple(index.shape)}, this layer expects {tuple(shape)}")
    index = index.long()
    if index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= limit:
            raise ValueError(f"{name}: {what} index {low if low < 0 else high} out of range (this layer has "
                             f"{limit} {what})")
        ordered = index.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError(f"{name}: the same {what[:-1]} index appears twice")
    return index


def checked_values(name: str, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Delta values after checking their shape against the layer's; a ``ValueError`` otherwise."""
    if tuple(values.shape) != tuple(shape):
        raise ValueError(f"{name}: delta of shape {tuple(values.shape)}, this layer expects {tuple(shape)}")
    if not values.dtype.is_floating_point:
        raise ValueError(f"{name}: delta values must be floating point, got {values.dtype}")
    return values


class SelectableLayer(nn.Module, metaclass=abc.ABCMeta):
    """A pre-trained layer wrapped so that a selection chooses which of its weight entries train.

    What every layer built from a selection shares: ``method.apply(model, selection)`` creates it
    with the selection's indices, ``save_tuned``/``load_tuned`` go through
    :meth:`export_tensors`/:meth:`import_tensors` (the values; the indices are the Selection's),
    the counts read :meth:`num_tuned` and ``merge`` replaces it by :meth:`merged_module`. Two families: :class:`DeltaLayer` (the pre-trained
    weight stays frozen and the tuned entries live in a small trainable delta) and the masked
    weights of ``methods/masked.py`` (the weight itself trains, under a mask).

    Attributes:
        base_layer: the pre-trained ``nn.Linear``/``nn.Conv2d`` (or subclass) or ``Conv1D``.
        original_name: the layer's name in the model before it was wrapped.
    """

    def __init__(self, base_layer: nn.Module, original_name: str):
        super().__init__()
        if not is_layer(base_layer):
            raise TypeError(f"{original_name}: deltas support nn.Linear, nn.Conv2d (subclasses of either are "
                            f"accepted) and transformers' Conv1D, got {type(base_layer).__name__}")
        if not isinstance(base_layer._parameters.get("weight"), nn.Parameter):
            raise TypeError(f"{original_name}: the weight of this {type(base_layer).__name__} is computed (a "
                            "parametrization such as weight norm), not a parameter a delta can be added to; "
                            "leave the layer out with the method's `exclude`")
        self.base_layer = base_layer
        self.original_name = original_name

    # -- shared helpers -----------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return matrix_shape(self.base_layer)[0]

    @property
    def fan_in(self) -> int:
        return matrix_shape(self.base_layer)[1]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    @property
    def selected_axis(self) -> int:
        """The axis this layer tunes (``ROW``, ``COLUMN`` or ``ENTRY``)."""
        return ENTRY

    def to_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor of the base weight's shape as the ``out x fan_in`` matrix (:func:`to_matrix`)."""
        return to_matrix(self.base_layer, tensor)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """An ``out x fan_in`` matrix in the base weight's layout (:func:`from_matrix`)."""
        return from_matrix(self.base_layer, matrix)

    def added_parameters(self) -> list[nn.Parameter]:
        """The parameters this layer adds beside the pre-trained ones (a delta's ``D``; none for a
        masked weight). ``export_tensors`` writes them."""
        return list(self.parameters(recurse=False))

    # -- what a kind provides -----------------------------------------------------------------
    @abc.abstractmethod
    def num_tuned(self) -> int:
        """Number of weight entries this layer tunes."""

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The tuned values this layer adds (``{"delta": D}``; none for a masked weight)."""
        return {name: p.detach() for name, p in self.named_parameters(recurse=False)}

    def import_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load :meth:`export_tensors` output, checking names and shapes."""
        own = dict(self.named_parameters(recurse=False))
        if set(tensors) != set(own):
            raise ValueError(f"{self.original_name}: expected {sorted(own)}, found {sorted(tensors)}")
        for name, value in tensors.items():
            target = own[name]
            checked_values(self.original_name, value, tuple(target.shape))
            with torch.no_grad():
                target.copy_(value.to(target.dtype))

    @abc.abstractmethod
    def merged_module(self) -> nn.Module:
        """A plain layer computing what this one computes (``merge`` puts it in its place)."""


class DeltaLayer(SelectableLayer):
    """A frozen base layer plus a trainable delta filled in by a selection.

    Attributes:
        plain_forward: whether the base layer computes plain ``F.linear``/``F.conv2d`` of its
            weight (the fast paths); False for e.g. ``StdConv2d`` (module docstring).
    """

    def __init__(self, base_layer: nn.Module, original_name: str):
        super().__init__(base_layer, original_name)
        #: False: the layer's own forward transforms its weight (StdConv2d); see the module docstring
        self.plain_forward = has_plain_forward(base_layer)
        if self.plain_forward and isinstance(base_layer, nn.Conv2d) and base_layer.padding_mode != "zeros":
            raise TypeError(f"{original_name}: padding_mode={base_layer.padding_mode!r} is not supported")
        base_layer.weight.requires_grad_(False)

    def linear_weight(self) -> torch.Tensor:
        """The base weight as ``F.linear`` takes it (``out x in``; a view for ``Conv1D``)."""
        weight = self.base_layer.weight
        return weight.t() if is_transposed(self.base_layer) else weight

    def _own_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's own forward with ``W0 + delta`` as its weight (layers without a plain
        forward: the delta goes through whatever the layer does to its weight)."""
        weight = self.base_layer.weight
        effective = weight + self.dense_delta().to(weight.dtype)
        return torch.func.functional_call(self.base_layer, {"weight": effective}, (x,))

    def _linear(self, x: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
        """The linear path of every kind (:class:`DeltaLinear`), on inputs of any leading shape.
        A row or entry delta whose input a tracked producer made (:class:`Recomputable`) keeps
        that producer's input instead of ``x``."""
        source = input_source(x) if axis != COLUMN and torch.is_grad_enabled() else None
        y = DeltaLinear.apply(x.reshape(-1, x.shape[-1]), delta, index, self.linear_weight(), self.base_layer.bias,
                               axis, source)
        return y.view(*x.shape[:-1], y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output with the delta's contribution."""
        if not self.plain_forward:
            return self._own_forward(x)
        return self.delta_forward(x)

    # -- what a kind provides -----------------------------------------------------------------
    @abc.abstractmethod
    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output of a selected layer with a plain forward (the fast paths)."""

    @abc.abstractmethod
    def dense_delta(self) -> torch.Tensor:
        """The delta as a tensor of the base weight's shape (zeros outside the selection)."""

    def l2(self) -> torch.Tensor:
        """``sum ||W - W0||^2`` over the tuned entries (the L2-SP penalty of GRFT)."""
        return sum((p.float().pow(2).sum() for p in self.added_parameters()),
                   torch.zeros((), device=self.base_layer.weight.device))

    def merged_module(self) -> nn.Module:
        """A plain copy of the base layer whose weight is ``W0 + delta``."""
        merged = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            merged.weight.add_(self.dense_delta().to(merged.weight.dtype))
        return merged


class StructuredDelta(DeltaLayer):
    """GRFT's delta: whole rows or whole columns of one weight matrix.

    Args:
        base_layer: the frozen pre-trained layer.
        original_name: its name in the model.
        axis: ``ROW`` or ``COLUMN``.
        index: the selected rows (output neurons) or columns (fan-in positions), ascending; the
            delta is ``(len(index), fan_in)`` for rows and ``(out, len(index))`` for columns.
    """

    def __init__(self, base_layer: nn.Module, original_name: str, axis: int, index: torch.Tensor):
        super().__init__(base_layer, original_name)
        if axis not in (ROW, COLUMN):
            raise ValueError(f"{original_name}: a structured delta tunes rows or columns, got axis {axis!r}")
        out, fin = self.out_features, self.fan_in
        what = "rows" if axis == ROW else "columns"
        index = checked_index(original_name, index, (len(index),), out if axis == ROW else fin, what)
        w = base_layer.weight
        self._axis = axis
        shape = (len(index), fin) if axis == ROW else (out, len(index))
        self.delta = nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device))
        self.register_buffer("index", index.to(w.device))

    @property
    def selected_axis(self) -> int:
        """``ROW`` or ``COLUMN``: the axis this layer tunes."""
        return self._axis

    def num_tuned(self) -> int:
        return self.delta.numel()

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return self._linear(x, self.delta, self.index, self._axis)
        conv = self.base_layer
        input_pad, padding = conv_padding(conv)
        if input_pad is not None:  # an even "same" kernel: torch's asymmetric padding, explicitly
            x = F.pad(x, input_pad)
        return ConvDelta.apply(x, self.delta, self.index, conv.weight, conv.bias, self._axis, conv.stride, padding,
                                conv.dilation, conv.groups)

    def dense_delta(self) -> torch.Tensor:
        out, fin = self.out_features, self.fan_in
        flat = torch.zeros(out, fin, dtype=self.delta.dtype, device=self.delta.device)
        flat.index_add_(0 if self._axis == ROW else 1, self.index, self.delta)
        return self.from_matrix(flat)




class IndexDelta(DeltaLayer):
    """GPS's delta: for every output neuron, ``k`` selected input connections.

    Only ``D`` (out x k) is a parameter: no optimizer state is kept for the untouched entries.
    On a linear layer the effective weight ``W0 + scatter(D)`` is a temporary of the product
    (``DeltaLinear``): no weight-sized tensor is kept per layer between forward and backward,
    and the dense weight gradient is never formed for small ``k``. On a convolution the
    effective weight is formed in the forward and its gradient is dense for one step.
    """

    def __init__(self, base_layer: nn.Module, original_name: str, index: torch.Tensor):
        super().__init__(base_layer, original_name)
        w = base_layer.weight
        index = checked_index(original_name, index, (self.out_features, index.shape[-1]), self.fan_in, "inputs")
        self.k = index.shape[1]
        self.delta = nn.Parameter(torch.zeros(self.out_features, self.k, dtype=w.dtype, device=w.device))
        self.register_buffer("index", index.to(w.device))

    def num_tuned(self) -> int:
        return self.out_features * self.k

    def dense_delta(self) -> torch.Tensor:
        flat = torch.zeros(self.out_features, self.fan_in, dtype=self.delta.dtype, device=self.delta.device)
        return self.from_matrix(flat.scatter_add(1, self.index, self.delta))

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return self._linear(x, self.delta, self.index, ENTRY)
        base = self.base_layer
        weight = base.weight + self.dense_delta()
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)



def selectable_layers(model: nn.Module) -> Iterator[tuple[str, SelectableLayer]]:
    """``(module path, layer)`` for every layer a selection fills (delta layers, masked weights)."""
    for name, module in model.named_modules():
        if isinstance(module, SelectableLayer):
            yield name, module


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def fold_layers(model: nn.Module) -> nn.Module:
    """Replace every selectable layer by its :meth:`~SelectableLayer.merged_module`, in place
    (and remove :func:`track_layer_inputs`' hooks)."""
    for path, layer in list(selectable_layers(model)):
        set_submodule(model, path, layer.merged_module())
    untrack_layer_inputs(model)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every tuned part into the weights, in place; returns the model with plain layers.

    Structural: every selectable layer becomes its :meth:`~SelectableLayer.merged_module`, and every
    layer that wraps a ``base_layer`` and can ``merge()`` itself into it (peft's LoRA and DoRA
    layers) does so and is replaced by its base layer. Parts that cannot be folded (adapters) stay.
    """
    for path, module in [(p, m) for p, m in model.named_modules() if _foldable_wrapper(m)]:
        module.merge()
        set_submodule(model, path, module.get_base_layer())
    return fold_layers(model)


def _foldable_wrapper(module: nn.Module) -> bool:
    """A layer of another library that adds an update to a ``base_layer`` and folds it itself
    (peft's tuner layers: ``merge()`` and ``get_base_layer()``)."""
    return (not isinstance(module, SelectableLayer) and callable(getattr(module, "merge", None))
            and callable(getattr(module, "get_base_layer", None)) and isinstance(getattr(module, "base_layer", None),
                                                                                nn.Module))
