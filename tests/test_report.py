"""grft_lightning.experiments.report on synthetic results.json files, with hand-computed numbers.

Data (accuracies in %):
- VTAB grft, seeds 0 and 1, all 19 tasks: task i (standard order) scores 50 + i + 2 * seed, so
  each task has mean 51 + i and std sqrt(2); Natural (i = 0..6) 54, Specialized (7..10) 59.5,
  Structured (11..18) 65.5, Mean (19 tasks) 60, Mean of group means 179 / 3. Every seed is
  shifted by the same 2 points, so every aggregate has std sqrt(2) as well.
- VTAB gps, seeds 0, 1, 2: the 7 natural tasks score 70 + seed except dtd (60, 62, 67: mean 63,
  std sqrt(13)); Natural = (6 * 71 + 63) / 7 = 489 / 7, per-seed means 480/7, 488/7, 499/7, so std
  sqrt(91) / 7. Three specialized tasks only (no diabetic_retinopathy): Specialized, Structured
  and both overall means blank. tuned_pct 0.2, dtd 0.4: Tuned % = (9 * 0.2 + 0.4) / 10 = 0.22.
- FGVC grft, one seed: 80, 70, 99, 85, 86 -> Mean 84, no std. gps: cub only, 81 and 83.
- offline grft: mnist 90, rotation 50 -> Mean 70; gps: mnist only -> Mean blank.
"""

import csv
import json
import math
import sys
from pathlib import Path

import pytest

from grft_lightning.experiments import report
from grft_lightning.experiments import tables as run_tables
from grft_lightning.experiments.tables import MEAN, MEAN_19, MEAN_GROUPS, VTAB_COLUMNS

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "reference.yaml"


def write_result(root: Path, dataset: str, method: str, seed: int, acc_pct: float,
                 tuned_pct: float = 0.3) -> None:
    run_dir = root / dataset / method / f"seed{seed}"
    run_dir.mkdir(parents=True)
    record = {"method": method, "dataset": dataset, "seed": seed, "test_acc": acc_pct / 100,
              "val_acc": None, "tuned_pct": tuned_pct}
    (run_dir / "results.json").write_text(json.dumps(record))


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for i, task in enumerate(VTAB_COLUMNS):
        for seed in (0, 1):
            write_result(root, f"vtab/{task}", "grft", seed, 50 + i + 2 * seed, 0.3)
    for task in run_tables.VTAB_GROUPS["Natural"]:
        for seed in (0, 1, 2):
            acc = {0: 60, 1: 62, 2: 67}[seed] if task == "dtd" else 70 + seed
            write_result(root, f"vtab/{task}", "gps", seed, acc, 0.4 if task == "dtd" else 0.2)
    for task in ("patch_camelyon", "eurosat", "resisc45"):
        for seed in (0, 1, 2):
            write_result(root, f"vtab/{task}", "gps", seed, 75.0, 0.2)
    for dataset, acc in zip(run_tables.FGVC_DATASETS, (80, 70, 99, 85, 86)):
        write_result(root, f"fgvc/{dataset}", "grft", 0, acc, 1.2)
    write_result(root, "fgvc/cub", "gps", 0, 81, 0.5)
    write_result(root, "fgvc/cub", "gps", 1, 83, 0.5)
    write_result(root, "offline/mnist", "grft", 0, 90, 1.0)
    write_result(root, "offline/rotation", "grft", 0, 50, 1.0)
    write_result(root, "offline/mnist", "gps", 0, 88, 1.0)
    return root


@pytest.fixture
def tables(runs_dir: Path) -> dict:
    return run_tables.summarize(run_tables.load_results(runs_dir))


def row(table: run_tables.Table, method: str) -> run_tables.Row:
    return next(r for r in table.rows if r.label == method)


def test_families_and_columns(tables):
    assert list(tables) == ["vtab", "fgvc", "offline"]
    vtab = tables["vtab"]
    assert vtab.tasks == VTAB_COLUMNS
    assert vtab.aggregates == ["Natural", "Specialized", "Structured", MEAN_19, MEAN_GROUPS]
    assert tables["fgvc"].columns == ["cub", "nabirds", "flowers", "dogs", "cars", MEAN]
    assert tables["offline"].columns == ["mnist", "rotation", MEAN]
    assert [r.method for r in vtab.rows] == ["gps", "grft"]


