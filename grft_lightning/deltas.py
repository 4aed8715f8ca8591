"""Frozen pre-trained weights plus small trainable deltas.

A delta layer wraps an ``nn.Linear`` or ``nn.Conv2d``, or a subclass of either, or Hugging Face's
``Conv1D`` (GPT-2; its weight is stored ``in x out`` and read transposed, :func:`to_matrix`) -- the
*base layer*, frozen -- and adds a trainable tensor of exactly the size a selection
(``selection.py``) gave this layer: deltas are built after the selection, from its indices. Every
weight is read as an ``out x fan_in`` matrix, and the *axis* a layer tunes is ``ROW``, ``COLUMN``
or ``ENTRY``. Three kinds (docs/methods.md, "How
tuned parameters are held"):

* rows (output neurons / output channels) ``R``:  ``y = base(x);  y[..., R] += x D^T``
* columns (input features / input channel x kernel position) ``C``: ``y += x[..., C] D^T``
* per-row index entries (GPS): ``W = W0 + scatter(D)`` for the selected ``(row, col)`` pairs.

The optimizer only ever sees ``D``, and no kind forms the gradient of the full weight (GPS's
only for a large ``k``). On a linear layer the three kinds share one autograd function
(``_DeltaLinear``): rows and columns add a skinny correction to the frozen product in place,
entries form ``W0 + delta`` as a temporary of the product (again in backward for the input
gradient), so the layer keeps no weight-sized tensor between forward and backward. On a
convolution, rows and columns run one convolution with the kernel ``W0 + delta`` (a temporary,
:class:`_ConvDelta`) and form the kernel gradient at the selected entries only. For a grouped or
depthwise convolution a row is an output channel with its ``in/groups x kh x kw`` weights (its
kernel gradient gathers that group's input channels); a column is a position of the per-group
fan-in and is applied to every group (its kernel gradient is then the whole kernel's, which for
depthwise convolutions is tiny). ``merge`` folds ``W0 + delta`` back into a plain layer.

:class:`SelectableLayer` is what every layer built from a selection shares (export of its values,
counts, ``merged_module``); :class:`DeltaLayer` adds the delta. GPS's masked weights
(``methods/masked.py``) are selectable layers without a delta.

Subclasses (timm's ``StdConv2d`` in BiT ResNets, ``Conv2dSame``, ``ScaledStdConv2d``, ...) often
transform the weight or the input in their own ``forward``: ``StdConv2d`` standardises each
output channel of its weight before the convolution. The skinny corrections above would add the
delta *outside* that transform, so for a layer whose ``forward`` is not ``nn.Linear``'s or
``nn.Conv2d``'s own, a selected delta layer instead calls the layer's own ``forward`` with
``W0 + delta`` as its weight (``torch.func.functional_call``): ``StdConv2d`` then standardises
``W0 + delta``, exactly what the merged layer computes. The price is a weight-sized temporary per
layer (and a dense weight gradient in backward), as for GPS's entries on convolutions.
"""

from __future__ import annotations

import abc
import collections
import copy
import fnmatch
import sys
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning.heads import DEFAULT, head_module_ids

#: The axis a layer tunes: whole rows (output neurons / channels), whole columns (fan-in
#: positions), or single entries (GPS: per-row indices). The one name of this notion is *axis*;
#: a Selection names it ``"row"``, ``"column"`` or ``"entry"`` (:data:`AXIS_NAMES`).
ROW, COLUMN, ENTRY = 0, 1, 2
AXIS_NAMES = {ROW: "row", COLUMN: "column", ENTRY: "entry"}
AXES = {name: axis for axis, name in AXIS_NAMES.items()}

#: The torch layers a delta can wrap, subclasses included. With Hugging Face's ``Conv1D``
#: (:func:`transposed_types`) they make the one definition of an eligible layer's type,
#: :func:`is_layer` (``methods/base.py`` walks a model with it, ``selection.py`` scores these weights).
LAYER_TYPES = (nn.Linear, nn.Conv2d)

#: Subclasses whose ``forward`` overrides the base class's but computes the same thing (timm's
#: ``Linear`` only changes dtypes under TorchScript): they keep the fast paths.
SAME_AS_BASE_FORWARD = frozenset({"timm.layers.linear.Linear"})


