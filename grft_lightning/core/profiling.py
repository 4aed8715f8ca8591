"""Where training memory goes: the tensors autograd keeps from forward for backward.

:func:`saved_tensor_bytes` walks the autograd graph behind a loss (after forward, before
backward) and adds up the bytes of every tensor a node saved, per node type
(``NativeLayerNormBackward0``, ``GeluBackward0``, ``DeltaLinearBackward``, ...). A storage is
counted once, under the first node met that holds it, and storages of parameters and buffers
are left out (they exist whether or not anything is trained). This is the part of the training
peak that a tuning method changes besides gradients and optimizer state: for example a row delta
must keep its layer's whole input (the gradient of row ``r`` is ``grad[:, r]^T x``), a column
delta only the selected input columns. ``benchmarks/saved_activations.py`` prints it per method.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


def _saved(node) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    try:  # a Python autograd.Function's node
        found += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
    except (AttributeError, RuntimeError):
        pass
    for attr in dir(node):
        if not attr.startswith("_saved_"):
            continue
        try:
            value = getattr(node, attr)
        except RuntimeError:  # freed already, or not a tensor attribute
            continue
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += [v for v in value if isinstance(v, torch.Tensor)]
    return found


def saved_tensor_bytes(loss: torch.Tensor, model: nn.Module | None = None) -> dict[str, int]:
    """Bytes autograd holds for the backward of ``loss``, per node type, largest first.

    Args:
        loss: the output of a forward pass that has a ``grad_fn`` (backward not run yet).
        model: its parameters and buffers are not counted (they are not activations).
    """
    if loss.grad_fn is None:
        raise ValueError("loss has no grad_fn: run the forward pass with something to train")
    exclude = set()
    if model is not None:
        exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    counted: set[int] = set()
    totals: dict[str, int] = defaultdict(int)
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for tensor in _saved(node):
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in counted or key in exclude or storage.nbytes() == 0:
                continue
            counted.add(key)
            totals[type(node).__name__] += storage.nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    return dict(sorted(totals.items(), key=lambda item: -item[1]))
