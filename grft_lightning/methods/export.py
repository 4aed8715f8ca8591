"""Export and import of the tuned values only (safetensors).

File layout: ``selection/<layer>/<key>`` for the Selection (indices and the scores they were
ranked by, ``selection.py``), ``delta/<layer>/<key>`` for each selectable layer's values,
``param/<name>`` for every other trainable tensor (biases, head, norms, LoRA/adapter weights),
``buffer/<name>`` for BatchNorm running statistics (they change during training and the logits
depend on them); :func:`split_tuned` is the one reader of these keys. The metadata holds the
method's ``class_path`` and ``init_args`` (a registered method only: ``methods.REGISTRY``) and the
Selection's description, so that ``load_tuned`` can rebuild the deltas on a fresh pre-trained
model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from grft_lightning.core.deltas import selectable_layers
from grft_lightning.core.heads import TIMM_HEAD, head_spec, num_classes
from grft_lightning.core.io import atomic_path
from grft_lightning.methods.base import Method
from grft_lightning.core.selection import Selection

FORMAT = "grft-lightning/tuned/2"
#: the sections of a tuned file's keys (``<section>/...``)
SECTIONS = ("selection", "delta", "param", "buffer")


def _tuned_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    owned: set[int] = set()
    for path, layer in selectable_layers(model):
        owned.update(id(p) for p in layer.added_parameters())
        for key, value in layer.export_tensors().items():
            tensors[f"delta/{path}/{key}"] = value
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in owned:
            tensors[f"param/{name}"] = p.detach()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            tensors[f"buffer/{name}.running_mean"] = module.running_mean
            tensors[f"buffer/{name}.running_var"] = module.running_var
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_tuned(model: nn.Module, path: str | os.PathLike, method: Method, selection: Selection,
               metadata: dict[str, Any] | None = None) -> str:
    """Write the method's configuration, the Selection and only the tuned values to ``path``
    (atomically).

    Args:
        model: the model ``method.apply(model, selection)`` returned (trained or not).
        path: target ``.safetensors`` file.
        method: the method applied.
        selection: the selection it was applied with.
        metadata: extra facts (backbone tag, dataset, budget, ...), stored as JSON strings.
    """
    from safetensors.torch import save_file

    held = [layer.original_name for _, layer in selectable_layers(model)]
    if held != list(selection.active()):
        missing = [name for name in selection.active() if name not in held]
        raise ValueError(f"save_tuned: the selection tunes {len(selection.active())} layers, but the model holds "
                         f"{len(held)} selectable layers"
                         + (f" (none for {missing[0]})" if missing else "")
                         + "; save the model method.apply(model, selection) returned, before merge()")
    state = selection.state_dict()
    meta = {
        "format": FORMAT,
        "method_class": method.class_path(),
        "method_args": json.dumps(method.config()),
        "num_classes": str(num_classes(model, selection.head)),
        "selection": json.dumps(state["meta"]),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    tensors = _tuned_tensors(model)
    tensors.update({f"selection/{key}": value for key, value in state["tensors"].items()})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return str(path)


def read_tuned(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a tuned file, with a clear error for truncated or foreign files."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"tuned-parameter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path}: not a readable safetensors file ({err}); it may be truncated or damaged") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a grft-lightning tuned file (metadata format={meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return tensors, meta


def split_tuned(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """A tuned file's tensors by section: ``{"selection": {key: tensor}, "delta": {layer path: {key:
    tensor}}, "param": {name: tensor}, "buffer": {name: tensor}}`` (the key layout in the module
    docstring)."""
    sections: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in tensors.items():
        section, _, rest = key.partition("/")
        if section not in sections:
            raise ValueError(f"tuned file key {key!r}: expected one of {', '.join(f'{s}/...' for s in SECTIONS)}")
        if section == "delta":
            layer_path, _, item = rest.rpartition("/")
            sections["delta"].setdefault(layer_path, {})[item] = value
        elif section == "selection":
            sections["selection"][rest] = value
        else:
            sections[section][rest] = value
    return sections


def method_from_metadata(meta: dict[str, str], source: str = "tuned file") -> Method:
    """The method a tuned file names: only a registered class (``grft_lightning.methods.REGISTRY``)
    with plain JSON arguments; nothing the file names is imported or called otherwise."""
    from grft_lightning.methods import method_from_config

    try:
        args = json.loads(meta.get("method_args", "{}"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: its method_args metadata is not JSON ({err})") from err
    return method_from_config(meta.get("method_class"), args, source)


def read_selection(path: str | os.PathLike) -> tuple[Method, Selection]:
    """The method (a registered one: nothing else is built) and the Selection a tuned file holds."""
    tensors, meta = read_tuned(path)
    return _method_and_selection(tensors, meta, str(path))


def _method_and_selection(tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str) -> tuple[Method, Selection]:
    method = method_from_metadata(meta, source)  # first: the file names a registered method or nothing happens
    state = {"meta": meta.get("selection", "{}"), "tensors": split_tuned(tensors)["selection"]}
    return method, Selection.from_state_dict(state, source)


def load_tuned(base_model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a tuned model from a fresh pre-trained backbone and a :func:`save_tuned` file.

    The method the file names is applied with the file's Selection (and its head). A timm head is
    re-created for the file's number of classes when it differs; another model must be built with
    that many outputs. Returns the model (modified in place) with the tuned values loaded;
    :func:`read_selection` gives the method and the Selection.
    """
    tensors, meta = read_tuned(path)
    method, selection = _method_and_selection(tensors, meta, str(path))
    head = head_spec(base_model, selection.head)
    classes = int(meta.get("num_classes", 0))
    if classes and num_classes(base_model, head) not in (0, classes):
        if head != TIMM_HEAD:
            raise ValueError(f"{path}: saved with a head of {classes} outputs, this model's head has "
                             f"{num_classes(base_model, head)}; build the model with {classes} outputs")
        base_model.reset_classifier(classes)
    try:
        method.apply(base_model, selection)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    layers = dict(selectable_layers(base_model))
    sections = split_tuned(tensors)
    for section in ("param", "buffer"):
        table = dict(base_model.named_parameters() if section == "param" else base_model.named_buffers())
        for name, value in sections[section].items():
            if name not in table or table[name].shape != value.shape:
                found = tuple(table[name].shape) if name in table else "absent"
                raise ValueError(f"{path}: {section}/{name} of shape {tuple(value.shape)} does not fit the model "
                                 f"({found}); was it saved from another backbone?")
            with torch.no_grad():
                table[name].copy_(value)
    for layer_path, items in sections["delta"].items():
        if layer_path not in layers:
            raise ValueError(f"{path}: delta for {layer_path} but the rebuilt model has no such delta layer")
        try:
            layers[layer_path].import_tensors(items)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
    missing = [name for name, layer in layers.items() if layer.added_parameters() and name not in sections["delta"]]
    if missing:
        raise ValueError(f"{path}: no delta values for {len(missing)} layer{'s' if len(missing) > 1 else ''} the "
                         f"selection tunes ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                         "the file is incomplete")
    return base_model
