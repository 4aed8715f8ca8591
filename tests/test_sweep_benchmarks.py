"""The VTAB-1k and FGVC suites end to end on synthetic folders: one sweep command runs the 19
VTAB tasks and the 5 FGVC datasets through their real configs (a tiny ViT instead of ViT-B/16,
one epoch), then the report builds both tables in the papers' layout from the results."""

from __future__ import annotations

import json

import pytest

from grft_lightning.experiments import report, sweep
from grft_lightning.experiments import tables as run_tables
from grft_lightning.data.fgvc import FGVC_DATASETS
from grft_lightning.data.vtab import VTAB_TASKS
from synthetic_folders import make_fgvc_folder, make_vtab_folder

EXTRA = ("--model.backbone test_vit --model.pretrained false --model.image_size 32 --model.warmup_epochs 0 "
         "--model.ema_decay null --trainer.max_epochs 1 --trainer.precision 32 --trainer.accelerator cpu "
         "--trainer.devices 1 --trainer.enable_progress_bar false --trainer.enable_model_summary false "
         "--data.init_args.num_workers 0 --data.init_args.batch_size 16 --selection.max_batches 1 "
         "--selection.progress false --wandb.mode disabled")


@pytest.mark.slow
def test_vtab_and_fgvc_suites_sweep_and_report(tmp_path, capfd):
    data = tmp_path / "data"  # VTAB task folders and FGVC dataset folders side by side
    for task in VTAB_TASKS:
        make_vtab_folder(data, task)
    for dataset in FGVC_DATASETS:
        make_fgvc_folder(data, dataset)
    runs_dir = tmp_path / "runs"
    argv = ["--suite", "vtab", "fgvc", "--methods", "grft_row", "--seeds", "0", "--runs-dir", str(runs_dir),
            "--mode", "inprocess", "--workers", "2", "--extra", EXTRA, "--extra", f"--data.init_args.root {data}"]
    assert sweep.main(argv) == 0
    assert "24 runs planned: 0 done, 24 pending" in capfd.readouterr().out

    results = run_tables.load_results(runs_dir)
    assert sorted(r["dataset"] for r in results) == sorted(
        [f"vtab/{t}" for t in VTAB_TASKS] + [f"fgvc/{d}" for d in FGVC_DATASETS])
    assert {r["method"] for r in results} == {"grft_row"} and {r["backbone"] for r in results} == {"test_vit"}

    assert report.main([str(runs_dir), "--out", str(tmp_path / "report")]) == 0
    tables = run_tables.summarize(results)
    vtab, fgvc = tables["vtab"], tables["fgvc"]
    [row] = vtab.rows
    accuracy = {t: 100 * next(r["test_acc"] for r in results if r["dataset"] == f"vtab/{t}") for t in VTAB_TASKS}
    groups = {g: [t for t, info in VTAB_TASKS.items() if info.group == g] for g in ("natural", "specialized", "structured")}
    group_means = {g: sum(accuracy[t] for t in tasks) / len(tasks) for g, tasks in groups.items()}
    for group, mean in group_means.items():
        assert row.cells[group.capitalize()].mean == pytest.approx(mean)
    assert row.cells[run_tables.MEAN_19].mean == pytest.approx(sum(accuracy.values()) / 19)
    assert row.cells[run_tables.MEAN_GROUPS].mean == pytest.approx(sum(group_means.values()) / 3)
    [row] = fgvc.rows
    fgvc_acc = [100 * r["test_acc"] for r in results if r["dataset"].startswith("fgvc/")]
    assert row.cells[run_tables.MEAN].mean == pytest.approx(sum(fgvc_acc) / 5)
    for name in ("vtab.md", "vtab.csv", "vtab_tradeoff.png", "vtab_groups.png", "fgvc.md", "fgvc.csv", "report.md"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    assert json.loads((runs_dir / "vtab" / "dtd" / "grft_row" / "seed0" / "results.json").read_text())["task_group"] == "natural"
