"""Data order: seeded by (seed, epoch) only, dealt across ranks, resumable mid-epoch; the
selection pass's batches dealt to ranks; each rank's own random stream."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from grft_lightning.training.callbacks import RankSeed
from grft_lightning.data import SyntheticImages
from grft_lightning.data.samplers import DealtBatches, EpochShuffle, ResumableLoader


def _order(n=20, seed=0, epoch=0, world=1, rank=0) -> list[int]:
    sampler = EpochShuffle(range(n), world, rank, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_training_order_depends_on_seed_and_epoch_only():
    torch.manual_seed(123)
    first = _order()
    torch.manual_seed(456)  # the global RNG plays no part
    assert _order() == first and sorted(first) == list(range(20))
    assert _order(epoch=1) != first and _order(seed=1) != first


@pytest.mark.parametrize("n", [20, 21])
def test_ranks_read_disjoint_shards_of_the_same_permutation(n):
    whole = _order(n)
    shards = [_order(n, world=2, rank=r) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == (n + 1) // 2
    assert shards[0] + shards[1] != whole and sorted(set(shards[0]) | set(shards[1])) == list(range(n))
    if n % 2 == 0:
        assert not set(shards[0]) & set(shards[1])
    else:  # padded by wrapping around, as DistributedSampler does for training
        assert len(set(shards[0]) & set(shards[1])) == 1


def _loader(n=40, batch_size=8, epoch=1) -> ResumableLoader:
    dataset = TensorDataset(torch.arange(n))
    loader = ResumableLoader(dataset, batch_size=batch_size, sampler=EpochShuffle(dataset, seed=3))
    loader.sampler.set_epoch(epoch)
    return loader


def test_a_resumed_loader_reads_the_rest_of_the_epoch():
    reference = [b[0].tolist() for b in _loader()]
    interrupted = _loader()
    it = iter(interrupted)
    seen = [next(it)[0].tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert seen == reference[:3] and state == {"epoch": 1, "batches": 3}

    resumed = _loader(epoch=0)  # a fresh process: the sampler does not know the epoch yet
    resumed.load_state_dict(state)
    assert resumed.sampler.epoch == 1
    rest = [b[0].tolist() for b in resumed]
    assert rest == reference[3:]
    assert resumed.state_dict() == {"epoch": 2, "batches": 0}  # the end of an epoch: the next one's start
    assert [b[0].tolist() for b in resumed] == reference  # later iterations read whole epochs again


def test_a_state_for_another_epoch_skips_nothing():
    loader = _loader()
    loader.load_state_dict({"epoch": 1, "batches": 2})
    loader.sampler.set_epoch(2)  # Lightning's view of the epoch wins
    assert len(list(loader)) == 5


def test_the_datamodule_saves_and_restores_the_training_position():
    def data():
        dm = SyntheticImages(n_train=24, n_val=2, n_test=2, batch_size=8, backbone="test_vit", image_size=32)
        dm.setup("fit")
        return dm

    first = data()
    assert first.state_dict() == {}
    loader = first.train_dataloader()
    loader.sampler.set_epoch(0)
    it = iter(loader)
    labels = [next(it)[1].tolist()]
    state = first.state_dict()
    assert state == {"train_loader": {"epoch": 0, "batches": 1}}
    labels += [b[1].tolist() for b in it]

    again = data()
    again.load_state_dict(state)  # before the loader exists (as with DDP and one device)
    rest = [b[1].tolist() for b in again.train_dataloader()]
    assert rest == labels[1:]

    late = data()
    late_loader = late.train_dataloader()
    late.load_state_dict(state)  # after it exists (strategies that restore after setup)
    assert [b[1].tolist() for b in late_loader] == labels[1:]


@pytest.mark.parametrize("n", [32, 30, 5])
def test_selection_batches_are_the_single_process_batches_dealt_to_ranks(n):
    single = list(DealtBatches(n, 8))
    assert single == [list(range(s, min(s + 8, n))) for s in range(0, n, 8)]
    ranks = [list(DealtBatches(n, 8, world=2, rank=r)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [len(DealtBatches(n, 8, 2, r)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == single


def test_each_rank_and_epoch_gets_its_own_random_stream(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    callback = RankSeed()

    def draw(rank, epoch=None):
        trainer = SimpleNamespace(global_rank=rank, current_epoch=epoch)
        if epoch is None:
            callback.setup(trainer, None, "fit")
        else:
            callback.on_train_epoch_start(trainer, None)
        return torch.rand(3).tolist()

    assert draw(0) == draw(0) and draw(0) != draw(1)
    assert draw(0, 0) == draw(0, 0) and len({str(draw(r, e)) for r in (0, 1) for e in (0, 1)} | {str(draw(0))}) == 5


@pytest.mark.parametrize("world", [1, 2, 3])
def test_selection_max_batches_caps_the_whole_pass_not_each_rank(monkeypatch, world):
    import contextlib

    import grft_lightning.training.callbacks as callbacks
    from torch.utils.data import DataLoader

    seen: list[int] = []

    def count(model, batches, loss_fn, names=None, progress=False, reduction="sum"):
        seen.extend(int(x[0]) for x, _ in batches)  # first sample of each batch read
        return {}

    monkeypatch.setattr(callbacks, "accumulate_gradients", count)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: None)
    dataset = TensorDataset(torch.arange(80), torch.zeros(80, dtype=torch.long))
    for rank in range(world):
        data = SimpleNamespace(selection_dataloader=lambda loss, r=rank: DataLoader(
            dataset, batch_sampler=DealtBatches(80, 8, world, r)))
        trainer = SimpleNamespace(datamodule=data, world_size=world, global_rank=rank, is_global_zero=rank == 0,
                                  precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))
        module = torch.nn.Module()
        module.model, module.device = torch.nn.Identity(), torch.device("cpu")
        module.method = SimpleNamespace(gradient_reduction="sum", gradient_names=lambda model: [])
        callbacks.GradientSelection(loss="ce", max_batches=5, progress=False)._gradients(trainer, module)
    assert sorted(seen) == [0, 8, 16, 24, 32]  # the first 5 single-process batches, once each
