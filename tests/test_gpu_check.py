"""The GPU cost check (scripts/gpu_check.sh, python -m benchmarks.gpu_check): its smoke run on the CPU
writes every phase's table with every method and key, ratios to full fine-tuning computed from
the measured values; a failed or timed-out phase keeps the others' results and fails the run.
The figures themselves are not checked (a CPU, a tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
METHODS = ["full", "linear", "bitfit", "lora", "adapter", "gps", "gps_masked", "grft_row", "grft_column"]
GRADIENT_METHODS = {"gps", "gps_masked", "grft_row", "grft_column"}
PHASES = ["methods", "selection", "fit", "compile"]
METHOD_KEYS = {"method", "images_per_second", "images_per_second_ratio", "step_seconds", "step_time_ratio",
               "peak_memory_bytes", "peak_memory_ratio", "tuned", "tuned_pct", "optimizer_state_bytes",
               "selection_seconds", "export_bytes"}
FIT_KEYS = {"method", "steps", "images", "train_seconds", "images_per_second", "images_per_second_ratio",
            "peak_memory_bytes", "peak_memory_ratio", "selection_seconds", "results"}
COMPILE_KEYS = {"method", "eager_images_per_second", "compiled_images_per_second", "speedup", "compile_seconds",
                "eager_peak_memory_bytes", "compiled_peak_memory_bytes"}


def _gpu_check():
    from benchmarks import gpu_check

    return gpu_check


def _run(tmp_path, *args: str, timeout: int = 1800) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHON=sys.executable, SMOKE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(["bash", SCRIPT, "--out", str(tmp_path / "cost_gpu"), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    path = tmp_path / "cost_gpu.json"
    return done, json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.slow
def test_smoke_run_writes_every_phase_method_and_ratio(tmp_path):
    committed = os.path.join(ROOT, "benchmarks", "results", "cost_gpu.json")
    before = os.path.getmtime(committed) if os.path.exists(committed) else None
    done, result = _run(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert result["work_dir"] is None  # removed at the end (--keep-work keeps it)
    after = os.path.getmtime(committed) if os.path.exists(committed) else None
    assert before == after  # the smoke run leaves benchmarks/results alone
    cfg = result["config"]
    assert result["smoke"] is True and (cfg["model"], cfg["img_size"], cfg["batch"]) == ("test_vit", 32, 4)
    assert (cfg["steps"], cfg["fit_steps"]) == (2, 4)
    assert {"name", "torch", "timm", "lightning", "jsonargparse", "python"} <= set(result["device"])
    assert {name: p["status"] for name, p in result["phases"].items()} == dict.fromkeys(PHASES, "ok")

    # 1. every method, images/s and memory, ratios = measured / full's
    rows = result["methods"]["rows"]
    assert [row["method"] for row in rows] == METHODS and result["methods"]["errors"] == {}
    full = rows[0]
    for row in rows:
        name = row["method"]
        assert METHOD_KEYS <= set(row), name
        assert row["images_per_second"] > 0 and row["peak_memory_bytes"] > 0 and row["optimizer_state_bytes"] > 0
        assert row["images_per_second"] == pytest.approx(cfg["batch"] / row["step_seconds"])
        assert row["images_per_second_ratio"] == pytest.approx(row["images_per_second"] / full["images_per_second"])
        assert row["peak_memory_ratio"] == pytest.approx(row["peak_memory_bytes"] / full["peak_memory_bytes"])
        assert row["step_time_ratio"] == pytest.approx(row["step_seconds"] / full["step_seconds"])
        assert (row["selection_seconds"] is not None) == (name in GRADIENT_METHODS), name
    assert full["images_per_second_ratio"] == 1.0 and full["peak_memory_ratio"] == 1.0

    # 2. the selection pass over one epoch's images against one epoch of full fine-tuning
    sel = result["selection"]
    assert sel["errors"] == {} and sel["images"] == sel["batches"] * cfg["batch"] == 8
    assert len(sel["pass_seconds_all"]) == len(sel["epoch_seconds_all"]) == 1 + cfg["repeats"]
    assert sel["pass_seconds"] > 0 and sel["epoch_seconds"] > 0 and sel["select_seconds"] >= 0
    assert sel["pass_vs_epoch"] == pytest.approx(sel["pass_seconds"] / sel["epoch_seconds"])

    # 3. train.py fit: images/s from results.json's train_seconds
    fit = result["fit"]
    assert [row["method"] for row in fit["rows"]] == ["full", "grft_row"] and fit["errors"] == {}
    for row in fit["rows"]:
        assert FIT_KEYS <= set(row), row["method"]
        written = row["results"]  # results.json as train.py wrote it
        assert written["train_seconds"] == row["train_seconds"] > 0
        assert written["backbone"] == "test_vit" and written["method"] == row["method"]
        assert row["images"] == cfg["fit_steps"] * cfg["batch"]
        assert row["images_per_second"] == pytest.approx(row["images"] / row["train_seconds"])
        assert row["images_per_second_ratio"] == pytest.approx(row["images_per_second"]
                                                               / fit["rows"][0]["images_per_second"])
    assert fit["rows"][1]["selection_seconds"] > 0  # GRFT's selection pass ran inside fit
    assert "--trainer.precision bf16-mixed" in fit["command"] and "--wandb.mode disabled" in fit["command"]

    # 4. torch.compile on and off
    comp = result["compile"]
    assert [row["method"] for row in comp["rows"]] == ["full", "grft_row"] and comp["errors"] == {}
    for row in comp["rows"]:
        assert COMPILE_KEYS <= set(row), row["method"]
        assert row["speedup"] == pytest.approx(row["compiled_images_per_second"] / row["eager_images_per_second"])

    # targets beside the measured ratios
    targets = {t["name"]: t for t in result["targets"]}
    grft = rows[METHODS.index("grft_row")]
    assert targets["GRFT row images/s / full fine-tuning's"]["measured"] == grft["images_per_second_ratio"]
    assert targets["GRFT row peak memory / full fine-tuning's"]["measured"] == grft["peak_memory_ratio"]
    assert targets["selection pass / one full-fine-tuning epoch"]["measured"] == sel["pass_vs_epoch"]
    assert all(t["ok"] in (True, False) for t in targets.values())

    # the Markdown file holds every table; the same text is printed at the end
    table = (tmp_path / "cost_gpu.md").read_text()
    for heading in ("## Phases", "## Targets", "## 1.", "## 2.", "## 3.", "## 4."):
        assert heading in table
    gpu_check = _gpu_check()
    method_lines = [line for line in table.splitlines() if line.startswith("| ")
                    and line.split(" | ")[0][2:] in gpu_check.cost.LABELS.values()]
    assert len(method_lines) == len(METHODS) + 4  # phase 1, and full + GRFT row in phases 3 and 4
    assert table.strip() in done.stdout


@pytest.mark.slow
def test_a_failed_phase_keeps_the_others_and_fails_the_run(tmp_path):
    # selection: no such model (fails at once); compile: a budget it cannot meet (killed)
    done, result = _run(tmp_path, "--phases", "selection,compile", "--model", "no_such_model", "--budget-compile", "1")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    phases = result["phases"]
    assert phases["selection"]["status"] == "failed" and "no_such_model" in phases["selection"]["error"]
    assert phases["compile"]["status"] == "timed out"
    assert phases["methods"]["status"] == phases["fit"]["status"] == "not run"
    assert "FAILED phases: selection, compile" in done.stderr
    assert "| selection | failed |" in (tmp_path / "cost_gpu.md").read_text()


def test_ratios_targets_and_partial_tables():
    """The arithmetic and the report, from made-up phase results (no torch here)."""
    gpu_check = _gpu_check()
    phase = {"rows": {m: {"method": m, "step_seconds": 0.1 * (i + 1), "images_per_second": 64 / (0.1 * (i + 1)),
                          "peak_memory_bytes": 1000 * (i + 1), "tuned_pct": 1.0, "optimizer_state_bytes": 10,
                          "selection_seconds": None, "export_bytes": 5}
                      for i, m in enumerate(METHODS)}, "errors": {}}
    phase["rows"]["grft_row"].update(step_seconds=0.05, images_per_second=64 / 0.05, peak_memory_bytes=600)
    del phase["rows"]["lora"]  # a method whose run failed: left out, the others kept
    methods = gpu_check.finish_methods(phase, 64)
    rows = {row["method"]: row for row in methods["rows"]}
    assert list(rows) == [m for m in METHODS if m != "lora"]
    assert rows["grft_row"]["images_per_second_ratio"] == pytest.approx(2.0)
    assert rows["grft_row"]["peak_memory_ratio"] == pytest.approx(0.6)
    assert rows["linear"]["step_time_ratio"] == pytest.approx(2.0)
    result = {"config": dict(gpu_check.GPU, phases=gpu_check.PHASES, fit_methods=["full", "grft_row"]),
              "smoke": False, "started": "now", "elapsed_s": 1.0,
              "device": {"name": "GPU", "capability": "9.0", "memory_bytes": 2**30, "driver": "1", "cuda_driver_api": "13.0",
                         "cuda_runtime": "13.0", "torch": "2", "timm": "1", "lightning": "2", "python": "3"},
              "phases": {p: {"status": "pending", "budget_s": 1} for p in gpu_check.PHASES},
              "methods": methods, "selection": {"pass_vs_epoch": 1.3}}
    found = {t["name"]: t for t in gpu_check.targets(result)}
    assert [t["ok"] for t in found.values()] == [True, True, False]
    result["targets"] = list(found.values())
    text = gpu_check.markdown(result)  # the selection table without its figures, no fit or compile table
    assert "| GRFT row (4/matrix) | 1,280.0 | 2.00 |" in text and "## 3." not in text
    assert "- [ ] selection pass / one full-fine-tuning epoch: 1.300x (target <= 1.2x)" in text
    assert gpu_check.targets({"phases": {}})[0]["ok"] is None  # nothing measured yet
