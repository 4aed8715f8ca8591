"""The learning-rate search behind the ViT suite's recipes, on the validation split only.

    python -m benchmarks.vit_suite_tuning [--runs-dir runs/vit_suite_tuning] [--tasks mnistm mnist_rotation]

Seed 0, the suite's task configs (8 epochs, last-epoch validation accuracy), each method's config
with its learning rate replaced by each value of its grid (``--model.head_lr`` for linear
probing). A method's rate is the one with the best mean validation accuracy over the tasks; the
random ablations take GRFT's recipe, GRFT auto GRFT row's, the scratch rows their pre-trained
counterparts', and the larger budgets their method's. Finished runs are skipped. Writes
``benchmarks/results/vit_suite_tuning.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GRID = {
    **{m: ("--model.optimizer.init_args.lr", ["0.01", "0.03", "0.1"])
       for m in ("grft_row", "grft_column", "gps", "bitfit", "lora", "adapter")},
    "full": ("--model.optimizer.init_args.lr", ["0.0003", "0.001"]),
    "linear": ("--model.head_lr", ["0.01", "0.03", "0.1"]),
}


def run(task: str, method: str, option: str, value: str, runs_dir: Path) -> dict:
    from grft_lightning.training.cli import cli_main

    run_dir = runs_dir / f"{task}-{method}-{value}"
    if not (run_dir / "results.json").is_file():
        args = ["fit", "--config", f"configs/vit_suite/{task}.yaml", "--config",
                f"configs/vit_suite/methods/{method}.yaml", option, value, "--run_dir", str(run_dir),
                "--checkpoint_every_n_steps", "null"]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli_main(args)
    return json.loads((run_dir / "results.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs/vit_suite_tuning")
    parser.add_argument("--tasks", nargs="+", default=["mnistm", "mnist_rotation"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(ROOT)
    rows = []
    for method, (option, values) in GRID.items():
        for value in values:
            val = {task: run(task, method, option, value, Path(args.runs_dir))["val_acc"] for task in args.tasks}
            rows.append({"method": method, "option": option, "value": float(value), "val_acc": val,
                         "mean_val_acc": statistics.fmean(val.values())})
            print(f"{method:12s} {option} {value:7s} " + " ".join(f"{t} {v:.3f}" for t, v in val.items()), flush=True)
    best = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["mean_val_acc"])["value"] for m in GRID}
    lines = ["# ViT suite: learning rates chosen on validation", "",
             f"Seed 0, validation accuracy after the last of 8 epochs, tasks {', '.join(args.tasks)}; "
             "produced by `python -m benchmarks.vit_suite_tuning`. The chosen value (bold) is in the suite's configs.",
             "", "| method | option | value | " + " | ".join(args.tasks) + " | mean |",
             "|---|---|---:|" + "---:|" * (len(args.tasks) + 1)]
    for r in rows:
        value = f"**{r['value']:g}**" if best[r["method"]] == r["value"] else f"{r['value']:g}"
        lines.append(f"| {r['method']} | `{r['option']}` | {value} | "
                     + " | ".join(f"{100 * r['val_acc'][t]:.1f}" for t in args.tasks) + f" | {100 * r['mean_val_acc']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vit_suite_tuning.md").write_text("\n".join(lines) + "\n")
    (out / "vit_suite_tuning.json").write_text(json.dumps({"rows": rows, "chosen": best}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
