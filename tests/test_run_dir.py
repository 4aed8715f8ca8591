"""A run directory across reruns, resumes and second starts (in-process, tiny ViT, synthetic data):
a finished run is left alone, an interrupted test pass is redone, a resume keeps the whole
history and refuses another config, no diverged state is saved or resumed, and one process at a
time holds the directory."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grft_lightning.training.cli import cli_main, main
from grft_lightning.training.module import PEFTModule
from grft_lightning.training.rundir import LOCK_NAME, run_defining_config
from test_errors import _error_line as error_line


def args(run_dir: Path, *extra: str, epochs: int = 1) -> list[str]:
    return [
        "fit", "--model.backbone", "test_vit", "--model.pretrained", "false", "--model.image_size", "32",
        "--model.method", json.dumps({"class_path": "grft_lightning.methods.GRFT",
                                      "init_args": {"mode": "row", "rows_per_matrix": 2}}),
        "--data", json.dumps({"class_path": "grft_lightning.data.SyntheticImages",
                              "init_args": {"num_classes": 4, "n_train": 32, "n_val": 16, "n_test": 16,
                                            "num_workers": 0}}),
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0",
        "--selection.loss", "ce", "--selection.progress", "false", "--wandb.mode", "disabled",
        "--run_dir", str(run_dir), *extra,
    ]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def train_seconds_of(ckpt: dict) -> float:
    return ckpt["callbacks"]["RunClock"]["train_seconds"]


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def preempted_at_epoch_1(monkeypatch):
    """The next fit stops (an error, as a kill would) when its second epoch starts, once the
    first epoch's checkpoint is written; checks meanwhile that the run holds its lock."""
    seen = {}

    def stop(self):
        if self.current_epoch == 1:
            lock = Path(self.trainer.default_root_dir) / LOCK_NAME
            seen["lock"] = json.loads(lock.read_text())
            monkeypatch.undo()
            raise RuntimeError("preempted")

    monkeypatch.setattr(PEFTModule, "on_train_epoch_start", stop, raising=False)
    return seen


# -- item 2: a finished run is recognised as finished -------------------------------------------
def test_a_finished_run_is_left_alone_and_overwrite_retrains(tmp_path, capsys, monkeypatch, one_torch_thread):
    import grft_lightning.training.module

    run = tmp_path / "run"
    cli_main(args(run))
    results = run / "results.json"
    before, stamp = results.read_bytes(), results.stat().st_mtime_ns
    ckpt_stamp = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    capsys.readouterr()

    def no_model(*a, **k):
        raise AssertionError("the model of a finished run was built")

    with pytest.raises(SystemExit) as stop, monkeypatch.context() as patch:
        patch.setattr(grft_lightning.training.module, "create_backbone", no_model)  # --run_dir given: decided first
        main(args(run))
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert f"{run} is a finished run: its results are in {results}" in out and "--overwrite" in out
    assert results.read_bytes() == before and results.stat().st_mtime_ns == stamp
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == ckpt_stamp
    assert not (run / LOCK_NAME).exists()

    again = cli_main(args(run, "--overwrite", "true"))
    out = capsys.readouterr().out
    assert f"--overwrite: removed {results}" in out and "resuming from" not in out
    assert again.trainer.global_step == 4  # trained from step 0 again
    fresh = json.loads(results.read_text())
    assert fresh["val_acc"] is not None and fresh["train_seconds"] > 0


def test_an_interrupted_test_pass_is_redone_on_resume(tmp_path, monkeypatch, one_torch_thread):
    run = tmp_path / "run"

    def preempted(self, batch, batch_idx):
        raise RuntimeError("preempted during the test pass")

    with monkeypatch.context() as patch:
        patch.setattr(PEFTModule, "test_step", preempted)
        with pytest.raises(RuntimeError, match="preempted"):
            cli_main(args(run))
    assert not (run / "results.json").exists() and not (run / LOCK_NAME).exists()
    saved = checkpoint(run)
    assert saved["global_step"] == 4 and train_seconds_of(saved) > 0

    cli = cli_main(args(run))
    results = json.loads((run / "results.json").read_text())
    assert cli.trainer.global_step == 4  # nothing trained again
    val_rows = [row for row in metrics_rows(run) if row.get("val/acc")]
    assert results["val_acc"] == pytest.approx(float(val_rows[0]["val/acc"]))  # the end-of-training figure
    assert all(float(row["val/acc"]) == pytest.approx(results["val_acc"]) for row in val_rows)
    assert results["test_acc"] is not None and 0.0 <= results["test_acc"] <= 1.0
    assert results["train_seconds"] == train_seconds_of(saved)  # the first segment's, not 0.0
    assert results["selection_seconds"] == saved["selection_seconds"] > 0


