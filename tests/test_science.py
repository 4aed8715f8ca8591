"""The controls and options of the pre-registered ViT study (benchmarks/vit_science_plan.md):
GRFT's lowest-scoring rows, GPS's random entries, SupCon with one view, the linear-probe head of
the selection pass, and the update size recorded in results.json."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from grft_lightning.core.accounting import update_ratios, update_size
from grft_lightning.training.callbacks import GradientSelection, fit_linear_probe
from grft_lightning.data import SyntheticImages
from grft_lightning.core.deltas import selectable_layers
from grft_lightning.methods import GPS, GRFT
from grft_lightning.training.module import PEFTModule
from grft_lightning.core.selection import Selection


def _grads(model: nn.Module, method) -> dict[str, torch.Tensor]:
    """Gradients whose row i of every matrix has squared norm growing with i (row 0 the lowest)."""
    grads = {}
    for name in method.gradient_names(model):
        w = model.get_submodule(name[: -len(".weight")]).weight
        out = w.shape[0]
        scale = torch.arange(1, out + 1, dtype=torch.float32).view(-1, *([1] * (w.dim() - 1)))
        grads[name] = scale.expand_as(w).clone()
    return grads


# -- GRFT(order="lowest") -------------------------------------------------------------------------
def test_lowest_takes_the_lowest_rows_of_every_matrix(tiny_vit):
    high = GRFT(rows_per_matrix=2)
    low = GRFT(rows_per_matrix=2, order="lowest")
    grads = _grads(tiny_vit, high)
    top, bottom = high.select(tiny_vit, grads), low.select(tiny_vit, grads)
    for name, layer in bottom.layers.items():
        out = layer.shape[0]
        assert layer.index.tolist() == [0, 1]
        assert top.layers[name].index.tolist() == [out - 2, out - 1]
    assert bottom.counts() == top.counts() and bottom.entries() == top.entries()
    # the rule is kept, so cuts nest and equal a fresh selection at the smaller budget
    again = Selection.from_state_dict(bottom.state_dict())
    assert again == bottom and again.rule.order == "lowest"
    assert bottom.cut(count=1) == GRFT(rows_per_matrix=1, order="lowest").select(tiny_vit, grads)


def test_lowest_under_proportional_keeps_the_counts(tiny_vit):
    high = GRFT(fraction=0.02, allocation="proportional")
    low = GRFT(fraction=0.02, allocation="proportional", order="lowest")
    grads = _grads(tiny_vit, high)
    top, bottom = high.select(tiny_vit, grads), low.select(tiny_vit, grads)
    assert bottom.counts() == top.counts()
    counts = {name: n for name, (_, n) in bottom.counts().items()}
    # 0.02 x 300,096 / 245,760 block entries = 2.44 % of each matrix's rows: 192 -> 5, 64 -> 2
    assert counts["blocks.0.mlp.fc1"] == counts["blocks.0.attn.qkv"] == 5 and counts["blocks.0.mlp.fc2"] == 2
    for name, layer in bottom.layers.items():
        assert layer.index.tolist() == list(range(counts[name]))


def test_lowest_under_global_spends_the_budget_from_the_bottom(tiny_vit):
    kwargs = dict(fraction=0.02, allocation="global")
    high, low = GRFT(**kwargs), GRFT(order="lowest", **kwargs)
    grads = _grads(tiny_vit, high)
    # one matrix's gradient scaled down 1000x: the lowest scores per parameter are all there
    quiet = "blocks.3.mlp.fc1.weight"
    grads[quiet] = grads[quiet] / 1000
    bottom, top = low.select(tiny_vit, grads), high.select(tiny_vit, grads)
    counts = {name: n for name, (_, n) in bottom.counts().items() if n}
    # 0.02 x 300,096 backbone parameters = 6,001.9 entries = 93 rows of 64 (of fc1's 192)
    assert list(counts) == ["blocks.3.mlp.fc1"] and counts["blocks.3.mlp.fc1"] == 93
    assert bottom.layers["blocks.3.mlp.fc1"].index.tolist() == list(range(93))
    assert top.counts()["blocks.3.mlp.fc1"][1] == 0


def test_the_default_order_leaves_configs_and_files_as_before(tiny_vit):
    assert "order" not in GRFT().config() and GRFT(order="lowest").config()["order"] == "lowest"
    grft = GRFT(rows_per_matrix=1)
    assert "order" not in grft.select(tiny_vit, _grads(tiny_vit, grft)).state_dict()["meta"]["rule"]
    with pytest.raises(ValueError, match="order"):
        GRFT(order="bottom")
    with pytest.raises(ValueError, match="auto"):
        GRFT(mode="auto", order="lowest")


# -- GPS(order="random") --------------------------------------------------------------------------
def test_random_gps_draws_k_entries_per_neuron_from_the_seed(tiny_vit):
    method = GPS(k=3, order="random")
    assert not method.needs_gradients and GPS().needs_gradients
    assert method.name == "gps_random" and GPS().name == "gps"
    first, again, other = (method.select(tiny_vit, seed=s) for s in (0, 0, 1))
    assert first == again and first != other
    gradient = GPS(k=3).select(tiny_vit, _grads(tiny_vit, GPS(k=3)))
    assert first.counts() == gradient.counts() and first.entries() == gradient.entries()
    for layer in first.layers.values():
        assert layer.index.shape == (layer.shape[0], 3)
        assert bool((layer.index[:, 1:] > layer.index[:, :-1]).all())
    # spread: not the same positions in every row
    fc1 = first.layers["blocks.0.mlp.fc1"].index
    assert len({tuple(row) for row in fc1.tolist()}) > fc1.shape[0] // 2
    # cuts nest and equal a fresh draw at the smaller k
    assert first.cut(k=1) == GPS(k=1, order="random").select(tiny_vit, seed=0)
    assert GPS(k=3, order="random", seed=7).select(tiny_vit, seed=0) == method.select(tiny_vit, seed=7)
    assert GPS().config() == GPS(order="gradient", seed=None).config() and "order" not in GPS().config()


def test_random_gps_is_applied_at_construction_without_a_pass():
    torch.manual_seed(0)
    module = PEFTModule(GPS(k=2, order="random"), backbone="test_vit", num_classes=4, pretrained=False,
                        image_size=32)
    assert module.selection is not None
    layers = dict(selectable_layers(module.model))
    assert layers and all(layer.k == 2 for layer in layers.values())


# -- update size ----------------------------------------------------------------------------------
def test_update_ratios_on_hand_made_deltas():
    weight = torch.zeros(4, 3)
    weight[1] = torch.tensor([3.0, 4.0, 0.0])       # norm 5
    weight[3] = torch.tensor([0.0, 0.0, 2.0])       # norm 2
    delta = torch.tensor([[0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])  # norms 1 and 1
    assert update_ratios(delta, weight, torch.tensor([1, 3]), "row").tolist() == pytest.approx([0.2, 0.5])
    col_delta = torch.tensor([[0.0], [6.0], [0.0], [8.0]])   # norm 10; column 0 of W has norm 3
    assert update_ratios(col_delta, weight, torch.tensor([0]), "column").tolist() == pytest.approx([10 / 3])
    entry_index = torch.tensor([[0], [0], [1], [2]])  # rows 0 and 2 pick zeros: left out
    entry_delta = torch.tensor([[1.0], [1.5], [9.0], [1.0]])
    assert update_ratios(entry_delta, weight, entry_index, "entry").tolist() == pytest.approx([0.5, 0.5])


def test_update_size_reads_the_model_deltas(tiny_vit):
    method = GRFT(rows_per_matrix=1, targets=["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"], exclude=[])
    selection = method.select(tiny_vit, _grads(tiny_vit, method))
    method.apply(tiny_vit, selection)
    assert update_size(tiny_vit) == {"median": 0.0, "p90": 0.0, "groups": 2}
    layers = dict(selectable_layers(tiny_vit))
    for factor, name in ((0.5, "blocks.0.mlp.fc1"), (2.0, "blocks.0.mlp.fc2")):
        layer = layers[name]
        with torch.no_grad():
            layer.delta.copy_(factor * layer.base_layer.weight[layer.index])
    moved = update_size(tiny_vit)
    assert moved["groups"] == 2
    assert moved["median"] == pytest.approx(1.25)  # halfway between 0.5 and 2.0
    assert moved["p90"] == pytest.approx(0.5 + 0.9 * 1.5)
    assert update_size(nn.Sequential(nn.Linear(2, 2))) is None


# -- SupCon with one view -------------------------------------------------------------------------
def test_one_view_is_the_evaluation_transform():
    data = SyntheticImages(num_classes=4, n_train=30, batch_size=8, backbone="test_vit", image_size=32)
    views, labels = next(iter(data.selection_dataloader("supcon", views="one")))
    assert views.shape == (8, 1, 3, 32, 32)
    images, same = next(iter(data.selection_dataloader("ce")))
    assert torch.equal(views[:, 0], images) and torch.equal(labels, same)
    with pytest.raises(ValueError, match="selection.views"):
        GradientSelection(views="three")


# -- the linear-probe head ------------------------------------------------------------------------
def test_fit_linear_probe_is_deterministic_and_fits_separable_features():
    torch.manual_seed(0)
    labels = torch.arange(60) % 3
    features = torch.randn(60, 8) + 4 * nn.functional.one_hot(labels, 8).float()
    heads = []
    for _ in range(2):
        torch.manual_seed(1)
        head = nn.Linear(8, 3)
        assert fit_linear_probe(head, features, labels, steps=50) == 1.0
        heads.append(head)
    assert all(torch.equal(a, b) for a, b in zip(heads[0].state_dict().values(), heads[1].state_dict().values()))
    assert heads[0].weight.requires_grad and heads[0].weight.grad is None


def _setup(selection: GradientSelection, ckpt_path=None):
    torch.manual_seed(0)
    module = PEFTModule(GRFT(rows_per_matrix=1), backbone="test_vit", num_classes=4, pretrained=False,
                        image_size=32)
    fresh = {k: v.clone() for k, v in module.model.get_classifier().state_dict().items()}
    data = SyntheticImages(num_classes=4, n_train=32, batch_size=8, backbone="test_vit", image_size=32)
    trainer = SimpleNamespace(datamodule=data, world_size=1, global_rank=0, is_global_zero=False, loggers=[],
                              ckpt_path=ckpt_path, strategy=SimpleNamespace(root_device=torch.device("cpu")),
                              precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))
    selection.setup(trainer, module, "fit")
    return module, fresh


def _head(module) -> dict[str, torch.Tensor]:
    return module.model.get_classifier().state_dict()


def test_probe_head_selects_and_training_starts_from_the_fresh_head(one_torch_thread):
    random_head, fresh = _setup(GradientSelection(loss="ce", progress=False))
    probe, fresh_again = _setup(GradientSelection(loss="ce", progress=False, head="probe", probe_steps=20))
    assert all(torch.equal(fresh[k], fresh_again[k]) for k in fresh)
    assert all(torch.equal(_head(probe)[k], fresh[k]) for k in fresh)  # put back after the pass
    assert random_head.selection != probe.selection  # another head, other gradients
    again, _ = _setup(GradientSelection(loss="ce", progress=False, head="probe", probe_steps=20))
    assert again.selection == probe.selection


def test_keep_probe_head_trains_from_the_probe_and_records_it(one_torch_thread):
    callback = GradientSelection(loss="ce", progress=False, head="probe", keep_probe_head=True, probe_steps=20)
    kept, fresh = _setup(callback)
    assert not all(torch.equal(_head(kept)[k], fresh[k]) for k in fresh)
    record = callback.record()
    assert record["head"] == "probe" and record["keep_probe_head"] is True and record["probe_steps"] == 20
    assert record["probe_seconds"] > 0 and 0.0 <= record["probe_train_acc"] <= 1.0
    assert not math.isnan(record["probe_train_acc"])
    other = GradientSelection(loss="ce", progress=False, head="probe", keep_probe_head=True, probe_steps=20)
    again, _ = _setup(other)
    assert all(torch.equal(_head(kept)[k], _head(again)[k]) for k in fresh)
    assert again.selection == kept.selection
    # the probe's record travels in checkpoints; a resumed run never refits
    restored = GradientSelection(head="probe", keep_probe_head=True)
    restored.load_state_dict(callback.state_dict())
    assert restored.record()["probe_seconds"] == record["probe_seconds"]
    assert GradientSelection().state_dict() == {} and "head" not in GradientSelection().record()


def test_a_resumed_run_never_fits_the_probe(monkeypatch, one_torch_thread):
    callback = GradientSelection(loss="ce", progress=False, head="probe", keep_probe_head=True)
    monkeypatch.setattr(GradientSelection, "_fit_probe", lambda *a: pytest.fail("the probe was refitted"))
    saved = GRFT(rows_per_matrix=1)
    torch.manual_seed(0)
    model = PEFTModule(saved, backbone="test_vit", num_classes=4, pretrained=False, image_size=32).model
    selection = saved.select(model, _grads(model, saved))
    monkeypatch.setattr(PEFTModule, "checkpoint_selection", staticmethod(lambda path: selection))
    module, _ = _setup(callback, ckpt_path="last.ckpt")
    assert module.selection == selection


def test_probe_options_are_checked():
    with pytest.raises(ValueError, match="keep_probe_head"):
        GradientSelection(keep_probe_head=True)
    with pytest.raises(ValueError, match="selection.head"):
        GradientSelection(head="linear")


# -- the harder structured tasks that may replace mnist_count -------------------------------------
def _cells(canvas, grid: int = 3):
    h = canvas.shape[0] // grid
    return [canvas[r * h:(r + 1) * h, c * h:(c + 1) * h] for r in range(grid) for c in range(grid)]


def test_count9_and_distance_canvases():
    import numpy as np

    from grft_lightning.data import MNISTDigits
    from grft_lightning.data.mnist import count_canvases, distance_canvases

    digits = np.full((5, 28, 28), 200, dtype=np.uint8)  # every digit fills its cell: occupied = non-zero
    canvases, labels = count_canvases(digits, 400, np.random.default_rng(0), grid=3)
    assert canvases.shape == (400, 84, 84) and set(labels.tolist()) == set(range(9))
    assert [sum(int(c.any()) for c in _cells(x)) for x in canvases] == (labels + 1).tolist()
    # grid 2 draws exactly what the committed mnist_count canvases drew
    two, two_labels = count_canvases(digits, 50, np.random.default_rng(3))
    again, again_labels = count_canvases(digits, 50, np.random.default_rng(3), grid=2)
    assert np.array_equal(two, again) and np.array_equal(two_labels, again_labels)
    canvases, labels = distance_canvases(digits, 400, np.random.default_rng(0))
    assert canvases.shape == (400, 84, 84) and np.bincount(labels, minlength=4).min() > 70
    for canvas, label in zip(canvases, labels):
        occupied = [i for i, c in enumerate(_cells(canvas)) if c.any()]
        assert len(occupied) == 2
        a, b = occupied
        assert abs(a // 3 - b // 3) + abs(a % 3 - b % 3) == label + 1
    for task, classes in (("count9", 9), ("distance", 4)):
        module = MNISTDigits(task=task, n_train=100, n_val=50, n_test=2000, family="vit_science")
        assert module.num_classes == classes and module.dataset_name == f"vit_science/mnist_{task}"
        images, labels = module._split()["test"]
        assert images.shape == (2000, 84, 84) and set(labels.tolist()) == set(range(classes))


def test_grft_and_gps_configure_the_same_layers_with_and_without_the_stem(tiny_vit):
    def names(method):
        return [name for name, _ in method.eligible_layers(tiny_vit)]

    with_stem, without = names(GPS()), names(GRFT())
    assert with_stem[0] == "patch_embed.proj" and "patch_embed.proj" not in without
    assert names(GRFT(exclude=[])) == with_stem and names(GPS(exclude=["patch_embed.*"])) == without
    assert len(with_stem) == len(without) + 1 == 25
