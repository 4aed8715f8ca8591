"""What every method shares: freezing, eligible layers, the select() contract.

A method is a small typed config (its ``__init__`` arguments, which LightningCLI turns into
``--help`` text and YAML under ``class_path``) plus:

* ``apply(model, head=...)``: freeze the pre-trained weights, insert trainable deltas whose
  shapes are fixed by the budget (index buffers not yet filled), mark biases/head trainable;
  returns model.
* ``select(model, grads)``: fill the index buffers from accumulated gradients (or a seed).
* ``regularizer(model, images, features)``: an extra loss term, or ``None``.
* ``on_before_optimizer_step`` / ``on_after_optimizer_step``: hooks around every optimizer step.
* ``merge(model)``: fold the method's parts into the weights (``grft_lightning.merge``).

Freezing is structural: the head is the module ``apply`` is told (``heads.py``: timm's
``model.get_classifier()`` by default, every module of it when it returns several, as DeiT's
distilled models do), biases are those of the eligible layers' types, norms are normalisation
modules -- never a name substring. The one exception is opt-in:
``tune_params`` names further pre-trained tensors to train in full (e.g. layer scales, Swin's
relative-position bias tables, which GPS's public code trains because of their names).
"""

from __future__ import annotations

import collections
import fnmatch
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

# What a delta can wrap (is_layer: nn.Linear, nn.Conv2d and their subclasses, transformers' Conv1D)
# is defined where deltas are: it is what a method may select from.
from grft_lightning.deltas import (DeltaLayer, SelectableLayer, fold_layers, is_layer, selectable_layers,
                                   set_submodule, track_layer_inputs)
# The head is defined in heads.py; these names are re-exported for scripts that import them from here.
from grft_lightning.heads import DEFAULT, HeadGroup, classifier, head_module_ids, head_parameter_ids, head_spec

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)

__all__ = ["Method", "eligible_layers", "check_count", "NORM_TYPES", "HeadGroup", "classifier", "head_parameter_ids"]


def _shared_weights(model: nn.Module) -> set[int]:
    """``id()`` of parameters registered in several modules (tied weights: GPT-2's output layer and
    its token embedding)."""
    seen = collections.Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
    return {pid for pid, n in seen.items() if n > 1}


