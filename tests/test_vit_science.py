"""The pre-registered study's arms (configs/vit_suite/science/) run end to end on tiny data: the
committed testbed weights, the real task and arm configs, 1 epoch; what results.json records."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCIENCE = REPO / "configs" / "vit_suite" / "science"
TINY = ["--data.init_args.n_train", "64", "--data.init_args.n_val", "32", "--data.init_args.n_test", "32",
        "--data.init_args.batch_size", "32", "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
        "--wandb.mode", "disabled", "--checkpoint_every_n_steps", "null"]


def _run(tmp_path: Path, arm: str, task: str = "tasks/mnist_digit.yaml") -> dict:
    from grft_lightning.cli import cli_main

    run_dir = tmp_path / arm
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli_main(["fit", "--config", str(SCIENCE / task), "--config", str(SCIENCE / f"{arm}.yaml"),
                  "--seed_everything", "0", "--run_dir", str(run_dir), *TINY])
    return json.loads((run_dir / "results.json").read_text())


def test_every_arm_is_labelled_by_its_file_and_extends_a_suite_recipe():
    import yaml

    arms = sorted(SCIENCE.glob("*.yaml"))
    assert len(arms) == 13
    for path in arms:
        config = yaml.safe_load(path.read_text())
        assert config["label"] == path.stem
        base = (SCIENCE / config["config"]).resolve()
        assert base.parent == (REPO / "configs" / "vit_suite" / "methods") and base.is_file()


@pytest.mark.slow
def test_the_primary_arms_run_and_record_what_the_plan_reads(tmp_path, one_torch_thread):
    probe = _run(tmp_path, "grft_row_probe")
    assert probe["method"] == "grft_row_probe" and probe["dataset"] == "vit_science/mnist_digit"
    assert probe["n_test"] == 32  # the tiny override of the 2,000-image split
    section = probe["selection"]
    assert section["head"] == "probe" and section["keep_probe_head"] is False and section["probe_seconds"] > 0
    assert set(probe["update_size"]) == {"median", "p90", "groups"} and probe["update_size"]["groups"] == 24
    assert probe["update_size"]["median"] > 0
    lowest = _run(tmp_path, "grft_row_lowest_probe")
    assert lowest["budget"]["mode"] == "row" and lowest["tuned"] == probe["tuned"]
    matched = _run(tmp_path, "grft_row_matched_probe")
    gps = _run(tmp_path, "gps_nostem_probe")
    random_gps = _run(tmp_path, "gps_random_nostem")
    # the same layers, the budget within one row: GPS's 6,912 block entries, GRFT's rows at most that
    gps_selected = gps["tuned"] - probe["tuned"] + 5376  # same biases and head as GRFT's
    assert gps_selected == 6912 and random_gps["tuned"] == gps["tuned"]
    assert 6912 - 512 < matched["tuned"] - probe["tuned"] + 5376 <= 6912
    assert "selection" not in random_gps and random_gps["update_size"]["groups"] == 6912 // 1
    random_rows = _run(tmp_path, "random_rows")
    assert random_rows["tuned"] == probe["tuned"] and "selection" not in random_rows
