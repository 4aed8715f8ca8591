"""Backbones beyond ViT: layers that subclass nn.Linear/nn.Conv2d (BiT's StdConv2d), heads that
come as a tuple (DeiT distilled), Swin's relative-position bias tables and ConvNeXt's layer
scales (frozen unless ``tune_params`` names them), and the Swin-B / ConvNeXt-B configs. Tiny
variants with random weights on the CPU; the full-size counts on the meta device."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning import accumulate_gradients, load_tuned, merge, save_tuned
from grft_lightning.core.accounting import count_parameters
from grft_lightning.training.losses import features_and_logits
from grft_lightning.core.deltas import StructuredDelta, selectable_layers
from grft_lightning.core.layers import ROW, eligible_layers, has_plain_forward, is_layer
from grft_lightning.core.gradients import default_gradient_targets
from grft_lightning.core.heads import TIMM_HEAD, HeadGroup, classifier
from grft_lightning.methods import GPS, GRFT, BitFit, GPSMasked, Linear, LoRA, RandomRows
from grft_lightning.methods import base as methods_base
from tuning import tune, zero_grads

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_bit(seed: int = 0) -> nn.Module:
    """timm ``resnetv2_50x1_bit`` (StdConv2d everywhere) with narrow stages."""
    from timm.layers import GroupNormAct

    torch.manual_seed(seed)
    return timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=5, channels=(16, 32, 48, 64),
                             stem_chs=16, norm_layer=functools.partial(GroupNormAct, num_groups=4))


def tiny_deit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=5, img_size=32,
                             patch_size=8, depth=2, embed_dim=32, num_heads=2)


def tiny_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=5, img_size=32,
                             window_size=2, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2))


def tiny_convnext(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("convnext_base", pretrained=False, num_classes=5, depths=(1, 1, 1, 1),
                             dims=(8, 16, 32, 64))


def ce(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def batch(n: int = 4, size: int = 32):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size), torch.randint(0, 5, (n,))


def standardised(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Weight standardisation by hand: zero mean, unit variance per output channel."""
    flat = weight.reshape(weight.shape[0], -1)
    mean, var = flat.mean(1, keepdim=True), flat.var(1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).view_as(weight)


# -- one definition of the eligible layers -------------------------------------------------------
def test_layer_types_have_one_definition():
    assert methods_base.is_layer is is_layer
    defining = [p.relative_to(REPO).as_posix() for p in sorted((REPO / "grft_lightning").rglob("*.py"))
                if "(nn.Linear, nn.Conv2d)" in p.read_text() or "LAYER_TYPES = " in p.read_text()]
    assert defining == ["grft_lightning/core/layers.py"]


def test_subclasses_are_eligible_and_multihead_attention_is_not():
    from timm.layers import Conv2dSame, StdConv2d
    from timm.layers import Linear as TimmLinear

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.std = StdConv2d(3, 4, 3)
            self.same = Conv2dSame(4, 4, 3, stride=2)
            self.lin = TimmLinear(4, 4)
            self.attn = nn.MultiheadAttention(4, 1)
            self.head = nn.Linear(4, 2)

        def get_classifier(self):
            return self.head

    net = Net()
    assert [name for name, _ in eligible_layers(net)] == ["std", "same", "lin"]
    assert set(default_gradient_targets(net)) == {"std.weight", "same.weight", "lin.weight"}
    assert not has_plain_forward(net.std) and not has_plain_forward(net.same)
    assert has_plain_forward(net.lin) and has_plain_forward(nn.Conv2d(1, 1, 1))


# -- BiT: StdConv2d --------------------------------------------------------------------------------
def test_bit_layers_are_found_and_scored_without_a_method():
    model = tiny_bit()
    convs = [name for name, m in model.named_modules() if type(m).__name__ == "StdConv2d"]
    assert convs and [name for name, _ in eligible_layers(model)] == convs
    grads = accumulate_gradients(model, [batch()], ce)
    assert set(grads) == {f"{name}.weight" for name in convs}
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("method", [GRFT(rows_per_matrix=2), GRFT(mode="column", columns_per_matrix=3),
                                    GPS(k=2), RandomRows(rows_per_matrix=2)], ids=lambda m: m.name)
