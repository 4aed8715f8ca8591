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
    from grft_lightning.training.cli import cli_main

    run_dir = tmp_path / arm
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli_main(["fit", "--config", str(SCIENCE / task), "--config", str(SCIENCE / f"{arm}.yaml"),
                  "--seed_everything", "0", "--run_dir", str(run_dir), *TINY])
    return json.loads((run_dir / "results.json").read_text())


def test_every_arm_is_labelled_by_its_file_and_extends_its_registry_method():
    """Each arm includes its method's registry file and states what differs on the suite's base
    (tests/test_method_registry.py holds the arms to the suite recipe's rates)."""
    import yaml

    arms = sorted(SCIENCE.glob("*.yaml"))
    assert len(arms) == 13
    for path in arms:
        config = yaml.safe_load(path.read_text())
        assert config["label"] == path.stem
        base = (SCIENCE / config["config"]).resolve()
        assert base.parent == (REPO / "configs" / "methods") and base.is_file()


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
    random_row = _run(tmp_path, "random_row")
    assert random_row["tuned"] == probe["tuned"] and "selection" not in random_row


def _science():
    from benchmarks import vit_science

    return vit_science


def _write(path: Path, **record) -> None:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(record))


def test_the_task_choice_reads_validation_only(tmp_path):
    science = _science()
    figures = {("mnist_count9", "full"): (0.90, 0.10), ("mnist_count9", "linear"): (0.60, 0.99),
               ("mnist_distance", "full"): (0.80, 0.10), ("mnist_distance", "linear"): (0.40, 0.99)}
    for (task, method), (val, test) in figures.items():
        _write(tmp_path / task / method / "seed100", dataset=f"vit_science/{task}", method=method, val_acc=val,
               test_acc=test)
    # distance: gap 0.40 > count9's 0.30 (the test numbers would say the opposite; they are not read)
    assert science.choose_task(tmp_path) == "configs/vit_suite/science/candidates/mnist_distance.yaml"
    _write(tmp_path / "mnist_distance" / "full" / "seed101", dataset="vit_science/mnist_distance", method="full",
           val_acc=1.0, test_acc=0.1)  # mean 0.90 <= 0.95: still open, gap 0.50
    assert science.choose_task(tmp_path).endswith("mnist_distance.yaml")
    _write(tmp_path / "mnist_distance" / "full" / "seed102", dataset="vit_science/mnist_distance", method="full",
           val_acc=1.0, test_acc=0.1)  # mean 0.933: open; count9 too; distance's gap 0.533 still wins
    assert science.choose_task(tmp_path).endswith("mnist_distance.yaml")
    for seed in (103, 104):  # full's mean 0.96 > 0.95: distance saturated, count9 (open) is taken
        _write(tmp_path / "mnist_distance" / "full" / f"seed{seed}", dataset="vit_science/mnist_distance",
               method="full", val_acc=1.0, test_acc=0.1)
    assert science.choose_task(tmp_path).endswith("mnist_count9.yaml")


def test_the_setting_choice_breaks_ties_towards_small_steps(tmp_path):
    science = _science()
    scores = {"lr0.03_lam0.0001": 0.80, "lr0.01_lam0": 0.85, "lr0.001_lam0.1": 0.85, "lr0.001_lam1": 0.85}
    for setting, val in scores.items():
        for task in ("mnist_digit", "mnistm"):
            _write(tmp_path / setting / "tasks" / task / "grft_row_probe" / "seed100", val_acc=val, test_acc=1 - val)
    assert science.choose_setting(tmp_path, "grft_row_probe") == (
        "--model.optimizer.init_args.lr 0.001 --model.method.init_args.reg_lambda 1.0")
    _write(tmp_path / "lr0.003_lamnone" / "tasks" / "mnistm" / "gps_nostem_probe" / "seed100", val_acc=0.9,
           test_acc=0.1)
    assert science.choose_setting(tmp_path, "gps_nostem_probe") == "--model.optimizer.init_args.lr 0.003"
    with pytest.raises(SystemExit, match="no run of random_row"):
        science.choose_setting(tmp_path, "random_row")


def test_power_script_minimum_detectable_effect():
    from benchmarks import power

    # (t_{0.975, 9} + t_{0.8, 9}) * sd / sqrt(10) = (2.2622 + 0.8834) * 1 / 3.1623
    assert power.mde(1.0, 10, 0.05) == pytest.approx(0.99472, abs=1e-4)
    assert power.sd([1.0, 2.0, 3.0]) == 1.0
    rows = [{"task": t, "method": m, "acc_per_seed": {"0": a, "1": b}}
            for t, m, a, b in (("x", "A", 0.50, 0.60), ("x", "B", 0.40, 0.40), ("y", "A", 0.9, 0.9), ("y", "B", 0.8, 0.7))]
    diffs = power.paired_differences(rows, "A", "B", ["x", "y"])
    assert diffs["x"] == pytest.approx([10.0, 20.0]) and diffs["mean"] == pytest.approx([10.0, 20.0])


