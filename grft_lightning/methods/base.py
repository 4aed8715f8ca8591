"""What every method shares: freezing, eligible layers, the select() contract.

A method is a small typed config (its ``__init__`` arguments, which LightningCLI turns into
``--help`` text and YAML under ``class_path``) plus:

* ``apply(model)``: freeze the pre-trained weights, insert trainable deltas whose shapes are
  fixed by the budget (index buffers not yet filled), mark biases/head trainable; returns model.
* ``select(model, grads)``: fill the index buffers from accumulated gradients (or a seed).
* ``regularizer(model, images, features)``: an extra loss term, or ``None``.

Freezing is structural: the head is ``model.get_classifier()``, biases are those of
``nn.Linear``/``nn.Conv2d`` modules, norms are normalisation modules -- never a name substring.
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from grft_lightning.deltas import DeltaLayer, delta_layers, set_submodule

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
LAYER_TYPES = (nn.Linear, nn.Conv2d)


def classifier(model: nn.Module) -> nn.Module:
    """The (new) classification head of a timm model."""
    if not hasattr(model, "get_classifier"):
        raise TypeError(f"{type(model).__name__} has no get_classifier(): use a timm model")
    head = model.get_classifier()
    return head if isinstance(head, nn.Module) else nn.Identity()


def head_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in classifier(model).parameters()}


class Method:
    """Base class of all tuning methods.

    Args:
        targets: ``fnmatch`` patterns on module names selecting the eligible layers among the
            ``nn.Linear``/``nn.Conv2d`` modules outside the head (None: all of them).
        exclude: patterns removed from the eligible layers.
        tune_bias: train the bias of every ``nn.Linear``/``nn.Conv2d`` outside the head.
        tune_norm: train the affine parameters of normalisation layers (LayerNorm, BatchNorm).
    """

    needs_gradients: ClassVar[bool] = False
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
    ):
        self.targets = list(targets) if targets is not None else None
        self.exclude = list(exclude) if exclude is not None else []
        self.tune_bias = tune_bias
        self.tune_norm = tune_norm

    # -- config ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.tag

    def config(self) -> dict[str, Any]:
        """The ``__init__`` arguments, as they would appear under ``init_args`` in YAML."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self" and hasattr(self, k)}

    def class_path(self) -> str:
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- apply ------------------------------------------------------------------------------
    def eligible_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        head = classifier(model)
        head_modules = {id(m) for m in head.modules()}
        layers = []
        for name, module in model.named_modules():
            if type(module) not in LAYER_TYPES or id(module) in head_modules:
                continue
            if self.targets is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.targets):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                continue
            layers.append((name, module))
        return layers

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze the pre-trained model and insert this method's trainable parts; returns it."""
        if getattr(model, "peft_method", None) is not None:
            raise RuntimeError(f"a method ({model.peft_method!r}) was already applied to this model")
        head_ids = head_parameter_ids(model)
        for p in model.parameters():
            p.requires_grad_(False)
        self.inject(model)
        for module in model.modules():
            if self.tune_bias and isinstance(module, LAYER_TYPES) and getattr(module, "bias", None) is not None:
                if id(module.bias) not in head_ids:
                    module.bias.requires_grad_(True)
            if self.tune_norm and isinstance(module, NORM_TYPES):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
        for p in classifier(model).parameters():
            p.requires_grad_(True)
        model.peft_method = self
        return model

    def inject(self, model: nn.Module) -> None:
        """Insert this method's trainable modules (none for the simple baselines)."""

    def required_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The eligible layers; an error naming the patterns when there is none."""
        layers = self.eligible_layers(model)
        if not layers:
            raise ValueError(
                f"{type(self).__name__}: no eligible layer matched targets={self.targets}, exclude={self.exclude} "
                f"(eligible layers are nn.Linear/nn.Conv2d modules outside the head)"
            )
        return layers

    @staticmethod
    def _replace(model: nn.Module, layers: list[tuple[str, nn.Module]], make_delta) -> list[DeltaLayer]:
        created = []
        for name, layer in layers:
            delta = make_delta(name, layer)
            set_submodule(model, name, delta)
            created.append(delta)
        return created

    # -- select -----------------------------------------------------------------------------
    def select(self, model: nn.Module, grads: dict[str, torch.Tensor] | None = None, reselect: bool = False) -> None:
        """Fill the index buffers of every delta layer from accumulated gradients.

        Args:
            model: the model this method was applied to.
            grads: original weight name -> accumulated gradient (same shape as the weight).
            reselect: allow replacing an existing selection (its delta values are reset to 0).
        """
        layers = [layer for _, layer in delta_layers(model)]
        if not layers:
            return
        done = [layer.original_name for layer in layers if layer._is_selected]
        if done and not reselect:
            raise RuntimeError(
                f"select() was already called on this model ({len(done)} layers selected, e.g. {done[0]}); "
                "pass reselect=True to replace the selection"
            )
        if self.needs_gradients:
            self._check_grads(layers, grads)
        for layer in layers:
            grad = grads[f"{layer.original_name}.weight"] if self.needs_gradients else None
            self.select_layer(layer, grad)

    def _check_grads(self, layers: list[DeltaLayer], grads: dict[str, torch.Tensor] | None) -> None:
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

    def select_layer(self, layer: DeltaLayer, grad: torch.Tensor | None) -> None:
        """Fill one layer's indices (methods with deltas override this)."""

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


def check_count(layer_name: str, what: str, count: int, limit: int) -> None:
    if count < 1 or count > limit:
        raise ValueError(f"{layer_name}: {count} {what} requested, but this matrix has {limit} {what} "
                         f"(the budget must be between 1 and {limit})")
