"""Delta layers: forward and gradients equal the dense ``W0 + delta`` computation.

Every check builds the dense delta by hand from the indices and values (never through the layer's
own ``dense_delta``), runs the plain base layer with ``W0 + dense``, and compares outputs and the
gradient w.r.t. the delta with autograd on a dense weight gathered at the selected entries.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning.core.deltas import DeltaLayer, IndexDelta, StructuredDelta, merge, selectable_layers

from grft_lightning.core.layers import COLUMN, ENTRY, ROW
from grft_lightning.methods import GPS, GRFT
from seeded_layers import seeded_layer
from tuning import random_grads

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (name, constructor, input shape). Kernels, strides, paddings and dilations chosen to differ.
LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (2, 3, 6)),
    "conv": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7)),
    "conv_dilated": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False), (2, 4, 6, 6)),
    "conv_rect": (lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 3, 6, 5)),
    "conv_grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
    "conv_depthwise": (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), (2, 4, 7, 7)),
    "conv_depthwise_x2": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=False), (2, 4, 5, 5)),
}


def _layer(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    return seeded_layer(*LAYERS[name], seed)


def _dense_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _make_delta(kind: str, layer: nn.Module):
    """A selected delta of ``kind`` on ``layer`` with random values; returns it and its dense (out x fan_in) form."""
    out, fin = layer.weight.shape[0], layer.weight[0].numel()
    gen = torch.Generator().manual_seed(1)
    if kind == "row":
        rows = torch.tensor(sorted({0, out // 2 + 1, out - 1}))  # rows in different groups for grouped convs
        delta = StructuredDelta(layer, "layer", ROW, rows)
        assert delta.delta.shape == (len(rows), fin)
        values = torch.randn(len(rows), fin, generator=gen)
        dense = torch.zeros(out, fin)
        dense[rows] = values
    elif kind == "column":
        # 0 and 1 share an input channel (different kernel positions) in a conv with kh*kw > 1
        cols = torch.tensor(sorted({0, 1, fin - 1}))
        delta = StructuredDelta(layer, "layer", COLUMN, cols)
        assert delta.delta.shape == (out, len(cols))
        values = torch.randn(out, len(cols), generator=gen)
        dense = torch.zeros(out, fin)
        dense[:, cols] = values
    else:  # gps
        k = 2
        index = torch.stack([torch.randperm(fin, generator=gen)[:k] for _ in range(out)])
        delta = IndexDelta(layer, "layer", index)
        assert delta.delta.shape == (out, k)
        values = torch.randn(out, k, generator=gen)
        dense = torch.zeros(out, fin)
        for i in range(out):
            for j in range(k):
                dense[i, index[i, j]] = values[i, j]
    with torch.no_grad():
        delta.delta.copy_(values)
    return delta, dense


def _gather(kind: str, delta: DeltaLayer, grad_w: torch.Tensor) -> torch.Tensor:
    g = grad_w.reshape(grad_w.shape[0], -1)
    if kind == "row":
        return g[delta.index]
    if kind == "column":
        return g[:, delta.index]
    return g.gather(1, delta.index)


@pytest.mark.parametrize("kind", ["row", "column", "gps"])
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_delta_forward_and_gradient_equal_dense(kind, layer_name):
    layer, x = _layer(layer_name)
    w0 = layer.weight.detach().clone()
    delta, dense = _make_delta(kind, copy.deepcopy(layer))
    x1 = x.clone().requires_grad_(True)
    y = delta(x1)

    weight = (w0 + dense.view_as(w0)).requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y_ref = _dense_forward(layer, x2, weight)
    assert y.shape == y_ref.shape
    assert (y - y_ref).abs().max() < 1e-5

    g_out = torch.randn_like(y)
    (y * g_out).sum().backward()
    (y_ref * g_out).sum().backward()
    assert (delta.delta.grad - _gather(kind, delta, weight.grad)).abs().max() < 1e-5
    assert (x1.grad - x2.grad).abs().max() < 1e-5
    if layer.bias is not None:  # a trained bias gets the same gradient as a plain layer's
        assert (delta.base_layer.bias.grad - layer.bias.grad).abs().max() < 1e-5
    # the pre-trained weight is frozen and never receives a gradient
    assert not delta.base_layer.weight.requires_grad and delta.base_layer.weight.grad is None
    assert torch.equal(delta.base_layer.weight, w0)
    # the layer's own dense form and the merged layer agree with the hand-built one
    assert torch.equal(delta.dense_delta(), dense.view_as(w0))
    merged = delta.merged_module()
    assert type(merged) is type(layer)
    assert (merged(x) - y_ref).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["row", "column", "gps"])
def test_a_new_delta_is_the_base_layer(kind):
    layer, x = _layer("conv_grouped")
    delta = {"row": lambda: StructuredDelta(layer, "l", ROW, torch.tensor([1, 4])),
             "column": lambda: StructuredDelta(layer, "l", COLUMN, torch.tensor([0, 17])),
             "gps": lambda: IndexDelta(layer, "l", torch.tensor([[0, 3]] * 6))}[kind]()
    assert torch.count_nonzero(delta.delta) == 0  # deltas start at zero: the pre-trained layer
    assert torch.equal(delta(x), layer(x))
    assert torch.equal(delta.merged_module().weight, layer.weight)
    assert delta.num_tuned() == {"row": 2 * 18, "column": 6 * 2, "gps": 6 * 2}[kind]


@pytest.mark.parametrize("kind", ["row", "column", "gps"])
def test_state_dict_restores_values_and_indices(kind):
    layer, x = _layer("conv")  # out 6, fan_in 36
    index = {"row": torch.tensor([1, 4]), "column": torch.tensor([0, 5, 9, 30]),
             "gps": torch.tensor([[0, 35]] * 3 + [[2, 7]] * 3)}[kind]
    make = {"row": lambda l, i: StructuredDelta(l, "l", ROW, i),
            "column": lambda l, i: StructuredDelta(l, "l", COLUMN, i),
            "gps": lambda l, i: IndexDelta(l, "l", i)}[kind]
    delta = make(layer, index)
    with torch.no_grad():
        delta.delta.normal_()
    assert set(delta.state_dict()) == {"delta", "index", "base_layer.weight", "base_layer.bias"}
    assert torch.equal(delta.export_tensors()["delta"], delta.delta) and list(delta.export_tensors()) == ["delta"]
    fresh = make(copy.deepcopy(layer), index)  # a checkpoint restore: built from the same selection
    fresh.load_state_dict(delta.state_dict())
    assert torch.equal(fresh(x), delta(x)) and not torch.equal(fresh(x), layer(x))
    imported = make(copy.deepcopy(layer), index)
    imported.import_tensors(delta.export_tensors())
    assert torch.equal(imported(x), delta(x))
    with pytest.raises(ValueError, match=r"l: delta of shape"):
        make(copy.deepcopy(layer), index[..., :1]).import_tensors(delta.export_tensors())


@pytest.mark.parametrize("kind", ["row", "column", "gps"])
def test_delta_tensors_live_on_the_base_weight_device(kind):
    with torch.device("meta"):  # a device other than the default one; no .item() may be needed
        layer = nn.Conv2d(4, 6, 3)
    if kind == "gps":
        delta = IndexDelta(layer, "l", torch.tensor([[0, 1]] * 6))
    else:
        index = torch.tensor([0, 1] if kind == "row" else [0, 1, 2])
        delta = StructuredDelta(layer, "l", ROW if kind == "row" else COLUMN, index)
    tensors = list(delta.parameters()) + list(delta.buffers())
    assert {t.device.type for t in tensors} == {"meta"}
    assert delta.num_tuned() == (6 * 3 if kind == "column" else 2 * 36 if kind != "gps" else 6 * 2)


def test_unsupported_layers_are_rejected():
    with pytest.raises(TypeError, match=r"blk\.conv: deltas support nn\.Linear, nn\.Conv2d .*got Conv1d"):
        StructuredDelta(nn.Conv1d(2, 3, 3), "blk.conv", ROW, torch.tensor([0]))
    with pytest.raises(TypeError, match=r"blk\.conv: padding_mode='reflect' is not supported"):
        IndexDelta(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), "blk.conv",
                   torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"blk\.fc: a structured delta tunes rows or columns, got axis 2"):
        StructuredDelta(nn.Linear(2, 3), "blk.fc", ENTRY, torch.tensor([0]))


def test_bad_indices_are_rejected():
    layer = nn.Linear(6, 5)
    with pytest.raises(ValueError, match=r"fc: rows index 5 out of range \(this layer has 5 rows\)"):
        StructuredDelta(layer, "fc", ROW, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"fc: the same column index appears twice"):
        StructuredDelta(layer, "fc", COLUMN, torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"fc: rows indices must be integers, got torch.float32"):
        StructuredDelta(layer, "fc", ROW, torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"fc: inputs indices of shape \(4, 1\), this layer expects \(5, 1\)"):
        IndexDelta(layer, "fc", torch.zeros(4, 1, dtype=torch.long))


def _random_selection(model: nn.Module, method, edit=None):
    """Select on random gradients (``edit`` may change them), apply, and fill the deltas with
    random values; returns the selection."""
    torch.manual_seed(0)
    grads = random_grads(model, method)
    if edit is not None:
        edit(grads)
    selection = method.select(model, grads)
    method.apply(model, selection)
    with torch.no_grad():
        for _, layer in selectable_layers(model):
            layer.delta.normal_(std=0.05)
    return selection


METHODS = {"row": lambda: GRFT(mode="row"), "column": lambda: GRFT(mode="column"),
           "auto": lambda: GRFT(mode="auto", rows_per_matrix=2), "gps": lambda: GPS(k=2)}


@pytest.mark.parametrize("model_name", ["tiny_vit", "tiny_cnn"])
@pytest.mark.parametrize("kind", ["row", "column", "gps"])
def test_bf16_autocast_forward_backward(request, model_name, kind):
    method = METHODS[kind]()
    model = request.getfixturevalue(model_name).eval()
    _random_selection(model, method)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        loss = y.float().logsumexp(-1).sum()
    loss.backward()
    assert y.dtype == torch.bfloat16
    scale = ref.abs().max()
    assert (y.float() - ref).abs().max() < 0.05 * scale  # bf16 has 8 mantissa bits; 6 blocks
    for _, layer in selectable_layers(model):
        assert layer.delta.grad is not None and layer.delta.grad.dtype == torch.float32
        assert torch.isfinite(layer.delta.grad).all() and layer.delta.grad.abs().sum() > 0


@pytest.mark.slow
def test_torch_compile_matches_eager(tiny_vit):
    method = GRFT(mode="row")
    model = tiny_vit
    _random_selection(model, method)
    x = torch.randn(2, 3, 32, 32)
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = [layer.delta.grad.clone() for _, layer in selectable_layers(model)]
    model.zero_grad()
    compiled = torch.compile(model)
    out = compiled(x)
    out.square().sum().backward()
    assert (out - eager_out).abs().max() < 1e-4
    for (_, layer), ref in zip(selectable_layers(model), eager_grads):
        assert torch.allclose(layer.delta.grad, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny_vit", "tiny_cnn"])
@pytest.mark.parametrize("kind", list(METHODS))
def test_deltas_trace_in_one_graph(request, model_name, kind):
    method = METHODS[kind]()
    model = request.getfixturevalue(model_name)
    _random_selection(model, method)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    torch._dynamo.reset()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)  # fullgraph: a graph break is an error
    out.sum().backward()
    assert (out - ref).abs().max() < 1e-5
    assert all(layer.delta.grad is not None for _, layer in selectable_layers(model))


def test_model_with_deltas_pickles_and_restores_from_a_state_dict(tiny_vit, tmp_path):
    pre = copy.deepcopy(tiny_vit)
    method = GRFT(mode="auto", rows_per_matrix=2)
    model = tiny_vit

    def column_shaped(grads):  # one matrix with columns
        grads["blocks.0.attn.proj.weight"] = torch.zeros(64, 64)
        grads["blocks.0.attn.proj.weight"][:, [3, 9]] = 1.0

    selection = _random_selection(model, method, column_shaped)
    proj = model.blocks[0].attn.proj
    assert proj.selected_axis == COLUMN and proj.index.tolist() == [3, 9]
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)

    torch.save(model, tmp_path / "model.pt")  # a whole-model pickle (also what spawn launchers do)
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded(x), ref)

    # a checkpoint restore: the saved selection applied to a fresh backbone, then load_state_dict
    fresh = GRFT(mode="auto", rows_per_matrix=2).apply(pre, selection)
    fresh.load_state_dict(model.state_dict())
    assert fresh.blocks[0].attn.proj.selected_axis == COLUMN
    assert [layer.original_name for _, layer in selectable_layers(fresh)] == list(selection.active())
    assert torch.equal(fresh(x), ref)


def test_merge_replaces_every_delta_and_keeps_outputs(tiny_cnn):
    model = tiny_cnn.eval()
    method = GRFT(mode="column", columns_per_matrix=2)
    _random_selection(model, method)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        merge(model)
        after = model(x)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert (after - before).abs().max() < 1e-5
