"""Selection first: known answers for global allocation, cuts of one selection, the random
allocations, and the Selection's round trips through tuned files and checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from grft_lightning import count_parameters, read_selection, save_tuned
from grft_lightning.core.deltas import StructuredDelta, selectable_layers
from grft_lightning.core.layers import COLUMN, ROW
from grft_lightning.methods import GPS, GRFT, Linear, RandomRows
from grft_lightning.core.selection import Selection
from tuning import random_grads

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _three_linears() -> nn.Module:
    """Three matrices of different shapes, no head: ``0`` is 4 x 8, ``1`` 16 x 4, ``2`` 8 x 16.
    Backbone (every parameter): 4*8+4 + 16*4+16 + 8*16+8 = 252."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 16), nn.Linear(16, 8))


BACKBONE = 252


def _grads(entries: dict[str, list[tuple[int, int, float]]]) -> dict[str, torch.Tensor]:
    """Zero gradients of the three weights with the given ``(row, column, value)`` entries."""
    shapes = {"0": (4, 8), "1": (16, 4), "2": (8, 16)}
    grads = {}
    for name, shape in shapes.items():
        g = torch.zeros(shape)
        for row, column, value in entries.get(name, []):
            g[row, column] = value
        grads[f"{name}.weight"] = g
    return grads


# One entry per scored row: a row's score (its squared gradient) is the square of that entry.
# score / parameters per row (fan-in 8, 4, 16):
#   "0": row 0: 64/8 = 8,  row 1: 16/8 = 2,   row 3: 36/8 = 4.5
#   "1": row 3: 36/4 = 9,  row 12: 25/4 = 6.25, row 7: 16/4 = 4, row 0: 4/4 = 1
#   "2": row 5: 16/16 = 1, row 1: 9/16 = 0.5625
# One ranking: "1".3 (9, 4 entries, 4 spent), "0".0 (8, 8 -> 12), "1".12 (6.25, 4 -> 16), "0".3 (4.5, 8 -> 24),
# "1".7 (4, 4 -> 28), "0".1 (2, 8 -> 36), "1".0 (1, 4 -> 40; ties with "2".5: model order first), "2".5 (1, 16 -> 56),
# "2".1 (0.5625, 16 -> 72), then the zero rows.
ROW_GRADS = {"0": [(0, 0, 8.0), (1, 5, 4.0), (3, 2, -6.0)],
             "1": [(3, 1, 6.0), (12, 0, -5.0), (7, 3, 4.0), (0, 2, 2.0)],
             "2": [(5, 9, 4.0), (1, 15, -3.0)]}
ROW_ANSWERS = [  # (entries budget, rows per matrix)
    (16, {"0": [0], "1": [3, 12], "2": []}),
    (36, {"0": [0, 1, 3], "1": [3, 7, 12], "2": []}),
    (38, {"0": [0, 1, 3], "1": [3, 7, 12], "2": []}),  # the next row (4 entries) would overspend: not taken
    (40, {"0": [0, 1, 3], "1": [0, 3, 7, 12], "2": []}),  # the tie at 1 per parameter: "1" before "2"
    (56, {"0": [0, 1, 3], "1": [0, 3, 7, 12], "2": [5]}),
]


@pytest.mark.parametrize("entries, rows", ROW_ANSWERS, ids=[str(e) for e, _ in ROW_ANSWERS])
def test_global_rows_by_score_per_parameter(entries, rows):
    model = _three_linears()
    method = GRFT(mode="row", fraction=entries / BACKBONE, allocation="global", exclude=[])
    selection = method.select(model, _grads(ROW_GRADS), head=None)
    assert selection.rule.backbone_parameters == BACKBONE and selection.head is None
    assert {name: layer.index.tolist() for name, layer in selection.layers.items()} == rows
    assert selection.counts() == {name: ["row", len(r)] for name, r in rows.items()}
    fan_in = {"0": 8, "1": 4, "2": 16}
    assert selection.entries() == sum(len(r) * fan_in[name] for name, r in rows.items()) <= entries
    assert list(selection.active()) == [name for name, r in rows.items() if r]


