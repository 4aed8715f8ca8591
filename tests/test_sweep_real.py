"""grft_lightning.experiments.sweep with real runs: two tiny runs (timm ``test_vit``, SyntheticImages) through
train.py (``local``: one process per run) and through ``cli_main`` in the sweep's own process
(``inprocess``) or in two worker processes; every run writes its results.json, and launching the
same sweep again skips them."""

import json
import os
import textwrap
from pathlib import Path

import pytest

from grft_lightning.experiments import report, sweep, tables

TASK = textwrap.dedent("""
    trainer:
      max_epochs: 1
      accelerator: cpu
      devices: 1
      enable_progress_bar: false
      enable_model_summary: false
      log_every_n_steps: 1
      num_sanity_val_steps: 0
    model:
      backbone: test_vit
      pretrained: false
      image_size: 32
    data:
      class_path: grft_lightning.data.SyntheticImages
      init_args: {num_classes: 4, n_train: 16, n_val: 8, n_test: 8}
    selection:
      progress: false
    wandb:
      mode: disabled
""")
METHODS = {
    "grft": "model:\n  method:\n    class_path: grft_lightning.methods.GRFT\n"
            "    init_args: {mode: row, rows_per_matrix: 2}\n",
    "linear": "model:\n  method:\n    class_path: grft_lightning.methods.Linear\n",
}


@pytest.fixture
def configs(tmp_path: Path) -> tuple[Path, list[str]]:
    (tmp_path / "tiny").mkdir()
    task = tmp_path / "tiny" / "synthetic.yaml"
    task.write_text(TASK)
    methods = []
    for name, text in METHODS.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        methods.append(str(path))
    return task, methods


@pytest.mark.slow
@pytest.mark.parametrize("mode, workers", [("local", 1), ("inprocess", 1), ("inprocess", 2)])
def test_real_two_run_sweep_and_relaunch(configs, tmp_path, capfd, mode, workers):
    task, methods = configs
    runs_dir = tmp_path / "runs"
    argv = ["--suite", str(task), "--methods", *methods, "--seeds", "3", "--runs-dir", str(runs_dir),
            "--mode", mode, "--workers", str(workers)]
    cwd = os.getcwd()
    assert sweep.main(argv) == 0
    assert os.getcwd() == cwd
    out = capfd.readouterr().out
    assert "2 runs planned: 0 done, 2 pending" in out

    run_dirs = {name: runs_dir / "tiny" / "synthetic" / name / "seed3" for name in METHODS}
    results = {name: json.loads((path / "results.json").read_text()) for name, path in run_dirs.items()}
    # the config file's name is the run's name everywhere; results.json keeps the method's own
    assert (results["grft"]["method"], results["linear"]["method"]) == ("grft", "linear")
    assert results["grft"]["method_name"] == "grft_row" and "method_name" not in results["linear"]
    for name, record in results.items():
        assert (record["dataset"], record["backbone"], record["seed"]) == ("synthetic", "test_vit", 3)
        assert 0.0 <= record["test_acc"] <= 1.0 and 0.0 <= record["val_acc"] <= 1.0
        assert record["tuned_pct"] > 0 and (run_dirs[name] / "tuned.safetensors").is_file()
    assert results["grft"]["counts"]["selected"] == 2 * (64 + 64 + 64 + 192) * 6  # 2 rows, 6 blocks
    assert results["linear"]["counts"]["selected"] == 0
    table = tables.summarize(tables.load_results(runs_dir))["other"]
    assert [row.method for row in table.rows] == ["grft", "linear"]

    written = {name: (path / "results.json").stat().st_mtime_ns for name, path in run_dirs.items()}
    assert sweep.main(argv) == 0
    out = capfd.readouterr().out
    assert "2 runs planned: 2 done, 0 pending" in out
    if workers == 1:  # (the workers' own lines go to their inherited stdout, not always captured)
        assert out.count("skip ") == 2 and "2 runs, 2 skipped, 0 ok, 0 failed" in out
    assert {name: (path / "results.json").stat().st_mtime_ns for name, path in run_dirs.items()} == written


@pytest.mark.slow
def test_inprocess_failure_is_counted_and_the_sweep_goes_on(configs, tmp_path, capfd):
    task, methods = configs
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  method:\n    class_path: grft_lightning.methods.NoSuchMethod\n")
    argv = ["--suite", str(task), "--methods", str(bad), methods[1], "--runs-dir", str(tmp_path / "runs"),
            "--mode", "inprocess"]
    assert sweep.main(argv) == 1
    out = capfd.readouterr().out
    assert "bad/seed0: failed (exit" in out and "linear/seed0: ok (" in out
    assert "2 runs, 0 skipped, 1 ok, 1 failed" in out
