"""The choices and the analysis of the pre-registered ViT study (benchmarks/vit_science_plan.md).

    python -m benchmarks.vit_science choose-task RUNS/choice           # prints the chosen task config
    python -m benchmarks.vit_science choose-setting RUNS/tune ARM      # prints the arm's chosen overrides
    python -m benchmarks.vit_science grid RUNS/tune ARM... --out OUT/vit_science   # the grid, per arm
    python -m benchmarks.vit_science analyse RUNS/main --out OUT/vit_science   # the comparisons

Every choice reads ``val_acc`` only (never ``test_acc``): the task that replaces ``mnist_count``
from full fine-tuning and linear probing, and each arm's learning rate and L2-SP weight. The
analysis pairs runs by seed, pools the tasks per seed (the mean over the tasks), and adjusts with
Holm over the primary comparisons only; every other comparison is exploratory (no adjustment).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks import power
from grft_lightning.experiments.stats import comparisons_markdown, holm, paired

ROOT = Path(__file__).resolve().parents[1]

CANDIDATES = ROOT / "configs" / "vit_suite" / "science" / "candidates"
#: full fine-tuning's mean validation accuracy above which a candidate counts as saturated
CEILING = 0.95
PRIMARY = [("grft_row_probe", "random_row"), ("grft_row_probe", "grft_row_lowest_probe"),
           ("grft_row_matched_probe", "gps_nostem_probe"), ("gps_nostem_probe", "gps_random_nostem")]
EXPLORATORY = [("random_row", "grft_row_lowest_probe"), ("grft_row_probe", "grft_row"),
               ("gps_probe", "gps_nostem_probe"), ("gps_probe", "gps_random"), ("gps", "gps_probe"),
               ("gps_random_nostem", "random_row_global"), ("grft_row_stem_probe", "gps_probe"),
               ("grft_row_lpft", "random_row_lpft"), ("grft_row_lpft", "grft_row_probe"),
               ("grft_row_supcon1", "grft_row_probe"), ("grft_row_matched_probe", "grft_row_probe")]


def _records(runs: Path) -> list[dict]:
    out = []
    for path in sorted(Path(runs).rglob("results.json")):
        record = json.loads(path.read_text())
        record["_path"] = str(path.relative_to(runs))
        out.append(record)
    return out


def _task(record: dict) -> str:
    return record["dataset"].split("/", 1)[-1]


def choose_task(runs: Path) -> str:
    """The candidate whose full fine-tuning is not saturated (mean validation accuracy at most
    :data:`CEILING`) with the largest gap between full fine-tuning and linear probing (room for
    the methods to differ); when every candidate is saturated, the one where full fine-tuning is
    lowest. Ties: the name. Prints the figures it used to stderr."""
    val: dict[tuple[str, str], list[float]] = {}
    for record in _records(runs):
        val.setdefault((_task(record), record["method"]), []).append(record["val_acc"])
    tasks = sorted({task for task, _ in val})
    figures = {t: (statistics.fmean(val[(t, "full")]), statistics.fmean(val[(t, "linear")])) for t in tasks
               if (t, "full") in val and (t, "linear") in val}
    if not figures:
        raise SystemExit(f"choose-task: no full and linear runs under {runs}")
    for task, (full, linear) in figures.items():
        print(f"{task}: full {full:.4f}, linear {linear:.4f} (validation)", file=sys.stderr)
    open_ = {t: f - lin for t, (f, lin) in figures.items() if f <= CEILING}
    if open_:
        best = max(sorted(open_), key=lambda t: open_[t])
    else:
        best = min(sorted(figures), key=lambda t: figures[t][0])
    return str((CANDIDATES / f"{best}.yaml").relative_to(ROOT))


def _setting_scores(runs: Path, arm: str) -> dict[str, list[float]]:
    """Per setting folder, the validation accuracies of ``arm``'s runs under it."""
    scores: dict[str, list[float]] = {}
    for record in _records(runs):
        setting, *_ = record["_path"].split("/")
        if f"/{arm}/" in f"/{record['_path']}":
            scores.setdefault(setting, []).append(record["val_acc"])
    return scores