def test_the_analysis_pools_tasks_per_seed_and_adjusts_the_primary_comparisons_only(tmp_path):
    science = _science()
    # GRFT probe beats random rows by exactly 1 + seed/10 points on the mean of two tasks; every other arm
    # equals random rows except the lowest rows, 2 points below on task b
    base = {0: 0.80, 1: 0.82, 2: 0.81, 3: 0.79}
    for seed, acc in base.items():
        for task in ("a", "b"):
            for arm in ("random_row", "grft_row_lowest_probe", "grft_row_matched_probe", "gps_nostem_probe",
                        "gps_random_nostem", "grft_row"):
                test = acc - (0.02 if arm == "grft_row_lowest_probe" and task == "b" else 0.0)
                _write(tmp_path / task / arm / f"seed{seed}", dataset=f"vit_science/{task}", method=arm, seed=seed,
                       test_acc=test, update_size={"median": 0.5})
            _write(tmp_path / task / "grft_row_probe" / f"seed{seed}", dataset=f"vit_science/{task}",
                   method="grft_row_probe", seed=seed, test_acc=acc + 0.01 + seed / 1000)
    result = science.analyse(tmp_path, tmp_path / "out")
    p1, p2, p3, p4 = result["primary"]
    assert (p1["a"], p1["b"], p1["task"], p1["n"]) == ("grft_row_probe", "random_row", "Mean", 4)
    assert p1["mean"] == pytest.approx(1.15) and p1["p_holm"] is not None
    assert p2["mean"] == pytest.approx(2.15)  # + the 1 point the lowest rows lose on the mean of a and b
    assert p3["mean"] == pytest.approx(0.0) and p4["mean"] == pytest.approx(0.0)
    # the exploratory comparisons carry no Holm adjustment
    assert all(c["p_holm"] is None for c in result["exploratory"])
    # detectable effect from the spread of P1's per-seed differences (1.0, 1.1, 1.2, 1.3 points)
    d1 = result["detectable"][0]
    assert d1["n"] == 4 and d1["sd"] == pytest.approx(0.1291, abs=1e-4)
    from benchmarks import power

    assert d1["strictest"] == pytest.approx(power.mde(d1["sd"], 4, 0.0125))
    assert d1["last"] == pytest.approx(power.mde(d1["sd"], 4, 0.05)) and d1["last"] < d1["strictest"]
    text = (tmp_path / "out" / "analysis.md").read_text()
    assert "| grft_row_probe - random_row | 4 | 0.13 |" in text
    assert result["update_size"]["random_row"] == 0.5 and "grft_row_probe" not in result["update_size"]


def test_the_grid_table_lists_every_setting_best_first(tmp_path):
    science = _science()
    for setting, val in {"lr0.03_lam0": 0.9, "lr0.001_lam1": 0.7}.items():
        for task in ("mnist_digit", "mnistm"):
            _write(tmp_path / setting / "tasks" / task / "random_row" / "seed100", val_acc=val + (0.1 if task == "mnistm" else 0))
    table = science.grid(tmp_path, ["random_row"], tmp_path / "out")
    assert [r["setting"] for r in table["random_row"]] == ["lr0.03_lam0", "lr0.001_lam1"]
    assert table["random_row"][0]["val_acc"] == pytest.approx(95.0) and table["random_row"][1]["runs"] == 2
    assert "| lr0.001_lam1 | 75.00 | 2 |" in (tmp_path / "out" / "grid.md").read_text()


def test_the_analysis_lists_every_arm_with_its_size(tmp_path):
    science = _science()
    for seed in (0, 1):
        for task, acc in (("a", 0.8), ("b", 0.6)):
            _write(tmp_path / task / "grft_row_probe" / f"seed{seed}", dataset=f"vit_science/{task}", method="grft_row_probe",
                   seed=seed, test_acc=acc + seed / 100, tuned_pct=1.09, counts={"selected": 5376, "bias": 7040},
                   update_size={"median": 2.0 + seed})
        _write(tmp_path / "a" / "linear" / f"seed{seed}", dataset="vit_science/a", method="linear", seed=seed,
               test_acc=0.5, tuned_pct=0.1, counts={"head": 1290})
    arms = {a["arm"]: a for a in science.analyse(tmp_path, tmp_path / "out")["arms"]}
    probe = arms["grft_row_probe"]
    assert probe["test_acc"] == {"a": pytest.approx(80.5), "b": pytest.approx(60.5)}
    assert probe["mean"] == pytest.approx(70.5) and probe["seeds"] == 2 and probe["selected"] == 5376
    assert probe["update_size"] == 2.5 and arms["linear"]["update_size"] is None and arms["linear"]["selected"] == 0
    text = (tmp_path / "out" / "analysis.md").read_text()
    assert "| grft_row_probe | 80.50 | 60.50 | 70.50 | 2 | 1.090 | 5,376 | 2.50 |" in text
    assert "| linear | 50.00 |  | 50.00 | 2 | 0.100 | 0 |  |" in text


def test_a_comparison_pools_only_the_tasks_both_arms_have(tmp_path):
    science = _science()
    for seed in (0, 1, 2):
        for task, acc in (("a", 0.9), ("b", 0.5)):
            _write(tmp_path / task / "grft_row_probe" / f"seed{seed}", dataset=f"vit_science/{task}",
                   method="grft_row_probe", seed=seed, test_acc=acc + seed / 1000)
        # the other arm has finished task a only: the comparison is on task a alone, not a's 90 against a mean of 70
        _write(tmp_path / "a" / "random_row" / f"seed{seed}", dataset="vit_science/a", method="random_row", seed=seed,
               test_acc=0.89)
    p1 = science.analyse(tmp_path, tmp_path / "out")["primary"][0]
    assert p1["mean"] == pytest.approx(1.1) and p1["n"] == 3
