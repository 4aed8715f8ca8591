"""The classification head: the one definition of which modules of a model are its new head.

A method trains the head in full and counts it apart (``accounting.py``); eligible layers, biases,
adapters and the loading of backbone weights leave it out. Which modules are the head is said
once, when the method selects (``method.select(model, grads, head=...)``), and the Selection
keeps it:

* an attribute path (``"classifier"`` on Hugging Face's ``BertForSequenceClassification``,
  ``"score"``, ``"head.fc"``), or a list of them;
* ``None``: the model has no new head (a language model whose output layer stays frozen or is
  tied to its input embeddings);
* not given (:data:`DEFAULT`): on a timm model ``model.get_classifier()`` (every module of it when
  it returns several, as DeiT's distilled ViTs do: :class:`HeadGroup`); a model without
  ``get_classifier()`` must name its head. The explicit form of that default is
  ``head=TIMM_HEAD``.

Nothing is stored on the model: the functions below take the head (``selection.head``) and, when
it is left out, fall back to ``get_classifier()`` when the model has one, and to no head otherwise.
"""

from __future__ import annotations

from typing import Union

from torch import nn

#: ``head=TIMM_HEAD``: the modules ``model.get_classifier()`` returns (the default on timm models).
TIMM_HEAD = "get_classifier()"

#: What ``head=`` takes: :data:`TIMM_HEAD`, an attribute path, a list of paths, or None.
HeadSpec = Union[str, list, None]


class _Default:
    """The ``head`` argument left out: the model's own ``get_classifier()`` (else no head)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


class HeadGroup(nn.Module):
    """Several head modules read as one head.

    ``get_classifier()`` of DeiT's distilled ViTs (and LeViT, PiT, EfficientFormer) returns a
    tuple, ``(head, head_dist)``: both are new layers of ``num_classes`` outputs, so both are
    trained and counted as head. The group is not called: the logits come from the model's own
    ``forward_head``, where each head reads its own token (``training/losses.py``,
    ``features_and_logits``). It only refers to the model's modules; the model itself is
    unchanged.
    """

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    @property
    def out_features(self) -> int:
        return getattr(self.heads[0], "out_features", 0)


def head_spec(model: nn.Module, head: HeadSpec | _Default = DEFAULT, required: bool = False) -> HeadSpec:
    """The head ``model`` is tuned with, as a spec (:data:`TIMM_HEAD`, a list of paths, or None).

    ``head`` given: checked against the model and returned (a path as a one-element list).
    Left out: :data:`TIMM_HEAD` on a model with ``get_classifier()``, else None; with
    ``required`` (``method.select``) a model without ``get_classifier()`` is an error that says
    how to name its head.
    """
    if isinstance(head, _Default):
        if hasattr(model, "get_classifier"):
            return TIMM_HEAD
        if required:
            raise ValueError(f"{type(model).__name__} has no get_classifier(), so its classification head is "
                             "unknown: name it by its attribute path, e.g. method.select(model, grads, head='classifier'), "
                             "or pass head=None for a model without a new head")
        return None
    if head is None or head == TIMM_HEAD:
        if head == TIMM_HEAD and not hasattr(model, "get_classifier"):
            raise ValueError(f"head={TIMM_HEAD!r}: {type(model).__name__} has no get_classifier(); name the head "
                             "by its attribute path instead")
        return head
    paths = [head] if isinstance(head, str) else list(head)
    for path in paths:
        if not isinstance(path, str) or not path:
            raise ValueError(f"head: expected attribute paths such as 'classifier', got {head!r}")
        try:
            model.get_submodule(path)
        except AttributeError:
            children = ", ".join(name for name, _ in model.named_children())
            raise ValueError(f"head={path!r}: {type(model).__name__} has no submodule {path!r} (its top-level "
                             f"modules: {children}); give the head's attribute path, or head=None") from None
    return paths


def head_modules(model: nn.Module, head: HeadSpec | _Default = DEFAULT) -> list[nn.Module]:
    """The head's modules (empty for a model without a new head)."""
    spec = head_spec(model, head)
    if spec is None:
        return []
    if spec == TIMM_HEAD:
        found = model.get_classifier()
        found = list(found) if isinstance(found, (tuple, list)) else [found]
        return [m for m in found if isinstance(m, nn.Module)]
    return [model.get_submodule(path) for path in spec]


def classifier(model: nn.Module, head: HeadSpec | _Default = DEFAULT) -> nn.Module:
    """The head as one module: itself, a :class:`HeadGroup` of several, ``nn.Identity`` for none."""
    modules = head_modules(model, head)
    if not modules:
        return nn.Identity()
    return modules[0] if len(modules) == 1 else HeadGroup(modules)


def head_parameter_ids(model: nn.Module, head: HeadSpec | _Default = DEFAULT) -> set[int]:
    """``id()`` of every parameter of the head."""
    return {id(p) for module in head_modules(model, head) for p in module.parameters()}


def head_module_ids(model: nn.Module, head: HeadSpec | _Default = DEFAULT) -> set[int]:
    """``id()`` of every module inside the head (the head's modules and their children)."""
    return {id(m) for module in head_modules(model, head) for m in module.modules()}


def head_parameter_names(model: nn.Module, head: HeadSpec | _Default = DEFAULT) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the head's parameters."""
    ids = head_parameter_ids(model, head)
    return {name for name, p in model.named_parameters() if id(p) in ids}


def num_classes(model: nn.Module, head: HeadSpec | _Default = DEFAULT) -> int:
    """Outputs of the head (0 when unknown or absent)."""
    return int(getattr(classifier(model, head), "out_features", 0) or 0)