def test_vtab_task_cells_mean_and_sample_std(tables):
    grft, gps = row(tables["vtab"], "grft"), row(tables["vtab"], "gps")
    assert grft.cells["cifar100"].mean == pytest.approx(51.0)
    assert grft.cells["smallnorb_ele"].mean == pytest.approx(69.0)
    assert grft.cells["dtd"].std == pytest.approx(math.sqrt(2))
    assert gps.cells["dtd"].mean == pytest.approx(63.0)
    assert gps.cells["dtd"].std == pytest.approx(math.sqrt(13))
    assert gps.cells["dtd"].text() == "63.00 ± 3.61"
    assert gps.seeds == "3" and grft.seeds == "2"


def test_vtab_group_means_and_overall_means(tables):
    grft = row(tables["vtab"], "grft")
    expected = {"Natural": 54.0, "Specialized": 59.5, "Structured": 65.5, MEAN_19: 60.0,
                MEAN_GROUPS: 179 / 3}
    for column, value in expected.items():
        assert grft.cells[column].mean == pytest.approx(value), column
        assert grft.cells[column].std == pytest.approx(math.sqrt(2)), column
    assert grft.tuned_pct == pytest.approx(0.3)


def test_missing_task_leaves_group_mean_blank(tables):
    gps = row(tables["vtab"], "gps")
    assert gps.cells["Natural"].mean == pytest.approx(489 / 7)
    assert gps.cells["Natural"].std == pytest.approx(math.sqrt(91) / 7)
    for column in ("Specialized", "Structured", MEAN_19, MEAN_GROUPS):
        assert gps.cells[column].mean is None, column
        assert gps.cells[column].text() == ""
    assert gps.tuned_pct == pytest.approx(0.22)
    markdown = report.to_markdown(tables["vtab"])
    assert "never taken over a subset" in markdown


def test_aggregate_std_only_when_seeds_align():
    one = run_tables.Cell(10.0, 1.0, {0: 9.0, 1: 11.0})
    other = run_tables.Cell(20.0, None, {0: 20.0})
    assert run_tables.aggregate([one, other]) == run_tables.Cell(15.0)
    assert run_tables.aggregate([one, None]).mean is None


def test_fgvc_single_seed_and_blank_mean(tables):
    grft, gps = row(tables["fgvc"], "grft"), row(tables["fgvc"], "gps")
    assert grft.cells[MEAN].mean == pytest.approx(84.0)
    assert grft.cells[MEAN].std is None
    assert grft.cells["cub"].text() == "80.00"
    assert gps.cells["cub"].text() == "82.00 ± 1.41"
    assert gps.cells[MEAN].mean is None


def test_other_family_mean(tables):
    assert row(tables["offline"], "grft").cells[MEAN].mean == pytest.approx(70.0)
    assert row(tables["offline"], "gps").cells[MEAN].mean is None


def test_vtab_folder_names_map_to_config_names():
    assert run_tables.split_dataset("vtab/cifar") == ("vtab", "cifar100")
    assert run_tables.split_dataset("vtab/oxford_iiit_pet") == ("vtab", "pets")
    assert run_tables.split_dataset("offline/mnist") == ("offline", "mnist")