# Columns: one entry per scored column; score / parameters per column (out 4, 16, 8):
#   "0": column 7: 36/4 = 9, column 2: 16/4 = 4, column 5: 4/4 = 1
#   "1": column 1: 100/16 = 6.25, column 3: 16/16 = 1
#   "2": column 9: 4/8 = 0.5
# One ranking: "0".7 (4 spent), "1".1 (16 -> 20), "0".2 (4 -> 24), "0".5 (4 -> 28; ties with "1".3: model order
# first), "1".3 (16 -> 44), "2".9 (8 -> 52).
COLUMN_GRADS = {"0": [(1, 7, 6.0), (3, 2, -4.0), (0, 5, 2.0)],
                "1": [(9, 1, -10.0), (2, 3, 4.0)],
                "2": [(6, 9, 2.0)]}
COLUMN_ANSWERS = [
    (20, {"0": [7], "1": [1], "2": []}),
    (28, {"0": [2, 5, 7], "1": [1], "2": []}),
    (44, {"0": [2, 5, 7], "1": [1, 3], "2": []}),
    (52, {"0": [2, 5, 7], "1": [1, 3], "2": [9]}),
]


@pytest.mark.parametrize("entries, columns", COLUMN_ANSWERS, ids=[str(e) for e, _ in COLUMN_ANSWERS])
def test_global_columns_by_score_per_parameter(entries, columns):
    model = _three_linears()
    method = GRFT(mode="column", fraction=entries / BACKBONE, allocation="global", exclude=[])
    selection = method.select(model, _grads(COLUMN_GRADS), head=None)
    assert {name: layer.index.tolist() for name, layer in selection.layers.items()} == columns
    assert selection.counts() == {name: ["column", len(c)] for name, c in columns.items()}
    out = {"0": 4, "1": 16, "2": 8}
    assert selection.entries() == sum(len(c) * out[name] for name, c in columns.items()) == entries


@pytest.mark.parametrize("mode", ["row", "column"])
def test_global_deltas_have_exactly_the_selected_sizes(mode):
    model = _three_linears()
    fraction, grads = (36 / BACKBONE, ROW_GRADS) if mode == "row" else (44 / BACKBONE, COLUMN_GRADS)
    method = GRFT(mode=mode, fraction=fraction, allocation="global", exclude=[])
    selection = method.select(model, _grads(grads), head=None)
    method.apply(model, selection)
    layers = dict(selectable_layers(model))
    assert list(layers) == ["0", "1"] and all(isinstance(layer, StructuredDelta) for layer in layers.values())
    if mode == "row":
        assert layers["0"].selected_axis == ROW and layers["0"].delta.shape == (3, 8)
        assert layers["1"].selected_axis == ROW and layers["1"].delta.shape == (3, 4)
        assert layers["1"].index.tolist() == [3, 7, 12]
    else:
        assert layers["0"].selected_axis == COLUMN and layers["0"].delta.shape == (4, 3)
        assert layers["1"].selected_axis == COLUMN and layers["1"].delta.shape == (16, 2)
        assert layers["0"].index.tolist() == [2, 5, 7]
    assert type(model[2]) is nn.Linear and model[2].weight.requires_grad is False  # zero selected: a plain layer
    counts = count_parameters(model, head=None)
    assert counts["selected"] == (36 if mode == "row" else 44) and counts["head"] == 0
    assert counts["bias"] == 4 + 16 + 8 and counts["backbone"] == BACKBONE


# -- cuts -------------------------------------------------------------------------------------------
def _indices(selection: Selection) -> dict[str, list]:
    return {name: layer.index.tolist() for name, layer in selection.layers.items()}