def test_bit_deltas_go_through_the_weight_standardisation(method):
    model = tiny_bit()
    tune(model, method, [batch()], ce, seed=0)
    layers = [layer for _, layer in selectable_layers(model)]
    assert layers and all(type(layer.base_layer).__name__ == "StdConv2d" for layer in layers)
    assert not any(layer.plain_forward for layer in layers)
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in layers:
            for p in layer.added_parameters():
                p.normal_(0, 0.05)
    x = batch()[0]
    # One layer by hand: the convolution of the standardised W0 + delta.
    layer = layers[1]
    conv = layer.base_layer
    probe = torch.randn(2, conv.in_channels, 8, 8)
    expected = F.conv2d(probe, standardised(conv.weight + layer.dense_delta(), conv.eps), conv.bias, conv.stride,
                        conv.padding, conv.dilation, conv.groups)
    assert torch.allclose(layer(probe), expected, atol=1e-5)
    additive = conv(probe) + F.conv2d(probe, layer.dense_delta(), None, conv.stride, conv.padding, conv.dilation,
                                      conv.groups)
    assert not torch.allclose(layer(probe), additive, atol=1e-3)  # the delta is not added outside
    # The whole model equals its merge (plain StdConv2d layers holding W0 + delta).
    out = model(x)
    merged = merge(copy.deepcopy(model))
    assert not list(selectable_layers(merged))
    assert torch.allclose(merged(x), out, atol=1e-5)


def test_bit_deltas_train_and_the_pretrained_weights_do_not_move():
    model = tiny_bit()
    method = GRFT(rows_per_matrix=2)
    tune(model, method, [batch()], ce)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tuned = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        ce(model, batch()).backward()
        optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    moved = [n for n, v in tuned.items() if not torch.equal(params[n], v)]
    assert any(n.endswith(".delta") for n in moved) and "head.fc.weight" in moved


def test_lora_refuses_layers_that_transform_their_weight():
    with pytest.raises(ValueError, match=r"LoRA: stem\.conv \(StdConv2d\).*leave them out with `exclude`"):
        LoRA(targets=["*conv*"]).apply(tiny_bit())


def test_a_parametrized_weight_is_refused():
    from torch.nn.utils.parametrizations import weight_norm

    conv = weight_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match=r"blk: the weight of this .* is computed .* `exclude`"):
        StructuredDelta(conv, "blk", ROW, torch.tensor([0]))


# -- DeiT distilled: two heads ---------------------------------------------------------------------
def test_distilled_heads_are_both_trained_and_counted_as_head():
    model = tiny_deit()
    head = classifier(model)
    assert isinstance(head, HeadGroup) and [type(h) for h in head.heads] == [nn.Linear, nn.Linear]
    assert head.out_features == 5
    per_head = 32 * 5 + 5
    for method in (Linear(), GRFT(rows_per_matrix=1), GPS(k=1)):
        m = tiny_deit()
        selection = tune(m, method)
        assert selection.head == TIMM_HEAD  # recorded: timm's get_classifier(), both heads
        names = {n for n, p in m.named_parameters() if p.requires_grad and n.startswith("head")}
        assert names == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
        counts = count_parameters(m)
        assert counts["head"] == 2 * per_head
        assert counts["backbone"] == sum(p.numel() for p in tiny_deit().parameters()) - 2 * per_head
        assert not any(layer.original_name.startswith("head") for _, layer in selectable_layers(m))
        assert not any(name.startswith("head") for name in selection.layers)


def test_training_logits_of_distilled_heads_are_those_of_the_models_forward():
    model = tiny_deit()
    tune(model, GRFT(rows_per_matrix=1))
    model.train()
    images, _ = batch()
    features, logits = features_and_logits(model, images)
    tokens = model.forward_features(images)
    assert torch.allclose(features, (tokens[:, 0] + tokens[:, 1]) / 2)
    # each head reads its own token: not the heads applied to the averaged token
    assert torch.allclose(logits, model(images), atol=1e-6)
    assert torch.allclose(logits, (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2, atol=1e-6)
    heads_on_pooled = (model.head(features) + model.head_dist(features)) / 2  # the heads on the pooled features
    assert not torch.allclose(logits, heads_on_pooled, atol=1e-3)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32)
    tune(vit, GRFT(rows_per_matrix=1))
    features, logits = features_and_logits(vit, images)
    assert torch.equal(logits, vit.head(features))


def test_distilled_heads_move_in_training_and_round_trip_through_export(tmp_path):
    model = tiny_deit()
    method = GRFT(rows_per_matrix=1)
    selection = tune(model, method, [batch()], ce)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("head")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, labels = batch()
    for _ in range(3):  # the training step's path (PEFTModule.training_step)
        optimizer.zero_grad()
        _, logits = features_and_logits(model, images)
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], v) for n, v in before.items())
    model.eval()
    path = save_tuned(model, tmp_path / "tuned.safetensors", method, selection)
    loaded = load_tuned(tiny_deit(), path).eval()
    assert torch.allclose(loaded(images), model(images), atol=1e-5)


