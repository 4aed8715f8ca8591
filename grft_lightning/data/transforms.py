"""Image transforms, sized and normalised from the backbone's own pretrained config.

Preprocessing is never hard-coded: mean, std, input size and interpolation are what timm's
``resolve_data_config`` reads from the pretrained config of the backbone name. Both ViT-B/16 ImageNet-21k checkpoints in use normalise
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
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, str_to_interp_mode
from torchvision import transforms as T

IMAGENET_MEAN = IMAGENET_DEFAULT_MEAN
IMAGENET_STD = IMAGENET_DEFAULT_STD


@dataclass(frozen=True)
class DataConfig:
    """What a transform needs to know about the backbone."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    image_size: int = 224
    interpolation: str = "bicubic"


def resolve_data_config(backbone: str | None, image_size: int | None = None) -> DataConfig:
    """Mean/std/size/interpolation of ``backbone``: timm's ``resolve_data_config`` on its pretrained config.

    Works offline: it reads timm's registry, it does not create the model or touch the hub.
    Deprecated names are first mapped to the name timm creates for them
    (``timm.models.get_deprecated_models``). A name timm does not know gets timm's defaults (the
    ImageNet statistics, 224 px, bicubic). ``image_size`` overrides the config's input size (e.g.
    64 px for the CPU demo). timm's ``crop_pct`` is not used: the FGVC evaluation crop is the
    recipe's fixed 248/224 (:func:`fgvc_eval_transform`).
    """
    from timm.data import resolve_data_config as timm_data_config
    from timm.models import PretrainedCfg, get_deprecated_models, get_pretrained_cfg

    pretrained = None
    if backbone:
        name = get_deprecated_models().get(backbone) or backbone
        pretrained = get_pretrained_cfg(name, allow_unregistered=True)
    pretrained = (pretrained or PretrainedCfg()).to_dict()
    args = {} if image_size is None else {"img_size": int(image_size)}
    resolved = timm_data_config(args=args, pretrained_cfg=pretrained)
    return DataConfig(mean=tuple(resolved["mean"]), std=tuple(resolved["std"]),
                      image_size=int(resolved["input_size"][-1]), interpolation=resolved["interpolation"])


def _interp(name: str) -> T.InterpolationMode:
    return str_to_interp_mode(name)  # timm's configs say "bicubic" or "bilinear"


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


class OneView:
    """One deterministic view, shaped as SupCon's views (``(1, C, H, W)``): the positives of an
    image are then the other images of its label."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        return self.transform(image).unsqueeze(0)
