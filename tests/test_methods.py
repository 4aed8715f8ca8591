"""Methods: only the tuned entries move, exact tuned counts, and the errors users meet."""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning import count_parameters, merge, parameter_summary
from grft_lightning.core.deltas import IndexDelta, StructuredDelta, selectable_layers
from grft_lightning.core.layers import COLUMN, ROW, matrix_shape
from grft_lightning.methods import GPS, GRFT, BitFit, Full, Linear, RandomRows
from tuning import random_grads, tune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# timm test_vit at img_size=32: embed 64, depth 6, mlp ratio 3, patch 16, one class token; 5 classes.
D, DEPTH, HIDDEN, PATCH_FAN_IN, TOKENS, CLASSES = 64, 6, 3 * 64, 3 * 16 * 16, 1 + (32 // 16) ** 2, 5
ROW_WIDTHS = [D, D, D, HIDDEN]  # fan-in of qkv, proj, fc1, fc2
COLUMN_HEIGHTS = [3 * D, D, HIDDEN, D]  # out of qkv, proj, fc1, fc2
LINEAR_BIASES = DEPTH * sum(COLUMN_HEIGHTS) + D  # + the patch-embedding conv's bias
HEAD = CLASSES * D + CLASSES
BLOCK = 2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D + (HIDDEN * D + HIDDEN) + (D * HIDDEN + D)
BACKBONE = D * PATCH_FAN_IN + D + D + TOKENS * D + DEPTH * BLOCK + 2 * D  # patch, cls, pos, blocks, norm


METHODS = {
    "grft_row": lambda: GRFT(mode="row"),
    "grft_column": lambda: GRFT(mode="column"),
    "grft_auto": lambda: GRFT(mode="auto", rows_per_matrix=2),
    "gps": lambda: GPS(k=2),
    "random_row": lambda: RandomRows(rows_per_matrix=3, seed=1),
    "full": Full,
    "linear": Linear,
    "bitfit": BitFit,
}


def _batches(n=2, seed=0, size=32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(n)]


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _tuned_masks(model: nn.Module, pre: nn.Module, method) -> dict[str, torch.Tensor]:
    """Original parameter name -> boolean mask of the entries the method may change.

    Written from the method's definition, not from the code under test: delta entries from the
    filled index buffers, biases of Linear/Conv2d layers outside the head, the head, everything
    for full fine-tuning.
    """
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in pre.named_parameters()}
    head = pre.get_classifier()
    head_names = {n for n, m in pre.named_modules() if m is head}
    for name, module in pre.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            if name in head_names or isinstance(method, Full):
                masks[key][...] = True
            elif pname == "bias" and isinstance(module, (nn.Linear, nn.Conv2d)) and method.tune_bias:
                masks[key][...] = True
    for _, layer in selectable_layers(model):
        m = masks[f"{layer.original_name}.weight"].view(layer.out_features, -1)
        if isinstance(layer, IndexDelta):
            m.scatter_(1, layer.index, True)
        elif layer.selected_axis == ROW:
            m[layer.index] = True
        else:
            m[:, layer.index] = True
    return masks


