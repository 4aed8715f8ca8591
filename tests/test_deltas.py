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

from grft_lightning.deltas import COLUMN, ROW, DeltaLayer, IndexDelta, StructuredDelta, delta_layers, merge
from grft_lightning.methods import GPS, GRFT
from seeded_layers import seeded_layer

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
        delta = StructuredDelta(layer, "layer", "row", rows=len(rows))
        delta.set_selection(ROW, rows)
        values = torch.randn(len(rows), fin, generator=gen)
        dense = torch.zeros(out, fin)
        dense[rows] = values
    elif kind == "column":
        # 0 and 1 share an input channel (different kernel positions) in a conv with kh*kw > 1
        cols = torch.tensor(sorted({0, 1, fin - 1}))
        delta = StructuredDelta(layer, "layer", "column", columns=len(cols))
        delta.set_selection(COLUMN, cols)
        values = torch.randn(out, len(cols), generator=gen)
        dense = torch.zeros(out, fin)
        dense[:, cols] = values
    else:  # gps
        k = 2
        index = torch.stack([torch.randperm(fin, generator=gen)[:k] for _ in range(out)])
        delta = IndexDelta(layer, "layer", k)
        delta.set_selection(index)
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
        return g[delta.row_index]
    if kind == "column":
        return g[:, delta.col_index]
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
def test_unselected_delta_is_the_base_layer(kind):
    layer, x = _layer("conv_grouped")
    delta = {"row": lambda: StructuredDelta(layer, "l", "row", rows=2),
             "column": lambda: StructuredDelta(layer, "l", "column", columns=2),
             "gps": lambda: IndexDelta(layer, "l", 2)}[kind]()
    with torch.no_grad():
        delta.delta.normal_()  # values without a selection must not be used
    assert torch.equal(delta(x), layer(x))
    assert torch.equal(delta.merged_module().weight, layer.weight)


def test_auto_delta_uses_leading_entries_for_columns():
    layer, x = _layer("linear")  # out 5, fan_in 6
    delta = StructuredDelta(layer, "l", "auto", rows=2, columns=2)  # 12 entries hold a 5 x 2 column delta
    assert delta.delta.shape == (2, 6)
    assert delta.num_tuned() == 12  # the row budget until a selection is made
    cols = torch.tensor([1, 4])
    delta.set_selection(COLUMN, cols)
    assert delta.num_tuned() == 10
    values = torch.randn(5, 2)
    with torch.no_grad():
        delta.delta.view(-1)[:10].copy_(values.reshape(-1))
        delta.delta.view(-1)[10:].fill_(100.0)  # unused tail: must not reach the output
    dense = torch.zeros(5, 6)
    dense[:, cols] = values
    assert (delta(x) - F.linear(x, layer.weight + dense, layer.bias)).abs().max() < 1e-5
    delta(x).sum().backward()
    assert torch.equal(delta.delta.grad.view(-1)[10:], torch.zeros(2))


def test_set_selection_resets_values_and_state_dict_restores_selection():
    layer, x = _layer("conv")
    delta = StructuredDelta(layer, "l", "auto", rows=2, columns=4)
    delta.set_selection(COLUMN, torch.tensor([0, 5, 9, 30]))
    with torch.no_grad():
        delta.delta.normal_()
    fresh = StructuredDelta(copy.deepcopy(layer), "l", "auto", rows=2, columns=4)
    fresh.load_state_dict(delta.state_dict())
    assert fresh.is_selected and fresh.selected_axis == COLUMN
    assert torch.equal(fresh(x), delta(x))
    delta.set_selection(ROW, torch.tensor([1, 2]))
    assert torch.count_nonzero(delta.delta) == 0 and delta.selected_axis == ROW


@pytest.mark.parametrize("kind", ["row", "column", "auto", "gps"])
def test_delta_tensors_live_on_the_base_weight_device(kind):
    with torch.device("meta"):  # a device other than the default one; no .item() may be needed
        layer = nn.Conv2d(4, 6, 3)
    delta = IndexDelta(layer, "l", 2) if kind == "gps" else StructuredDelta(layer, "l", kind, rows=2, columns=3)
    tensors = list(delta.parameters()) + list(delta.buffers())
    assert {t.device.type for t in tensors} == {"meta"}
    assert delta.num_tuned() == (6 * 3 if kind == "column" else 2 * 36 if kind != "gps" else 6 * 2)


