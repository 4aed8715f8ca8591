"""A user's mistake ends ``python train.py`` with one ``error: ...`` line and a non-zero exit
status, without a traceback; ``GRFT_DEBUG=1`` shows it; other errors keep theirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grft_lightning.training.cli import cli_main, main
from grft_lightning.data.folders import DatasetError
from grft_lightning.core.errors import is_user_error, report_user_errors
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


# -- reliability: every case below ends in one line, before the model where it can -----------------
def test_parser_errors_keep_their_reason(tmp_path, capsys):
    line = _error_line(capsys, _synthetic_args(tmp_path / "run", "--model.method", "grft_lightning.methods.NoSuch"),
                       code=2)
    assert line.startswith("error: model.method: module 'grft_lightning.methods' has no attribute 'NoSuch'")
    assert "grft_lightning.methods.NoSuch" in line
    line = _error_line(capsys, _synthetic_args(tmp_path / "run", method_args={"rows_per_matrx": 2}), code=2)
    assert line.startswith("error: model.method: Option 'rows_per_matrx' is not accepted")
    assert "class_path grft_lightning.methods.GRFT" in line


def test_condense_parser_error_shapes():
    from grft_lightning.core.errors import condense_parser_error

    nested = ('Parser key "model.method":\n\n  - Expected a path but {...} either not accessible or invalid\n'
              "  - Problem with given class_path 'grft_lightning.methods.GRFT':\n    Parser key \"mode\":\n"
              "      Expected a typing.Literal['row', 'column', 'auto']. Got value: diag\n")
    assert condense_parser_error(nested) == ("model.method.init_args.mode: expected a typing.Literal['row', 'column', "
                                             "'auto']. Got value: diag")
    missing = ('Parser key "model.method":\n\n  - Expected a path but x either not accessible or invalid\n'
               "  - Problem with given class_path 'pkg.NoSuch':\n    module 'pkg' has no attribute 'NoSuch'\n")
    assert condense_parser_error(missing) == "model.method: module 'pkg' has no attribute 'NoSuch' (class_path pkg.NoSuch)"
    assert condense_parser_error("Something else\nmore") == "Something else"


@pytest.mark.parametrize("option, value, expected", [
    ("--data.init_args.num_classes", "1", "error: data: synthetic has 1 class; classification needs at least 2"),
    ("--data.init_args.num_classes", "0", "error: data: synthetic has 0 classes; classification needs at least 2"),
    ("--data.init_args.n_train", "0", "error: data: the train split of synthetic is empty (data.init_args.n_train: 0)"),
    ("--model.image_size", "33", "error: model.image_size: backbone 'test_vit' cannot take 33 px images"),
])
def test_bad_data_ends_in_one_line_before_the_model(tmp_path, capsys, monkeypatch, option, value, expected):
    import grft_lightning.training.module as module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(module, "create_backbone", no_model)
    line = _error_line(capsys, _synthetic_args(tmp_path / "run", option, value))
    assert line.startswith(expected), line
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_list_path_outside_the_task_folder_ends_in_one_line(tmp_path, capsys):
    task_dir = Path(make_vtab_folder(tmp_path / "data", "dtd"))
    listing = task_dir / "test.txt"
    lines = listing.read_text().splitlines()
    lines[2] = "/etc/passwd 3"
    listing.write_text("\n".join(lines) + "\n")
    line = _error_line(capsys, _vtab_args(tmp_path / "data", tmp_path / "run"))
    assert line.startswith(f"error: {listing}:3: image path '/etc/passwd' is outside the folder {task_dir}")
    assert line.endswith("set data.init_args.allow_outside_root: true")


@pytest.mark.parametrize("where", ["file", "proc", "proc_folder"])
def test_a_run_dir_that_cannot_be_one_ends_in_one_line(tmp_path, capsys, where):
    if where == "file":
        (tmp_path / "plain").write_text("x")
        run_dir, reason = tmp_path / "plain" / "run", f"{tmp_path / 'plain'} is a file, not a folder"
    elif where == "proc":
        run_dir, reason = Path("/proc/grft_no_such/run"), "cannot create /proc/grft_no_such"
    else:  # a folder that exists but takes no files, even for root
        run_dir, reason = Path("/proc/self"), "cannot write in it"
    line = _error_line(capsys, _synthetic_args(run_dir))
    assert line.startswith(f"error: --run_dir: {run_dir} cannot be the run directory ({reason}")


def test_a_checkpoint_of_another_shape_is_refused_in_one_line(tmp_path, capsys, one_torch_thread):
    run = tmp_path / "run"
    cli_main(_synthetic_args(run))
    capsys.readouterr()
    ckpt = run / "checkpoints" / "last.ckpt"
    (run / "results.json").unlink()  # an unfinished run: the next command resumes last.ckpt
    # A resume compares the run-defining config first and names the keys that differ.
    line = _error_line(capsys, _synthetic_args(run, "--data.init_args.num_classes", "5"))
    assert "num_classes (4 -> 5)" in line and "--run_dir" in line
    line = _error_line(capsys, _synthetic_args(run, "--model.image_size", "48"))
    assert "image_size (32 -> 48)" in line
    # A checkpoint given to another command is checked when it is loaded.
    args = _synthetic_args(tmp_path / "other", "--data.init_args.num_classes", "3")
    args[0] = "validate"
    line = _error_line(capsys, args + ["--ckpt_path", str(ckpt)])
    assert line.startswith(f"error: checkpoint {ckpt} has num_classes 4, this run 3;")


@pytest.mark.parametrize("case", ["image_size", "run_dir"])
def test_debug_shows_the_traceback_of_the_new_checks(tmp_path, monkeypatch, case):
    from grft_lightning.core.errors import ConfigError

    monkeypatch.setenv("GRFT_DEBUG", "1")
    if case == "image_size":
        args, match = _synthetic_args(tmp_path / "run", "--model.image_size", "33"), "cannot take 33 px"
    else:
        (tmp_path / "plain").write_text("x")
        args, match = _synthetic_args(tmp_path / "plain" / "run"), "cannot be the run directory"
    with pytest.raises(ValueError, match=match) as raised:
        main(args)
    assert isinstance(raised.value, ConfigError) or isinstance(raised.value.__cause__, ConfigError)


def test_a_bad_choice_has_one_wording():
    from grft_lightning.core.errors import check_choice
    from grft_lightning.methods import GPS, GRFT

    check_choice("x", "b", ("a", "b"))  # a good choice passes
    with pytest.raises(ValueError, match=r"^GRFT\.order must be highest or lowest, got 'middle'$"):
        GRFT(mode="row", rows_per_matrix=1, order="middle")
    with pytest.raises(ValueError, match=r"^GPS\.order must be gradient or random, got 'best'$"):
        GPS(k=1, order="best")
    with pytest.raises(ValueError, match=r"^GRFT\.allocation must be uniform, proportional or global, got 'x'$"):
        GRFT(mode="row", fraction=0.01, allocation="x")
