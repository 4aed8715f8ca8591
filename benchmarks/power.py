"""Minimum detectable effect of the pre-registered ViT study (benchmarks/vit_science_plan.md).

From the committed per-seed test accuracies of the ViT suite (``benchmarks/results/vit_suite.json``)
it takes the spread of the paired (same-seed) differences between two methods, per task and of the
mean over the tasks, and gives the smallest true difference a two-sided paired t-test detects with
the given power at the given level, for several numbers of seeds:

    MDE = (t_{1 - alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)

(the usual approximation with central t quantiles; ``sd`` is the standard deviation of the paired
differences over the committed seeds, assumed to hold for the new arms). ``alpha`` is Holm's first
(strictest) step over the primary comparisons, ``0.05 / m``, and its last step, ``0.05``.

    .venv/bin/python -m benchmarks.power [--pairs grft_row:random_row grft_row:gps] \
        [--tasks mnist_digit mnist_rotation mnistm] [--seeds 5 10 15 20] [--primary 4]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


def paired_differences(rows: list[dict], a: str, b: str, tasks: list[str]) -> dict[str, list[float]]:
    """Per task, and for the mean over ``tasks`` (``mean``), the per-seed differences a - b in points."""
    acc = {(r["task"], r["method"]): {int(s): v for s, v in r["acc_per_seed"].items()} for r in rows}
    seeds = sorted(set.intersection(*(set(acc[(t, m)]) for t in tasks for m in (a, b))))
    out = {t: [100 * (acc[(t, a)][s] - acc[(t, b)][s]) for s in seeds] for t in tasks}
    out["mean"] = [sum(out[t][i] for t in tasks) / len(tasks) for i in range(len(seeds))]
    return out


def sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mde(sd_: float, n: int, alpha: float, power: float = 0.8) -> float:
    """Smallest true paired difference a two-sided t-test at ``alpha`` detects with ``power``."""
    return (stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd_ / math.sqrt(n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/vit_suite.json"))
    parser.add_argument("--pairs", nargs="+", default=["grft_row:random_row", "grft_row:gps"])
    parser.add_argument("--tasks", nargs="+", default=["mnist_digit", "mnist_rotation", "mnistm"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[5, 10, 15, 20])
    parser.add_argument("--primary", type=int, default=4, help="primary comparisons (Holm)")
    parser.add_argument("--power", type=float, default=0.8)
    args = parser.parse_args(argv)
    rows = json.loads(Path(args.results).read_text())
    alphas = (0.05 / args.primary, 0.05)
    print(f"Minimum detectable effect (points), two-sided paired t, power {args.power:.0%}, "
          f"alpha {alphas[0]:.4f} (Holm's first step over {args.primary}) / {alphas[1]:.2f} (its last); "
          f"sd of the paired differences from {Path(args.results).name}")
    print()
    print("| pair | over | sd | " + " | ".join(f"n={n}" for n in args.seeds) + " |")
    print("|---|---|---|" + "---|" * len(args.seeds))
    for pair in args.pairs:
        a, b = pair.split(":")
        diffs = paired_differences(rows, a, b, args.tasks)
        for where, values in diffs.items():
            s = sd(values)
            cells = " | ".join(f"{mde(s, n, alphas[0], args.power):.2f} / {mde(s, n, alphas[1], args.power):.2f}"
                               for n in args.seeds)
            print(f"| {a} - {b} | {where} | {s:.2f} | {cells} |")


if __name__ == "__main__":
    main()
