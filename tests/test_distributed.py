"""DDP through the real CLI: 2 CPU processes (gloo) against the same run on one process.

One test, two runs (2 processes, then 1), each a ``train.py fit`` subprocess with the
``rank_probe.RankProbe`` callback, which leaves per-rank files to compare. Validation and test
splits have an odd size (15), so a padding sampler would show as a duplicated sample.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from cli_runs import finish, fit, fit_command, probe_facts, saved_selection, start

pytestmark = pytest.mark.slow

N_TRAIN, N_EVAL, BATCH = 32, 15, 8


def _row_overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Fraction of selected rows (over all layers) that two selections share."""
    assert a.keys() == b.keys()
    shared = sum(len(set(a[k].tolist()) & set(b[k].tolist())) for k in a)
    return shared / sum(a[k].numel() for k in a)


def _index_buffers(selection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in selection.items() if k.endswith(".index")}


def test_two_processes_select_train_and_evaluate_like_one(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    started = time.perf_counter()
    # Both at once: the machine has 2 cores and the processes spend much of their time starting.
    ddp = start(fit_command(ddp_dir, devices=2, n_train=N_TRAIN, n_val=N_EVAL, n_test=N_EVAL, batch_size=BATCH),
                tmp_path / "ddp.log")
    single = fit(single_dir, devices=1, n_train=N_TRAIN, n_val=N_EVAL, n_test=N_EVAL, batch_size=BATCH)
    finish(ddp, tmp_path / "ddp.log")
    print(f"two runs in {time.perf_counter() - started:.1f} s")
    results = json.loads((ddp_dir / "results.json").read_text())
    rank0, rank1 = probe_facts(ddp_dir, 0), probe_facts(ddp_dir, 1)
    # one holder of the run directory's lock (the launcher, rank 0), released at the end: a
    # second process taking it would have been refused or taken it over
    log = (tmp_path / "ddp.log").read_text()
    assert not (ddp_dir / "run.lock").exists() and "is in use" not in log and "taking over" not in log
    alone = probe_facts(single_dir)

    # (a) every rank selects exactly the same indices, and the saved file holds them
    assert rank0["selection"].keys() == rank1["selection"].keys()
    for key in rank0["selection"]:
        assert torch.equal(rank0["selection"][key], rank1["selection"][key]), key
    saved = saved_selection(ddp_dir)
    for key, rows in _index_buffers(rank0["selection"]).items():
        layer = key.removesuffix(".index")
        assert torch.equal(saved[f"selection/{layer}/index"].long(), rows), layer

    # (b) the same indices as one process on the same data (the gradient sums differ only in
    # the order of float additions: two per-rank partial sums, then the all-reduce)
    ddp_rows, single_rows = _index_buffers(rank0["selection"]), _index_buffers(alone["selection"])
    overlap = _row_overlap(ddp_rows, single_rows)
    print(f"rows selected identically by 2 processes and by 1: {100 * overlap:.1f} %")
    assert overlap >= 0.95
    assert overlap == 1.0, "differences beyond float summation order would be unexpected at these margins"

    # (c) after training, the tuned tensors are bit-identical on both ranks
    assert rank0["tuned"].keys() == rank1["tuned"].keys() and rank0["tuned"]
    for name in rank0["tuned"]:
        assert torch.equal(rank0["tuned"][name], rank1["tuned"][name]), name
    assert rank0["global_step"] == rank1["global_step"] == 2 * N_TRAIN // (2 * BATCH)

    # the ranks read disjoint halves of the training split in each epoch, in a new order per epoch,
    # and draw from different random streams (seed offset by rank, re-seeded per epoch)
    for epoch in (0, 1):
        mine = [p for e, _, prints in rank0["batches"] if e == epoch for p in prints]
        theirs = [p for e, _, prints in rank1["batches"] if e == epoch for p in prints]
        assert len(mine) == len(theirs) == N_TRAIN // 2 and not set(mine) & set(theirs)
    assert [p for _, _, p in rank0["batches"][:2]] != [p for _, _, p in rank0["batches"][2:]]
    seeds0, seeds1 = dict(rank0["epoch_seeds"]), dict(rank1["epoch_seeds"])
    assert seeds0.keys() == seeds1.keys() == {0, 1}
    assert len({*seeds0.values(), *seeds1.values()}) == 4

    # (d) validation and test: every sample exactly once over both ranks (8 + 7, no padding)
    for epoch in rank0["val"]:
        assert epoch["samples"] == N_EVAL
    assert sorted([rank0["val"][-1]["rank_samples"], rank1["val"][-1]["rank_samples"]]) == [7, 8]
    test = rank0["test"]
    assert test["samples"] == N_EVAL and rank0["test"]["rank_samples"] + rank1["test"]["rank_samples"] == N_EVAL
    assert results["test_acc"] == pytest.approx(test["correct"] / N_EVAL, rel=1e-6)
    assert results["val_acc"] == pytest.approx(rank0["val"][-1]["correct"] / N_EVAL, rel=1e-6)

    # results.json and tuned.safetensors written once, by rank 0; rank 1 writes nothing
    writes = [line.split("\t")[1] for line in (ddp_dir / "probe" / "writes_rank0.txt").read_text().splitlines()]
    assert writes.count(str(ddp_dir / "results.json")) == 1
    assert writes.count(str(ddp_dir / "tuned.safetensors")) == 1
    assert not (ddp_dir / "probe" / "writes_rank1.txt").exists()
    assert len(list(tmp_path.rglob("results.json"))) == 2  # one per run directory
    assert not list(ddp_dir.rglob("*.tmp"))
    # checkpoints: after each epoch, last.ckpt only (no last-v1.ckpt)
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert [w for w in writes if w.endswith(".ckpt")] == [str(ddp_dir / "checkpoints" / "last.ckpt")] * 2


def test_two_processes_fit_one_probe_head(tmp_path):
    """``selection.head: probe`` under DDP: every rank fits the probe on the whole training split, rank
    0's head is broadcast, so both ranks select through the same head and start training from it
    (``keep_probe_head``), and the run equals one process's."""
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    probe = ("--selection.head", "probe", "--selection.keep_probe_head", "true", "--selection.probe_steps", "10")
    ddp = start(fit_command(ddp_dir, *probe, devices=2, n_train=N_TRAIN, n_val=N_EVAL, n_test=N_EVAL,
                            batch_size=BATCH), tmp_path / "ddp.log")
    single = fit(single_dir, *probe, devices=1, n_train=N_TRAIN, n_val=N_EVAL, n_test=N_EVAL, batch_size=BATCH)
    finish(ddp, tmp_path / "ddp.log")
    results = json.loads((ddp_dir / "results.json").read_text())
    rank0, rank1, alone = probe_facts(ddp_dir, 0), probe_facts(ddp_dir, 1), probe_facts(single_dir)
    for key in rank0["selection"]:
        assert torch.equal(rank0["selection"][key], rank1["selection"][key]), key
    assert _row_overlap(_index_buffers(rank0["selection"]), _index_buffers(alone["selection"])) == 1.0
    for name in rank0["tuned"]:  # the head included: both ranks started from the same probe head
        assert torch.equal(rank0["tuned"][name], rank1["tuned"][name]), name
    assert results["selection"]["head"] == single["selection"]["head"] == "probe"
    assert results["selection"]["probe_train_acc"] == single["selection"]["probe_train_acc"]