def _nested(small: Selection, large: Selection) -> bool:
    for name, layer in small.layers.items():
        big = large.layers[name]
        if layer.axis == "entry":
            if not all(set(a) <= set(b) for a, b in zip(layer.index.tolist(), big.index.tolist(), strict=True)):
                return False
        elif layer.axis != big.axis or not set(layer.index.tolist()) <= set(big.index.tolist()):
            return False
    return True


CUTS = {  # (method at the largest budget, [(cut arguments, the same method at that budget)])
    "grft_uniform": (lambda: GRFT(rows_per_matrix=8),
                     [({"count": 4}, lambda: GRFT(rows_per_matrix=4)),
                      ({"count": 1}, lambda: GRFT(rows_per_matrix=1))]),
    "grft_column_uniform": (lambda: GRFT(mode="column", columns_per_matrix=6),
                            [({"count": 3}, lambda: GRFT(mode="column", columns_per_matrix=3))]),
    "grft_global": (lambda: GRFT(fraction=0.05, allocation="global"),
                    [({"fraction": 0.02}, lambda: GRFT(fraction=0.02, allocation="global")),
                     ({"fraction": 0.005}, lambda: GRFT(fraction=0.005, allocation="global"))]),
    "grft_column_global": (lambda: GRFT(mode="column", fraction=0.04, allocation="global"),
                           [({"fraction": 0.01}, lambda: GRFT(mode="column", fraction=0.01, allocation="global"))]),
    "gps": (lambda: GPS(k=4), [({"k": 2}, lambda: GPS(k=2)), ({"k": 1}, lambda: GPS(k=1))]),
    "random_global": (lambda: RandomRows(fraction=0.05, allocation="global", seed=7),
                      [({"fraction": 0.02}, lambda: RandomRows(fraction=0.02, allocation="global", seed=7)),
                       ({"fraction": 0.004}, lambda: RandomRows(fraction=0.004, allocation="global", seed=7))]),
    "random_uniform": (lambda: RandomRows(rows_per_matrix=6, seed=7),
                       [({"count": 3}, lambda: RandomRows(rows_per_matrix=3, seed=7)),
                        ({"count": 1}, lambda: RandomRows(rows_per_matrix=1, seed=7))]),
}


@pytest.mark.parametrize("name", list(CUTS))
def test_cuts_nest_and_equal_a_fresh_selection(tiny_vit, name):
    make, smaller = CUTS[name]
    method = make()
    grads = random_grads(tiny_vit, method, seed=0) if method.needs_gradients else None
    large = method.select(tiny_vit, grads)
    previous = large
    for budget, make_small in smaller:
        cut = large.cut(**budget)
        fresh = make_small().select(tiny_vit, grads)
        assert cut.budget == fresh.budget == budget
        assert _indices(cut) == _indices(fresh) and cut.counts() == fresh.counts()
        if name != "gps":  # GPS's cut keeps the scores of the k=4 entries it ranked; a fresh k=2 pass, of 2
            assert cut == fresh
        assert _nested(cut, previous) and _nested(cut, large) and cut.entries() < previous.entries()
        assert cut.cut(**budget) == cut  # cutting at the same budget changes nothing
        previous = cut
    assert large.cut(**smaller[0][0]) == large.cut(**smaller[0][0])  # a cut is a pure function of the scores


def test_a_cut_larger_than_the_selection_is_refused(tiny_vit):
    grads = random_grads(tiny_vit, GPS(), seed=0)
    grft = GRFT(fraction=0.02, allocation="global").select(tiny_vit, grads)
    with pytest.raises(ValueError, match=r"Selection.cut: \{'fraction': 0.05\} is larger than the selection's own "
                                         r"budget \{'fraction': 0.02\}"):
        grft.cut(fraction=0.05)
    with pytest.raises(ValueError, match="give exactly one of fraction, count or k"):
        grft.cut(fraction=0.01, count=2)
    rows = GRFT(rows_per_matrix=2).select(tiny_vit, grads)
    with pytest.raises(ValueError, match="is larger than the selection's own budget"):
        rows.cut(count=3)
    with pytest.raises(ValueError, match=r"k=3 is more than the 2 entries per row this selection ranked"):
        GPS(k=2).select(tiny_vit, grads).cut(k=3)
    with pytest.raises(ValueError, match="an entry selection is cut by k"):
        GPS(k=2).select(tiny_vit, grads).cut(fraction=0.001)
    with pytest.raises(ValueError, match="no rule to cut by"):
        Linear().select(tiny_vit).cut(k=1)  # a method without a selection: an empty one


