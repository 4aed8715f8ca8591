"""Backbones: timm models by name, with weights from timm's hub cache or a local file.

Names carry the weights' provenance (``arch.pretrain_tag``, e.g.
``vit_base_patch16_224.augreg_in21k``); it is recorded in every run. Deprecated timm spellings
(``vit_base_patch16_224_in21k``) are read as the name timm maps them to (:func:`resolve_model_name`). A local file is used
instead of the hub with ``weights: PATH``:

* ``timm`` layout (keys as in the timm model): loaded through timm's
  ``pretrained_cfg_overlay=dict(file=PATH)``, which keeps timm's head adaptation when
  ``num_classes`` differs and resamples position embeddings for another ``image_size``.
* ``ordered`` layout (e.g. torchvision's MobileNetV2 ``.pth`` for timm ``mobilenetv2_100``):
  tensors are paired with the model's in order (``num_batches_tracked`` aside), every shape must
  be equal, and the trailing head tensors are dropped.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import nn

from grft_lightning.core.errors import WeightsUnavailable
from grft_lightning.core.heads import head_parameter_names
from grft_lightning.core.paths import resolve_path

WeightsFormat = Literal["auto", "timm", "ordered"]


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.weights: file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"model.weights: cannot read {path} ({err})") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.weights: {path} does not hold a state dict of tensors")
    return state


def resolve_model_name(name: str) -> str:
    """The current timm name of ``name``: deprecated spellings map to ``arch.pretrained_tag``.

    Older scripts (GPS's, SSF's) say ``vit_base_patch16_224_in21k``; timm creates
    ``vit_base_patch16_224.augreg_in21k`` for it (with a warning) and holds no pretrained config
    under the old name. The tag decides the weights and their preprocessing, so read it here.
    A name timm does not list as deprecated is returned unchanged.
    """
    try:
        from timm.models import get_deprecated_models
    except ImportError:  # a timm without the deprecation registry
        return name
    return get_deprecated_models().get(name) or name


def load_ordered(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Pair ``state``'s tensors with the model's in order; drop the head; shapes must match."""
    skip = "num_batches_tracked"
    head = head_parameter_names(model)  # every head module (DeiT distilled: two)
    target = [(k, v) for k, v in model.state_dict().items() if not k.endswith(skip) and k not in head]
    source = [(k, v) for k, v in state.items() if not k.endswith(skip)]
    if len(source) < len(target):
        raise ValueError(f"model.weights: {path} has {len(source)} tensors, the backbone needs {len(target)} "
                         "(is it the right architecture?)")
    mapped = {}
    for i, ((tk, tv), (sk, sv)) in enumerate(zip(target, source)):
        if tuple(tv.shape) != tuple(sv.shape):
            raise ValueError(f"model.weights: {path} does not match the backbone at tensor #{i}: "
                             f"file {sk} {tuple(sv.shape)} vs model {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    left = [k for k in missing if k not in head and not k.endswith(skip)]
    if left or unexpected:
        raise ValueError(f"model.weights: {path} left tensors unloaded: {left[:3]} {unexpected[:3]}")


def _is_timm_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    keys = set(model.state_dict()) - head_parameter_names(model)
    return keys.issubset(state.keys())


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    weights: str | None = None,
    weights_format: WeightsFormat = "auto",
    drop_path_rate: float = 0.0,
    image_size: int | None = None,
) -> nn.Module:
    """A timm model with a new ``num_classes`` head and pre-trained weights.

    Args:
        name: timm model name, with its pretrained tag.
        num_classes: classes of the new head.
        pretrained: load pre-trained weights (from ``weights`` if given, else timm's hub/cache).
        weights: local weight file (``.pth``/``.bin``/``.safetensors``), see module docstring.
        weights_format: ``auto`` (timm keys if they match, else ``ordered``), ``timm``, ``ordered``.
        drop_path_rate: stochastic depth rate (models that support it).
        image_size: input size for models with a fixed size (ViTs); CNNs take any size.
    """
    import timm

    kwargs = {"num_classes": num_classes}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    cfg = timm.models.get_pretrained_cfg(resolve_model_name(name), allow_unregistered=True)
    if image_size is not None and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = image_size
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights is None:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [""])[0]
            raise WeightsUnavailable(
                f"model.backbone: could not load pre-trained weights for {name!r} from the hub or its cache "
                f"({type(err).__name__}: {reason}); offline, give a local weight file with --model.weights PATH, "
                "or train from random weights with --model.pretrained false") from err
    weights = resolve_path(weights, "model.weights")
    state = _read_state_dict(weights)
    model = timm.create_model(name, pretrained=False, **kwargs)
    fmt = weights_format
    if fmt == "auto":
        fmt = "timm" if _is_timm_layout(model, state) else "ordered"
    if fmt == "ordered":
        load_ordered(model, state, weights)
        return model
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights}, **kwargs)
    except Exception as err:
        raise ValueError(f"model.weights: {weights} does not fit backbone {name!r} ({err})") from err


def _meta_forward(name: str, image_size: int, fixed: bool) -> None:
    """Build ``name`` on the meta device (no memory, no weights) and run one forward pass of a
    ``(2, 3, image_size, image_size)`` batch: shapes propagate as in a real pass."""
    import timm

    kwargs = {"img_size": image_size} if fixed else {}
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=2, **kwargs)
    model.eval()
    with torch.no_grad():
        model(torch.empty(2, 3, image_size, image_size, device="meta"))


def check_image_size(name: str, image_size: int | None) -> None:
    """Refuse an ``image_size`` the backbone cannot take, before any weights are loaded.

    The model is built on the meta device and given one batch of that size (a fraction of a
    second, no memory), which finds what a real forward pass would: a ViT's patch size that does
    not divide the size, a convolutional stem whose token grid does not match its position
    embedding, a size smaller than a patch. Only a failure at ``image_size`` where the
    backbone's own pretrained size passes is reported; a backbone timm does not know, or one
    that cannot run on the meta device at all, is left to the real build.

    Raises:
        ConfigError: naming ``model.image_size``, the backbone, the reason and the sizes it takes.
    """
    if image_size is None:
        return
    import timm

    from grft_lightning.core.errors import ConfigError

    name = resolve_model_name(name)
    if image_size < 1:
        raise ConfigError(f"model.image_size must be a positive number of pixels, got {image_size}")
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    except Exception:  # noqa: BLE001 - an unknown name is reported by the real build
        return
    default = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else None
    fixed = bool(cfg is not None and cfg.fixed_input_size)
    if default == image_size:
        return
    try:
        _meta_forward(name, image_size, fixed)
        return
    except Exception as err:  # noqa: BLE001 - judged below against the pretrained size
        failure = err
    if default is None:
        return
    try:
        _meta_forward(name, default, fixed)
    except Exception:  # noqa: BLE001 - the meta check does not work for this model
        return
    reason = " ".join((str(failure).strip() or type(failure).__name__).split())
    hint = f"its pretrained size is {default}"
    patch = _patch_size(name)
    if patch:
        hint += f"; sizes that are a multiple of its patch size {patch} fit"
    raise ConfigError(f"model.image_size: backbone {name!r} cannot take {image_size} px images "
                      f"({type(failure).__name__}: {reason}); {hint}")


def _patch_size(name: str) -> int | None:
    """The patch size of a ViT-like timm model (its ``patch_embed.patch_size``), else None."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=2)
    except Exception:  # noqa: BLE001
        return None
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(size, (tuple, list)) and size:
        size = size[0]
    return int(size) if isinstance(size, int) else None