def transposed_types() -> tuple[type, ...]:
    """Linear layers that store their weight as ``in x out``: Hugging Face's ``Conv1D`` (GPT-2's
    attention and MLP), ``y = x W + b``. Looked up only when ``transformers`` is loaded (a model
    holding one has loaded it), so this module never imports it."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def is_layer(module: nn.Module) -> bool:
    """Whether a delta can wrap ``module``: ``nn.Linear``, ``nn.Conv2d`` (subclasses included) or
    Hugging Face's ``Conv1D``."""
    return isinstance(module, LAYER_TYPES + transposed_types())


def is_transposed(layer: nn.Module) -> bool:
    """True for layers whose weight is stored ``in x out`` (:func:`transposed_types`)."""
    types = transposed_types()
    return bool(types) and isinstance(layer, types)


def has_plain_forward(layer: nn.Module) -> bool:
    """True when ``layer`` computes exactly ``F.linear`` / ``F.conv2d`` of its own weight (its
    class keeps ``nn.Linear``'s, ``nn.Conv2d``'s or ``Conv1D``'s forward), so a delta's
    contribution may be added to its output; False for subclasses such as ``StdConv2d`` that
    transform the weight."""
    cls = type(layer)
    if f"{cls.__module__}.{cls.__qualname__}" in SAME_AS_BASE_FORWARD:
        return True
    if isinstance(layer, nn.Conv2d):
        return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward
    if is_transposed(layer):
        return cls.forward is transposed_types()[0].forward
    return isinstance(layer, nn.Linear) and cls.forward is nn.Linear.forward


def matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """``(out, fan_in)``: the layer's weight read as a matrix (a convolution as ``out x
    (in/groups * kh * kw)``, a ``Conv1D`` weight transposed)."""
    weight = layer.weight
    if is_transposed(layer):
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight[0].numel()


