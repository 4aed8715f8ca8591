"""What every method shares: the two stages, select then apply, and structural freezing.

A method is configuration only: its ``__init__`` arguments (which LightningCLI turns into
``--help`` text and YAML under ``class_path``), stored under their own names, and no run-time
state. It provides:

* ``select(model, grads=None, head=..., seed=...) -> Selection``: which weight entries to tune,
  from the pre-trained model and the accumulated gradients (or a seed, for the random draws).
  Methods without a selection (full, linear, BitFit, LoRA, adapters) return an empty one that
  records the head.
* ``apply(model, selection) -> model``: freeze the pre-trained weights, build the trainable parts
  from the selection (deltas of exactly its sizes), mark biases/head trainable. Nothing is stored
  on the model except the replaced layers.
* ``regularizer(model, images, features, reference)``: an extra loss term, or ``None``.
* ``on_before_optimizer_step`` / ``on_after_optimizer_step``: hooks around every optimizer step.

Freezing is structural: the head is the module the selection records (``heads.py``: timm's
``model.get_classifier()`` by default, every module of it when it returns several, as DeiT's
distilled models do), biases are those of the eligible layers' types, norms are normalisation
modules -- never a name substring. The one exception is opt-in: ``tune_params`` names further
pre-trained tensors to train in full (e.g. layer scales, Swin's relative-position bias tables,
which GPS's public code trains because of their names).
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from grft_lightning.core.accounting import backbone_parameter_count
from grft_lightning.core.deltas import DeltaLayer, SelectableLayer, selectable_layers, set_submodule
from grft_lightning.core.layers import eligible_layers, is_layer, matrix_shape
from grft_lightning.core.recompute import track_layer_inputs
from grft_lightning.core.heads import DEFAULT, classifier, head_parameter_ids, head_spec
from grft_lightning.core.selection import Selection

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)

__all__ = ["Method", "NORM_TYPES"]


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

    #: the selection pass needs accumulated gradients (a data pass before training)
    needs_gradients: ClassVar[bool] = False
    #: what the selection pass sums (``accumulate_gradients``' ``reduction``); GRFT's ``score`` changes it
    gradient_reduction: str = "sum"
    #: the method's name (:attr:`name`; GRFT and RandomRows add their mode: ``grft_row``,
    #: ``random_column``), which is also its config file's name: results.json ``method``, run
    #: directories, report rows
    tag: ClassVar[str] = "method"
    #: arguments left out of :meth:`config` while they hold these (default) values, so that a run's
    #: config, checkpoints and tuned files read as before the option existed
    QUIET_DEFAULTS: ClassVar[dict[str, Any]] = {}

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
        """The ``__init__`` arguments, as they would appear under ``init_args`` in YAML.

        Every argument is stored under its own name (a method that stored one elsewhere would
        lose it from checkpoints; that is refused here rather than dropped).
        """
        params = [k for k in inspect.signature(type(self).__init__).parameters if k != "self"]
        missing = [k for k in params if not hasattr(self, k)]
        if missing:
            raise TypeError(f"{type(self).__name__} keeps no attribute for its argument(s) {missing}: a method stores "
                            "every __init__ argument under its own name")
        config = {k: getattr(self, k) for k in params}
        for key, value in self.QUIET_DEFAULTS.items():
            if key in config and config[key] == value:
                del config[key]
        return config

    def class_path(self) -> str:
        """The class path files record: ``grft_lightning.methods.<Name>`` for the package's methods
        (so that a file does not depend on which module defines the class), the defining module's
        path for any other."""
        cls = type(self)
        if cls.__module__.startswith("grft_lightning.methods."):
            return f"grft_lightning.methods.{cls.__qualname__}"
        return f"{cls.__module__}.{cls.__qualname__}"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- select -----------------------------------------------------------------------------
    def eligible_layers(self, model: nn.Module, head=DEFAULT) -> list[tuple[str, nn.Module]]:
        """This method's layers: :func:`~grft_lightning.core.layers.eligible_layers` with its
        ``targets``, ``exclude`` and the head."""
        return eligible_layers(model, self.targets, self.exclude, head)

    def required_layers(self, model: nn.Module, head=DEFAULT) -> list[tuple[str, nn.Module]]:
        """The eligible layers; an error naming the patterns when there is none."""
        layers = self.eligible_layers(model, head)
        if not layers:
            raise ValueError(
                f"{type(self).__name__}: no eligible layer matched targets={self.targets}, exclude={self.exclude} "
                f"(eligible layers are nn.Linear/nn.Conv2d modules, subclasses included, and transformers' Conv1D, "
                f"outside the head)"
            )
        return layers

    def gradient_names(self, model: nn.Module, head=DEFAULT) -> list[str]:
        """The weights whose accumulated gradients :meth:`select` reads (``accumulate_gradients``'
        ``names``)."""
        return [f"{name}.weight" for name, _ in self.required_layers(model, head_spec(model, head, required=True))]

    def select(self, model: nn.Module, grads: dict[str, torch.Tensor] | None = None, head=DEFAULT,
               seed: int | None = None) -> Selection:
        """What to tune, from the pre-trained ``model`` (before :meth:`apply`).

        Args:
            model: any PyTorch model (timm, Hugging Face transformers, your own).
            grads: original weight name -> accumulated gradient (``accumulate_gradients``), for the
                methods with ``needs_gradients``.
            head: the new classification head, trained in full and counted apart: its attribute
                path (``"classifier"``), a list of paths, or None for a model without a new head.
                Left out: timm's ``model.get_classifier()``; other models must name it.
            seed: the seed of a random draw (the random ablations; others ignore it).
        """
        return Selection({}, None, {}, head_spec(model, head, required=True))

    def _check_grads(self, layers: list[tuple[str, nn.Module]], grads: dict[str, torch.Tensor] | None) -> None:
        if grads is None:
            raise ValueError(f"{type(self).__name__}.select needs accumulated gradients (got None)")
        problems = []
        for name, layer in layers:
            key = f"{name}.weight"
            expected = tuple(layer.weight.shape)
            if key not in grads:
                problems.append(f"missing gradient for {key} (shape {expected})")
            elif tuple(grads[key].shape) != expected:
                problems.append(f"gradient for {key} has shape {tuple(grads[key].shape)}, expected {expected}")
        if problems:
            raise ValueError(f"{type(self).__name__}.select: " + "; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))

    @staticmethod
    def backbone_parameters(model: nn.Module, head) -> int:
        """The parameter count a ``fraction`` budget refers to (``accounting.backbone_parameter_count``)."""
        return backbone_parameter_count(model, head)

    # -- apply ------------------------------------------------------------------------------
    def apply(self, model: nn.Module, selection: Selection | None = None) -> nn.Module:
        """Freeze the pre-trained model and build this method's trainable parts; returns it.

        Args:
            model: the pre-trained model :meth:`select` read.
            selection: what :meth:`select` returned (None: select without gradients or seed, for
                the methods that need neither; a method that needs a selection refuses None).
        """
        if any(True for _ in selectable_layers(model)):
            raise RuntimeError("a method was already applied to this model (it holds selectable layers)")
        if selection is None:
            selection = self.select(model)
        head = head_spec(model, selection.head, required=True)
        head_ids = head_parameter_ids(model, head)
        extra = self._named_extra_parameters(model, head_ids)
        for p in model.parameters():
            p.requires_grad_(False)
        self.inject(model, selection)
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
        for p in classifier(model, head).parameters():
            p.requires_grad_(True)
        return model

    def inject(self, model: nn.Module, selection: Selection) -> None:
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

    @staticmethod
    def _replace(model: nn.Module, selection: Selection, make_layer) -> list[SelectableLayer]:
        """Wrap every layer the selection tunes (``selection.active()``) by ``make_layer(name,
        layer, layer_selection)``."""
        created = []
        for name, chosen in selection.active().items():
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"the selection names layer {name!r}, which this {type(model).__name__} does not "
                                 "have; was it made on another model?") from None
            if not is_layer(layer) or tuple(matrix_shape(layer)) != tuple(chosen.shape):
                raise ValueError(f"the selection's layer {name!r} is a {tuple(chosen.shape)} matrix; this model's is "
                                 f"{type(layer).__name__} {tuple(matrix_shape(layer)) if is_layer(layer) else ''}; "
                                 "was it made on another model?")
            wrapped = make_layer(name, layer, chosen)
            set_submodule(model, name, wrapped)
            created.append(wrapped)
        if any(isinstance(layer, DeltaLayer) for layer in created):
            track_layer_inputs(model)  # deltas keep a LayerNorm's or GELU's input, not its output
        return created

    # -- training ---------------------------------------------------------------------------
    def regularizer(self, model: nn.Module, images: torch.Tensor, features: torch.Tensor,
                    reference: nn.Module | None = None) -> torch.Tensor | None:
        """Extra loss term added to the task loss (logged separately); None for most methods.
        ``reference`` is the frozen pre-trained model, for the methods whose
        :meth:`needs_reference` is true (the caller holds it)."""
        return None

    def needs_reference(self) -> bool:
        """Whether :meth:`regularizer` compares with a frozen copy of the pre-trained model."""
        return False

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
