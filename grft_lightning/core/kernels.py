"""The autograd functions behind a delta layer's forward and backward.

On a linear layer the three axes share :class:`DeltaLinear`: rows and columns add a skinny
correction to the frozen product in place, entries form ``W0 + delta`` as a temporary of the
product (again in backward for the input gradient), so the layer keeps no weight-sized tensor
between forward and backward. On a convolution, rows and columns run one convolution with the
kernel ``W0 + delta`` (a temporary, :class:`ConvDelta`) and form the kernel gradient at the
selected entries only. For a grouped or depthwise convolution a row is an output channel with its
``in/groups x kh x kw`` weights (its kernel gradient gathers that group's input channels); a column
is a position of the per-group fan-in and is applied to every group (its kernel gradient is then
the whole kernel's, which for depthwise convolutions is tiny).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning.core.layers import COLUMN, ENTRY, ROW
from grft_lightning.core.recompute import recompute


def conv_padding(conv: nn.Conv2d) -> tuple[tuple[int, int, int, int] | None, tuple[int, int]]:
    """A convolution's padding as ``(input_pad, padding)``: ``input_pad`` for ``F.pad`` (None when
    nothing is padded beforehand) and the numeric ``padding`` of the convolution itself.
    ``"valid"`` pads nothing; ``"same"`` (stride 1, as torch requires) pads ``d * (k - 1)`` in all,
    half on each side where that is even; where it is odd (an even kernel), torch puts the extra
    row and column on the bottom and the right, which one convolution with numeric padding cannot
    express: the input is then padded explicitly and the convolution pads nothing."""
    if not isinstance(conv.padding, str):
        return None, tuple(conv.padding)
    if conv.padding == "valid":
        return None, (0, 0)
    totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    if not any(total % 2 for total in totals):
        return None, tuple(total // 2 for total in totals)
    (top, height), (left, width) = [(total // 2, total) for total in totals]
    return (left, width - left, top, height - top), (0, 0)


def _channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last (and not also contiguous, as at ``H = W = 1``)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _matrix(t: torch.Tensor) -> torch.Tensor | None:
    """A channels-last ``N x C x H x W`` tensor as its ``NHW x C`` matrix (a view); None otherwise."""
    m = t.permute(0, 2, 3, 1)
    return m.reshape(-1, t.shape[1]) if m.is_contiguous() else None


def _select_channels(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(1, index)`` for an ``N x C x H x W`` tensor, in ``t``'s memory format.

    On a channels-last tensor the gather runs on its ``NHW x C`` matrix view: ``index_select``
    along dim 1 of the 4-D tensor takes a strided path there (10-30x slower at MobileNetV2's
    sizes) and returns a contiguous tensor, whose gradient would then leave channels-last.
    """
    if not _channels_last(t):
        return t.index_select(1, index)
    n, _, h, w = t.shape
    return _matrix(t).index_select(1, index).view(n, h, w, -1).permute(0, 3, 1, 2)