# -- item 3: a resume keeps the whole history -------------------------------------------------
def test_a_resume_appends_metrics_and_adds_up_the_seconds(tmp_path, preempted_at_epoch_1, one_torch_thread):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="preempted"):
        cli_main(args(run, epochs=2))
    assert preempted_at_epoch_1["lock"]["pid"] == os.getpid()
    assert preempted_at_epoch_1["lock"]["host"] == socket.gethostname()
    assert not (run / LOCK_NAME).exists()  # released on the error
    first = checkpoint(run)
    assert first["global_step"] == 4
    first_rows = metrics_rows(run)
    assert any(row.get("val/acc") for row in first_rows)

    cli_main(args(run, epochs=2))
    rows = metrics_rows(run)
    assert rows[:len(first_rows)] == [{**row, **{k: "" for k in rows[0].keys() - row.keys()}} for row in first_rows]
    train_steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    assert train_steps == list(range(8))  # steps 0-3 from the first segment, 4-7 from the resume
    assert [int(float(row["epoch"])) for row in rows if row.get("val/acc")] == [0, 1]
    results = json.loads((run / "results.json").read_text())
    assert results["train_seconds"] > train_seconds_of(first) > 0
    assert results["selection_seconds"] == first["selection_seconds"] > 0  # selected once, in segment 1


# -- item 4: no checkpoint with non-finite weights -----------------------------------------------
def test_a_diverging_run_ends_in_one_line_without_a_non_finite_checkpoint(tmp_path, capsys, one_torch_thread):
    run = tmp_path / "run"
    huge = json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e6}})
    line = error_line(capsys, args(run, "--model.optimizer", huge, "--checkpoint_every_n_steps", "1"))
    # the loss of step 4 was still finite; the weights it left are not, and are not saved
    assert line.startswith("error: non-finite tuned weights (") and "after global step 4 (epoch 0)" in line
    assert "last finite loss: " in line and "Lower the learning rate (model.optimizer.init_args.lr" in line
    saved = checkpoint(run)  # the step-3 state, the last one written
    assert saved["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert not (run / LOCK_NAME).exists()


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(tmp_path, capsys, preempted_at_epoch_1,
                                                              one_torch_thread):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="preempted"):
        cli_main(args(run, epochs=2))
    path = run / "checkpoints" / "last.ckpt"
    ckpt = checkpoint(run)
    name = next(k for k in ckpt["state_dict"] if k.endswith("head.weight"))
    ckpt["state_dict"][name][0, 0] = float("inf")
    torch.save(ckpt, path)
    line = error_line(capsys, args(run, epochs=2))
    assert line == (f"error: checkpoint {path} holds non-finite weights ({name}): the run diverged before it "
                    "was saved; start it again with a lower learning rate (--overwrite, or another --run_dir)")


# -- item 5: a resume refuses a config that changes the run -------------------------------------
def test_a_resume_refuses_another_run_config_and_accepts_other_logging(tmp_path, capsys, preempted_at_epoch_1,
                                                                         one_torch_thread):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="preempted"):
        cli_main(args(run, epochs=2))
    path = run / "checkpoints" / "last.ckpt"
    assert checkpoint(run)["run_config"]["seed_everything"] == 0
    kept = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt")}

    line = error_line(capsys, args(run, "--seed_everything", "1", epochs=2))
    assert line.startswith(f"error: checkpoint {path} is of another run: seed_everything (0 -> 1) differ;")
    assert "--run_dir" in line and "--overwrite" in line
    adamw = json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.5}})
    line = error_line(capsys, args(run, "--model.optimizer", adamw, epochs=2))
    assert f"checkpoint {path} is of another run: model.optimizer.init_args.lr (0.001 -> 0.5) differ;" in line
    sgd = json.dumps({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}})
    line = error_line(capsys, args(run, "--model.optimizer", sgd, epochs=2))
    assert "model.optimizer.class_path ('torch.optim.AdamW' -> 'torch.optim.SGD')" in line
    assert ", and model.optimizer.init_args.lr, model.optimizer.init_args.momentum," in line  # every key named
    line = error_line(capsys, args(run, "--model.warmup_epochs", "0.5", "--trainer.max_epochs", "3"))
    assert "model.warmup_epochs (0.0 -> 0.5)" in line and "trainer.max_epochs (2 -> 3)" in line
    assert not (run / "results.json").exists() and not (run / LOCK_NAME).exists()
    # refused before anything in the run directory is written: config.yaml still the run's own
    assert {name: (run / name).read_bytes() for name in kept} == kept

    # what does not change the run may differ
    cli = cli_main(args(run, "--trainer.log_every_n_steps", "2", "--checkpoint_every_n_steps", "3",
                        "--model.check_finite_every_n_batches", "2", "--selection.progress", "true",
                        "--data.init_args.num_workers", "1", epochs=2))
    assert cli.trainer.global_step == 8
    assert json.loads((run / "results.json").read_text())["seed"] == 0


