"""Row and entry deltas keep a LayerNorm's or GELU's input, not its output, and recompute the
output in backward (``deltas.Recomputable``): the same gradients bit for bit, less memory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning import merge
from grft_lightning.core.deltas import StructuredDelta
from grft_lightning.core.layers import ROW
from grft_lightning.core.profiling import saved_tensor_bytes
from grft_lightning.core.recompute import (SOURCE_ATTRIBUTE, input_source, is_tracked, track_layer_inputs,
                                           untrack_layer_inputs)
from grft_lightning.methods import GPS, GRFT

METHODS = {"grft_row": lambda: GRFT(mode="row", rows_per_matrix=2), "gps": lambda: GPS(k=2),
           "grft_column": lambda: GRFT(mode="column", columns_per_matrix=2)}


def _selected(model: nn.Module, method) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from grft_lightning import accumulate_gradients

    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    grads = accumulate_gradients(model, [(x, labels)], lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                                 names=method.gradient_names(model))
    method.apply(model, method.select(model, grads))
    with torch.no_grad():  # non-zero deltas: the delta term matters in every product
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05, generator=gen)
    return model.train(), x, labels


def _grads(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, autocast: bool = False) -> dict:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(x).float(), labels)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _hooked(model: nn.Module) -> int:
    return sum(is_tracked(m) for m in model.modules())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["grft_row", "gps"])
def test_gradients_equal_those_from_kept_inputs_bit_for_bit(tiny_vit, one_torch_thread, kind, autocast):
    model, x, labels = _selected(tiny_vit, METHODS[kind]())
    plain = copy.deepcopy(model)
    untrack_layer_inputs(plain)
    assert _hooked(model) == 19 and _hooked(plain) == 0  # 6 blocks x (2 LayerNorms + GELU) + the final norm
    recomputed, kept = _grads(model, x, labels, autocast), _grads(plain, x, labels, autocast)
    assert recomputed.keys() == kept.keys() and len(kept) > 0
    for name in kept:
        assert torch.equal(recomputed[name], kept[name]), name


@pytest.mark.parametrize("kind", ["grft_row", "gps", "grft_column"])
def test_saved_memory_drops_by_exactly_the_producer_outputs(tiny_vit, one_torch_thread, kind):
    model, x, labels = _selected(tiny_vit, METHODS[kind]())
    plain = copy.deepcopy(model)
    untrack_layer_inputs(plain)
    outputs = []
    handles = [m.register_forward_hook(lambda _m, _a, out: outputs.append(out.numel() * out.element_size()))
               for block in model.blocks for m in (block.norm1, block.norm2, block.mlp.act)]
    recomputed = sum(saved_tensor_bytes(F.cross_entropy(model(x), labels), model).values())
    for handle in handles:
        handle.remove()
    kept = sum(saved_tensor_bytes(F.cross_entropy(plain(x), labels), plain).values())
    # test_vit at 32 px: 4 images x 5 tokens (4 patches + class token); norm outputs 64 wide, GELU outputs 192 wide; fp32
    assert sum(outputs) == 6 * 4 * 5 * (64 + 64 + 192) * 4
    # a column delta keeps only its columns of the input: nothing to recompute
    assert kept - recomputed == (0 if kind == "grft_column" else sum(outputs))


def test_an_output_changed_in_place_is_kept_not_recomputed(one_torch_thread):
    class Double(nn.Module):
        def forward(self, x):
            return x.mul_(2)  # in place on the LayerNorm's output

    torch.manual_seed(0)
    norm, linear = nn.LayerNorm(8), nn.Linear(8, 6)
    delta = StructuredDelta(linear, "linear", ROW, torch.tensor([1, 4]))
    with torch.no_grad():
        delta.delta.normal_()
    model = nn.Sequential(norm, Double(), delta)
    track_layer_inputs(model)
    x = torch.randn(5, 8, requires_grad=True)
    model(x).square().sum().backward()
    reference = (2 * F.layer_norm(x.detach(), (8,), norm.weight.detach(), norm.bias.detach()))
    effective = linear.weight + delta.dense_delta()
    expected = torch.autograd.grad((reference @ effective.t() + linear.bias).square().sum(), effective)[0]
    assert torch.allclose(delta.delta.grad, expected[[1, 4]], atol=1e-5)


def test_outputs_are_marked_only_when_the_input_needs_a_gradient():
    norm = nn.LayerNorm(4)
    track_layer_inputs(norm)
    track_layer_inputs(norm)  # once only
    assert _hooked(norm) == 1
    x = torch.randn(3, 4)
    assert input_source(norm(x)) is None  # the LayerNorm's backward would not keep x
    x.requires_grad_(True)
    out = norm(x)
    assert input_source(out).input is x
    out.add_(1)
    assert input_source(out) is None  # changed since
    with torch.no_grad():
        assert not hasattr(norm(x), SOURCE_ATTRIBUTE)
    assert not hasattr(nn.ReLU()(x), SOURCE_ATTRIBUTE)  # never hooked: ReLU's backward keeps its output


def test_merge_removes_the_hooks(tiny_vit):
    model, x, _ = _selected(tiny_vit, METHODS["grft_row"]())
    assert _hooked(model) == 19
    merge(model)
    assert _hooked(model) == 0
    with torch.enable_grad():
        x.requires_grad_(True)
        assert not hasattr(model.blocks[0].norm1(x.new_ones(2, 64).requires_grad_()), SOURCE_ATTRIBUTE)
