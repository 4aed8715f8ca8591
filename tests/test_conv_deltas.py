"""Row and column deltas on convolutions (``ConvDelta``): one convolution with ``W0 + delta``,
the kernel gradient at the selected entries only, channels-last kept through forward and backward.

Every check compares with the dense computation: the plain convolution with ``W0 + dense`` where
``dense`` is built by hand from the rows or columns and values.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from grft_lightning.core.deltas import StructuredDelta
from grft_lightning.core.kernels import _select_channels

from grft_lightning.core.layers import COLUMN, ROW
from seeded_layers import seeded_layer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CL = torch.channels_last
# (constructor, input shape): the kinds of MobileNetV2 (1x1, depthwise, strided dense 3x3) and others
CONVS = {
    "pointwise": (lambda: nn.Conv2d(8, 12, 1, bias=False), (2, 8, 5, 5)),
    "pointwise_bias": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 5, 5)),
    "pointwise_1x1_input": (lambda: nn.Conv2d(8, 12, 1), (3, 8, 1, 1)),
    "dense_stride2": (lambda: nn.Conv2d(3, 10, 3, stride=2, padding=1), (2, 3, 9, 9)),
    "dilated": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False), (2, 4, 6, 6)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), (2, 8, 6, 6)),
    "depthwise_stride2": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), (2, 8, 7, 7)),
    "depthwise_x2": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4), (2, 4, 5, 5)),
    "grouped": (lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3), (2, 6, 5, 5)),
}


def _setup(name: str, indices: list[int], seed: int = 0, axis: int = ROW):
    """A layer of ``CONVS``, its delta at ``indices`` (rows or columns) with random values, the same
    delta as a dense ``out x fan_in`` matrix (a repeated index adds up), and an input."""
    layer, x = seeded_layer(*CONVS[name], seed)
    out, fin = layer.weight.shape[0], layer.weight[0].numel()
    index = torch.tensor(indices)
    if len(set(indices)) == len(indices):
        delta = StructuredDelta(copy.deepcopy(layer), "layer", axis, index)
    else:  # a selection never repeats an index; set the buffer by hand to test the kernel's arithmetic
        delta = StructuredDelta(copy.deepcopy(layer), "layer", axis, torch.arange(len(indices)))
        delta.index.copy_(index)
    values = torch.randn(*delta.delta.shape)
    with torch.no_grad():
        delta.delta.copy_(values)
    return layer, delta, torch.zeros(out, fin).index_add_(axis, index, values), x


def _reference(layer: nn.Conv2d, dense: torch.Tensor, x: torch.Tensor, weight_grad: bool = True):
    weight = (layer.weight.detach() + dense.view_as(layer.weight)).requires_grad_(weight_grad)
    return weight, F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(CONVS))
def test_rows_equal_dense_in_both_memory_formats(name, channels_last):
    out = CONVS[name][0]().out_channels
    layer, delta, dense, x = _setup(name, [0, out // 2 + 1, out - 1])  # rows in different groups
    _check_against_dense(layer, delta, dense, x, channels_last, lambda matrix: matrix[delta.index])


def _check_against_dense(layer, delta, dense, x, channels_last: bool, tuned_entries) -> None:
    """Output, input, delta and bias gradients equal the dense convolution's; the base weight gets
    none; on channels-last tensors the output and the input gradient stay channels-last.
    ``tuned_entries`` picks the delta's entries from the dense kernel gradient (``out x fan_in``)."""
    if channels_last:
        delta, x = delta.to(memory_format=CL), x.contiguous(memory_format=CL)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = delta(x1)
    weight, y_ref = _reference(layer, dense, x2)
    assert (y - y_ref).abs().max() < 1e-5
    g = torch.randn_like(y_ref)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert (delta.delta.grad - tuned_entries(weight.grad.reshape(weight.shape[0], -1))).abs().max() < 1e-5
    assert (x1.grad - x2.grad).abs().max() < 1e-5
    if layer.bias is not None:
        assert (delta.base_layer.bias.grad - layer.bias.grad).abs().max() < 1e-5
    assert delta.base_layer.weight.grad is None
    if channels_last and x.shape[-1] > 1:  # the delta path keeps the layout: no copy to NCHW downstream
        assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
        assert x1.grad.is_contiguous(memory_format=CL) and not x1.grad.is_contiguous()


@pytest.mark.parametrize("name", ["pointwise", "depthwise", "grouped"])
def test_repeated_rows_sum_like_the_dense_delta(name):
    with pytest.raises(ValueError, match="layer: the same row index appears twice"):
        StructuredDelta(seeded_layer(*CONVS[name])[0], "layer", ROW, torch.tensor([1, 1, 4]))
    layer, delta, dense, x = _setup(name, [1, 1, 4])
    dense = torch.zeros_like(dense).index_add_(0, delta.index, delta.delta.detach())
    x = x.contiguous(memory_format=CL)
    y = delta(x)
    weight, y_ref = _reference(layer, dense, x)
    assert (y - y_ref).abs().max() < 1e-5
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert (delta.delta.grad - weight.grad.reshape(weight.shape[0], -1)[delta.index]).abs().max() < 1e-4


def test_input_without_gradient_trains_only_the_rows():
    """The first convolution of a network: the images need no gradient, only the rows do."""
    layer, delta, dense, x = _setup("dense_stride2", [2, 7])
    x = x.contiguous(memory_format=CL)
    y = delta(x)
    weight, y_ref = _reference(layer, dense, x)
    y.sum().backward()
    y_ref.sum().backward()
    assert (delta.delta.grad - weight.grad.reshape(10, -1)[[2, 7]]).abs().max() < 1e-5


