"""saved_tensor_bytes: the activations autograd keeps, per node type, in exact bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning.methods import RandomRows
from grft_lightning.core.profiling import saved_tensor_bytes

N = 5  # batch


class MLP(nn.Module):
    """fc1 (8 -> 16), GELU, fc2 (16 -> 16), head (16 -> 3)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.fc2(F.gelu(self.fc1(x))))


def _saved(mode: str) -> dict[str, int]:
    torch.manual_seed(0)
    model = MLP()
    kwargs = {"rows_per_matrix": 2} if mode == "row" else {"columns_per_matrix": 2}
    method = RandomRows(mode=mode, exclude=[], tune_bias=False, seed=0, **kwargs)
    method.apply(model, method.select(model))
    loss = F.cross_entropy(model(torch.randn(N, 8)), torch.zeros(N, dtype=torch.long))
    return saved_tensor_bytes(loss, model)


def test_row_deltas_keep_each_layer_input_and_columns_only_their_columns():
    row, column = _saved("row"), _saved("column")
    f32 = 4
    # rows: fc1 keeps x (N x 8), fc2 keeps gelu's output (N x 16); gelu keeps fc1's output (N x 16)
    assert row["DeltaLinearBackward"] == N * (8 + 16) * f32
    assert row["GeluBackward0"] == N * 16 * f32
    # columns: each delta keeps the 2 selected input columns only
    assert column["DeltaLinearBackward"] == 2 * N * 2 * f32
    assert column["GeluBackward0"] == N * 16 * f32
    # the trained head keeps its input (fc2's output, N x 16) in either mode
    assert row["AddmmBackward0"] == column["AddmmBackward0"] == N * 16 * f32
    assert list(row) == sorted(row, key=lambda k: -row[k])  # largest first


def test_parameters_are_not_counted_and_a_graphless_loss_is_refused():
    model = nn.Linear(4, 2)
    loss = model(torch.randn(3, 4)).sum()
    assert saved_tensor_bytes(loss, model) == {"AddmmBackward0": 3 * 4 * 4}  # the input, not the weight
    with pytest.raises(ValueError, match="no grad_fn"):
        saved_tensor_bytes(torch.zeros(()), model)