# -- the random allocations --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["row", "column"])
def test_matched_keeps_grft_global_counts_with_other_rows(tiny_vit, mode):
    grads = random_grads(tiny_vit, GRFT(), seed=0)
    grft = GRFT(mode=mode, fraction=0.02, allocation="global").select(tiny_vit, grads)
    matched = RandomRows(mode=mode, fraction=0.02, allocation="matched", seed=1)
    assert matched.needs_gradients
    with pytest.raises(ValueError, match="RandomRows.select needs accumulated gradients"):
        matched.select(tiny_vit)
    drawn = matched.select(tiny_vit, grads)
    assert drawn.counts() == grft.counts()  # "which matrices": GRFT's, matrix by matrix
    assert 0 in {n for _, n in grft.counts().values()} and len(set(n for _, n in grft.counts().values())) > 2
    assert drawn.entries() == grft.entries()
    differ = [name for name in grft.active() if _indices(drawn)[name] != _indices(grft)[name]]
    assert len(differ) == len(grft.active())  # "which rows": drawn, not GRFT's, in every matrix that has some
    # another seed: the same counts, other rows
    again = RandomRows(mode=mode, fraction=0.02, allocation="matched", seed=2).select(tiny_vit, grads)
    assert again.counts() == grft.counts() and _indices(again) != _indices(drawn)


def test_matched_on_hand_made_gradients_keeps_the_known_counts():
    model = _three_linears()
    method = RandomRows(fraction=36 / BACKBONE, allocation="matched", exclude=[], seed=0)
    selection = method.select(model, _grads(ROW_GRADS), head=None)
    assert selection.counts() == {"0": ["row", 3], "1": ["row", 3], "2": ["row", 0]}  # GRFT global's (above)
    assert selection.entries() == 36


def test_global_random_row_go_to_matrices_in_proportion_to_their_rows(tiny_vit):
    # tiny ViT: per block qkv and fc1 have 192 rows, proj and fc2 64; a row costs 64 entries in
    # qkv, proj, fc1 and 192 in fc2: every row equally likely means 3 qkv (or fc1) rows per proj
    # (or fc2) row, whatever they cost
    drawn = {"qkv": 0, "proj": 0, "fc1": 0, "fc2": 0}
    rows = {"qkv": 192, "proj": 64, "fc1": 192, "fc2": 64}
    for seed in range(40):
        selection = RandomRows(fraction=0.02, allocation="global", seed=seed).select(tiny_vit)
        assert not selection.rule.per_parameter and selection.entries() <= 0.02 * 300_096
        for name, (_, n) in selection.counts().items():
            drawn[name.rsplit(".", 1)[-1]] += n
    total = sum(drawn.values())
    for kind, n in drawn.items():
        expected = total * rows[kind] / sum(rows.values())
        assert abs(n - expected) < 0.1 * expected, (kind, n, expected)
    # the same seed draws the same rows; another seed others
    first = RandomRows(fraction=0.02, allocation="global", seed=0).select(tiny_vit)
    assert first == RandomRows(fraction=0.02, allocation="global", seed=0).select(tiny_vit)
    assert _indices(first) != _indices(RandomRows(fraction=0.02, allocation="global", seed=1).select(tiny_vit))