@pytest.mark.parametrize("model_name", ["tiny_vit", "tiny_cnn"])
@pytest.mark.parametrize("method_name", list(METHODS))
def test_three_adamw_steps_move_only_tuned_entries(request, model_name, method_name):
    model = request.getfixturevalue(model_name)
    size = 32
    if model_name == "tiny_cnn":
        model.eval()  # BatchNorm running statistics must not move: only parameters are compared
        size = 64  # at 32x32 the last depthwise conv sees a 2x2 map: 5 of its 9 taps only read padding
    pre = copy.deepcopy(model)
    method = METHODS[method_name]()

    def column_shaped(grads):  # make sure both axes of the auto mode take part
        if method_name != "grft_auto":
            return
        # the first matrix where 2 rows buy at least one column (floor(2 * fan_in / out) > 0)
        name = next(n for n, l in method.eligible_layers(model) if 2 * matrix_shape(l)[1] // matrix_shape(l)[0] > 0)
        grads[f"{name}.weight"] = torch.zeros_like(grads[f"{name}.weight"])
        grads[f"{name}.weight"].view(matrix_shape(model.get_submodule(name))[0], -1)[:, 1] = 1.0

    batches = _batches(1, seed=1, size=size) if method.needs_gradients else None
    selection = tune(model, method, batches, _ce, edit=column_shaped if method.needs_gradients else None)
    if method_name == "grft_auto":
        assert {l.selected_axis for _, l in selectable_layers(model)} == {ROW, COLUMN}
    if method.needs_gradients or isinstance(method, RandomRows):
        assert [l.original_name for _, l in selectable_layers(model)] == list(selection.active())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    for batch in _batches(3, seed=2, size=size):
        loss = _ce(model, batch)
        reg = method.regularizer(model, batch[0], None)
        if reg is not None:
            loss = loss + reg
        opt.zero_grad()
        loss.backward()
        method.on_before_optimizer_step(model)
        opt.step()

    masks = _tuned_masks(model, pre, method)
    merge(model)
    after = dict(model.named_parameters())
    assert set(after) == set(masks)
    for name, old in pre.named_parameters():
        new, mask = after[name], masks[name]
        assert new.shape == old.shape, name
        assert torch.equal(new[~mask], old[~mask]), f"{name}: an entry outside the tuned set moved"
        moved = (new != old) & mask
        assert torch.equal(moved, mask), f"{name}: only {int(moved.sum())}/{int(mask.sum())} tuned entries moved"
    buffers = dict(model.named_buffers())
    assert set(buffers) == {name for name, _ in pre.named_buffers()}
    for name, old in pre.named_buffers():
        assert torch.equal(buffers[name], old), name
    if isinstance(method, GRFT) and model_name == "tiny_vit":
        for name in ("pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.bias", "patch_embed.proj.weight"):
            assert torch.equal(after[name], dict(pre.named_parameters())[name])
        assert not torch.equal(after["head.weight"], pre.head.weight)


def test_grft_auto_picks_each_matrix_s_axis_on_the_tiny_vit(tiny_vit):
    method = GRFT(mode="auto", rows_per_matrix=2)

    def shaped(grads):
        grads["blocks.0.attn.proj.weight"] = torch.zeros(D, D)
        grads["blocks.0.attn.proj.weight"][:, 5] = 1.0  # a column-shaped gradient
        grads["blocks.1.mlp.fc2.weight"] = torch.zeros(D, HIDDEN)
        grads["blocks.1.mlp.fc2.weight"][7] = 1.0  # a row-shaped gradient
        grads["blocks.2.mlp.fc2.weight"] = torch.zeros(D, HIDDEN)
        grads["blocks.2.mlp.fc2.weight"][:, 9] = 1.0  # column-shaped again, on a wide matrix

    selection = tune(tiny_vit, method, _batches(1, seed=1), _ce, edit=shaped)
    counts = selection.counts()
    # columns at the rows' parameter budget: floor(2 * fan_in / out)
    assert counts["blocks.0.attn.proj"] == ["column", 2] and counts["blocks.2.mlp.fc2"] == ["column", 6]
    assert counts["blocks.1.mlp.fc2"] == ["row", 2] and counts["blocks.0.attn.qkv"] == ["row", 2]
    layers = {layer.original_name: layer for _, layer in selectable_layers(tiny_vit)}
    proj, fc2, qkv = layers["blocks.0.attn.proj"], layers["blocks.1.mlp.fc2"], layers["blocks.0.attn.qkv"]
    assert proj.selected_axis == COLUMN and proj.index.tolist() == [0, 5] and proj.delta.shape == (D, 2)
    assert fc2.selected_axis == ROW and fc2.index.tolist() == [0, 7] and fc2.delta.shape == (2, HIDDEN)
    wide = layers["blocks.2.mlp.fc2"]
    assert wide.selected_axis == COLUMN and wide.index.tolist() == [0, 1, 2, 3, 4, 9] and wide.delta.shape == (D, 6)
    assert qkv.selected_axis == ROW  # 2 rows of 64 buy no column of 192


# -- counts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, selected, bias, head", [
    (GRFT(rows_per_matrix=4), DEPTH * 4 * sum(ROW_WIDTHS), LINEAR_BIASES, HEAD),
    (GRFT(mode="column", columns_per_matrix=2), DEPTH * 2 * sum(COLUMN_HEIGHTS), LINEAR_BIASES, HEAD),
    (GRFT(mode="auto", rows_per_matrix=3), DEPTH * 3 * sum(ROW_WIDTHS), LINEAR_BIASES, HEAD),
    (GRFT(fraction=0.03), DEPTH * 4 * sum(ROW_WIDTHS), LINEAR_BIASES, HEAD),  # 0.03*300,096 / 2,304 -> 4 rows
    (GRFT(rows_per_matrix=1, tune_bias=False), DEPTH * sum(ROW_WIDTHS), 0, HEAD),
    (GRFT(rows_per_matrix=1, tune_norm=True), DEPTH * sum(ROW_WIDTHS) + (2 * DEPTH + 1) * D,
     LINEAR_BIASES + (2 * DEPTH + 1) * D, HEAD),
    (RandomRows(rows_per_matrix=4), DEPTH * 4 * sum(ROW_WIDTHS), LINEAR_BIASES, HEAD),
    (GPS(k=1), DEPTH * sum(COLUMN_HEIGHTS) + D, LINEAR_BIASES, HEAD),
    (GPS(k=3), 3 * (DEPTH * sum(COLUMN_HEIGHTS) + D), LINEAR_BIASES, HEAD),
    (Full(), BACKBONE - LINEAR_BIASES - (2 * DEPTH + 1) * D, LINEAR_BIASES + (2 * DEPTH + 1) * D, HEAD),
    (Linear(), 0, 0, HEAD),
    (BitFit(), 0, LINEAR_BIASES, HEAD),
], ids=["grft_rows4", "grft_columns2", "grft_auto3", "grft_fraction", "grft_no_bias", "grft_norm", "random_row4",
        "gps_k1", "gps_k3", "full", "linear", "bitfit"])
