"""Recomputing a delta layer's input in backward instead of keeping it (selective recomputation).

A row or entry delta needs its layer's input only for its own gradient. When that input is the
output of a cheap, deterministic producer whose own backward keeps *its* input anyway (LayerNorm,
GELU, SiLU, ...), the delta keeps the producer's input and recomputes the output in backward, so
nothing is kept twice. :func:`track_layer_inputs` puts a forward hook on every such producer of a
model; the hook handles are kept here (:data:`_HANDLES`, by module, weakly), and a hook acts only
for a module that is tracked, so a deep copy of a tracked model carries inert copies of the hooks.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

#: Producers whose output a delta layer recomputes in backward instead of keeping it: cheap,
#: deterministic, and their own backward keeps their input anyway (LayerNorm, GELU, SiLU, ...; not
#: ReLU, Tanh or Sigmoid, whose backward keeps the output), so nothing is kept twice.
RECOMPUTABLE_TYPES = (nn.LayerNorm, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)
#: The same by qualified class name, for libraries this module does not import (Hugging Face's GELUs).
RECOMPUTABLE_NAMES = frozenset({"transformers.activations.GELUActivation",
                                "transformers.activations.NewGELUActivation"})
#: The attribute of a producer's output that says how to recompute it (:class:`Recomputable`).
SOURCE_ATTRIBUTE = "_delta_input_source"


def is_recomputable(module: nn.Module) -> bool:
    """Whether ``module``'s output may be recomputed from its input in a delta layer's backward."""
    cls = type(module)
    return ((isinstance(module, RECOMPUTABLE_TYPES) or f"{cls.__module__}.{cls.__qualname__}" in RECOMPUTABLE_NAMES)
            and not getattr(module, "inplace", False))


class Recomputable:
    """How a tensor was produced: ``producer.forward(input)`` under the recorded autocast state.

    Attached to the output of every recomputable producer in training (:func:`track_layer_inputs`)
    when its input needs a gradient: that producer's own backward then keeps ``input``, so a row
    or entry delta fed by the output saves ``input`` in place of the output (which it needs only
    for its delta's gradient) and recomputes the output in backward (selective recomputation). In a
    ViT block that drops the LayerNorm outputs feeding ``qkv`` and ``fc1`` and the GELU output
    feeding ``fc2`` from what a step keeps. ``version`` is the output's version counter when it
    was made: an output changed in place since is not recomputed.
    """

    __slots__ = ("producer", "input", "version", "autocast")

    def __init__(self, producer: nn.Module, input: torch.Tensor, version: int, autocast: tuple[bool, torch.dtype]):
        self.producer, self.input, self.version, self.autocast = producer, input, version, autocast

    def recipe(self) -> tuple[nn.Module, tuple[bool, torch.dtype]]:
        """What :func:`recompute` needs besides the input (no tensor: a tensor goes through
        ``save_for_backward``)."""
        return self.producer, self.autocast


def recompute(recipe: tuple[nn.Module, tuple[bool, torch.dtype]], input: torch.Tensor) -> torch.Tensor:
    """The producer's output again, from its input, without hooks and under its autocast state."""
    producer, (enabled, dtype) = recipe
    with torch.no_grad(), torch.autocast(input.device.type, dtype=dtype, enabled=enabled):
        return producer.forward(input)


#: The handle of each tracked producer's hook (:func:`track_layer_inputs`), by module, weakly: a
#: module that is collected leaves it. The hook acts only for a module found here.
_HANDLES: "weakref.WeakKeyDictionary[nn.Module, torch.utils.hooks.RemovableHandle]" = weakref.WeakKeyDictionary()


def _record_source(module: nn.Module, args: tuple, output) -> None:
    """Forward hook of a recomputable producer: attach a :class:`Recomputable` to its output."""
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                                             and len(args) == 1):
        return
    (x,) = args
    if not (isinstance(x, torch.Tensor) and x.requires_grad) or output is x or module not in _HANDLES:
        return
    device = x.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    setattr(output, SOURCE_ATTRIBUTE, Recomputable(module, x, output._version, autocast))


def track_layer_inputs(model: nn.Module) -> None:
    """Let the delta layers of ``model`` recompute their input instead of keeping it (see
    :class:`Recomputable`): a forward hook on every recomputable producer, once. ``Method.apply``
    calls it when it inserts delta layers; ``merge`` (:func:`untrack_layer_inputs`) removes the
    hooks. A deep copy of a tracked model copies the hooks but not their handles: the copies do
    nothing until the copy is tracked itself."""
    for module in model.modules():
        if is_recomputable(module) and module not in _HANDLES:
            _HANDLES[module] = module.register_forward_hook(_record_source)


def untrack_layer_inputs(model: nn.Module) -> None:
    """Remove the hooks of :func:`track_layer_inputs` from ``model``'s producers."""
    for module in model.modules():
        handle = _HANDLES.pop(module, None)
        if handle is not None:
            handle.remove()


def is_tracked(module: nn.Module) -> bool:
    """Whether ``module``'s output carries how to recompute it (:func:`track_layer_inputs`)."""
    return module in _HANDLES


def input_source(x: torch.Tensor) -> Recomputable | None:
    """The :class:`Recomputable` attached to ``x``, if ``x`` is unchanged since it was made."""
    source = getattr(x, SOURCE_ATTRIBUTE, None)
    return source if source is not None and source.version == x._version else None

