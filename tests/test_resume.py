"""Preemption: a run killed (SIGKILL) in the middle of an epoch and restarted with the same
command ends exactly like a run that was never interrupted.

Three ``train.py fit`` subprocesses of the same tiny config (5 steps per epoch, 3 epochs, a
checkpoint every 2 steps and at every epoch end): the uninterrupted run, a run that stops making
progress after step 9 and is killed from outside once its step-8 checkpoint exists (3 batches
into epoch 1), and that run's restart.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from cli_runs import finish, fit_command, probe_facts, saved_selection, start, tuned_values

pytestmark = pytest.mark.slow

N_TRAIN, BATCH, EPOCHS, EVERY = 40, 8, 3, 2
STEPS_PER_EPOCH = N_TRAIN // BATCH
HANG_AT = 9  # killed here: the newest checkpoint is then step 8, the 3rd batch of epoch 1


def _command(run_dir: Path) -> list[str]:
    return fit_command(run_dir, "--checkpoint_every_n_steps", str(EVERY), epochs=EPOCHS, n_train=N_TRAIN,
                       batch_size=BATCH, n_val=7, n_test=9)


def _wait_for(paths: list[Path], process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert process.poll() is None, f"the run ended (code {process.returncode}) before {paths} appeared"
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.2)


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _equal_nested(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal_nested(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_killed_mid_epoch_and_restarted_equals_uninterrupted(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    started = time.perf_counter()
    reference = start(_command(whole), tmp_path / "whole.log")
    victim = start(_command(killed), tmp_path / "killed.log", RANK_PROBE_HANG_AT_STEP=str(HANG_AT))
    last = killed / "checkpoints" / "last.ckpt"
    _wait_for([killed / "probe" / "hanging_rank0", last], victim)
    assert _checkpoint(last)["global_step"] == HANG_AT - 1  # mid-epoch 1: 3 of its 5 batches done
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert not list(killed.rglob("*.tmp"))  # killed between saves: no temporary file left behind
    finish(reference, tmp_path / "whole.log")

    # what a kill in the middle of a save would have left: removed by the restart
    leftover = last.parent / ".last.ckpt.x1y2z3.tmp"
    leftover.write_bytes(b"half a checkpoint")
    os.utime(leftover, (time.time() - 60, time.time() - 60))

    # the same command again: resumes from last.ckpt
    restart = start(_command(killed), tmp_path / "killed.log")
    finish(restart, tmp_path / "killed.log")
    assert not leftover.exists() and f"removed {leftover}" in (tmp_path / "killed.log").read_text()
    print(f"three runs in {time.perf_counter() - started:.1f} s")
    log = (tmp_path / "killed.log").read_text()
    assert f"resuming from {last}" in log
    assert "not resumable" not in log  # Lightning's warning for a loader that cannot resume mid-epoch

    a, b = probe_facts(whole), probe_facts(killed)
    # the restart selected nothing (it ran from the checkpoint's selection), and it is the same
    for key in a["selection"]:
        assert torch.equal(a["selection"][key], b["selection"][key]), key
    assert a["global_step"] == b["global_step"] == EPOCHS * STEPS_PER_EPOCH
    # after the restart, the very samples of the uninterrupted run, step by step: batches 3-4 of
    # epoch 1 (no replay of its first batches), then epoch 2
    resumed = [(e, s, p) for e, s, p in b["batches"]]
    assert resumed[0][:2] == (1, HANG_AT - 1)
    assert resumed == [x for x in a["batches"] if x[1] >= HANG_AT - 1]

    # results: counts and selection exactly, accuracies within float tolerance (equal in practice)
    ra = json.loads((whole / "results.json").read_text())
    rb = json.loads((killed / "results.json").read_text())
    for key in ("tuned", "backbone_params", "tuned_pct", "counts", "method", "dataset", "seed"):
        assert ra[key] == rb[key], key
    assert rb["val_acc"] == pytest.approx(ra["val_acc"], abs=1e-6)
    assert rb["test_acc"] == pytest.approx(ra["test_acc"], abs=1e-6)
    sa, sb = saved_selection(whole), saved_selection(killed)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ta, tb = tuned_values(whole), tuned_values(killed)
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-5, atol=1e-7, msg=key)
    bitwise = all(torch.equal(ta[k], tb[k]) for k in ta)
    print(f"tuned values bit-identical after the restart: {bitwise}")

    # the final checkpoints agree: step count, optimizer moments and scheduler state
    ca, cb = _checkpoint(whole / "checkpoints" / "last.ckpt"), _checkpoint(last)
    assert ca["global_step"] == cb["global_step"] == EPOCHS * STEPS_PER_EPOCH
    # the lr follows the optimizer step count (grft_lightning/training/schedules.py): at the last step, min_lr
    lrs = [[g["lr"] for g in c["optimizer_states"][0]["param_groups"]] for c in (ca, cb)]
    assert lrs[0] == lrs[1] and all(lr == pytest.approx(1e-8) for lr in lrs[0])
    _equal_nested(ca["lr_schedulers"], cb["lr_schedulers"], "lr_schedulers")
    sa_, sb_ = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert sa_.keys() == sb_.keys()
    for index in sa_:
        assert int(sa_[index]["step"]) == int(sb_[index]["step"]) == EPOCHS * STEPS_PER_EPOCH
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb_[index][moment], sa_[index][moment], rtol=1e-5, atol=1e-9)

    # metrics.csv keeps the killed segment's rows up to its checkpoint, then the restart's: every
    # training step once, and the validation rows of the three epochs
    import csv

    for run in (whole, killed):
        with open(run / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(EPOCHS * STEPS_PER_EPOCH)), run
        assert [int(float(r["epoch"])) for r in rows if r.get("val/acc")] == list(range(EPOCHS)), run
    assert json.loads((killed / "results.json").read_text())["train_seconds"] > 0

    # a checkpoint every 2 steps and at every epoch end, all in last.ckpt (no last-v1.ckpt)
    writes = [line.split("\t") for line in (whole / "probe" / "writes_rank0.txt").read_text().splitlines()]
    ckpt_steps = sorted({int(step) for step, path in writes if path.endswith(".ckpt")})
    expected = sorted({*range(EVERY, EPOCHS * STEPS_PER_EPOCH + 1, EVERY),
                       *range(STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH + 1, STEPS_PER_EPOCH)})
    assert ckpt_steps == expected
    assert {path for _, path in writes if path.endswith(".ckpt")} == {str(whole / "checkpoints" / "last.ckpt")}
    for run in (whole, killed):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


PROBE = ("--selection.head", "probe", "--selection.keep_probe_head", "true", "--selection.probe_steps", "10")


def test_a_probe_head_run_resumes_without_fitting_the_probe_again(tmp_path):
    """LP-FT (``selection.head: probe`` with ``keep_probe_head``) killed mid-epoch and restarted: the
    restart takes the selection, the head and the probe's record from the checkpoint, fits no probe,
    and ends where the uninterrupted run ends."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    command = lambda run: _command(run) + list(PROBE)  # noqa: E731
    reference = start(command(whole), tmp_path / "whole.log")
    victim = start(command(killed), tmp_path / "killed.log", RANK_PROBE_HANG_AT_STEP=str(HANG_AT))
    last = killed / "checkpoints" / "last.ckpt"
    _wait_for([killed / "probe" / "hanging_rank0", last], victim)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    first_segment = (tmp_path / "killed.log").read_text()
    assert first_segment.count("selection: linear probe fitted on 40 images") == 1
    finish(reference, tmp_path / "whole.log")
    finish(start(command(killed), tmp_path / "killed.log"), tmp_path / "killed.log")
    restart = (tmp_path / "killed.log").read_text()[len(first_segment):]
    assert f"resuming from {last}" in restart and "not re-selected" in restart
    assert "linear probe fitted" not in restart

    a, b = probe_facts(whole), probe_facts(killed)
    for key in a["selection"]:
        assert torch.equal(a["selection"][key], b["selection"][key]), key
    ra = json.loads((whole / "results.json").read_text())
    rb = json.loads((killed / "results.json").read_text())
    assert ra["selection"]["head"] == rb["selection"]["head"] == "probe"
    assert rb["selection"]["keep_probe_head"] is True and rb["selection"]["probe_seconds"] > 0
    assert rb["selection"]["probe_train_acc"] == ra["selection"]["probe_train_acc"]  # the first segment's probe
    assert rb["test_acc"] == pytest.approx(ra["test_acc"], abs=1e-6)
    ta, tb = tuned_values(whole), tuned_values(killed)
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-5, atol=1e-7, msg=key)
