"""Selection: exact rows / columns / entries on hand-built gradients, and gradient accumulation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning.core.deltas import selectable_layers

from grft_lightning.core.layers import COLUMN, ROW
from grft_lightning.core.gradients import (
    accumulate_gradients,
    column_scores,
    per_row_top_k,
    row_scores,
    top_k,
)
from grft_lightning.methods import GPS, GRFT, RandomRows
from tuning import tune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Toy(nn.Module):
    """A Linear (4 x 6), a Conv2d (3 x 2*2*2), a depthwise Conv2d (3 x 1*3*3) and a head."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.conv = nn.Conv2d(2, 3, 2)
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.head = nn.Linear(3, 2)

    def get_classifier(self):
        return self.head

    def forward(self, x):  # x: (n, 6)
        h = self.fc(x).view(-1, 1, 2, 2).repeat(1, 2, 1, 1)  # (n, 2, 2, 2)
        h = self.dw(self.conv(F.pad(h, (0, 1, 0, 1))))
        return self.head(h.mean((2, 3)))


def _grads(fc: torch.Tensor, conv: torch.Tensor, dw: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"fc.weight": fc.reshape(4, 6), "conv.weight": conv.reshape(3, 2, 2, 2), "dw.weight": dw.reshape(3, 1, 3, 3)}


def _layers(model):
    return {layer.original_name: layer for _, layer in selectable_layers(model)}


def _tuned(method, grads=None, model=None):
    """A fresh Toy (or ``model``) with ``method`` selected on ``grads`` and applied."""
    model = Toy() if model is None else model
    selection = method.select(model, grads)
    method.apply(model, selection)
    return model, selection


# -- scoring primitives ------------------------------------------------------------------------
def test_top_k_breaks_ties_by_lowest_index_and_returns_sorted_indices():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 2.0])
    assert top_k(scores, 2).tolist() == [1, 2]
    assert top_k(scores, 4).tolist() == [1, 2, 4, 5]
    assert top_k(torch.zeros(5), 3).tolist() == [0, 1, 2]
    assert top_k(torch.tensor([[0.0, 5.0, 5.0], [7.0, 7.0, 7.0]]), 1, dim=1).tolist() == [[1], [0]]


def test_scores_read_convolutions_as_out_by_fan_in():
    g = torch.arange(3 * 2 * 2 * 2, dtype=torch.float32).view(3, 2, 2, 2)
    m = g.view(3, 8)
    assert torch.equal(row_scores(g), (m**2).sum(1))
    assert torch.equal(column_scores(g), (m**2).sum(0))
    assert row_scores(g.to(torch.bfloat16)).dtype == torch.float32
    dw = torch.zeros(3, 1, 3, 3)
    dw[1, 0, 2, 1] = -4.0
    assert per_row_top_k(dw, 1)[1].tolist() == [7]  # |.|, position 2*3+1 of the 9-wide fan-in


# -- GRFT --------------------------------------------------------------------------------------
def test_grft_rows_with_ties():
    fc = torch.zeros(4, 6)
    fc[1, 0], fc[2, 5], fc[3, 3] = 2.0, -2.0, 2.0  # rows 1, 2, 3 tie: lowest indices win
    conv = torch.zeros(3, 8)
    conv[2, :] = 1.0  # energy 8
    conv[0, 7] = 3.0  # energy 9
    dw = torch.zeros(3, 9)
    dw[1] = 0.5  # energy 2.25; rows 0 and 2 tie at 0 -> row 0
    model, selection = _tuned(GRFT(rows_per_matrix=2, exclude=[]), _grads(fc, conv, dw))
    layers = _layers(model)
    assert layers["fc"].index.tolist() == [1, 2]
    assert layers["conv"].index.tolist() == [0, 2]
    assert layers["dw"].index.tolist() == [0, 1]
    assert all(layer.selected_axis == ROW for layer in layers.values())
    assert selection.counts() == {"fc": ["row", 2], "conv": ["row", 2], "dw": ["row", 2]}
    assert {name: layer.index.tolist() for name, layer in selection.layers.items()} == {
        "fc": [1, 2], "conv": [0, 2], "dw": [0, 1]}
    assert selection.layers["conv"].scores["row"].tolist() == [9.0, 0.0, 8.0]