def to_matrix(layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of the layer's weight shape (the weight, its gradient, a mask) as the ``out x
    fan_in`` matrix every score, index and delta refers to (a view)."""
    return tensor.t() if is_transposed(layer) else tensor.reshape(tensor.shape[0], -1)


def from_matrix(layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_matrix`: an ``out x fan_in`` matrix in the layer's weight layout."""
    return matrix.t() if is_transposed(layer) else matrix.reshape(layer.weight.shape)


def checked_index(name: str, index: torch.Tensor, shape: tuple[int, ...], limit: int, what: str) -> torch.Tensor:
    """``index`` as int64 after checking what a file (tuned file, checkpoint) could get wrong: an
    integer dtype, the ``shape`` the layer expects, values in ``[0, limit)`` and no value twice
    (along the last dimension); a ``ValueError`` naming the layer otherwise."""
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{name}: {what} indices must be integers, got {index.dtype}")
    if tuple(index.shape) != tuple(shape):
        raise ValueError(f"{name}: {what} indices of shape {tuple(index.shape)}, this layer expects {tuple(shape)}")
    index = index.long()
    if index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= limit:
            raise ValueError(f"{name}: {what} index {low if low < 0 else high} out of range (this layer has "
                             f"{limit} {what})")
        ordered = index.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError(f"{name}: the same {what[:-1]} index appears twice")
    return index


def checked_values(name: str, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Delta values after checking their shape against the layer's; a ``ValueError`` otherwise."""
    if tuple(values.shape) != tuple(shape):
        raise ValueError(f"{name}: delta of shape {tuple(values.shape)}, this layer expects {tuple(shape)}")
    if not values.dtype.is_floating_point:
        raise ValueError(f"{name}: delta values must be floating point, got {values.dtype}")
    return values


class SelectableLayer(nn.Module, metaclass=abc.ABCMeta):
    """A pre-trained layer wrapped so that a selection chooses which of its weight entries train.

    What every layer built from a selection shares: ``method.apply(model, selection)`` creates it
    with the selection's indices, ``save_tuned``/``load_tuned`` go through
    :meth:`export_tensors`/:meth:`import_tensors` (the values; the indices are the Selection's),
    the counts read :meth:`num_tuned` and ``merge`` replaces it by :meth:`merged_module`. Two families: :class:`DeltaLayer` (the pre-trained
    weight stays frozen and the tuned entries live in a small trainable delta) and the masked
    weights of ``methods/masked.py`` (the weight itself trains, under a mask).

    Attributes:
        base_layer: the pre-trained ``nn.Linear``/``nn.Conv2d`` (or subclass) or ``Conv1D``.
        original_name: the layer's name in the model before it was wrapped.
    """

    def __init__(self, base_layer: nn.Module, original_name: str):
        super().__init__()
        if not is_layer(base_layer):
            raise TypeError(f"{original_name}: deltas support nn.Linear, nn.Conv2d (subclasses of either are "
                            f"accepted) and transformers' Conv1D, got {type(base_layer).__name__}")
        if not isinstance(base_layer._parameters.get("weight"), nn.Parameter):
            raise TypeError(f"{original_name}: the weight of this {type(base_layer).__name__} is computed (a "
                            "parametrization such as weight norm), not a parameter a delta can be added to; "
                            "leave the layer out with the method's `exclude`")
        self.base_layer = base_layer
        self.original_name = original_name

    # -- shared helpers -----------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return matrix_shape(self.base_layer)[0]

    @property
    def fan_in(self) -> int:
        return matrix_shape(self.base_layer)[1]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    @property
    def selected_axis(self) -> int:
        """The axis this layer tunes (``ROW``, ``COLUMN`` or ``ENTRY``)."""
        return ENTRY

    def to_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor of the base weight's shape as the ``out x fan_in`` matrix (:func:`to_matrix`)."""
        return to_matrix(self.base_layer, tensor)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """An ``out x fan_in`` matrix in the base weight's layout (:func:`from_matrix`)."""
        return from_matrix(self.base_layer, matrix)

    def added_parameters(self) -> list[nn.Parameter]:
        """The parameters this layer adds beside the pre-trained ones (a delta's ``D``; none for a
        masked weight). ``export_tensors`` writes them."""
        return list(self.parameters(recurse=False))

    # -- what a kind provides -----------------------------------------------------------------
    @abc.abstractmethod
    def num_tuned(self) -> int:
        """Number of weight entries this layer tunes."""

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The tuned values this layer adds (``{"delta": D}``; none for a masked weight)."""
        return {name: p.detach() for name, p in self.named_parameters(recurse=False)}

    def import_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load :meth:`export_tensors` output, checking names and shapes."""
        own = dict(self.named_parameters(recurse=False))
        if set(tensors) != set(own):
            raise ValueError(f"{self.original_name}: expected {sorted(own)}, found {sorted(tensors)}")
        for name, value in tensors.items():
            target = own[name]
            checked_values(self.original_name, value, tuple(target.shape))
            with torch.no_grad():
                target.copy_(value.to(target.dtype))

    @abc.abstractmethod
    def merged_module(self) -> nn.Module:
        """A plain layer computing what this one computes (``merge`` puts it in its place)."""


class DeltaLayer(SelectableLayer):
    """A frozen base layer plus a trainable delta filled in by a selection.

    Attributes:
        plain_forward: whether the base layer computes plain ``F.linear``/``F.conv2d`` of its
            weight (the fast paths); False for e.g. ``StdConv2d`` (module docstring).
    """

    def __init__(self, base_layer: nn.Module, original_name: str):
        super().__init__(base_layer, original_name)
        #: False: the layer's own forward transforms its weight (StdConv2d); see the module docstring
        self.plain_forward = has_plain_forward(base_layer)
        if self.plain_forward and isinstance(base_layer, nn.Conv2d) and base_layer.padding_mode != "zeros":
            raise TypeError(f"{original_name}: padding_mode={base_layer.padding_mode!r} is not supported")
        base_layer.weight.requires_grad_(False)

    def linear_weight(self) -> torch.Tensor:
        """The base weight as ``F.linear`` takes it (``out x in``; a view for ``Conv1D``)."""
        weight = self.base_layer.weight
        return weight.t() if is_transposed(self.base_layer) else weight

    def _own_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's own forward with ``W0 + delta`` as its weight (layers without a plain
        forward: the delta goes through whatever the layer does to its weight)."""
        weight = self.base_layer.weight
        effective = weight + self.dense_delta().to(weight.dtype)
        return torch.func.functional_call(self.base_layer, {"weight": effective}, (x,))

    def _linear(self, x: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
        """The linear path of every kind (:class:`_DeltaLinear`), on inputs of any leading shape.
        A row or entry delta whose input a tracked producer made (:class:`Recomputable`) keeps
        that producer's input instead of ``x``."""
        source = input_source(x) if axis != COLUMN and torch.is_grad_enabled() else None
        y = _DeltaLinear.apply(x.reshape(-1, x.shape[-1]), delta, index, self.linear_weight(), self.base_layer.bias,
                               axis, source)
        return y.view(*x.shape[:-1], y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output with the delta's contribution."""
        if not self.plain_forward:
            return self._own_forward(x)
        return self.delta_forward(x)

    # -- what a kind provides -----------------------------------------------------------------
    @abc.abstractmethod
    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output of a selected layer with a plain forward (the fast paths)."""

    @abc.abstractmethod
    def dense_delta(self) -> torch.Tensor:
        """The delta as a tensor of the base weight's shape (zeros outside the selection)."""

    def l2(self) -> torch.Tensor:
        """``sum ||W - W0||^2`` over the tuned entries (the L2-SP penalty of GRFT)."""
        return sum((p.float().pow(2).sum() for p in self.added_parameters()),
                   torch.zeros((), device=self.base_layer.weight.device))

    def merged_module(self) -> nn.Module:
        """A plain copy of the base layer whose weight is ``W0 + delta``."""
        merged = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            merged.weight.add_(self.dense_delta().to(merged.weight.dtype))
        return merged


class StructuredDelta(DeltaLayer):
    """GRFT's delta: whole rows or whole columns of one weight matrix.

    Args:
        base_layer: the frozen pre-trained layer.
        original_name: its name in the model.
        axis: ``ROW`` or ``COLUMN``.
        index: the selected rows (output neurons) or columns (fan-in positions), ascending; the
            delta is ``(len(index), fan_in)`` for rows and ``(out, len(index))`` for columns.
    """

    def __init__(self, base_layer: nn.Module, original_name: str, axis: int, index: torch.Tensor):
        super().__init__(base_layer, original_name)
        if axis not in (ROW, COLUMN):
            raise ValueError(f"{original_name}: a structured delta tunes rows or columns, got axis {axis!r}")
        out, fin = self.out_features, self.fan_in
        what = "rows" if axis == ROW else "columns"
        index = checked_index(original_name, index, (len(index),), out if axis == ROW else fin, what)
        w = base_layer.weight
        self._axis = axis
        shape = (len(index), fin) if axis == ROW else (out, len(index))
        self.delta = nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device))
        self.register_buffer("index", index.to(w.device))

    @property
    def selected_axis(self) -> int:
        """``ROW`` or ``COLUMN``: the axis this layer tunes."""
        return self._axis

    def num_tuned(self) -> int:
        return self.delta.numel()

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return self._linear(x, self.delta, self.index, self._axis)
        conv = self.base_layer
        padding = _numeric_padding(conv)
        if padding is None:  # an even "same" kernel pads asymmetrically: the layer's own conv of W0 + delta
            return self._own_forward(x)
        return _ConvDelta.apply(x, self.delta, self.index, conv.weight, conv.bias, self._axis, conv.stride, padding,
                                conv.dilation, conv.groups)

    def dense_delta(self) -> torch.Tensor:
        out, fin = self.out_features, self.fan_in
        flat = torch.zeros(out, fin, dtype=self.delta.dtype, device=self.delta.device)
        flat.index_add_(0 if self._axis == ROW else 1, self.index, self.delta)
        return self.from_matrix(flat)



