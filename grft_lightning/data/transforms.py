"""Image transforms, sized and normalised from the backbone's own pretrained config.

Preprocessing is never hard-coded: mean, std, input size and interpolation come from timm's
pretrained config of the backbone name. Both ViT-B/16 ImageNet-21k checkpoints in use normalise
with mean = std = 0.5 there: ``vit_base_patch16_224.augreg_in21k`` (GPS, SSF) and
``vit_base_patch16_224.orig_in21k`` (the original Google ``ViT-B_16.npz``, trained on inputs in
[-1, 1]; VPT, NOAH and SPT fed it the ImageNet statistics instead, which is not what timm's config
says). Swin-B, ConvNeXt-B and the ImageNet CNNs use the ImageNet statistics. A deprecated timm
spelling such as ``vit_base_patch16_224_in21k`` (the GPS and SSF scripts') has no config of its
own: it is first resolved to the name timm creates for it (``.augreg_in21k``), so it gets that
checkpoint's normalisation, not the ImageNet default (docs/data.md, "Normalisation").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """What a transform needs to know about the backbone."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    image_size: int = 224
    interpolation: str = "bicubic"


def resolve_data_config(backbone: str | None, image_size: int | None = None) -> DataConfig:
    """Read mean/std/size/interpolation from timm's pretrained config of ``backbone``.

    Works offline: it reads timm's registry, it does not create the model or touch the hub.
    Deprecated names are resolved through timm's mapping first
    (:func:`grft_lightning.backbones.resolve_model_name`). ``image_size`` overrides the config's
    input size (e.g. 64 px for the CPU demo).
    """
    cfg = DataConfig()
    if backbone:
        from timm.models import get_pretrained_cfg

        from grft_lightning.backbones import resolve_model_name

        pretrained = get_pretrained_cfg(resolve_model_name(backbone), allow_unregistered=True)
        if pretrained is None:  # a name without a pretrained tag that timm does not know
            pretrained_dict = {}
        else:
            pretrained_dict = pretrained.to_dict()
        size = pretrained_dict.get("input_size", (3, cfg.image_size, cfg.image_size))[-1]
        cfg = DataConfig(
            mean=tuple(pretrained_dict.get("mean", cfg.mean)),
            std=tuple(pretrained_dict.get("std", cfg.std)),
            image_size=int(size),
            interpolation=pretrained_dict.get("interpolation", cfg.interpolation) or "bicubic",
        )
    if image_size is not None:
        cfg = DataConfig(cfg.mean, cfg.std, int(image_size), cfg.interpolation)
    return cfg


def _interp(name: str) -> T.InterpolationMode:
    return {
        "bicubic": T.InterpolationMode.BICUBIC,
        "bilinear": T.InterpolationMode.BILINEAR,
        "nearest": T.InterpolationMode.NEAREST,
    }.get(name, T.InterpolationMode.BICUBIC)


def _to_tensor(cfg: DataConfig) -> list:
    return [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]


def resize_transform(cfg: DataConfig) -> T.Compose:
    """VTAB protocol: plain resize to the input size, no augmentation (train and eval)."""
    return T.Compose(
        [T.Resize((cfg.image_size, cfg.image_size), interpolation=_interp(cfg.interpolation))]
        + _to_tensor(cfg)
    )


def fgvc_train_transform(cfg: DataConfig) -> T.Compose:
    """FGVC recipe: random resized crop to the input size and a horizontal flip."""
    return T.Compose(
        [
            T.RandomResizedCrop(cfg.image_size, interpolation=_interp(cfg.interpolation)),
            T.RandomHorizontalFlip(),
        ]
        + _to_tensor(cfg)
    )


def fgvc_eval_transform(cfg: DataConfig) -> T.Compose:
    """FGVC recipe: resize to 248/224 of the input size, then center crop (248 -> 224 on ViT-B)."""
    resize = int(round(cfg.image_size * 248 / 224))
    return T.Compose(
        [T.Resize(resize, interpolation=_interp(cfg.interpolation)), T.CenterCrop(cfg.image_size)]
        + _to_tensor(cfg)
    )


def supcon_view_transform(cfg: DataConfig) -> T.Compose:
    """One augmented view for GPS's supervised-contrastive selection loss (docs/methods.md)."""
    return T.Compose(
        [
            T.RandomResizedCrop(cfg.image_size, scale=(0.08, 1.0), interpolation=_interp(cfg.interpolation)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        + _to_tensor(cfg)
    )


class TwoViews:
    """Apply a transform twice to the same image: the two views SupCon contrasts."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.transform(image), self.transform(image)])