def test_grft_columns():
    fc = torch.zeros(4, 6)
    fc[:, 4] = 1.0  # 4
    fc[0, 1] = 3.0  # 9
    fc[3, 2] = 2.0  # 4: ties with column 4, lower index wins
    conv = torch.zeros(3, 8)
    conv[:, 6] = 1.0  # channel 1, kernel position (1, 0)
    conv[2, 3] = -5.0  # channel 0, kernel position (1, 1)
    dw = torch.zeros(3, 9)
    dw[:, 8] = 1.0
    model, selection = _tuned(GRFT(mode="column", columns_per_matrix=2, exclude=[]), _grads(fc, conv, dw))
    layers = _layers(model)
    assert layers["fc"].index.tolist() == [1, 2]
    assert layers["conv"].index.tolist() == [3, 6]
    assert layers["dw"].index.tolist() == [0, 8]  # column 8, then the all-zero tie -> 0
    assert selection.counts() == {"fc": ["column", 2], "conv": ["column", 2], "dw": ["column", 2]}
    assert all(layer.selected_axis == COLUMN for layer in layers.values())


def test_grft_auto_chooses_per_matrix_by_energy_per_parameter():
    method = GRFT(mode="auto", rows_per_matrix=1, exclude=[])
    # columns at the same budget: floor(rows * fan_in / out): 1, 2, 3; column-shaped gradients
    # everywhere show them
    columns, _ = _tuned(method, _grads(torch.ones(4, 6) * torch.arange(6), torch.ones(3, 8) * torch.arange(8),
                                       torch.ones(3, 9) * torch.arange(9)))
    assert {name: (layer.selected_axis, layer.index.tolist()) for name, layer in _layers(columns).items()} == {
        "fc": (COLUMN, [5]), "conv": (COLUMN, [6, 7]), "dw": (COLUMN, [6, 7, 8])}
    fc = torch.zeros(4, 6)
    fc[:, 2] = 1.0  # best column: 4 / 4 per parameter; best row: 1 / 6 -> columns
    conv = torch.zeros(3, 8)
    conv[0, :] = 1.0  # best row: 8 / 8; best two columns: 2 / 6 -> rows
    dw = torch.ones(3, 9)  # equal energy per parameter: rows (columns must do strictly better)
    model, selection = _tuned(method, _grads(fc, conv, dw))
    layers = _layers(model)
    assert selection.counts() == {"fc": ["column", 1], "conv": ["row", 1], "dw": ["row", 1]}
    assert layers["fc"].selected_axis == COLUMN and layers["fc"].index.tolist() == [2]
    assert layers["conv"].selected_axis == ROW and layers["conv"].index.tolist() == [0]
    assert layers["dw"].selected_axis == ROW and layers["dw"].index.tolist() == [0]
    assert layers["fc"].num_tuned() == 4 and layers["conv"].num_tuned() == 8