def _numeric_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """A convolution's padding as numbers: ``"valid"`` is none; ``"same"`` (stride 1, as torch
    requires) is symmetric where the dilated kernel size is odd. An even ``"same"`` kernel pads
    asymmetrically, which one convolution with numeric padding cannot express: None (the delta then
    runs the layer's own convolution of ``W0 + delta``)."""
    if not isinstance(conv.padding, str):
        return conv.padding
    if conv.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return tuple(pads)


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


class _ConvDelta(torch.autograd.Function):
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


# -- recomputing a layer's input in backward ---------------------------------------------------
#: Producers whose output a delta layer recomputes in backward instead of keeping it: cheap,
#: deterministic, and their own backward keeps their input anyway (LayerNorm, GELU, SiLU, ...; not
#: ReLU, Tanh or Sigmoid, whose backward keeps the output), so nothing is kept twice.
RECOMPUTABLE_TYPES = (nn.LayerNorm, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)
#: The same by qualified class name, for libraries this module does not import (Hugging Face's GELUs).
RECOMPUTABLE_NAMES = frozenset({"transformers.activations.GELUActivation",
                                "transformers.activations.NewGELUActivation"})
#: The attribute of a producer's output that says how to recompute it (:class:`Recomputable`).
SOURCE_ATTRIBUTE = "_delta_input_source"


