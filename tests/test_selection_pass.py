"""The selection pass as GPS's public code runs it: batches shuffled with the run's seed and the
last partial batch dropped (the same on every rank), the model's mode an option, SupCon in fp32
under autocast."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from grft_lightning.training.callbacks import GradientSelection
from grft_lightning.data import SyntheticImages
from grft_lightning.data.base import SelectionBatches
from grft_lightning.training.losses import selection_loss_fn, supcon_loss
from grft_lightning.methods import GRFT
from grft_lightning.training.module import PEFTModule
from grft_lightning.core.gradients import row_scores, top_k


# -- batches -------------------------------------------------------------------------------
def test_selection_batches_are_shuffled_with_the_seed_and_full():
    n, size = 30, 8
    first, again, other = (list(SelectionBatches(n, size, seed=s)) for s in (0, 0, 1))
    assert first == again and first != other
    for batches in (first, other):
        assert [len(b) for b in batches] == [8, 8, 8]  # 30 = 3 x 8 + 6: the partial batch is left out
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == 24 and set(flat) <= set(range(n))
    assert first != [list(range(s, s + 8)) for s in (0, 8, 16)]
    unshuffled = list(SelectionBatches(n, size, shuffle=False, drop_last=False))
    assert unshuffled == [list(range(s, min(s + 8, n))) for s in range(0, n, 8)]
    assert list(SelectionBatches(5, 8, seed=3))[0] != [0, 1, 2, 3, 4]  # smaller than a batch: kept
    assert sorted(list(SelectionBatches(5, 8, seed=3))[0]) == [0, 1, 2, 3, 4]


def test_a_class_grouped_list_gives_mixed_batches():
    labels = [i // 25 for i in range(100)]  # a list file sorted by class: 4 classes of 25
    for batch in SelectionBatches(len(labels), 16, seed=0):
        assert len({labels[i] for i in batch}) > 1


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_the_single_process_batches_once(world):
    single = list(SelectionBatches(70, 8, seed=5))
    ranks = [list(SelectionBatches(70, 8, world, rank, seed=5)) for rank in range(world)]
    assert sorted(b for r in ranks for b in r) == sorted(single)
    assert [ranks[j % world][j // world] for j in range(len(single))] == single  # batch j to rank j % world


def test_the_selection_loader_follows_the_run_seed(monkeypatch):
    data = SyntheticImages(num_classes=4, n_train=30, batch_size=8, backbone="test_vit", image_size=32)

    def order(seed: str) -> list[list[int]]:
        monkeypatch.setenv("PL_GLOBAL_SEED", seed)
        loader = data.selection_dataloader("ce")
        sizes = [len(labels) for _, labels in loader]
        assert sizes == [8, 8, 8]
        return list(loader.batch_sampler)

    assert order("0") == order("0") and order("0") != order("1")
    views, labels = next(iter(data.selection_dataloader("supcon")))
    assert views.shape == (8, 2, 3, 32, 32) and labels.shape == (8,)


# -- the model's mode ---------------------------------------------------------------------------
def _module(drop_path_rate: float = 0.0, backbone: str = "test_vit") -> PEFTModule:
    torch.manual_seed(0)
    return PEFTModule(GRFT(rows_per_matrix=2), backbone=backbone, num_classes=4, pretrained=False,
                      image_size=32, drop_path_rate=drop_path_rate)


def _trainer(backbone: str = "test_vit") -> SimpleNamespace:
    data = SyntheticImages(num_classes=4, n_train=32, batch_size=8, backbone=backbone, image_size=32)
    return SimpleNamespace(datamodule=data, world_size=1, global_rank=0, is_global_zero=True,
                           precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))


def _gradients(module: PEFTModule, mode: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # drop-path's draws (the run's seed, RankSeed, in a real run)
    return GradientSelection(loss="ce", progress=False, mode=mode)._gradients(_trainer(), module)


def _rows(grads: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {name: top_k(row_scores(g), 2).tolist() for name, g in grads.items()}


def test_train_mode_runs_drop_path_and_eval_mode_is_deterministic(one_torch_thread):
    module = _module(drop_path_rate=0.5)
    module.train()
    evaluated = _gradients(module, "eval")
    assert module.training  # the module's mode is put back
    again = _gradients(module, "eval", seed=1)  # another random state: eval does not draw
    assert all(torch.equal(evaluated[k], again[k]) for k in evaluated)
    trained = _gradients(module, "train")
    assert not all(torch.equal(evaluated[k], trained[k]) for k in evaluated)
    assert _rows(trained) != _rows(evaluated)  # drop-path changes the selection
    replay = _gradients(module, "train")  # the same seed: the same draws
    assert all(torch.equal(trained[k], replay[k]) for k in trained)
    module.eval()
    _gradients(module, "train")
    assert not module.training


def test_without_drop_path_train_and_eval_agree_on_a_vit(one_torch_thread):
    module = _module(drop_path_rate=0.0)
    evaluated, trained = _gradients(module, "eval"), _gradients(module, "train")
    assert all(torch.allclose(evaluated[k], trained[k], rtol=1e-5, atol=1e-7) for k in evaluated)


def test_train_mode_leaves_batchnorm_statistics_as_they_were(one_torch_thread):
    torch.manual_seed(0)
    module = PEFTModule(GRFT(rows_per_matrix=1), backbone="test_efficientnet", num_classes=4, pretrained=False,
                        image_size=32)
    before = {k: v.clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}
    assert before
    torch.manual_seed(0)
    GradientSelection(loss="ce", progress=False, mode="train")._gradients(_trainer("test_efficientnet"), module)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mode_is_checked():
    with pytest.raises(ValueError, match="selection.mode"):
        GradientSelection(mode="training")


# -- SupCon precision ---------------------------------------------------------------------------
def test_supcon_runs_in_fp32_under_a_bf16_autocast():
    torch.manual_seed(0)
    features, labels = torch.randn(16, 2, 64), torch.randint(0, 3, (16,))
    reference = supcon_loss(features, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = supcon_loss(features, labels)
        from_bf16 = supcon_loss(features.bfloat16(), labels)
        # what the similarity product gives in bf16: far from the fp32 loss
        z = torch.nn.functional.normalize(features.reshape(32, -1), dim=-1)
        assert (z @ z.t()).dtype == torch.bfloat16
    assert inside.dtype == torch.float32 and from_bf16.dtype == torch.float32
    assert torch.equal(inside, reference)
    assert torch.allclose(from_bf16, reference, atol=5e-3)  # only the features' own rounding
    loss_fn = selection_loss_fn("supcon")
    model = _module().model
    views = torch.randn(4, 2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model, (views, torch.tensor([0, 1, 0, 1])))
    assert loss.dtype == torch.float32