# -- GPS ---------------------------------------------------------------------------------------
def test_gps_per_row_top_k():
    method = GPS(k=2)
    fc = torch.tensor([[0.0, -3.0, 1.0, 3.0, 0.0, 0.0],
                       [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all tied: 0, 1
                       [0.0, 0.0, 0.0, 0.0, -0.5, 0.2],
                       [9.0, 0.0, 8.0, 0.0, -10.0, 0.0]])
    conv = torch.zeros(3, 8)
    conv[0, 7], conv[0, 2] = 1.0, -1.0
    conv[1, 5] = 1.0  # then the first zero: 0
    dw = torch.arange(27, dtype=torch.float32).view(3, 9) * torch.tensor([1.0, -1.0, 1.0])[:, None]
    model, selection = _tuned(method, _grads(fc, conv, dw))
    layers = _layers(model)
    assert selection.counts() == {"fc": ["entry", 2], "conv": ["entry", 2], "dw": ["entry", 2]}
    assert layers["fc"].index.tolist() == [[1, 3], [0, 1], [4, 5], [0, 4]]
    assert layers["conv"].index.tolist() == [[2, 7], [0, 5], [0, 1]]
    assert layers["dw"].index.tolist() == [[7, 8]] * 3


class GroupedToy(nn.Module):
    """One grouped Conv2d: 6 output channels, 2 groups of 2 input channels, 3x3 -> a 6 x 18 matrix."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, groups=2)
        self.head = nn.Linear(6, 2)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_grouped_conv_rows_columns_and_entries():
    g = torch.zeros(6, 2, 3, 3)
    g[4, 1, 2, 0] = 5.0  # row 4 (second group), fan-in position 1*9 + 2*3 + 0 = 15
    g[1, :, 1, 1] = 2.0  # row 1, positions 4 and 13 (the centre tap of both input channels)
    g[:, 0, 0, 2] = 1.5  # every row, position 2
    grads = {"conv.weight": g}

    model, _ = _tuned(GRFT(rows_per_matrix=2, exclude=[]), grads, GroupedToy())
    assert model.conv.selected_axis == ROW and model.conv.index.tolist() == [1, 4]  # energies 10.25, 27.25 vs 2.25

    model, _ = _tuned(GRFT(mode="column", columns_per_matrix=2, exclude=[]), grads, GroupedToy())
    assert model.conv.selected_axis == COLUMN and model.conv.index.tolist() == [2, 15]  # 13.5, 25 vs 4 (4, 13)

    model, _ = _tuned(GPS(k=1), grads, GroupedToy())
    assert model.conv.index.tolist() == [[2], [4], [2], [2], [15], [2]]  # row 1: 2.0 > 1.5, tie 4/13 -> 4


# -- select() contract ---------------------------------------------------------------------------
def _toy_grads():
    torch.manual_seed(0)
    return _grads(torch.randn(4, 6), torch.randn(3, 8), torch.randn(3, 9))


@pytest.mark.parametrize("method", [GRFT(rows_per_matrix=1, exclude=[]), GPS(k=1)], ids=["grft", "gps"])
def test_select_rejects_missing_and_misshaped_gradients(method):
    model = Toy()
    grads = _toy_grads()
    with pytest.raises(ValueError, match=r"select needs accumulated gradients \(got None\)"):
        method.select(model, None)
    missing = {k: v for k, v in grads.items() if k != "conv.weight"}
    with pytest.raises(ValueError, match=r"missing gradient for conv\.weight \(shape \(3, 2, 2, 2\)\)"):
        method.select(model, missing)
    bad = dict(grads, **{"dw.weight": torch.zeros(3, 9)})
    with pytest.raises(ValueError, match=r"gradient for dw\.weight has shape \(3, 9\), expected \(3, 1, 3, 3\)"):
        method.select(model, bad)
    assert not _layers(model) and all(p.requires_grad for p in model.parameters())  # nothing half-done


@pytest.mark.parametrize("method", [GRFT(rows_per_matrix=1, exclude=[]), GPS(k=1),
                                    RandomRows(rows_per_matrix=1, exclude=[], seed=0)], ids=["grft", "gps", "random"])
def test_select_leaves_the_model_alone_and_is_repeatable(method):
    model = Toy()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = method.select(model, _toy_grads())
    assert method.select(model, _toy_grads()) == first  # a pure function of the gradients (or the seed)
    assert not _layers(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    method.apply(model, first)
    assert list(_layers(model)) == ["fc", "conv", "dw"]
    assert all(torch.count_nonzero(layer.delta) == 0 for layer in _layers(model).values())


def test_random_row_is_seeded_and_within_budget():
    def pick(seed, mode="row"):
        kwargs = {"rows_per_matrix": 2} if mode == "row" else {"columns_per_matrix": 2}
        method = RandomRows(mode=mode, exclude=[], seed=seed, **kwargs)
        assert not method.needs_gradients
        model, selection = _tuned(method)
        assert {layer.selected_axis for layer in _layers(model).values()} == {ROW if mode == "row" else COLUMN}
        assert selection.counts() == dict.fromkeys(["fc", "conv", "dw"], [mode, 2])
        return {name: layer.index.tolist() for name, layer in _layers(model).items()}

    assert pick(0) == pick(0)
    assert pick(0, "column") == pick(0, "column")
    assert any(pick(s) != pick(0) for s in range(1, 5))
    for name, (rows, cols) in zip(["fc", "conv", "dw"], [(4, 6), (3, 8), (3, 9)]):
        assert pick(3)[name] == sorted(set(pick(3)[name])) and max(pick(3)[name]) < rows
        assert pick(3, "column")[name] == sorted(set(pick(3, "column")[name])) and max(pick(3, "column")[name]) < cols
    with pytest.raises(ValueError, match="RandomRows.mode must be row or column"):
        RandomRows(mode="auto")


def test_random_row_follows_the_run_seed_by_default(monkeypatch):
    def pick(run_seed, seed=None):
        monkeypatch.setenv("PL_GLOBAL_SEED", str(run_seed))
        method = RandomRows(rows_per_matrix=2, exclude=[], seed=seed)
        model, _ = _tuned(method)
        return {name: layer.index.tolist() for name, layer in _layers(model).items()}

    assert pick(3) == pick(3) == pick(0, seed=3)  # no seed: the run's seed
    assert any(pick(s) != pick(0) for s in range(1, 5))
    assert pick(1, seed=0) == pick(2, seed=0)  # an explicit seed wins


# -- accumulate_gradients -------------------------------------------------------------------------
def _batches(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 5, (2,), generator=gen)) for _ in range(n)]


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _reference(model, batches):
    """Gradient of the summed loss, by plain autograd on an untouched copy."""
    ref = copy.deepcopy(model).requires_grad_(True)
    sum(_ce(ref, b) for b in batches).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_accumulate_sums_over_batches_without_a_method(tiny_vit):
    batches = _batches()
    ref = _reference(tiny_vit, batches)
    tiny_vit.pos_embed.requires_grad_(False)  # a mixed set of flags to restore
    flags = _flags(tiny_vit)
    grads = accumulate_gradients(tiny_vit, batches, _ce)
    expected = {f"{n}.weight" for n, m in tiny_vit.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n != "head"}
    assert set(grads) == expected and "patch_embed.proj.weight" in grads
    for name, g in grads.items():
        assert g.dtype == torch.float32
        assert torch.allclose(g, ref[name], atol=1e-6, rtol=1e-4), name
    assert _flags(tiny_vit) == flags
    assert all(p.grad is None for p in tiny_vit.parameters())


@pytest.mark.parametrize("method", [GRFT(), GPS(k=1)], ids=["grft", "gps"])
def test_accumulate_returns_original_names_after_apply(tiny_vit, method):
    batches = _batches()
    ref = _reference(tiny_vit, batches)
    tune(tiny_vit, method)
    flags = _flags(tiny_vit)
    grads = accumulate_gradients(tiny_vit, batches, _ce)
    expected = {f"{layer.original_name}.weight" for _, layer in selectable_layers(tiny_vit)}
    assert set(grads) == expected and "blocks.0.attn.qkv.weight" in grads
    assert ("patch_embed.proj.weight" in grads) == isinstance(method, GPS)  # GRFT excludes the patch embedding
    for name, g in grads.items():
        assert torch.allclose(g, ref[name], atol=1e-6, rtol=1e-4), name
    assert _flags(tiny_vit) == flags
    assert all(p.grad is None for p in tiny_vit.parameters())
    sub = accumulate_gradients(tiny_vit, batches[:1], _ce, names=["blocks.1.mlp.fc2.weight"])
    assert list(sub) == ["blocks.1.mlp.fc2.weight"]
    with pytest.raises(KeyError, match="not an eligible weight"):
        accumulate_gradients(tiny_vit, batches, _ce, names=["blocks.1.mlp.fc2.base_layer.weight"])


def test_accumulate_restores_flags_when_the_loss_raises(tiny_vit):
    tune(tiny_vit, GRFT())
    flags = _flags(tiny_vit)
    calls = []

    def failing(model, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in loss")
        return _ce(model, batch)

    with pytest.raises(RuntimeError, match="boom in loss"):
        accumulate_gradients(tiny_vit, _batches(), failing)
    assert _flags(tiny_vit) == flags
    assert all(p.grad is None for p in tiny_vit.parameters())


def test_accumulate_under_bf16_autocast_sums_in_fp32(tiny_vit):
    batches = _batches()
    ref = _reference(tiny_vit, batches)
    tune(tiny_vit, GRFT())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = accumulate_gradients(tiny_vit, batches, _ce)
    for name, g in grads.items():
        assert g.dtype == torch.float32
        err = (g - ref[name]).norm() / ref[name].norm()
        assert err < 0.05, (name, float(err))
    # and the selection it feeds agrees with the fp32 one on most rows
    fp32 = row_scores(ref["blocks.0.mlp.fc1.weight"])
    bf16 = row_scores(grads["blocks.0.mlp.fc1.weight"])
    assert len(set(top_k(fp32, 8).tolist()) & set(top_k(bf16, 8).tolist())) >= 6
