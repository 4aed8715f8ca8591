"""Which layers of a model can be tuned, and how their weights read as matrices.

Every score, index and delta of this package refers to a layer's weight read as an ``out x fan_in``
matrix (:func:`to_matrix`): a linear layer's weight as it is, a convolution's as ``out x
(in/groups * kh * kw)``, Hugging Face's ``Conv1D`` (GPT-2, stored ``in x out``) transposed. The
*axis* a layer tunes is ``ROW`` (output neurons / channels), ``COLUMN`` (fan-in positions) or
``ENTRY`` (GPS's per-row entries). :func:`eligible_layers` is the one definition of the layers a
method may select from.
"""

from __future__ import annotations

import collections
import fnmatch
import sys

import torch
from torch import nn

from grft_lightning.core.heads import DEFAULT, head_module_ids

#: The axis a layer tunes: whole rows (output neurons / channels), whole columns (fan-in
#: positions), or single entries (GPS: per-row indices). The one name of this notion is *axis*;
#: a Selection names it ``"row"``, ``"column"`` or ``"entry"`` (:data:`AXIS_NAMES`).
ROW, COLUMN, ENTRY = 0, 1, 2
AXIS_NAMES = {ROW: "row", COLUMN: "column", ENTRY: "entry"}
AXES = {name: axis for axis, name in AXIS_NAMES.items()}

#: The torch layers a delta can wrap, subclasses included. With Hugging Face's ``Conv1D``
#: (:func:`transposed_types`) they make the one definition of an eligible layer's type,
#: :func:`is_layer` (:func:`eligible_layers` walks a model with it, ``gradients.py`` scores these weights).
LAYER_TYPES = (nn.Linear, nn.Conv2d)

#: Subclasses whose ``forward`` overrides the base class's but computes the same thing (timm's
#: ``Linear`` only changes dtypes under TorchScript): they keep the fast paths.
SAME_AS_BASE_FORWARD = frozenset({"timm.layers.linear.Linear"})


def transposed_types() -> tuple[type, ...]:
    """Linear layers that store their weight as ``in x out``: Hugging Face's ``Conv1D`` (GPT-2's
    attention and MLP), ``y = x W + b``. Looked up only when ``transformers`` is loaded (a model
    holding one has loaded it), so this module never imports it."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def is_layer(module: nn.Module) -> bool:
    """Whether a delta can wrap ``module``: ``nn.Linear``, ``nn.Conv2d`` (subclasses included) or
    Hugging Face's ``Conv1D``."""
    return isinstance(module, LAYER_TYPES + transposed_types())


def is_transposed(layer: nn.Module) -> bool:
    """True for layers whose weight is stored ``in x out`` (:func:`transposed_types`)."""
    types = transposed_types()
    return bool(types) and isinstance(layer, types)


def has_plain_forward(layer: nn.Module) -> bool:
    """True when ``layer`` computes exactly ``F.linear`` / ``F.conv2d`` of its own weight (its
    class keeps ``nn.Linear``'s, ``nn.Conv2d``'s or ``Conv1D``'s forward), so a delta's
    contribution may be added to its output; False for subclasses such as ``StdConv2d`` that
    transform the weight."""
    cls = type(layer)
    if f"{cls.__module__}.{cls.__qualname__}" in SAME_AS_BASE_FORWARD:
        return True
    if isinstance(layer, nn.Conv2d):
        return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward
    if is_transposed(layer):
        return cls.forward is transposed_types()[0].forward
    return isinstance(layer, nn.Linear) and cls.forward is nn.Linear.forward


def matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """``(out, fan_in)``: the layer's weight read as a matrix (a convolution as ``out x
    (in/groups * kh * kw)``, a ``Conv1D`` weight transposed)."""
    weight = layer.weight
    if is_transposed(layer):
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight[0].numel()


def to_matrix(layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of the layer's weight shape (the weight, its gradient, a mask) as the ``out x
    fan_in`` matrix every score, index and delta refers to (a view)."""
    return tensor.t() if is_transposed(layer) else tensor.reshape(tensor.shape[0], -1)


def from_matrix(layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_matrix`: an ``out x fan_in`` matrix in the layer's weight layout."""
    return matrix.t() if is_transposed(layer) else matrix.reshape(layer.weight.shape)


def _shared_weights(model: nn.Module) -> set[int]:
    """``id()`` of parameters registered in several modules (tied weights: GPT-2's output layer and
    its token embedding)."""
    seen = collections.Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
    return {pid for pid, n in seen.items() if n > 1}


def eligible_layers(model: nn.Module, targets: list[str] | None = None,
                    exclude: list[str] | tuple[str, ...] = (), head=DEFAULT) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every layer a method may select from, in model order.

    Those are the :func:`~grft_lightning.core.layers.is_layer` modules (``nn.Linear``/``nn.Conv2d``,
    subclasses such as timm's ``StdConv2d`` included, and transformers' ``Conv1D``) outside the head
    (``heads.py``; ``head`` as ``method.apply`` takes it), whose names match one of the ``fnmatch``
    patterns ``targets`` (all when None) and none of ``exclude``. Left out: the ``out_proj`` of
    ``nn.MultiheadAttention``, which reads its weight directly and would bypass a delta, and layers
    whose weight is tied to another module's (GPT-2's output layer shares the token embedding: a
    delta could not be folded into that weight without changing the embedding).
    """
    head_modules = head_module_ids(model, head)
    bypassed = {id(child) for module in model.modules() if isinstance(module, nn.MultiheadAttention)
                for child in module.children()}
    tied = _shared_weights(model)
    layers = []
    for name, module in model.named_modules():
        if not is_layer(module) or id(module) in head_modules or id(module) in bypassed or id(module.weight) in tied:
            continue
        if targets is not None and not any(fnmatch.fnmatchcase(name, p) for p in targets):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        layers.append((name, module))
    return layers

