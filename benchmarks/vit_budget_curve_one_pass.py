"""The ViT suite's budget curve from one selection pass per seed, against the committed curve.

Runs the budget-curve part of ``PART=ablations bash scripts/vit_suite.sh`` for GRFT rows and GPS
(MNIST-M, seeds 0-2): per seed the 8x run selects, and the 2x and 4x runs take that selection cut
to their budget (``--selection.from_file``, ``Selection.cut``). Then it compares every run's test
accuracy with the committed ablation table (``benchmarks/results/vit_ablations.json``), whose
runs each made their own selection pass, and writes a table of both with each run's selection
seconds. Finished runs in ``--runs-dir`` are skipped, so a re-launch only compares.

    python -m benchmarks.vit_budget_curve_one_pass [--runs-dir runs/vit_budget_curve_one_pass]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ABLATIONS = "configs/vit_suite/ablations"
TASK = "configs/vit_suite/mnistm.yaml"
METHODS = ("grft_row", "gps")
SEEDS = (0, 1, 2)


def sweep(runs_dir: Path, methods: list[str], seed: int, *extra: str) -> None:
    command = [sys.executable, "-m", "grft_lightning.experiments.sweep", "--suite", TASK, "--methods-dir", ABLATIONS,
               "--methods", *methods, "--seeds", str(seed), "--mode", "inprocess", "--workers", "2",
               "--runs-dir", str(runs_dir), "--extra", "--wandb.mode disabled", *extra]
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})


def run_dir(runs_dir: Path, method: str, seed: int) -> Path:
    return runs_dir / "vit_suite" / "mnistm" / method / f"seed{seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "vit_budget_curve_one_pass")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vit_budget_curve_one_pass")
    args = parser.parse_args()
    start = time.time()
    for seed in SEEDS:
        sweep(args.runs_dir, [f"{m}_x8" for m in METHODS], seed)
        for m in METHODS:
            selection = run_dir(args.runs_dir, f"{m}_x8", seed) / "tuned.safetensors"
            sweep(args.runs_dir, [f"{m}_x2", f"{m}_x4"], seed, "--extra", f"--selection.from_file {selection}")
    committed = {row["method"]: row for row in json.loads((ROOT / "benchmarks/results/vit_ablations.json").read_text())
                 if row["task"] == "mnistm"}
    rows = []
    for m in METHODS:
        for scale in ("x2", "x4", "x8"):
            name = f"{m}_{scale}"
            for seed in SEEDS:
                result = json.loads((run_dir(args.runs_dir, name, seed) / "results.json").read_text())
                before = committed[name]["acc_per_seed"][str(seed)]
                rows.append({"method": name, "seed": seed, "test_acc": result["test_acc"], "committed_test_acc": before,
                             "equal": result["test_acc"] == before, "selection_seconds": result["selection_seconds"],
                             "from_file": (result.get("selection") or {}).get("from_file") is not None})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"rows": rows, "all_equal": all(r["equal"] for r in rows), "invocation_seconds": round(time.time() - start, 1)}  # finished runs are skipped
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# ViT budget curve from one selection pass per seed (MNIST-M)", "",
             "Per seed the 8x run selects; the 2x and 4x runs cut its selection. Test accuracy against the committed",
             "ablation runs (`vit_ablations.json`), which each made their own pass. Produced by",
             "`python -m benchmarks.vit_budget_curve_one_pass`.", "",
             "| run | seed | test acc (one pass) | committed | equal | selection s | cut from the 8x run |",
             "|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {100 * r['test_acc']:.2f} | {100 * r['committed_test_acc']:.2f} | "
                     f"{'yes' if r['equal'] else 'NO'} | {r['selection_seconds']:.2f} | {'yes' if r['from_file'] else 'no'} |")
    lines += ["", f"All {len(rows)} runs equal to the committed ones: {'yes' if record['all_equal'] else 'no'}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