def _conv_kernel(weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, axis: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """``W0`` with ``delta`` added to its output channels (``ROW``) or fan-in positions (``COLUMN``):
    a temporary in ``weight``'s layout (out-of-place ``index_add`` would return a contiguous kernel,
    and a convolution of a contiguous input with it would leave channels-last for every layer after
    it)."""
    if axis == ROW:
        kernel = weight.clone()  # keeps a channels-last weight channels-last
        kernel.index_add_(0, index, delta.view(len(index), *weight.shape[1:]).to(weight.dtype))
        return kernel.to(dtype)
    columns = delta.new_zeros(weight.shape[0], weight[0].numel()).index_add_(1, index, delta)
    return (weight + columns.view(weight.shape).to(weight.dtype)).to(dtype)  # ``+`` keeps the first's layout


def _delta_kernel_grad(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, axis: int,
                       weight_shape: torch.Size, conv: tuple) -> torch.Tensor:
    """The kernel gradient at the delta's entries alone, in the delta's shape.

    Rows ``(len(rows), fan_in)``: the kernel gradient from those channels of ``grad`` (and, for a
    grouped convolution, the input channels of their groups). Columns ``(out, len(columns))``: for an
    ungrouped convolution the kernel gradient of the columns' input channels, read at their kernel
    positions; for a grouped one (a column applies to every group) the whole kernel gradient, the size
    of a depthwise kernel. A 1x1 convolution on channels-last tensors takes the product of the
    ``NHW x C`` matrices instead.
    """
    stride, padding, dilation, groups = conv
    out, per_group_in, kh, kw = weight_shape
    pointwise = (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and groups == 1
    if axis == ROW:
        g = _select_channels(grad, index)
        g_matrix, x_matrix = (_matrix(g), _matrix(x)) if pointwise else (None, None)
        if g_matrix is not None and x_matrix is not None:
            return g_matrix.t().matmul(x_matrix)
        if groups == 1:
            inputs, kernel_groups = x, 1
        else:  # each selected output channel reads only its own group's input channels
            first = (index // (out // groups)) * per_group_in
            inputs = _select_channels(x, (first[:, None] + torch.arange(per_group_in, device=index.device)).reshape(-1))
            kernel_groups = len(index)
        kernel = delta.view(len(index), per_group_in, kh, kw).to(g.dtype)
        return torch.ops.aten.convolution_backward(g, inputs, kernel, None, stride, padding, dilation, False, (0, 0),
                                                   kernel_groups, (False, True, False))[1].reshape(len(index), -1)
    if groups != 1:  # every group reads the column: the whole (small) kernel gradient
        kernel = grad.new_zeros(weight_shape)
        whole = torch.ops.aten.convolution_backward(grad, x, kernel, None, stride, padding, dilation, False, (0, 0),
                                                    groups, (False, True, False))[1]
        return whole.reshape(out, -1).index_select(1, index)
    channels, position = index // (kh * kw), index % (kh * kw)
    inputs = _select_channels(x, channels)
    g_matrix, x_matrix = (_matrix(grad), _matrix(inputs)) if pointwise else (None, None)
    if g_matrix is not None and x_matrix is not None:
        return g_matrix.t().matmul(x_matrix)
    kernel = grad.new_zeros(out, len(index), kh, kw)
    per_channel = torch.ops.aten.convolution_backward(grad, inputs, kernel, None, stride, padding, dilation, False,
                                                      (0, 0), 1, (False, True, False))[1]
    return per_channel.reshape(out, len(index), kh * kw).gather(2, position.view(1, -1, 1).expand(out, -1, 1))[..., 0]


class ConvDelta(torch.autograd.Function):
    """A convolution with ``W0`` plus row or column deltas: ``conv2d(x, W0 + scatter(D))``, bias
    included.

    Forward is one convolution with the effective kernel (a temporary, rebuilt in backward rather
    than kept), so a layer costs what the frozen convolution costs; backward is one input-gradient
    convolution with that kernel and the kernel gradient at the delta's entries only
    (:func:`_delta_kernel_grad`), never the full weight's (unless ``W0`` itself trains, or for
    columns of a grouped convolution, whose kernel is small). An extra convolution of the delta
    added to the frozen output would cost a second input gradient, an output-sized add and, on
    channels-last tensors, strided gathers (see :func:`_select_channels`). Under autocast the
    convolution runs in the autocast dtype and the saved input is in it, as for ``F.conv2d``.
    """

    @staticmethod
    def forward(ctx, x, delta, index, weight, bias, axis, stride, padding, dilation, groups):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x = x.to(dtype)
            b = None if bias is None else bias.to(dtype)
            y = F.conv2d(x, _conv_kernel(weight, delta, index, axis, dtype), b, stride, padding, dilation, groups)
        ctx.save_for_backward(x, delta, index, weight)
        ctx.axis, ctx.conv, ctx.dtype = axis, (stride, padding, dilation, groups), dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, delta, index, weight = ctx.saved_tensors
        axis, (stride, padding, dilation, groups) = ctx.axis, ctx.conv
        grad = grad.to(ctx.dtype)
        grad_x = grad_delta = grad_weight = grad_bias = None
        need_x, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        if need_x or need_weight:
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad, x, _conv_kernel(weight, delta, index, axis, ctx.dtype), None, stride, padding, dilation, False,
                (0, 0), groups, (need_x, need_weight, False))
        if ctx.needs_input_grad[1]:
            if grad_weight is not None:  # a trained W0: its gradient holds the delta's entries already
                grad_delta = grad_weight.reshape(weight.shape[0], -1).index_select(0 if axis == ROW else 1, index)
            else:
                grad_delta = _delta_kernel_grad(grad, x, delta, index, axis, weight.shape, ctx.conv)
            grad_delta = grad_delta.to(delta.dtype)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = grad.float().sum((0, 2, 3))
        return grad_x, grad_delta, None, grad_weight, grad_bias, None, None, None, None, None


class DeltaLinear(torch.autograd.Function):
    """``y = x (W0 + delta)^T + b`` for a 2-D ``x``: one product each way, like a frozen linear.

    Rows and columns never form the effective weight: the frozen product ``x W0^T`` is corrected
    in place by a skinny one (``y[:, R] += x D^T``, ``y += x[:, C] D^T``; in backward
    ``grad_x += grad[:, R] D`` or ``grad_x[:, C] += grad D``), so no weight-sized temporary is
    made at all. GPS's entries form ``W0.scatter_add(D)`` as a temporary of the product, again in
    backward for ``grad_x``; no weight-sized tensor outlives a layer's forward. The delta's gradient reads only what it needs: ``grad[:, R]^T x`` (rows),
    ``grad^T x[:, C]`` (columns: only that slice of ``x`` is saved) or, for entries, gathers
    ``sum_n grad[n, i] x[n, index[i, j]]`` instead of the dense ``N * out * in`` product. Under
    autocast the products run in the autocast dtype and the saved input is in it, as for
    ``F.linear``. With a ``source`` (:class:`Recomputable`), ``x`` is not kept: the source's
    input is, and backward recomputes ``x`` from it, bit for bit, when the delta's or the
    weight's gradient needs it (the input's gradient never does).
    """

    @staticmethod
    def forward(ctx, x, delta, index, weight, bias, axis, source=None):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x = x.to(dtype)
            b = None if bias is None else bias.to(dtype)
            x_c = x.index_select(1, index) if axis == COLUMN else None
            if axis == ENTRY:
                y = F.linear(x, _effective_weight(weight, delta, index, dtype), b)
            else:  # the frozen product, then a skinny correction added in place
                y = F.linear(x, weight.to(dtype), b)
                if axis == ROW:  # y[:, R] += x D^T
                    y.index_add_(1, index, x.matmul(delta.to(dtype).t()))
                else:  # y += x[:, C] D^T
                    y.addmm_(x_c, delta.to(dtype).t())
        whole = axis != COLUMN or ctx.needs_input_grad[3]  # a trained W0 needs all of x
        ctx.recipe = source.recipe() if source is not None and whole else None
        ctx.save_for_backward(source.input if ctx.recipe else x if whole else x_c, delta, index, weight)
        ctx.axis, ctx.dtype, ctx.whole, ctx.width = axis, dtype, whole, x.shape[1]
        return y

    @staticmethod
    def backward(ctx, grad):
        x, delta, index, weight = ctx.saved_tensors
        if ctx.recipe and (ctx.needs_input_grad[1] or ctx.needs_input_grad[3]):
            x = recompute(ctx.recipe, x).reshape(-1, ctx.width).to(ctx.dtype)
        axis, grad = ctx.axis, grad.to(ctx.dtype)
        grad_x = grad_delta = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if axis == ENTRY:
                grad_x = grad.matmul(_effective_weight(weight, delta, index, ctx.dtype))
            else:
                d = delta.to(ctx.dtype)
                grad_x = grad.matmul(weight.to(ctx.dtype))
                if axis == ROW:  # + grad[:, R] D
                    grad_x.addmm_(grad.index_select(1, index), d)
                else:  # grad_x[:, C] += grad D
                    grad_x.index_add_(1, index, grad.matmul(d))
        if ctx.needs_input_grad[1]:
            if axis == ROW:
                grad_delta = grad.index_select(1, index).t().matmul(x)
            elif axis == COLUMN:  # as (x_C^T grad)^T: a skinny product over grad's contiguous rows is ~8x faster
                grad_delta = (x.index_select(1, index) if ctx.whole else x).t().matmul(grad).t()
            elif index.shape[1] * GATHER_FAN_IN_RATIO <= x.shape[1]:
                grad_delta = torch.stack([(grad * x.index_select(1, index[:, j])).float().sum(0)
                                          for j in range(index.shape[1])], 1)
            else:  # many entries per row: one dense product is cheaper than k gathers
                grad_delta = grad.t().matmul(x).gather(1, index)
            grad_delta = grad_delta.to(delta.dtype)
        if ctx.needs_input_grad[3]:
            grad_weight = grad.t().matmul(x).to(weight.dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = grad.float().sum(0)
        return grad_x, grad_delta, None, grad_weight, grad_bias, None, None


def _effective_weight(weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W0`` with GPS's per-row entries added (a temporary of one product)."""
    return weight.clone().scatter_add_(1, index, delta.to(weight.dtype)).to(dtype)


#: below ``k * GATHER_FAN_IN_RATIO <= fan_in`` an index delta's gradient is gathered entry by
#: entry (GPS's k=1 everywhere); above it, one dense product and a gather are faster.
GATHER_FAN_IN_RATIO = 16