def is_recomputable(module: nn.Module) -> bool:
    """Whether ``module``'s output may be recomputed from its input in a delta layer's backward."""
    cls = type(module)
    return ((isinstance(module, RECOMPUTABLE_TYPES) or f"{cls.__module__}.{cls.__qualname__}" in RECOMPUTABLE_NAMES)
            and not getattr(module, "inplace", False))


class Recomputable:
    """How a tensor was produced: ``producer.forward(input)`` under the recorded autocast state.

    Attached to the output of every recomputable producer in training (:func:`track_layer_inputs`)
    when its input needs a gradient: that producer's own backward then keeps ``input``, so a row
    or entry delta fed by the output saves ``input`` in place of the output (which it needs only
    for its delta's gradient) and recomputes the output in backward (selective recomputation). In a
    ViT block that drops the LayerNorm outputs feeding ``qkv`` and ``fc1`` and the GELU output
    feeding ``fc2`` from what a step keeps. ``version`` is the output's version counter when it
    was made: an output changed in place since is not recomputed.
    """

    __slots__ = ("producer", "input", "version", "autocast")

    def __init__(self, producer: nn.Module, input: torch.Tensor, version: int, autocast: tuple[bool, torch.dtype]):
        self.producer, self.input, self.version, self.autocast = producer, input, version, autocast

    def recipe(self) -> tuple[nn.Module, tuple[bool, torch.dtype]]:
        """What :func:`recompute` needs besides the input (no tensor: a tensor goes through
        ``save_for_backward``)."""
        return self.producer, self.autocast


def recompute(recipe: tuple[nn.Module, tuple[bool, torch.dtype]], input: torch.Tensor) -> torch.Tensor:
    """The producer's output again, from its input, without hooks and under its autocast state."""
    producer, (enabled, dtype) = recipe
    with torch.no_grad(), torch.autocast(input.device.type, dtype=dtype, enabled=enabled):
        return producer.forward(input)


def _record_source(module: nn.Module, args: tuple, output) -> None:
    """Forward hook of a recomputable producer: attach a :class:`Recomputable` to its output."""
    if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and len(args) == 1):
        return
    (x,) = args
    if not (isinstance(x, torch.Tensor) and x.requires_grad) or output is x or torch.compiler.is_compiling():
        return
    device = x.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    setattr(output, SOURCE_ATTRIBUTE, Recomputable(module, x, output._version, autocast))


def track_layer_inputs(model: nn.Module) -> None:
    """Let the delta layers of ``model`` recompute their input instead of keeping it (see
    :class:`Recomputable`): a forward hook on every recomputable producer, once. ``Method``
    calls it when it inserts delta layers; :func:`fold_layers` removes the hooks."""
    for module in model.modules():
        if is_recomputable(module) and _record_source not in module._forward_hooks.values():
            module.register_forward_hook(_record_source)


def untrack_layer_inputs(model: nn.Module) -> None:
    """Remove the hooks of :func:`track_layer_inputs`."""
    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if hook is _record_source]:
            del module._forward_hooks[key]


def input_source(x: torch.Tensor) -> Recomputable | None:
    """The :class:`Recomputable` attached to ``x``, if ``x`` is unchanged since it was made."""
    source = getattr(x, SOURCE_ATTRIBUTE, None)
    return source if source is not None and source.version == x._version else None


class _DeltaLinear(torch.autograd.Function):
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