def test_tiny_vit_counts_equal_hand_computed(tiny_vit, method, selected, bias, head):
    assert BACKBONE == 300_096
    selection = None
    if method.needs_gradients or isinstance(method, RandomRows):
        # a row-shaped gradient (row 0 of every matrix): rows capture more per parameter in auto mode
        grads = {n: torch.zeros_like(p) for n, p in tiny_vit.named_parameters() if n in method.gradient_names(tiny_vit)}
        for g in grads.values():
            g.view(g.shape[0], -1)[0] = 1.0
        selection = tune(tiny_vit, method, grads=grads)
    else:
        method.apply(tiny_vit)
    counts = count_parameters(tiny_vit)
    assert set(counts) == {"selected", "bias", "head", "backbone", "tuned", "tuned_pct"}
    assert (counts["selected"], counts["bias"], counts["head"], counts["backbone"]) == (selected, bias, head, BACKBONE)
    assert counts["tuned"] == selected + bias + head
    assert counts["tuned_pct"] == pytest.approx(100 * (selected + bias + head) / BACKBONE)
    if selection is not None:  # the deltas hold exactly the selected entries
        norms = (2 * DEPTH + 1) * D if method.tune_norm else 0  # norm scales count as selected too
        assert selection.entries() == selected - norms
        assert sum(l.num_tuned() for _, l in selectable_layers(tiny_vit)) == selected - norms


def test_parameter_summary_line(tiny_vit):
    tune(tiny_vit, GRFT(rows_per_matrix=4))
    tuned = DEPTH * 4 * sum(ROW_WIDTHS) + LINEAR_BIASES + HEAD  # 9,216 + 3,136 + 325
    line = parameter_summary(tiny_vit)
    assert line == f"tuned params: {tuned:,} || backbone params: {BACKBONE:,} || tuned%: {100 * tuned / BACKBONE:.4f}"
    assert line == "tuned params: 12,677 || backbone params: 300,096 || tuned%: 4.2243"
    assert re.fullmatch(r"tuned params: [\d,]+ \|\| backbone params: [\d,]+ \|\| tuned%: \d+\.\d{4}", line)


def _vit_b16():
    with torch.device("meta"):  # shapes only: no 86M-parameter initialisation
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)


VB_D, VB_DEPTH = 768, 12
VB_ROW = VB_D + VB_D + VB_D + 4 * VB_D  # one row in each of qkv, proj, fc1, fc2: 5,376 entries per block
VB_COL = 3 * VB_D + VB_D + 4 * VB_D + VB_D  # one column in each: 6,912 entries per block
VB_BACKBONE = (VB_D * 3 * 16 * 16 + VB_D + VB_D + 197 * VB_D + 2 * VB_D
               + VB_DEPTH * (4 * VB_D + 3 * VB_D * VB_D + 3 * VB_D + VB_D * VB_D + VB_D
                             + 2 * 4 * VB_D * VB_D + 4 * VB_D + VB_D))