def test_unsupported_layers_are_rejected():
    with pytest.raises(TypeError, match=r"blk\.conv: deltas support nn\.Linear, nn\.Conv2d .*got Conv1d"):
        StructuredDelta(nn.Conv1d(2, 3, 3), "blk.conv", "row", rows=1)
    with pytest.raises(TypeError, match=r"blk\.conv: padding_mode='reflect' is not supported"):
        IndexDelta(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), "blk.conv", 1)
    with pytest.raises(ValueError, match=r"blk\.fc: mode must be row, column or auto, got 'rows'"):
        StructuredDelta(nn.Linear(2, 3), "blk.fc", "rows", rows=1)


def _random_selection(model: nn.Module, method) -> None:
    grads = {f"{layer.original_name}.weight": torch.randn_like(layer.base_layer.weight)
             for _, layer in delta_layers(model)}
    method.select(model, grads)
    with torch.no_grad():
        for _, layer in delta_layers(model):
            layer.delta.normal_(std=0.05)


METHODS = {"row": lambda: GRFT(mode="row"), "column": lambda: GRFT(mode="column"),
           "auto": lambda: GRFT(mode="auto", rows_per_matrix=2), "gps": lambda: GPS(k=2)}


@pytest.mark.parametrize("model_name", ["tiny_vit", "tiny_cnn"])
@pytest.mark.parametrize("kind", ["row", "column", "gps"])
def test_bf16_autocast_forward_backward(request, model_name, kind):
    method = METHODS[kind]()
    model = method.apply(request.getfixturevalue(model_name).eval())
    torch.manual_seed(0)
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
    for _, layer in delta_layers(model):
        assert layer.delta.grad is not None and layer.delta.grad.dtype == torch.float32
        assert torch.isfinite(layer.delta.grad).all() and layer.delta.grad.abs().sum() > 0


@pytest.mark.slow
def test_torch_compile_matches_eager(tiny_vit):
    method = GRFT(mode="row")
    model = method.apply(tiny_vit)
    _random_selection(model, method)
    x = torch.randn(2, 3, 32, 32)
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = [layer.delta.grad.clone() for _, layer in delta_layers(model)]
    model.zero_grad()
    compiled = torch.compile(model)
    out = compiled(x)
    out.square().sum().backward()
    assert (out - eager_out).abs().max() < 1e-4
    for (_, layer), ref in zip(delta_layers(model), eager_grads):
        assert torch.allclose(layer.delta.grad, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny_vit", "tiny_cnn"])
@pytest.mark.parametrize("kind", list(METHODS))
def test_deltas_trace_in_one_graph(request, model_name, kind):
    method = METHODS[kind]()
    model = method.apply(request.getfixturevalue(model_name))
    _random_selection(model, method)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    torch._dynamo.reset()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)  # fullgraph: a graph break is an error
    out.sum().backward()
    assert (out - ref).abs().max() < 1e-5
    assert all(layer.delta.grad is not None for _, layer in delta_layers(model))


def test_model_with_deltas_pickles_and_restores_from_a_state_dict(tiny_vit, tmp_path):
    pre = copy.deepcopy(tiny_vit)
    method = GRFT(mode="auto", rows_per_matrix=2)
    model = method.apply(tiny_vit)
    _random_selection(model, method)
    proj = model.blocks[0].attn.proj
    proj.set_selection(COLUMN, torch.tensor([3, 9]))  # one matrix with columns
    with torch.no_grad():
        proj.delta.normal_(std=0.05)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)

    torch.save(model, tmp_path / "model.pt")  # a whole-model pickle (also what spawn launchers do)
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded(x), ref)

    # a checkpoint restore: same method on a fresh backbone, then load_state_dict
    fresh = GRFT(mode="auto", rows_per_matrix=2).apply(pre)
    fresh.load_state_dict(model.state_dict())
    assert fresh.blocks[0].attn.proj.selected_axis == COLUMN
    assert all(layer.is_selected for _, layer in delta_layers(fresh))
    assert torch.equal(fresh(x), ref)


def test_merge_replaces_every_delta_and_keeps_outputs(tiny_cnn):
    model = tiny_cnn.eval()
    method = GRFT(mode="column", columns_per_matrix=2)
    method.apply(model)
    _random_selection(model, method)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        merge(model)
        after = model(x)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert (after - before).abs().max() < 1e-5
