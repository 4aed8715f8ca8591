"""How concentrated is the squared gradient that GRFT selects on, on the ViT testbed?

    python -m benchmarks.vit_selection_analysis [--seeds 0 1 2 3 4] [--out benchmarks/results]

For each task of the ViT suite and each seed (the seed draws the new head, as in the suite's
runs), one selection pass as the suite runs it (cross-entropy, evaluation transform, model in
eval mode, batches of 32 shuffled with the seed, last partial batch dropped) accumulates the
gradient ``G`` of every block matrix (qkv, proj, fc1, fc2 of the 6 blocks). Per matrix:

- ``row_share``: the share of the matrix's squared-gradient mass ``sum_ij G_ij^2`` that its best
  row holds; a random row holds ``1 / rows`` of it on average, so ``row_gain = row_share * rows``
  is how many times more first-order loss decrease GRFT's row buys than a random row's (1 = no
  better than random); ``column_share`` / ``column_gain`` likewise for columns;
- ``fisher_overlap``: whether the best row by the summed gradient is also the best row by the
  per-sample empirical Fisher (``sum_n ||g_n,i||^2``) and by the batch-level one.

Writes ``vit_selection_analysis.{md,json}``: per task, the median over matrices and seeds of the
gains, the share of matrices whose best row holds more than 2x an average row's mass, and the
agreement of the scores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from grft_lightning.core.backbones import create_backbone
from grft_lightning.data.mnist import MNISTDigits
from grft_lightning.core.gradients import accumulate_gradients, as_matrix, default_gradient_targets
from grft_lightning.training.losses import selection_loss_fn
from grft_lightning.core.testbed import NAME, TAG, WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"mnist_digit": "digit", "mnist_rotation": "rotation", "mnist_count": "count", "mnistm": "mnistm"}


def analyse(name: str, seed: int, weights: str = WEIGHTS) -> list[dict]:
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    data = MNISTDigits(task=TASKS[name], family="vit_suite", backbone=f"{NAME}.{TAG}", image_size=32)
    data.setup("fit")
    torch.manual_seed(seed)
    model = create_backbone(f"{NAME}.{TAG}", data.num_classes, weights=weights).eval()
    loader = data.selection_dataloader("ce", seed=seed)
    batches = list(loader)
    names = [n for n in default_gradient_targets(model) if n.startswith("blocks.")]  # GRFT's matrices (no stem)
    ce = selection_loss_fn("ce")  # the suite's selection loss: cross-entropy through the new head
    summed = accumulate_gradients(model, batches, ce, names)
    per_batch = accumulate_gradients(model, batches, ce, names, reduction="sum_of_squares")
    per_sample = accumulate_gradients(model, batches, ce, names, reduction="per_sample_squares")
    rows = []
    for matrix, grad in summed.items():
        g2 = as_matrix(grad).pow(2)
        total = float(g2.sum())
        row_mass, column_mass = g2.sum(1), g2.sum(0)
        best = int(row_mass.argmax())
        rows.append({
            "task": name, "seed": seed, "matrix": matrix, "rows": g2.shape[0], "columns": g2.shape[1],
            "row_share": float(row_mass.max()) / total, "row_gain": float(row_mass.max()) / total * g2.shape[0],
            "column_share": float(column_mass.max()) / total,
            "column_gain": float(column_mass.max()) / total * g2.shape[1],
            "best_row_fisher_sample": best == int(as_matrix(per_sample[matrix]).sum(1).argmax()),
            "best_row_fisher_batch": best == int(as_matrix(per_batch[matrix]).sum(1).argmax()),
        })
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        out.append({
            "task": task, "matrices": len(mine),
            "row_gain_median": statistics.median(r["row_gain"] for r in mine),
            "column_gain_median": statistics.median(r["column_gain"] for r in mine),
            "rows_over_2x": sum(r["row_gain"] > 2 for r in mine) / len(mine),
            "columns_over_2x": sum(r["column_gain"] > 2 for r in mine) / len(mine),
            "best_row_same_as_fisher_sample": sum(r["best_row_fisher_sample"] for r in mine) / len(mine),
            "best_row_same_as_fisher_batch": sum(r["best_row_fisher_batch"] for r in mine) / len(mine),
        })
    return out


def to_markdown(summary: list[dict], seeds: list[int]) -> str:
    lines = ["| task | matrices x seeds | best row: x an average row (median) | best column: x average (median) | "
             "rows > 2x | columns > 2x | best row = per-sample Fisher's | = batch Fisher's |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['task']} | {s['matrices']} | {s['row_gain_median']:.2f} | {s['column_gain_median']:.2f} | "
                     f"{100 * s['rows_over_2x']:.0f} % | {100 * s['columns_over_2x']:.0f} % | "
                     f"{100 * s['best_row_same_as_fisher_sample']:.0f} % | {100 * s['best_row_same_as_fisher_batch']:.0f} % |")
    lines += ["", f"Seeds {seeds}; the 24 block matrices (qkv, proj, fc1, fc2 of 6 blocks) of each run. Produced by "
              "`python -m benchmarks.vit_selection_analysis` (about 40 minutes on a busy core); definitions in its "
              "docstring."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", default=WEIGHTS, help="backbone weights (default: the committed testbed)")
    parser.add_argument("--from-json", help="summarise the per-matrix rows of an earlier run's JSON instead "
                        "(block matrices only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    if args.from_json:
        rows = [r for r in json.loads(Path(args.from_json).read_text())["matrices"] if r["matrix"].startswith("blocks.")]
        args.seeds = sorted({r["seed"] for r in rows})
    for task in [] if args.from_json else args.tasks:
        for seed in args.seeds:
            rows += analyse(task, seed, args.weights)
            print(f"{task} seed {seed}: done", flush=True)
    summary = summarise(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vit_selection_analysis.json").write_text(json.dumps({"summary": summary, "matrices": rows}, indent=1))
    text = to_markdown(summary, args.seeds)
    (out / "vit_selection_analysis.md").write_text("# Gradient concentration on the ViT testbed\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
