"""Nothing lost: a crash while saving keeps the previous file; damaged, foreign or unsafe files
are refused with an error that names them; checkpoints load with ``weights_only=True``."""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch

from grft_lightning.methods.export import read_tuned, save_tuned
from grft_lightning.core.io import load_checkpoint_safely, make_atomic_checkpoint_io, write_text_atomic
from grft_lightning.methods import RandomRows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Gadget:
    """A custom class: pickle can store it, ``weights_only=True`` must refuse to rebuild it."""

    rebuilt = 0

    def __init__(self, value=0):
        self.value = value

    def __setstate__(self, state):
        Gadget.rebuilt += 1
        self.__dict__.update(state)


def _half_then_fail(real_write):
    """A writer that writes half of what the real one would, then raises (a crash mid-save)."""

    def write(obj, path, *args, **kwargs):
        real_write(obj, path, *args, **kwargs)
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    return write


def _tuned_model(tiny_vit, seed=0):
    method = RandomRows(rows_per_matrix=1, seed=seed)
    selection = method.select(tiny_vit)
    method.apply(tiny_vit, selection)
    return tiny_vit, method, selection


# -- a crash during a save ------------------------------------------------------------------
def test_crash_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    io = make_atomic_checkpoint_io()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.arange(6.0)}}, target)
    monkeypatch.setattr(torch, "save", _half_then_fail(torch.save))
    with pytest.raises(OSError, match="simulated"):
        io.save_checkpoint({"global_step": 6, "state_dict": {"w": torch.zeros(6)}}, target)
    monkeypatch.undo()
    assert os.listdir(target.parent) == ["last.ckpt"]  # no partial file, no temporary file
    kept = io.load_checkpoint(target)
    assert kept["global_step"] == 4 and torch.equal(kept["state_dict"]["w"], torch.arange(6.0))


def test_crash_while_saving_tuned_values_keeps_the_previous_file(tiny_vit, tmp_path, monkeypatch):
    import safetensors.torch

    model, method, selection = _tuned_model(tiny_vit)
    target = tmp_path / "tuned.safetensors"
    save_tuned(model, target, method, selection)
    before = target.read_bytes()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    monkeypatch.setattr(safetensors.torch, "save_file", _half_then_fail(safetensors.torch.save_file))
    with pytest.raises(OSError, match="simulated"):
        save_tuned(model, target, method, selection)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["tuned.safetensors"] and target.read_bytes() == before
    tensors, _ = read_tuned(target)
    assert tensors["param/head.bias"].shape == model.head.bias.shape


def test_crash_while_writing_results_keeps_the_previous_file(tmp_path, monkeypatch):
    from pathlib import Path

    target = tmp_path / "results.json"
    write_text_atomic(target, json.dumps({"test_acc": 0.5}))
    real = Path.write_text

    def half(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(OSError, match="simulated"):
        write_text_atomic(target, json.dumps({"test_acc": 0.75}))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["results.json"] and json.loads(target.read_text()) == {"test_acc": 0.5}


# -- damaged and foreign files ----------------------------------------------------------------
def _good_checkpoint(path):
    make_atomic_checkpoint_io().save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(1000)}}, path)
    return path


@pytest.mark.parametrize("kind", ["truncated", "random_bytes", "empty", "custom_object_list"])
def test_a_bad_checkpoint_is_refused_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        raw = _good_checkpoint(tmp_path / "good.ckpt").read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "random_bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                         .numpy().tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save([1, Gadget(2)], path)
    expected = re.escape(str(path)) + r": cannot load as a checkpoint with weights_only=True"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint_safely(path)
    with pytest.raises(ValueError, match=expected):  # the path the Trainer takes
        make_atomic_checkpoint_io().load_checkpoint(path)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.ckpt"))):
        load_checkpoint_safely(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("kind", ["random_bytes", "pickle"])
def test_a_foreign_tuned_file_is_refused_naming_the_file(tmp_path, kind):
    path = tmp_path / "tuned.safetensors"
    if kind == "random_bytes":
        path.write_bytes(bytes(range(256)) * 8)
    else:
        path.write_bytes(pickle.dumps({"delta": [1, 2, 3]}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a readable safetensors file"):
        read_tuned(path)


def test_checkpoints_load_weights_only_a_pickled_class_is_never_rebuilt(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(2)}, "extra": Gadget(7)}, path)
    assert torch.load(path, weights_only=False)["extra"].value == 7  # an ordinary pickle can rebuild it
    rebuilt = Gadget.rebuilt
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": .*weights_only=True \(UnpicklingError"):
        make_atomic_checkpoint_io().load_checkpoint(path)
    assert Gadget.rebuilt == rebuilt  # nothing of the custom class ran


def test_the_cli_refuses_a_damaged_last_checkpoint_naming_it(tmp_path):
    """Auto-resume finds ``<run_dir>/checkpoints/last.ckpt``; a damaged one stops the run."""
    from grft_lightning.training.cli import cli_main

    run = tmp_path / "run"
    raw = _good_checkpoint(tmp_path / "good.ckpt").read_bytes()
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(raw[:100])
    data = {"class_path": "grft_lightning.data.SyntheticImages",
            "init_args": {"num_classes": 4, "n_train": 8, "n_val": 4, "n_test": 4, "num_workers": 0}}
    args = ["fit", "--model.backbone", "test_vit", "--model.pretrained", "false", "--model.image_size", "32",
            "--model.method", json.dumps({"class_path": "grft_lightning.methods.BitFit"}), "--data", json.dumps(data),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--wandb.mode", "disabled", "--run_dir", str(run)]
    with pytest.raises(ValueError, match=re.escape(str(run / "checkpoints" / "last.ckpt"))):
        cli_main(args)


def test_leftovers_of_a_killed_save_are_removed_and_live_ones_kept(tmp_path):
    from grft_lightning.core.io import remove_stale_temporaries

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"good")
    stale = folder / ".last.ckpt.ab12cd.tmp"  # what atomic_path names its temporary
    stale.write_bytes(b"half")
    os.utime(stale, (1000.0, 1000.0))
    live = folder / ".last.ckpt.ef34gh.tmp"  # another process's save in progress
    live.write_bytes(b"writing")
    other = folder / "notes.tmp"  # not hidden: not ours
    other.write_bytes(b"x")
    os.utime(other, (1000.0, 1000.0))
    assert remove_stale_temporaries(folder, older_than=2000.0) == [stale]
    assert sorted(p.name for p in folder.iterdir()) == [".last.ckpt.ef34gh.tmp", "last.ckpt", "notes.tmp"]
    assert remove_stale_temporaries(tmp_path / "absent", older_than=2000.0) == []