def eligible_layers(model: nn.Module, targets: list[str] | None = None,
                    exclude: list[str] | tuple[str, ...] = (), head=DEFAULT) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every layer a method may select from, in model order.

    Those are the :func:`~grft_lightning.deltas.is_layer` modules (``nn.Linear``/``nn.Conv2d``,
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


class Method:
    """Base class of all tuning methods.

    Args:
        targets: ``fnmatch`` patterns on module names selecting the eligible layers among the
            ``nn.Linear``/``nn.Conv2d`` modules (and subclasses) outside the head (None: all).
        exclude: patterns removed from the eligible layers.
        tune_bias: train the bias of every ``nn.Linear``/``nn.Conv2d`` outside the head.
        tune_norm: train the affine parameters of normalisation layers (LayerNorm, BatchNorm).
        tune_params: ``fnmatch`` patterns on parameter names (as in the model before ``apply``)
            of further pre-trained tensors trained in full, e.g. ``["*.gamma"]`` (layer scales)
            or ``["*.relative_position_bias_table"]`` (Swin), which GPS's public code trains.
            Every pattern must match a parameter outside the head that no delta covers.
    """

    needs_gradients: ClassVar[bool] = False
    #: the head the method was applied with (``heads.head_spec``; set by :meth:`apply`)
    head: Any = None
    #: what the selection pass sums (``accumulate_gradients``' ``reduction``); GRFT's ``score`` changes it
    gradient_reduction: str = "sum"
    #: short name written to results.json and run directories
    tag: ClassVar[str] = "method"

    def __init__(
        self,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        tune_bias: bool = True,
        tune_norm: bool = False,
        tune_params: list[str] | None = None,
    ):
        self.targets = list(targets) if targets is not None else None
        self.exclude = list(exclude) if exclude is not None else []
        self.tune_bias = tune_bias
        self.tune_norm = tune_norm
        self.tune_params = list(tune_params) if tune_params is not None else None

    # -- config ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.tag

    def config(self) -> dict[str, Any]:
        """The ``__init__`` arguments, as they would appear under ``init_args`` in YAML."""
        params = inspect.signature(type(self).__init__).parameters
        config = {k: getattr(self, k) for k in params if k != "self" and hasattr(self, k)}
        # Unset, tune_params is left out: a checkpoint or tuned file written before the option
        # existed then holds the same method config as a run of today (resume compares them).
        if config.get("tune_params", ()) is None:
            del config["tune_params"]
        return config

    def class_path(self) -> str:
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- apply ------------------------------------------------------------------------------
    def eligible_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """This method's layers: :func:`eligible_layers` with its ``targets``, ``exclude`` and head."""
        return eligible_layers(model, self.targets, self.exclude, self.head)

    def apply(self, model: nn.Module, head=DEFAULT) -> nn.Module:
        """Freeze the pre-trained model and insert this method's trainable parts; returns it.

        Args:
            model: any PyTorch model (timm, Hugging Face transformers, your own).
            head: the new classification head, trained in full and counted apart: its attribute
                path (``"classifier"``), a list of paths, or None for a model without a new head
                (a language model whose output layer stays frozen or is tied). Left out: timm's
                ``model.get_classifier()``; other models must name it (``grft_lightning/heads.py``).
        """
        if getattr(model, "peft_method", None) is not None:
            raise RuntimeError(f"a method ({model.peft_method!r}) was already applied to this model")
        self.head = head_spec(model, head, required=True)
        head_ids = head_parameter_ids(model, self.head)
        extra = self._named_extra_parameters(model, head_ids)
        for p in model.parameters():
            p.requires_grad_(False)
        self.inject(model)
        covered = {id(layer.base_layer.weight) for _, layer in selectable_layers(model)}
        for name, p in extra.items():
            if id(p) in covered:
                raise ValueError(f"{type(self).__name__}.tune_params: {name} is the weight of a layer this method "
                                 "already tunes through a delta; leave it out of tune_params (or the layer out "
                                 "with `exclude`)")
            p.requires_grad_(True)
        for module in model.modules():
            if self.tune_bias and is_layer(module) and getattr(module, "bias", None) is not None:
                if id(module.bias) not in head_ids:
                    module.bias.requires_grad_(True)
            if self.tune_norm and isinstance(module, NORM_TYPES):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
        for p in classifier(model, self.head).parameters():
            p.requires_grad_(True)
        model.peft_method = self
        return model

    def inject(self, model: nn.Module) -> None:
        """Insert this method's trainable modules (none for the simple baselines)."""

    def _named_extra_parameters(self, model: nn.Module, head_ids: set[int]) -> dict[str, nn.Parameter]:
        """The parameters ``tune_params`` names (outside the head); every pattern must match."""
        patterns = getattr(self, "tune_params", None) or []
        named = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]
        found = {}
        for pattern in patterns:
            hits = {n: p for n, p in named if fnmatch.fnmatchcase(n, pattern)}
            if not hits:
                raise ValueError(f"{type(self).__name__}.tune_params: {pattern!r} matched no parameter outside the "
                                 f"head of this {type(model).__name__} (see model.named_parameters() for the names)")
            found.update(hits)
        return found

    def required_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The eligible layers; an error naming the patterns when there is none."""
        layers = self.eligible_layers(model)
        if not layers:
            raise ValueError(
                f"{type(self).__name__}: no eligible layer matched targets={self.targets}, exclude={self.exclude} "
                f"(eligible layers are nn.Linear/nn.Conv2d modules, subclasses included, and transformers' Conv1D, "
                f"outside the head)"
            )
        return layers

    @staticmethod
    def _replace(model: nn.Module, layers: list[tuple[str, nn.Module]], make_delta) -> list[SelectableLayer]:
        created = []
        for name, layer in layers:
            delta = make_delta(name, layer)
            set_submodule(model, name, delta)
            created.append(delta)
        if any(isinstance(layer, DeltaLayer) for layer in created):
            track_layer_inputs(model)  # deltas keep a LayerNorm's or GELU's input, not its output
        return created

    # -- select -----------------------------------------------------------------------------
    def select(self, model: nn.Module, grads: dict[str, torch.Tensor] | None = None, reselect: bool = False) -> None:
        """Fill the index buffers of every delta layer from accumulated gradients.

        Args:
            model: the model this method was applied to.
            grads: original weight name -> accumulated gradient (same shape as the weight).
            reselect: allow replacing an existing selection (its delta values are reset to 0).
        """
        layers = [layer for _, layer in selectable_layers(model)]
        if not layers:
            return
        done = [layer.original_name for layer in layers if layer.is_selected]
        if done and not reselect:
            raise RuntimeError(
                f"select() was already called on this model ({len(done)} layers selected, e.g. {done[0]}); "
                "pass reselect=True to replace the selection"
            )
        if self.needs_gradients:
            self._check_grads(layers, grads)
        for layer in layers:
            grad = layer.to_matrix(grads[f"{layer.original_name}.weight"]) if self.needs_gradients else None
            self.select_layer(layer, grad)

    def _check_grads(self, layers: list[SelectableLayer], grads: dict[str, torch.Tensor] | None) -> None:
        if grads is None:
            raise ValueError(f"{type(self).__name__}.select needs accumulated gradients (got None)")
        problems = []
        for layer in layers:
            key = f"{layer.original_name}.weight"
            expected = tuple(layer.base_layer.weight.shape)
            if key not in grads:
                problems.append(f"missing gradient for {key} (shape {expected})")
            elif tuple(grads[key].shape) != expected:
                problems.append(f"gradient for {key} has shape {tuple(grads[key].shape)}, expected {expected}")
        if problems:
            raise ValueError(f"{type(self).__name__}.select: " + "; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))

    def select_layer(self, layer: SelectableLayer, grad: torch.Tensor | None) -> None:
        """Fill one layer's indices from its accumulated gradient read as the ``out x fan_in``
        matrix (``layer.to_matrix``; None for methods without gradients). Methods with deltas
        override this."""

    # -- training ---------------------------------------------------------------------------
    def regularizer(self, model: nn.Module, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        """Extra loss term added to the task loss (logged separately); None for most methods."""
        return None

    def on_before_optimizer_step(self, model: nn.Module) -> None:
        """Called after backward and before each optimizer step (e.g. to mask gradients)."""

    def on_after_optimizer_step(self, model: nn.Module) -> None:
        """Called after each optimizer step (e.g. to write back entries the step must not move).

        ``PEFTModule`` calls it after every real optimizer step (with gradient accumulation, not
        after the batches that only accumulate). A plain PyTorch loop calls it itself::

            loss.backward()
            method.on_before_optimizer_step(model)
            optimizer.step()
            method.on_after_optimizer_step(model)

        A no-op here; :class:`~grft_lightning.methods.GPSMasked` overrides it.
        """

    def describe_budget(self, model: nn.Module) -> str:
        """One line on how the budget was turned into shapes (printed after apply)."""
        return ""

    # -- deploy -----------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold this method's trainable parts into the weights, in place (``grft_lightning.merge``
        calls it). Here: every selectable layer becomes its ``merged_module()``; a method whose
        parts are of another kind (peft's LoRA layers) folds them itself."""
        fold_layers(model)


def check_count(layer_name: str, what: str, count: int, limit: int) -> None:
    if count < 1 or count > limit:
        raise ValueError(f"{layer_name}: {count} {what} requested, but this matrix has {limit} {what} "
                         f"(the budget must be between 1 and {limit})")
