"""A user's mistake ends ``python train.py`` with one ``error: ...`` line and a non-zero exit
status, without a traceback; ``GRFT_DEBUG=1`` shows it; other errors keep theirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grft_lightning.cli import cli_main, main
from grft_lightning.data.folders import DatasetError
from grft_lightning.errors import is_user_error, report_user_errors
from synthetic_folders import make_vtab_folder

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
#: a timm name whose weights are not in the offline cache: loading them would fail
UNCACHED = "vit_tiny_patch16_224.augreg_in21k"


def _vtab_args(root, run_dir, backbone: str = "test_vit", pretrained: str = "false") -> list[str]:
    return [
        "fit", "--model.backbone", backbone, "--model.pretrained", pretrained, "--model.image_size", "32",
        "--model.method", "grft_lightning.methods.GRFT",
        "--data", json.dumps({"class_path": "grft_lightning.data.VTAB1k",
                              "init_args": {"root": str(root), "task": "dtd", "num_workers": 0}}),
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--wandb.mode", "disabled",
        "--run_dir", str(run_dir),
    ]


def _synthetic_args(run_dir, *extra: str, method_args: dict | None = None) -> list[str]:
    return [
        "fit", "--model.backbone", "test_vit", "--model.pretrained", "false", "--model.image_size", "32",
        "--model.method", json.dumps({"class_path": "grft_lightning.methods.GRFT",
                                      "init_args": method_args or {"rows_per_matrix": 2}}),
        "--data", json.dumps({"class_path": "grft_lightning.data.SyntheticImages",
                              "init_args": {"num_classes": 4, "n_train": 16, "n_val": 8, "n_test": 8,
                                            "num_workers": 0}}),
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        "--selection.loss", "ce", "--selection.progress", "false", "--wandb.mode", "disabled",
        "--run_dir", str(run_dir), *extra,
    ]


def _error_line(capsys, args: list[str], code: int = 1) -> str:
    """Run the entry point; the one ``error:`` line it printed (no traceback, exit ``code``)."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_wrong_data_root_fails_before_the_weights_are_loaded(tmp_path, capsys):
    # The backbone's weights are not cached: had the model been built first, the error would be
    # about them. The data is checked first.
    line = _error_line(capsys, _vtab_args(tmp_path / "nowhere", tmp_path / "run", UNCACHED, "true"))
    assert "data root" in line and "nowhere" in line and "--data.init_args.root" in line


def test_a_malformed_list_file_line_is_named(tmp_path, capsys):
    task_dir = Path(make_vtab_folder(tmp_path / "data", "dtd"))
    listing = task_dir / "train800val200.txt"
    lines = listing.read_text().splitlines()
    lines[1] = "images/train800/000001.jpg seven"
    listing.write_text("\n".join(lines) + "\n")
    line = _error_line(capsys, _vtab_args(tmp_path / "data", tmp_path / "run"))
    assert f"{listing}:2: malformed line" in line


def test_a_missing_image_is_named_with_its_list_line(tmp_path, capsys):
    task_dir = Path(make_vtab_folder(tmp_path / "data", "dtd"))
    (task_dir / "images" / "test" / "000003.jpg").unlink()
    line = _error_line(capsys, _vtab_args(tmp_path / "data", tmp_path / "run"))
    assert f"{task_dir / 'test.txt'}:4" in line and "000003.jpg does not exist" in line


def test_bad_config_values_name_the_option(tmp_path, capsys):
    line = _error_line(capsys, _synthetic_args(tmp_path / "run", method_args={"mode": "diagonal"}), code=2)
    assert line.startswith("error: model.method.init_args.mode: ") and "diagonal" in line
    line = _error_line(capsys, _synthetic_args(tmp_path / "run", "--trainer.max_epochs", "ten"), code=2)
    assert line.startswith("error: trainer.max_epochs: ") and "ten" in line
    line = _error_line(capsys, _synthetic_args(tmp_path / "run", method_args={"fraction": 2.0}))
    assert line == "error: GRFT.fraction must be in (0, 1], got 2.0"
    line = _error_line(capsys, ["fit", "--config", str(tmp_path / "nope.yaml")])
    assert line == f"error: --config: file not found: {tmp_path / 'nope.yaml'}"


def test_a_checkpoint_of_another_budget_is_refused_in_one_line(tmp_path, capsys, one_torch_thread):
    run = tmp_path / "run"
    cli_main(_synthetic_args(run))
    (run / "results.json").unlink()  # as if the final test pass had been interrupted
    capsys.readouterr()
    line = _error_line(capsys, _synthetic_args(run, method_args={"rows_per_matrix": 3}))  # resumes last.ckpt
    # refused by the run-defining config before anything is written (PEFTModule's own check of the
    # method and budget, "was trained with another method or budget", backs an explicit --ckpt_path)
    assert line.startswith(f"error: checkpoint {run / 'checkpoints' / 'last.ckpt'} is of another run: "
                           "model.method.init_args.rows_per_matrix (2 -> 3)")
    assert "--run_dir" in line


def test_weights_missing_offline_say_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _synthetic_args(tmp_path / "run", "--model.backbone", UNCACHED, "--model.pretrained", "true",
                           "--model.image_size", "224")
    line = _error_line(capsys, args)
    assert f"could not load pre-trained weights for {UNCACHED!r}" in line
    assert "--model.weights PATH" in line and "--model.pretrained false" in line


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("GRFT_DEBUG", "1")
    with pytest.raises(ValueError, match="data root") as raised:  # jsonargparse's link error, from ours
        main(_vtab_args(tmp_path / "nowhere", tmp_path / "run"))
    assert isinstance(raised.value, DatasetError) or isinstance(raised.value.__cause__, DatasetError)


def test_other_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        with report_user_errors():
            1 / 0
    with pytest.raises(ValueError, match="not from this package"):
        with report_user_errors():
            raise ValueError("not from this package")  # raised here, in a test: not a user error
    try:
        import torch

        torch.zeros(2).view(3)
    except RuntimeError as err:
        assert not is_user_error(err)


def test_train_py_prints_one_line_and_exits_non_zero(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("GRFT_DEBUG", None)
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *_vtab_args(tmp_path / "nowhere", tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "data root" in errors[0]