def test_written_csv_markdown_and_pngs(runs_dir, tmp_path):
    out = tmp_path / "report"
    assert report.main([str(runs_dir), "--out", str(out)]) == 0
    with open(out / "fgvc.csv", newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == ["method", "reported", "cub", "cub std", "nabirds", "nabirds std",
                        "flowers", "flowers std", "dogs", "dogs std", "cars", "cars std",
                        "Mean", "Mean std", "tuned_pct", "seeds"]
    assert lines[1] == ["gps", "false", "82.0000", "1.4142", "", "", "", "", "", "", "", "",
                        "", "", "0.5000", "2"]
    assert lines[2] == ["grft", "false", "80.0000", "", "70.0000", "", "99.0000", "",
                        "85.0000", "", "86.0000", "", "84.0000", "", "1.2000", "1"]
    markdown = (out / "vtab.md").read_text()
    assert "| Method | cifar100 | caltech101 |" in markdown
    means = "| 54.00 ± 1.41 | 59.50 ± 1.41 | 65.50 ± 1.41 | 60.00 ± 1.41 | 59.67 ± 1.41 |"
    assert means in markdown
    assert (out / "report.md").read_text().count("### ") == 3
    for name in ("vtab_tradeoff.png", "vtab_groups.png", "fgvc_tradeoff.png",
                 "offline_tradeoff.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_reference_rows(tables):
    run_tables.add_reference(tables, REFERENCE)
    gps = row(tables["vtab"], "GPS (reported)")
    assert gps.reported
    assert gps.cells["cifar100"].mean == pytest.approx(81.1)
    assert gps.cells[MEAN_19].mean == pytest.approx(73.1)
    assert "dtd" not in gps.cells and gps.cells.get(MEAN_GROUPS) is None
    full = row(tables["fgvc"], "Full fine-tuning (reported)")
    assert full.cells[MEAN].mean == pytest.approx(88.45)
    assert row(tables["vtab"], "Full fine-tuning (reported)").cells[MEAN_19].mean == \
        pytest.approx(65.57)
    assert row(tables["fgvc"], "GPS (reported)").cells[MEAN].mean == pytest.approx(91.78)
    grft = row(tables["fgvc"], "GRFT (reported)")
    assert grft.cells == {} and grft.tuned_pct == pytest.approx(1.22)
    markdown = report.to_markdown(tables["vtab"])
    assert "| GPS (reported) | 81.10 |" in markdown
    assert "no per-task numbers available" in markdown and "2312.10136" in markdown
    assert "offline" in tables and not any(r.reported for r in tables["offline"].rows)
    csv_line = report.csv_rows(tables["fgvc"])[-1]
    assert csv_line[:2] == ["GRFT", "true"] and csv_line[-2] == "1.2200"


def test_reference_rejects_unknown_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows:\n  - method: X\n    source: {paper: P}\n    fgvc: {birds: 1}\n")
    with pytest.raises(ValueError, match="birds"):
        run_tables.add_reference({}, bad)


def test_wandb_logs_each_table(runs_dir, tmp_path, monkeypatch):
    """--wandb logs one wandb.Table per family (a stand-in module records the calls)."""
    logged = {}

    class FakeRun:
        def log(self, data):
            logged.update(data)

        def finish(self):
            logged["finished"] = True

    fake = type(sys)("wandb")
    fake.init = lambda **kwargs: FakeRun()
    fake.Table = lambda columns, data: {"columns": columns, "data": data}
    fake.Image = lambda path: path
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert report.main([str(runs_dir), "--out", str(tmp_path / "out"), "--wandb"]) == 0
    assert set(logged) >= {"vtab/table", "fgvc/table", "offline/table", "plots/vtab_groups"}
    assert logged["fgvc/table"]["columns"][:3] == ["method", "reported", "cub"]
    assert logged["fgvc/table"]["data"][1][12] == "84.0000"
    assert logged["finished"]


def test_json_rows(tables, runs_dir, tmp_path):
    rows = report.json_rows(tables)
    offline = {(r["task"], r["method"]): r for r in rows if r["family"] == "offline"}
    assert set(offline) == {("mnist", "grft"), ("rotation", "grft"), (MEAN, "grft"), ("mnist", "gps")}
    assert offline[("mnist", "grft")] == {"family": "offline", "task": "mnist", "method": "grft",
                                          "acc_mean": pytest.approx(0.9), "acc_std": None,
                                          "tuned_pct": pytest.approx(1.0), "seeds": [0],
                                          "acc_per_seed": {"0": pytest.approx(0.9)}}
    assert offline[(MEAN, "grft")]["acc_mean"] == pytest.approx(0.7)
    assert offline[(MEAN, "grft")]["seeds"] == [0]
    dtd = next(r for r in rows if r["task"] == "dtd" and r["method"] == "gps")
    assert dtd["acc_mean"] == pytest.approx(0.63) and dtd["acc_std"] == pytest.approx(math.sqrt(13) / 100)
    assert dtd["tuned_pct"] == pytest.approx(0.4) and dtd["seeds"] == [0, 1, 2]
    natural = next(r for r in rows if r["task"] == "Natural" and r["method"] == "gps")
    assert natural["tuned_pct"] == pytest.approx(0.22) and natural["seeds"] == [0, 1, 2]
    assert natural["acc_per_seed"] == {"0": pytest.approx(4.80 / 7), "1": pytest.approx(4.88 / 7),
                                       "2": pytest.approx(4.99 / 7)}
    assert not any(r["task"] == "Specialized" and r["method"] == "gps" for r in rows)  # blank cell

    path = tmp_path / "out" / "rows.json"
    assert report.main([str(runs_dir), "--out", str(tmp_path / "report"), "--json", str(path)]) == 0
    assert json.loads(path.read_text()) == json.loads(json.dumps(rows))
    assert len(path.read_text().splitlines()) == len(rows) + 2  # one row per line
    for task in ("mnist", "rotation"):  # per-task trade-off plots for the small families
        assert (tmp_path / "report" / f"offline_tradeoff_{task}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "report" / "vtab_tradeoff_dtd.png").exists()


BAD_RECORDS = {
    "null_acc": ({"method": "grft", "dataset": "fgvc/cub", "seed": 1, "test_acc": None},
                 "test_acc is null (the run has no test figure)"),
    "word_seed": ({"method": "grft", "dataset": "fgvc/cub", "seed": "three", "test_acc": 0.9},
                  "seed 'three' is not an integer"),
    "null_seed": ({"method": "grft", "dataset": "fgvc/cub", "seed": None, "test_acc": 0.9},
                  "seed None is not an integer"),
    "text_acc": ({"method": "grft", "dataset": "fgvc/cub", "seed": 2, "test_acc": "0.9"},
                 "test_acc '0.9' is not a number"),
    "text_tuned": ({"method": "grft", "dataset": "fgvc/cub", "seed": 2, "test_acc": 0.9, "tuned_pct": "high"},
                   "tuned_pct 'high' is not a number"),
    "a_list": ([1, 2], "not a JSON object but a JSON list"),
}


def test_one_bad_results_file_is_skipped_with_a_warning(runs_dir, tmp_path):
    for name, (record, _) in BAD_RECORDS.items():
        (runs_dir / "bad" / name).mkdir(parents=True)
        (runs_dir / "bad" / name / "results.json").write_text(json.dumps(record))
    (runs_dir / "bad" / "truncated").mkdir()
    (runs_dir / "bad" / "truncated" / "results.json").write_text('{"method": "grft", "dataset": "fgv')
    (runs_dir / "bad" / "seed_text").mkdir()  # an integer written as text is read as that integer
    (runs_dir / "bad" / "seed_text" / "results.json").write_text(json.dumps(
        {"method": "grft", "dataset": "fgvc/cub", "seed": "1", "test_acc": 0.78}))
    with pytest.warns(UserWarning) as caught:
        results = run_tables.load_results(runs_dir)
    messages = [str(w.message) for w in caught]
    for name, (_, reason) in BAD_RECORDS.items():
        assert f"{runs_dir / 'bad' / name / 'results.json'}: {reason}; skipped" in messages, (name, messages)
    assert any(m.startswith(f"{runs_dir / 'bad' / 'truncated' / 'results.json'}: unreadable") for m in messages)
    cub = run_tables.summarize(results)["fgvc"].rows[1]
    assert cub.method == "grft" and cub.cells["cub"].per_seed == {0: 80.0, 1: 78.0}
    out = tmp_path / "report"
    with pytest.warns(UserWarning):
        assert report.main([str(runs_dir), "--out", str(out)]) == 0  # the report is written all the same
    assert "| grft | 79.00 ± 1.41 |" in (out / "fgvc.md").read_text()