def test_the_run_defining_config_lists():
    config = {"seed_everything": 3, "run_dir": "x", "label": "y", "checkpoint_every_n_steps": 5,
              "wandb": {"mode": "online"}, "trainer": {"max_epochs": 2, "logger": None, "devices": 4,
                                                       "enable_progress_bar": True, "precision": "bf16-mixed"},
              "model": {"backbone": "b", "check_finite_every_n_batches": 7,
                        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.1}}},
              "data": {"class_path": "D", "init_args": {"num_workers": 8, "batch_size": 16}},
              "selection": {"loss": "ce", "progress": False}, "budget": {"fraction": 0.01, "k": None}}
    assert run_defining_config(config) == {
        "seed_everything": 3, "trainer.max_epochs": 2, "trainer.precision": "bf16-mixed", "model.backbone": "b",
        "model.optimizer.class_path": "torch.optim.AdamW", "model.optimizer.init_args.lr": 0.1,
        "data.class_path": "D", "data.init_args.batch_size": 16, "selection.loss": "ce",
        "budget.fraction": 0.01, "budget.k": None}


# -- item 6: one run per directory at a time ---------------------------------------------------
def test_a_second_start_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys, one_torch_thread):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_NAME
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "slurm_job": None,
                                    "started": "2026-01-01T00:00:00+0000"}))
        line = error_line(capsys, args(run))
        assert line == (f"error: {run} is in use by process {live.pid} on {socket.gethostname()} (started "
                        f"2026-01-01T00:00:00+0000; {lock}); wait for it to end, or give this run another "
                        "--run_dir. If that process is gone, delete the lock file.")
        assert json.loads(lock.read_text())["pid"] == live.pid  # left to its owner
        assert not (run / "checkpoints").exists()
    finally:
        live.kill()
        live.wait()
    # the owner is gone now: its lock is stale
    cli_main(args(run))
    out = capsys.readouterr().out
    assert f"taking over {lock}: its process {live.pid} on {socket.gethostname()} is gone" in out
    assert (run / "results.json").is_file() and not lock.exists()


def test_only_rank_zero_takes_the_lock(monkeypatch):
    from grft_lightning.training.rundir import holds_run_lock

    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(variable, raising=False)
    assert holds_run_lock()
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert holds_run_lock()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's launcher started
    assert not holds_run_lock()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # local rank 0 of the second node
    assert not holds_run_lock()


def test_lock_of_an_earlier_run_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch, capsys):
    from grft_lightning.core.errors import RunDirectoryBusy
    from grft_lightning.training.rundir import RunLock

    for variable in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    path = tmp_path / LOCK_NAME
    # a requeued job, possibly on another node: the earlier run's pid may even be alive here
    path.write_text(json.dumps({"pid": os.getppid(), "host": "node-a", "slurm_job": "4242", "started": "t"}))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert capsys.readouterr().out == (f"taking over {path}: it was taken by an earlier run of this SLURM job "
                                       "(4242)\n")
    assert json.loads(path.read_text())["pid"] == os.getpid() and lock.held
    lock.release()
    assert not path.exists()
    # another job's lock on another host cannot be checked from here: refused, left in place
    path.write_text(json.dumps({"pid": 1, "host": "node-b", "slurm_job": "99", "started": "t"}))
    with pytest.raises(RunDirectoryBusy, match="is in use by process 1 on node-b"):
        RunLock(tmp_path).acquire()
    assert json.loads(path.read_text())["host"] == "node-b"


def test_a_finished_run_in_the_default_run_dir_is_left_alone(tmp_path, monkeypatch, capsys, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    argv = [a for a in args(tmp_path / "unused") if a not in ("--run_dir", str(tmp_path / "unused"))]
    cli_main(argv)
    results = Path("runs") / "synthetic" / "grft_row" / "seed0" / "results.json"
    before = results.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0
    assert f"is a finished run: its results are in {results}" in capsys.readouterr().out
    assert results.read_bytes() == before and not (results.parent / LOCK_NAME).exists()