@pytest.mark.parametrize("method, selected", [
    (GRFT(rows_per_matrix=4), 258_048),
    (GRFT(fraction=0.003), 258_048),
    (GRFT(mode="column", columns_per_matrix=3), 248_832),
    (GPS(k=1), 83_712),
], ids=["grft_rows4", "grft_fraction", "grft_columns3", "gps_k1"])
def test_vit_b16_counts(method, selected):
    model = _vit_b16()
    assert VB_BACKBONE == 85_798_656
    assert 12 * 4 * VB_ROW == 258_048 and 12 * 3 * VB_COL == 248_832 and 12 * VB_COL + VB_D == 83_712
    shapes = {n: p.shape for n, p in model.named_parameters()}
    # zero gradients without memory (a stride-0 view): the counts do not depend on the values
    grads = {n: torch.zeros(()).expand(shapes[n]) for n in method.gradient_names(model)}
    selection = method.select(model, grads)
    method.apply(model, selection)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    counts = count_parameters(model)
    assert counts["selected"] == selected
    assert counts["bias"] == VB_DEPTH * VB_COL + VB_D == 83_712  # every Linear/Conv2d bias, the patch embedding's too
    assert counts["head"] == 10 * VB_D + 10
    assert counts["backbone"] == VB_BACKBONE
    assert selection.entries() == selected
    if isinstance(method, GRFT):
        assert len(selection.layers) == 48 and "patch_embed.proj" not in selection.layers
        if method.fraction is not None:  # 0.003 * 85,798,656 / (12 * 5,376) = 3.99 -> 4 rows per matrix
            assert {tuple(c) for c in selection.counts().values()} == {("row", 4)}
            assert selection.describe() == ("row (uniform): 192 rows in 48 of 48 matrices = 258,048 weight entries "
                                            "(0.301 % of the backbone)")


@pytest.mark.parametrize("mode", ["row", "column"])
@pytest.mark.parametrize("allocation", ["uniform", "proportional"])
def test_fraction_lands_near_its_target_on_the_cnn(tiny_cnn, mode, allocation):
    backbone = sum(p.numel() for n, p in tiny_cnn.named_parameters() if not n.startswith("classifier."))
    method = GRFT(mode=mode, fraction=0.05, allocation=allocation)
    selection = tune(tiny_cnn, method)
    selected = count_parameters(tiny_cnn)["selected"]
    assert len(selection.layers) == 17  # every Conv2d of test_efficientnet
    assert abs(selected - 0.05 * backbone) < 0.1 * 0.05 * backbone
    assert {axis for axis, _ in selection.counts().values()} == {mode}
    counts = {n for _, n in selection.counts().values()}
    assert (len(counts) == 1) == (allocation == "uniform")


# -- errors ---------------------------------------------------------------------------------------
def test_budget_larger_than_a_matrix_names_the_layer(tiny_vit):
    grads = random_grads(tiny_vit, GPS(), seed=0)  # every eligible weight, the patch embedding's too
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.proj: 65 rows requested, but this matrix has 64 rows"):
        GRFT(rows_per_matrix=65).select(tiny_vit, grads)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: 65 columns requested, but this matrix has 64 columns"):
        GRFT(mode="column", columns_per_matrix=65).select(tiny_vit, grads)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: 65 input connections per row requested, "
                                         r"but this matrix has 64"):
        GPS(k=65).select(tiny_vit, grads)
    # fraction 1 asks round(300,096 / 2,304) = 130 rows of every matrix
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.proj: 130 rows requested, but this matrix has 64 rows"):
        GRFT(fraction=1.0).select(tiny_vit, grads)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: 0 rows requested, but this matrix has 192 rows "
                                         r"\(the budget must be between 1 and 192\)"):
        GRFT(rows_per_matrix=0).select(tiny_vit, grads)
    # the budget is checked by the selection, before any layer is replaced: the model is untouched
    assert not list(selectable_layers(tiny_vit)) and all(p.requires_grad for p in tiny_vit.parameters())
    tune(tiny_vit, GRFT(rows_per_matrix=64), grads=grads)  # the largest budget every matrix allows
    assert count_parameters(tiny_vit)["selected"] == DEPTH * 64 * sum(ROW_WIDTHS)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match=re.escape(f"GRFT.fraction must be in (0, 1], got {fraction}")):
        GRFT(fraction=fraction)


def test_bad_configurations():
    with pytest.raises(ValueError, match="either a per-matrix count or fraction, not both"):
        GRFT(rows_per_matrix=2, fraction=0.01)
    with pytest.raises(ValueError, match="rows_per_matrix does not apply to mode='column'"):
        GRFT(mode="column", rows_per_matrix=2)
    with pytest.raises(ValueError, match="columns_per_matrix does not apply to mode='row'"):
        GRFT(columns_per_matrix=2)
    with pytest.raises(ValueError, match="GRFT.mode must be row, column or auto, got 'rows'"):
        GRFT(mode="rows")
    with pytest.raises(ValueError, match="GPS.k must be >= 1, got 0"):
        GPS(k=0)