class IndexDelta(DeltaLayer):
    """GPS's delta: for every output neuron, ``k`` selected input connections.

    Only ``D`` (out x k) is a parameter: no optimizer state is kept for the untouched entries.
    On a linear layer the effective weight ``W0 + scatter(D)`` is a temporary of the product
    (``_DeltaLinear``): no weight-sized tensor is kept per layer between forward and backward,
    and the dense weight gradient is never formed for small ``k``. On a convolution the
    effective weight is formed in the forward and its gradient is dense for one step.
    """

    def __init__(self, base_layer: nn.Module, original_name: str, index: torch.Tensor):
        super().__init__(base_layer, original_name)
        w = base_layer.weight
        index = checked_index(original_name, index, (self.out_features, index.shape[-1]), self.fan_in, "inputs")
        self.k = index.shape[1]
        self.delta = nn.Parameter(torch.zeros(self.out_features, self.k, dtype=w.dtype, device=w.device))
        self.register_buffer("index", index.to(w.device))

    def num_tuned(self) -> int:
        return self.out_features * self.k

    def dense_delta(self) -> torch.Tensor:
        flat = torch.zeros(self.out_features, self.fan_in, dtype=self.delta.dtype, device=self.delta.device)
        return self.from_matrix(flat.scatter_add(1, self.index, self.delta))

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return self._linear(x, self.delta, self.index, ENTRY)
        base = self.base_layer
        weight = base.weight + self.dense_delta()
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)


# -- model-level helpers ----------------------------------------------------------------------
def _shared_weights(model: nn.Module) -> set[int]:
    """``id()`` of parameters registered in several modules (tied weights: GPT-2's output layer and
    its token embedding)."""
    seen = collections.Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
    return {pid for pid, n in seen.items() if n > 1}


def eligible_layers(model: nn.Module, targets: list[str] | None = None,
                    exclude: list[str] | tuple[str, ...] = (), head=DEFAULT) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every layer a method may select from, in model order.

    Those are the :func:`~grft_lightning.deltas.is_layer` modules (``nn.Linear``/``nn.Conv2d``,
    subclasses such as timm's ``StdConv2d`` included, and transformers' ``Conv1D``) outside the head
    (``heads.py``; ``head`` as ``method.apply`` takes it), whose names match one of the ``fnmatch``
    patterns ``targets`` (all when None) and none of ``exclude``. Left out: the ``out_proj`` of
    ``nn.MultiheadAttention``, which reads its weight directly and would bypass a delta, and layers
    whose weight is tied to another module's (GPT-2's output layer shares the token embedding: a
    delta could not be folded into that weight without changing the embedding).
    """
    head_modules = head_module_ids(model, head)
    bypassed = {id(child) for module in model.modules() if isinstance(module, nn.MultiheadAttention)
                for child in module.children()}
    tied = _shared_weights(model)
    layers = []
    for name, module in model.named_modules():
        if not is_layer(module) or id(module) in head_modules or id(module) in bypassed or id(module.weight) in tied:
            continue
        if targets is not None and not any(fnmatch.fnmatchcase(name, p) for p in targets):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        layers.append((name, module))
    return layers


def selectable_layers(model: nn.Module) -> Iterator[tuple[str, SelectableLayer]]:
    """``(module path, layer)`` for every layer a selection fills (delta layers, masked weights)."""
    for name, module in model.named_modules():
        if isinstance(module, SelectableLayer):
            yield name, module


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def fold_layers(model: nn.Module) -> nn.Module:
    """Replace every selectable layer by its :meth:`~SelectableLayer.merged_module`, in place
    (and remove :func:`track_layer_inputs`' hooks)."""
    for path, layer in list(selectable_layers(model)):
        set_submodule(model, path, layer.merged_module())
    untrack_layer_inputs(model)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every tuned part into the weights, in place; returns the model with plain layers.

    Structural: every selectable layer becomes its :meth:`~SelectableLayer.merged_module`, and every
    layer that wraps a ``base_layer`` and can ``merge()`` itself into it (peft's LoRA and DoRA
    layers) does so and is replaced by its base layer. Parts that cannot be folded (adapters) stay.
    """
    for path, module in [(p, m) for p, m in model.named_modules() if _foldable_wrapper(m)]:
        module.merge()
        set_submodule(model, path, module.get_base_layer())
    return fold_layers(model)


def _foldable_wrapper(module: nn.Module) -> bool:
    """A layer of another library that adds an update to a ``base_layer`` and folds it itself
    (peft's tuner layers: ``merge()`` and ``get_base_layer()``)."""
    return (not isinstance(module, SelectableLayer) and callable(getattr(module, "merge", None))
            and callable(getattr(module, "get_base_layer", None)) and isinstance(getattr(module, "base_layer", None),
                                                                                nn.Module))