# -- round trips ---------------------------------------------------------------------------------------
ROUND_TRIPS = {
    "grft_global": lambda: GRFT(fraction=0.02, allocation="global"),
    "grft_auto": lambda: GRFT(mode="auto", rows_per_matrix=2),
    "gps": lambda: GPS(k=2),
    "random_global": lambda: RandomRows(fraction=0.02, allocation="global", seed=3),
    "random_matched": lambda: RandomRows(mode="column", fraction=0.02, allocation="matched", seed=3),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_a_selection_round_trips_through_a_tuned_file_and_a_checkpoint(tiny_vit, tmp_path, name):
    method = ROUND_TRIPS[name]()
    grads = random_grads(tiny_vit, method, seed=0) if method.needs_gradients else None
    selection = method.select(tiny_vit, grads)
    # what a checkpoint holds: plain data, loadable with weights_only=True
    buffer = io.BytesIO()
    torch.save(selection.state_dict(), buffer)
    buffer.seek(0)
    restored = Selection.from_state_dict(torch.load(buffer, weights_only=True))
    assert restored == selection and restored.describe() == selection.describe()
    assert restored.rule == selection.rule and restored.budget == selection.budget and restored.head == selection.head
    method.apply(tiny_vit, selection)
    path = save_tuned(tiny_vit, tmp_path / "tuned.safetensors", method, selection)
    saved_method, saved = read_selection(path)
    assert saved == selection and saved_method.config() == method.config()
    if selection.rule.allocation != "per_row":  # the file's scores (and keys) still cut
        assert saved.cut(fraction=0.005 if "fraction" in selection.budget else None,
                         count=1 if "count" in selection.budget else None) == \
            selection.cut(fraction=0.005 if "fraction" in selection.budget else None,
                          count=1 if "count" in selection.budget else None)
    else:
        assert saved.cut(k=1) == selection.cut(k=1)


def test_selections_differ_when_anything_differs(tiny_vit):
    grads = random_grads(tiny_vit, GRFT(), seed=0)
    base = GRFT(fraction=0.02, allocation="global").select(tiny_vit, grads)
    assert base != GRFT(fraction=0.02, allocation="global").select(tiny_vit, random_grads(tiny_vit, GRFT(), seed=1))
    assert base != base.cut(fraction=0.01)
    assert base != GRFT(fraction=0.02, allocation="global").select(tiny_vit, grads, head=["head"])
    assert base == GRFT(fraction=0.02, allocation="global").select(tiny_vit, grads)


def test_describe_says_what_is_selected(tiny_vit):
    model = _three_linears()
    rows = GRFT(fraction=36 / BACKBONE, allocation="global", exclude=[]).select(model, _grads(ROW_GRADS), head=None)
    assert rows.describe() == "row (global): 6 rows in 2 of 3 matrices = 36 weight entries (14.286 % of the backbone)"
    one = GRFT(fraction=16 / BACKBONE, allocation="global", exclude=[]).select(model, _grads(ROW_GRADS), head=None)
    assert one.cut(fraction=4 / BACKBONE).describe() == ("row (global): 1 row in 1 of 3 matrices = 4 weight entries "
                                                         "(1.587 % of the backbone)")
    columns = GRFT(mode="column", fraction=28 / BACKBONE, allocation="global", exclude=[]).select(
        model, _grads(COLUMN_GRADS), head=None)
    assert columns.describe() == ("column (global): 4 columns in 2 of 3 matrices = 28 weight entries "
                                  "(11.111 % of the backbone)")
    # GPS on the tiny ViT: 2 entries in each row of 25 matrices (6 blocks of 192 + 64 + 192 + 64 rows, and the
    # patch embedding's 64)
    gps = GPS(k=2).select(tiny_vit, random_grads(tiny_vit, GPS(), seed=0))
    assert gps.describe() == ("entry (per_row): the top 2 entries of every row in 25 of 25 matrices "
                              "= 6,272 weight entries (2.090 % of the backbone)")
    assert Linear().select(tiny_vit).describe() == "no selection"