def test_no_eligible_layer(tiny_vit):
    with pytest.raises(ValueError, match=re.escape("GRFT: no eligible layer matched targets=['decoder.*'], "
                                                   "exclude=['patch_embed.*']")):
        GRFT(targets=["decoder.*"]).select(tiny_vit, {})
    with pytest.raises(ValueError, match=r"GPS: no eligible layer matched targets=None, exclude=\['\*'\]"):
        GPS(exclude=["*"]).gradient_names(tiny_vit)
    with pytest.raises(ValueError, match=r"GPS: no eligible layer matched targets=None, exclude=\['\*'\]"):
        GPS(exclude=["*"]).select(tiny_vit, {})
    assert not list(selectable_layers(tiny_vit))


def test_targets_and_exclude_patterns(tiny_vit):
    method = GRFT(rows_per_matrix=1, targets=["blocks.*.mlp.*"], exclude=["blocks.5.*"])
    expected = [f"blocks.{i}.mlp.{fc}" for i in range(5) for fc in ("fc1", "fc2")]
    assert method.gradient_names(tiny_vit) == [f"{name}.weight" for name in expected]
    selection = tune(tiny_vit, method)
    assert list(selection.layers) == expected
    names = [layer.original_name for _, layer in selectable_layers(tiny_vit)]
    assert names == expected
    assert isinstance(tiny_vit.blocks[0].attn.qkv, nn.Linear)


def test_apply_twice(tiny_vit):
    selection = tune(tiny_vit, GRFT())
    with pytest.raises(RuntimeError,
                       match=r"a method was already applied to this model \(it holds selectable layers\)"):
        GRFT().apply(tiny_vit, selection)
    with pytest.raises(RuntimeError, match="was already applied"):
        BitFit().apply(tiny_vit)


def test_deltas_have_the_selected_sizes(tiny_cnn):
    method = GRFT(mode="auto", rows_per_matrix=4)
    selection = tune(tiny_cnn, method)
    layers = dict(selectable_layers(tiny_cnn))
    assert list(layers) == list(selection.layers) and len(layers) == 17
    axes = set()
    for name, layer in layers.items():
        assert isinstance(layer, StructuredDelta)
        out, fin = layer.out_features, layer.fan_in
        axis, count = selection.counts()[name]
        axes.add(axis)
        assert (axis, count) in {("row", 4), ("column", min(fin, 4 * fin // out))}
        assert layer.delta.shape == ((4, fin) if axis == "row" else (out, count))
        assert layer.index.tolist() == selection.layers[name].index.tolist()
    assert axes == {"row", "column"}
    dw = tiny_cnn.blocks[3][0].conv_dw
    assert dw.fan_in == 9 and dw.out_features == 128
    assert dw.selected_axis == ROW and dw.delta.shape == (4, 9)  # 4 rows of 9 buy no column of 128


# -- regularizers ---------------------------------------------------------------------------------
def test_l2sp_regularizer_is_lambda_times_sum_of_squared_deltas(tiny_vit):
    method = GRFT(rows_per_matrix=2, regularization="l2sp", reg_lambda=0.5)
    tune(tiny_vit, method)
    assert not method.needs_reference()
    assert float(method.regularizer(tiny_vit, None, None)) == 0.0
    with torch.no_grad():
        for _, layer in selectable_layers(tiny_vit):
            layer.delta.fill_(0.1)
    expected = 0.5 * 0.01 * DEPTH * 2 * sum(ROW_WIDTHS)
    assert float(method.regularizer(tiny_vit, None, None)) == pytest.approx(expected, rel=1e-5)
    assert GRFT(regularization="none").regularizer(tiny_vit, None, None) is None


def test_feature_regularizer_is_zero_before_training(tiny_vit):
    method = GRFT(rows_per_matrix=1, regularization="feature", reg_lambda=1.0)
    assert method.needs_reference() and not GRFT(regularization="feature", reg_lambda=0.0).needs_reference()
    reference = copy.deepcopy(tiny_vit).eval()  # the caller holds the frozen pre-trained copy
    tune(tiny_vit, method)
    model = tiny_vit.eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    assert float(method.regularizer(model, x, feats, reference=reference)) == pytest.approx(0.0, abs=1e-10)
    # mean over batch of sum over D
    assert float(method.regularizer(model, x, feats + 1.0, reference=reference)) == pytest.approx(D, rel=1e-5)
    with pytest.raises(ValueError, match="compares with the frozen pre-trained model"):
        method.regularizer(model, x, feats)


def test_config_round_trips_through_the_constructor():
    for make in METHODS.values():
        method = make()
        clone = type(method)(**method.config())
        assert clone.config() == method.config()
        assert method.class_path().startswith("grft_lightning.methods.")
