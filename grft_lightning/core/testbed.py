"""A small vision transformer pre-trained here: the offline testbed for the ViT methods.

``vit_convstem_w128d6_32`` is timm's own ``VisionTransformer`` (6 blocks, width 128, 4 heads,
MLP ratio 4, class token, 32 px input) whose patch embedding is a convolutional stem: three 3x3
convolutions of stride 2 (3 -> 24 -> 48 -> 96 channels, GroupNorm + GELU after each) and a 1x1
projection to the width, giving a 4 x 4 token grid. A plain 8 x 8 patchify stem stays on the
training plateau on small synthetic data; early convolutions remove that (Xiao et al. 2021,
"Early convolutions help transformers see better"). The stem lives in ``patch_embed``, which the
sparse methods exclude by default, so qkv / proj / fc1 / fc2 are where rows, columns and entries
are chosen, exactly as on ViT-B/16.

The model is registered with timm when ``grft_lightning`` is imported, so configs name it like any
timm model. Its pretrained tag ``glyphs62`` carries the normalisation used in pre-training
(mean = std = 0.5) and the 32 px input size; the weights come from a local file
(``model.weights: pkg://grft_lightning/weights/vit_convstem_w128d6_32.glyphs62.safetensors``,
written by ``scripts/pretrain_vit.py``; recipe and figures in ``docs/testbed_card.md``).
"""

from __future__ import annotations

from torch import nn

from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

NAME = "vit_convstem_w128d6_32"
TAG = "glyphs62"
WEIGHTS = f"pkg://grft_lightning/weights/{NAME}.{TAG}.safetensors"
STEM_CHANNELS = (24, 48, 96)


class ConvStem(PatchEmbed):
    """timm's ``PatchEmbed`` with its single patchify convolution replaced by a small conv stem.

    Keeps ``PatchEmbed``'s grid bookkeeping (``grid_size``, ``num_patches``, flattening), so the
    ``VisionTransformer`` around it is unchanged. The patch size must be 8 (three stride-2 convs).
    """

    def __init__(self, img_size=32, patch_size=8, in_chans=3, embed_dim=128, bias=True, **kwargs):
        if patch_size != 8:
            raise ValueError(f"ConvStem: patch_size must be 8 (three stride-2 convolutions), got {patch_size}")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         bias=bias, **kwargs)
        layers, channels = [], in_chans
        for out in STEM_CHANNELS:
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, out), nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, embed_dim, 1, bias=bias))
        self.proj = nn.Sequential(*layers)


default_cfgs = generate_default_cfgs({
    f"{NAME}.{TAG}": {
        "num_classes": 62,
        "input_size": (3, 32, 32),
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "first_conv": "patch_embed.proj.0",
        "classifier": "head",
        "license": "same as this repository",
    },
})


@register_model
def vit_convstem_w128d6_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT with a convolutional stem, width 128, depth 6, 32 px (1.26 M parameters)."""
    args = dict(img_size=32, patch_size=8, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0, embed_layer=ConvStem)
    return build_model_with_cfg(VisionTransformer, NAME, pretrained, **{**args, **kwargs})