# -- Swin and ConvNeXt: tables and layer scales ----------------------------------------------------
def test_swin_tables_and_convnext_layer_scales_are_frozen_by_default():
    for build, pattern in ((tiny_swin, "relative_position_bias_table"), (tiny_convnext, "gamma")):
        for method in (GRFT(rows_per_matrix=1), GPS(k=1), BitFit()):
            model = build()
            tune(model, method)
            extra = [p for n, p in model.named_parameters() if n.endswith(pattern)]
            assert extra and not any(p.requires_grad for p in extra)


@pytest.mark.parametrize("build, pattern", [(tiny_swin, "*.relative_position_bias_table"),
                                            (tiny_convnext, "*.gamma")], ids=["swin", "convnext"])
@pytest.mark.parametrize("make", [lambda p: GRFT(rows_per_matrix=1, tune_params=[p]),
                                  lambda p: GPS(k=1, tune_params=[p]), lambda p: GPSMasked(k=1, tune_params=[p]),
                                  lambda p: RandomRows(rows_per_matrix=1, tune_params=[p]),
                                  lambda p: BitFit(tune_params=[p])], ids=["grft", "gps", "gps_masked", "random",
                                                                           "bitfit"])
def test_tune_params_trains_them_in_full_and_counts_them(build, pattern, make):
    plain = make(pattern)
    plain.tune_params = None
    plain_model = build()
    tune(plain_model, plain, seed=0)
    reference = count_parameters(plain_model)
    method = make(pattern)
    model = build()
    tune(model, method, seed=0)
    extra = {n: p for n, p in model.named_parameters() if n.endswith(pattern[2:])}
    assert extra and all(p.requires_grad for p in extra.values())
    counts = count_parameters(model)
    assert counts["selected"] == reference["selected"] + sum(p.numel() for p in extra.values())
    assert counts["bias"] == reference["bias"] and counts["head"] == reference["head"]
    assert method.config()["tune_params"] == [pattern]
    assert plain.config()["tune_params"] is None


def test_tune_params_errors_name_the_option():
    with pytest.raises(ValueError, match=r"GPS\.tune_params: '\*\.gamma' matched no parameter"):
        tune(tiny_swin(), GPS(tune_params=["*.gamma"]))
    with pytest.raises(ValueError, match=r"GRFT\.tune_params: .*mlp\.fc1\.weight is the weight of a layer"):
        tune(tiny_convnext(), GRFT(rows_per_matrix=1, tune_params=["*.mlp.fc1.weight"]))


@pytest.mark.parametrize("build", [tiny_swin, tiny_convnext], ids=["swin", "convnext"])
def test_swin_and_convnext_select_train_and_merge(build):
    model = build()
    method = GRFT(rows_per_matrix=1)
    tune(model, method, [batch()], ce)
    with torch.no_grad():
        for _, layer in selectable_layers(model):
            layer.delta.normal_(0, 0.05)
    model.eval()
    x = batch()[0]
    assert torch.allclose(merge(copy.deepcopy(model))(x), model(x), atol=1e-5)


# -- the configs -----------------------------------------------------------------------------------
BACKBONES = {  # config -> (timm name, full-size counts: tables/layer scales, GRFT rows at 0.30 %, matrices)
    "swin_base": ("swin_base_patch4_window7_224.ms_in22k", "*.relative_position_bias_table", 63_544, 3, 99),
    "convnext_base": ("convnext_base.fb_in22k", "*.gamma", 18_048, 3, 112),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_configs_compose_and_their_documented_counts_hold(name):
    from grft_lightning.training.cli import config_parser, expand_config_includes

    backbone, pattern, extra, rows, matrices = BACKBONES[name]
    path = REPO / "configs" / "backbones" / f"{name}.yaml"
    args = ["fit", "--config", str(REPO / "configs/vtab/dtd.yaml"), "--config", str(path),
            "--config", str(REPO / "configs/methods/gps.yaml")]
    cfg = config_parser().parse_args(expand_config_includes(args)).fit.as_dict()
    assert cfg["model"]["backbone"] == backbone
    assert cfg["model"]["method"]["class_path"].endswith(".GPS")
    assert timm.models.get_pretrained_cfg(backbone) is not None
    text = path.read_text()
    assert f"{extra:,} values" in text and f"{rows} rows in each of {matrices} matrices" in text
    with torch.device("meta"):
        model = timm.create_model(backbone.split(".")[0], pretrained=False, num_classes=100)
    import fnmatch

    assert sum(p.numel() for n, p in model.named_parameters() if fnmatch.fnmatchcase(n, pattern)) == extra
    method = GRFT(fraction=0.003)
    selection = method.select(model, zero_grads(model, method))
    assert {tuple(c) for c in selection.counts().values()} == {("row", rows)} and len(selection.layers) == matrices