def grid(runs: Path, arms: list[str], out: Path) -> dict:
    """The validation grid the settings were chosen from: per arm and setting the mean validation
    accuracy (percent) over the tasks and the number of runs, best first; ``grid.{md,json}``."""
    table = {arm: sorted(({"setting": setting, "val_acc": 100 * statistics.fmean(v), "runs": len(v)}
                          for setting, v in _setting_scores(runs, arm).items()), key=lambda r: -r["val_acc"])
             for arm in arms}
    lines = ["# Validation grid (seed 100): mean validation accuracy over the tasks, best first", ""]
    for arm, rows in table.items():
        lines += [f"## {arm}", "", "| setting | validation accuracy (%) | runs |", "|---|---:|---:|"]
        lines += [f"| {r['setting']} | {r['val_acc']:.2f} | {r['runs']} |" for r in rows] + [""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.md").write_text("\n".join(lines))
    (out / "grid.json").write_text(json.dumps(table, indent=1) + "\n")
    return table


def choose_setting(runs: Path, arm: str) -> str:
    """``runs/<setting>/.../<arm>/seed*/results.json``: the setting (a folder ``lr<LR>_lam<L>``)
    with the best mean validation accuracy over the tasks; ties: the smaller learning rate, then
    the larger L2-SP weight (the smaller step). Prints the overrides."""
    scores = _setting_scores(runs, arm)
    if not scores:
        raise SystemExit(f"choose-setting: no run of {arm} under {runs}")

    def key(setting: str):
        lr, lam = _parse(setting)
        return (statistics.fmean(scores[setting]), -lr, lam if lam is not None else 0.0)

    best = max(sorted(scores), key=key)
    lr, lam = _parse(best)
    args = f"--model.optimizer.init_args.lr {lr}"
    if lam is not None:
        args += f" --model.method.init_args.reg_lambda {lam}"
    return args


def _parse(setting: str) -> tuple[float, float | None]:
    lr, _, lam = setting.partition("_lam")
    return float(lr.removeprefix("lr")), (None if lam in ("", "none") else float(lam))


def analyse(runs: Path, out: Path) -> dict:
    """Primary comparisons (Holm over them only) and exploratory ones, pooled over the tasks per
    seed, plus per task; and per arm the mean ``update_size`` median."""
    acc: dict[str, dict[str, dict[int, float]]] = {}
    moved: dict[str, list[float]] = {}
    size: dict[str, dict[str, list[float]]] = {}
    for record in _records(runs):
        if record.get("test_acc") is None:
            continue
        acc.setdefault(record["method"], {}).setdefault(_task(record), {})[int(record["seed"])] = 100 * record["test_acc"]
        if record.get("update_size"):
            moved.setdefault(record["method"], []).append(record["update_size"]["median"])
        sizes = size.setdefault(record["method"], {"tuned_pct": [], "selected": []})
        if record.get("tuned_pct") is not None:
            sizes["tuned_pct"].append(record["tuned_pct"])
        sizes["selected"].append((record.get("counts") or {}).get("selected", 0))

    def pooled(method: str, over: set[str] | None = None) -> dict[int, float]:
        """Per seed, the mean over the tasks (``over``: only those) the method has that seed on all of."""
        tasks = {t: v for t, v in acc.get(method, {}).items() if over is None or t in over}
        seeds = set.intersection(*(set(v) for v in tasks.values())) if tasks else set()
        return {s: statistics.fmean(tasks[t][s] for t in tasks) for s in seeds}

    def both(a: str, b: str) -> tuple[dict[int, float], dict[int, float]]:
        """Two arms pooled over the tasks both have (a comparison never mixes task sets)."""
        common = set(acc[a]) & set(acc[b])
        return pooled(a, common), pooled(b, common)

    def compare(pairs, adjust: bool):
        rows = [paired(*both(a, b), a, b, "Mean") for a, b in pairs if a in acc and b in acc]
        if adjust:
            holm(rows)
        per_task = [paired(acc[a][t], acc[b][t], a, b, t) for a, b in pairs if a in acc and b in acc
                    for t in sorted(set(acc[a]) & set(acc[b]))]
        return rows, per_task

    def detectable(a: str, b: str) -> dict | None:
        """The smallest true difference (points, power 80 %) the comparison detects, from the
        observed spread of its per-seed differences: at Holm's strictest step and at its last."""
        pa, pb = both(a, b)
        diffs = [pa[s] - pb[s] for s in sorted(set(pa) & set(pb))]
        if len(diffs) < 2:
            return None
        spread = power.sd(diffs)
        return {"a": a, "b": b, "n": len(diffs), "sd": spread,
                "strictest": power.mde(spread, len(diffs), 0.05 / len(PRIMARY)), "last": power.mde(spread, len(diffs), 0.05)}

    tasks = sorted({t for per_task in acc.values() for t in per_task})
    arms = [{"arm": arm, "test_acc": {t: statistics.fmean(acc[arm][t].values()) for t in tasks if t in acc[arm]},
             "mean": statistics.fmean(pooled(arm).values()) if pooled(arm) else None,
             "seeds": len(pooled(arm)),
             "tuned_pct": statistics.median(size[arm]["tuned_pct"]) if size[arm]["tuned_pct"] else None,
             "selected": statistics.median(size[arm]["selected"]),
             "update_size": statistics.median(moved[arm]) if arm in moved else None} for arm in sorted(acc)]
    primary, primary_tasks = compare(PRIMARY, adjust=True)
    exploratory, exploratory_tasks = compare(EXPLORATORY, adjust=False)
    detectable_effects = [d for d in (detectable(a, b) for a, b in PRIMARY if a in acc and b in acc) if d]
    out.mkdir(parents=True, exist_ok=True)
    cell = lambda v, f: "" if v is None else f.format(v)  # noqa: E731
    text = ["### Arms (test accuracy %, mean over seeds; mean: over the tasks, seeds every task has)", "",
            "| arm | " + " | ".join(tasks) + " | mean | seeds | tuned % | selected entries | update size |",
            "|---|" + "---:|" * (len(tasks) + 5),
            *[f"| {a['arm']} | " + " | ".join(cell(a["test_acc"].get(t), "{:.2f}") for t in tasks)
              + f" | {cell(a['mean'], '{:.2f}')} | {a['seeds']} | {cell(a['tuned_pct'], '{:.3f}')} | {a['selected']:,.0f} | "
              f"{cell(a['update_size'], '{:.2f}')} |" for a in arms],
            "", "- tuned %: every trained parameter (selected entries, biases, head) over the backbone's; selected "
            "entries: the weight entries of the selection (median over runs); update size: median over runs of each "
            "run's median ||delta|| / ||W0|| over its selected rows or neuron entry groups.", "",
            comparisons_markdown(primary, "Primary comparisons (mean over the tasks per seed; Holm over these)"),
            "Minimum detectable effect of each primary comparison (two-sided paired t, power 80 %), from the "
            f"observed spread of its per-seed differences, at Holm's strictest step (alpha 0.05/{len(PRIMARY)}) "
            "and at its last (alpha 0.05):\n",
            "| A - B | seeds | sd of the differences | detectable (strictest) | detectable (last) |",
            "|---|---:|---:|---:|---:|",
            *[f"| {d['a']} - {d['b']} | {d['n']} | {d['sd']:.2f} | {d['strictest']:.2f} | {d['last']:.2f} |"
              for d in detectable_effects],
            "",
            comparisons_markdown(primary_tasks, "Primary comparisons per task (exploratory)"),
            comparisons_markdown(exploratory + exploratory_tasks, "Exploratory comparisons (no adjustment)"),
            "In the per-task and exploratory tables no p-value is adjusted: \"significant\" there means an "
            "unadjusted p < 0.05, reported as exploratory.\n"]
    (out / "analysis.md").write_text("\n".join(text) + "\n")
    result = {"arms": arms, "primary": [c.to_dict() for c in primary], "detectable": detectable_effects,
              "primary_per_task": [c.to_dict() for c in primary_tasks],
              "exploratory": [c.to_dict() for c in exploratory + exploratory_tasks],
              "update_size": {m: statistics.median(v) for m, v in moved.items()}}
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("choose-task").add_argument("runs", type=Path)
    setting = sub.add_parser("choose-setting")
    setting.add_argument("runs", type=Path)
    setting.add_argument("arm")
    table = sub.add_parser("grid")
    table.add_argument("runs", type=Path)
    table.add_argument("arms", nargs="+")
    table.add_argument("--out", type=Path, required=True)
    analysis = sub.add_parser("analyse")
    analysis.add_argument("runs", type=Path)
    analysis.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "choose-task":
        print(choose_task(args.runs))
    elif args.command == "choose-setting":
        print(choose_setting(args.runs, args.arm))
    elif args.command == "grid":
        grid(args.runs, args.arms, args.out)
        print(f"wrote {args.out}/grid.md, {args.out}/grid.json")
    else:
        analyse(args.runs, args.out)
        print(f"wrote {args.out}/analysis.md, {args.out}/analysis.json")


if __name__ == "__main__":
    main()