def test_a_trained_base_weight_gets_the_dense_gradient():
    layer, delta, dense, x = _setup("depthwise", [3, 5])
    delta.base_layer.weight.requires_grad_(True)
    y = delta(x)
    weight, y_ref = _reference(layer, dense, x)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert (delta.base_layer.weight.grad - weight.grad).abs().max() < 1e-5
    assert (delta.delta.grad - weight.grad.reshape(8, -1)[[3, 5]]).abs().max() < 1e-5


class _ConvBackwardCalls(TorchDispatchMode):
    """Records the kernel-gradient shape of every ``convolution_backward`` (None: not asked for)."""

    def __init__(self):
        super().__init__()
        self.kernel_grads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.kernel_grads.append(tuple(args[2].shape) if args[-1][1] else None)
        return func(*args, **(kwargs or {}))


# rows of any convolution; columns of an ungrouped one (a grouped one's columns touch every group)
@pytest.mark.parametrize("axis, name", [("row", "pointwise"), ("row", "depthwise"), ("row", "dense_stride2"),
                                        ("column", "pointwise"), ("column", "dense_stride2"), ("column", "dilated")])
def test_backward_never_forms_the_full_kernel_gradient(axis, name):
    layer, delta, _, x = _setup(name, [1, 4], axis=ROW if axis == "row" else COLUMN)
    x = x.contiguous(memory_format=CL).requires_grad_(True)
    y = delta(x)
    with _ConvBackwardCalls() as calls:
        y.sum().backward()
    assert calls.kernel_grads, "backward ran no convolution"
    assert tuple(layer.weight.shape) not in calls.kernel_grads
    assert delta.delta.grad is not None and x.grad is not None


@pytest.mark.parametrize("kernel", [(3, 2), (3, 3)], ids=["even", "odd"])
def test_padding_same_equals_dense(kernel):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, kernel, padding="same")  # (3, 2): asymmetric padding
    delta = StructuredDelta(copy.deepcopy(layer), "layer", ROW, torch.tensor([1, 4]))
    with torch.no_grad():
        delta.delta.normal_()
    dense = torch.zeros(6, 4 * kernel[0] * kernel[1]).index_add_(0, delta.index, delta.delta.detach())
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=CL)
    weight = (layer.weight.detach() + dense.view_as(layer.weight)).requires_grad_(True)
    y, y_ref = delta(x), F.conv2d(x, weight, layer.bias, 1, "same")
    assert (y - y_ref).abs().max() < 1e-5
    y.sum().backward()
    y_ref.sum().backward()
    assert (delta.delta.grad - weight.grad.reshape(6, -1)[[1, 4]]).abs().max() < 1e-5


def test_bf16_autocast_on_channels_last():
    layer, delta, dense, x = _setup("depthwise_stride2", [0, 6])
    delta, x = delta.to(memory_format=CL), x.contiguous(memory_format=CL)
    _, ref = _reference(layer, dense, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = delta(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()
    y.float().sum().backward()
    assert delta.delta.grad.dtype == torch.float32 and delta.delta.grad.abs().sum() > 0
    assert delta.base_layer.bias.grad.dtype == torch.float32


# (2, 6, 1, 1) and (1, 1, 3, 3) are contiguous in both layouts: the plain index_select, whose output
# layout is then its own
@pytest.mark.parametrize("shape", [(2, 6, 4, 5), (2, 6, 1, 1), (1, 1, 3, 3)])
def test_select_channels_is_index_select_in_the_input_layout(shape):
    torch.manual_seed(0)
    index = torch.tensor([4 % shape[1], 0, 4 % shape[1]])
    for layout in (torch.contiguous_format, CL):
        x = torch.randn(shape).contiguous(memory_format=layout)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y = _select_channels(x1, index)
        assert torch.equal(y, x2.index_select(1, index))
        unambiguous = shape[1] > 1 and shape[2] * shape[3] > 1
        assert y.is_contiguous(memory_format=layout) or not unambiguous
        g = torch.randn(y.shape)
        (y * g).sum().backward()
        (x2.index_select(1, index) * g).sum().backward()
        assert torch.equal(x1.grad, x2.grad)
        assert x1.grad.is_contiguous(memory_format=layout) or not unambiguous


@pytest.mark.parametrize("name", ["pointwise", "dense_stride2", "grouped"])
def test_a_channels_last_layer_turns_a_contiguous_input_channels_last(name):
    # as a plain convolution with a channels-last weight does: the first layer of a channels-last
    # model starts the whole network in NHWC even when the images arrive contiguous
    layer, delta, _, x = _setup(name, [0, 2])
    delta, layer = delta.to(memory_format=CL), layer.to(memory_format=CL)
    assert layer(x).is_contiguous(memory_format=CL) and not layer(x).is_contiguous()
    y = delta(x.requires_grad_(True))
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()


def test_the_module_lays_image_batches_out_channels_last_when_asked():
    from grft_lightning.methods import GRFT
    from grft_lightning.training.module import PEFTModule

    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for channels_last in (False, True):
        module = PEFTModule(GRFT(rows_per_matrix=1), backbone="test_efficientnet", num_classes=2, pretrained=False,
                            image_size=32, channels_last=channels_last)
        out_images, out_labels = module.on_after_batch_transfer((images, labels), 0)
        assert out_labels is labels and torch.equal(out_images, images)
        assert out_images.is_contiguous(memory_format=CL) == channels_last


# -- columns ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(CONVS))
def test_columns_equal_dense_in_both_memory_formats(name, channels_last):
    fin = CONVS[name][0]().weight[0].numel()
    layer, delta, dense, x = _setup(name, [0, fin // 2, fin - 1, fin // 2], axis=COLUMN)  # one column twice
    _check_against_dense(layer, delta, dense, x, channels_last, lambda matrix: matrix[:, delta.index])
