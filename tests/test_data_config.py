"""Normalisation and input size of every backbone the configs use (grft_lightning.data.transforms):
timm's ``resolve_data_config`` gives exactly the constants the project's runs have used."""

from __future__ import annotations

import pytest
from torchvision import transforms as T

import grft_lightning  # noqa: F401  (registers the testbed model)
from grft_lightning.data.transforms import fgvc_eval_transform, resize_transform, resolve_data_config

HALF = (0.5, 0.5, 0.5)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

EXPECTED = {  # name: (mean, std, image size, interpolation), as the runs so far were normalised
    "vit_convstem_w128d6_32.glyphs62": (HALF, HALF, 32, "bilinear"),  # the testbed
    "vit_base_patch16_224.augreg_in21k": (HALF, HALF, 224, "bicubic"),
    "vit_base_patch16_224.orig_in21k": (HALF, HALF, 224, "bicubic"),
    "vit_base_patch16_224_in21k": (HALF, HALF, 224, "bicubic"),  # deprecated spelling: .augreg_in21k
    "swin_base_patch4_window7_224.ms_in22k": (*IMAGENET, 224, "bicubic"),
    "swin_base_patch4_window7_224_in22k": (*IMAGENET, 224, "bicubic"),
    "convnext_base.fb_in22k": (*IMAGENET, 224, "bicubic"),
    "mobilenetv2_100": (*IMAGENET, 224, "bicubic"),
    "resnet50.tv_in1k": (*IMAGENET, 224, "bilinear"),
    "test_vit": (HALF, HALF, 160, "bicubic"),
    "no_such_model": (*IMAGENET, 224, "bicubic"),  # unknown to timm: the defaults
    None: (*IMAGENET, 224, "bicubic"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_data_config_constants(name):
    mean, std, size, interpolation = EXPECTED[name]
    cfg = resolve_data_config(name)
    assert (cfg.mean, cfg.std, cfg.image_size, cfg.interpolation) == (mean, std, size, interpolation)
    assert all(type(v) is float for v in cfg.mean + cfg.std) and type(cfg.image_size) is int
    small = resolve_data_config(name, image_size=64)  # the CPU demo's override
    assert (small.mean, small.std, small.image_size, small.interpolation) == (mean, std, 64, interpolation)


def test_transforms_take_the_config():
    cfg = resolve_data_config("vit_convstem_w128d6_32.glyphs62")
    resize, *_, normalize = resize_transform(cfg).transforms
    assert resize.size == (32, 32) and resize.interpolation == T.InterpolationMode.BILINEAR
    assert tuple(normalize.mean) == HALF and tuple(normalize.std) == HALF
    resize, crop, *_ = fgvc_eval_transform(resolve_data_config("vit_base_patch16_224.augreg_in21k")).transforms
    assert (resize.size, crop.size) == (248, (224, 224)) and resize.interpolation == T.InterpolationMode.BICUBIC
