"""Accuracy tables and plots in the papers' layout, from a folder of runs.

    python -m grft_lightning.experiments.report RUNS_DIR [RUNS_DIR ...] [--out DIR] [--reference benchmarks/reference.yaml]
                                             [--json PATH] [--wandb]
                                             [--compare A:B [A:B ...]] [--compare-json PATH]

Reads every ``results.json`` under each ``RUNS_DIR`` (recursively; keys in docs/INTERFACES.md), groups
the runs by (benchmark family, dataset, method) and writes, per family, ``<family>.md``,
``<family>.csv`` and ``<family>_tradeoff.png`` (plus ``vtab_groups.png``), and ``report.md`` with
every table. The family is the part of ``results["dataset"]`` before the first ``/`` ("vtab/dtd"
-> vtab, "fgvc/cub" -> fgvc, "offline/mnist" -> offline).

Definitions (the only place they are made; tables, CSV and plots all use them):

- Run accuracy: ``100 * results["test_acc"]`` (percent, last epoch). A ``results.json`` that
  cannot be read, or whose keys cannot be used (``test_acc`` null or not a number, a seed that
  is not an integer, a missing key: :func:`record_problem`), is left out with a warning naming
  the file and the reason; a run with ``test_acc: null`` has no figure, so it is not in any cell.
- Task cell: mean of the run accuracies over seeds, ``± std`` with the sample std (ddof=1) over
  seeds; a single seed shows the mean alone. Two runs with the same seed: the later path wins.
- Group mean (VTAB Natural / Specialized / Structured): arithmetic mean of the per-task means of
  the group's tasks. If any task of the group is missing for a method the cell is blank; it is
  never a mean over a subset.
- "Mean (19 tasks)": mean of the 19 per-task means (each task weighs 1/19). "Mean of group
  means": mean of the three group means (each group weighs 1/3). Both blank unless complete.
- FGVC and any other family: "Mean" is the mean of the per-dataset means over the family's
  columns (FGVC: its 5 datasets; other families: every dataset seen in the runs), blank unless
  complete.
- An aggregate shows ``± std`` only when every cell entering it has the same set of two or more
  seeds: the aggregate is then formed seed by seed and the sample std is taken over seeds. Its
  mean equals the mean of the per-task means either way.
- Tuned %: mean over the family's tasks of the per-task mean of ``results["tuned_pct"]``.
- ``--json``: one row per (family, task or aggregate column, method) of the measured rows,
  ``{"family", "task", "method", "acc_mean", "acc_std", "tuned_pct", "seeds"}``, accuracy as a
  fraction (the table's percent / 100, ``acc_std`` null for one seed or an aggregate whose seeds
  do not align), ``tuned_pct`` in percent (per task: the mean over its runs; per aggregate: the
  row's Tuned %), ``seeds`` the sorted seeds (of an aggregate: those every task of the row has),
  ``acc_per_seed`` ``{seed: accuracy fraction}`` (of an aggregate: the per-seed mean over tasks, for
  the common seeds).
- ``--compare A:B``: paired comparisons of method A against method B on every task and on the
  family's mean (``grft_lightning.experiments.stats``: mean difference, 95 % interval, paired t-test, Holm's
  adjustment over the table's comparisons), printed, written to ``comparisons.md`` and appended
  to ``report.md``; ``--compare-json`` writes them as rows.

Reference rows (``--reference``) are published numbers, marked "(reported)"; columns they do not
give stay blank.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from grft_lightning.experiments import figures
from grft_lightning.experiments.stats import Paired, comparisons_markdown, holm, paired
from grft_lightning.experiments.tables import (FAMILY_TITLES, MEAN, MEAN_19, Cell, Row, Table, add_reference,
                                               load_results, summarize)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def to_markdown(table: Table) -> str:
    header = ["Method", *table.columns, "Tuned %", "Seeds"]
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    for row in table.rows:
        cells = [row.cells.get(col, Cell()).text() for col in table.columns]
        values = [row.label, *cells, _fmt(row.tuned_pct, 3), row.seeds]
        lines.append("| " + " | ".join(values) + " |")
    lines.append("")
    lines += [f"- {note}" for note in table.footnotes]
    return "\n".join(lines) + "\n"


def csv_rows(table: Table) -> list[list[str]]:
    """Header plus one line per row: each column as a mean and a std (4 decimals, blank if none)."""
    header = ["method", "reported"]
    for col in table.columns:
        header += [col, f"{col} std"]
    rows = [header + ["tuned_pct", "seeds"]]
    for row in table.rows:
        line = [row.method, str(row.reported).lower()]
        for col in table.columns:
            cell = row.cells.get(col, Cell())
            line += [_fmt(cell.mean, 4), _fmt(cell.std, 4)]
        rows.append(line + [_fmt(row.tuned_pct, 4), row.seeds])
    return rows


def json_rows(tables: dict[str, Table]) -> list[dict]:
    """The measured cells of every table as plain rows (definitions: module docstring)."""
    rows = []
    for family, table in tables.items():
        for row in table.rows:
            if row.reported:
                continue
            task_seeds = [set(row.cells[t].per_seed) for t in table.tasks if t in row.cells]
            common = sorted(set.intersection(*task_seeds)) if task_seeds else []
            for column in table.columns:
                cell = row.cells.get(column)
                if cell is None or cell.mean is None:
                    continue
                aggregate_column = column in table.aggregates
                tuned = row.tuned_pct if aggregate_column else cell.tuned_pct
                per_seed = _seed_scores(table, row, column)
                rows.append({
                    "family": family, "task": column, "method": row.method,
                    "acc_mean": cell.mean / 100.0, "acc_std": None if cell.std is None else cell.std / 100.0,
                    "tuned_pct": tuned, "seeds": common if aggregate_column else sorted(cell.per_seed),
                    "acc_per_seed": {str(seed): value / 100.0 for seed, value in sorted(per_seed.items())}})
    return rows


def _seed_scores(table: Table, row: Row, column: str) -> dict[int, float]:
    """Percent per seed of a task cell; of an aggregate, the mean over its members for the seeds
    every member has (the pairing unit of ``--compare``); empty if a member is missing."""
    members = table.members.get(column)
    if members is None:
        return dict(row.cells[column].per_seed) if column in row.cells else {}
    scores = [_seed_scores(table, row, member) for member in members]
    if not scores or any(not score for score in scores):
        return {}
    seeds = set.intersection(*(set(score) for score in scores))
    return {s: statistics.fmean(score[s] for score in scores) for s in sorted(seeds)}


def compare(table: Table, pairs: list[tuple[str, str]]) -> list[Paired]:
    """Paired comparisons ``A - B`` on every task both methods ran and, where both ran every task,
    on the mean of all the table's tasks (``Mean`` / ``Mean (19 tasks)``), with Holm's adjustment
    over the list."""
    rows = {row.method: row for row in table.rows if not row.reported}
    overall = MEAN_19 if table.family == "vtab" else MEAN
    out = []
    for a, b in pairs:
        missing = [m for m in (a, b) if m not in rows]
        if missing:
            raise ValueError(f"--compare {a}:{b}: no runs of {', '.join(missing)} in {table.family} "
                             f"(methods: {', '.join(sorted(rows))})")
        for column in [t for t in table.tasks if t in rows[a].cells and t in rows[b].cells] + [overall]:
            scores = _seed_scores(table, rows[a], column), _seed_scores(table, rows[b], column)
            if all(scores):  # the overall mean only where both methods ran every task
                out.append(paired(*scores, a, b, column))
    holm(out)
    return out


def write_report(tables: dict[str, Table], out: str | Path) -> list[Path]:
    """Markdown, CSV and PNG files for every table; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for family, table in tables.items():
        stem = family.replace("/", "_")
        (out / f"{stem}.md").write_text(to_markdown(table))
        with open(out / f"{stem}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(csv_rows(table))
        written += [out / f"{stem}.md", out / f"{stem}.csv"]
        written += figures.plot_table(table, out)
    (out / "report.md").write_text("\n".join(to_markdown(t) for t in tables.values()))
    return written + [out / "report.md"]


def log_wandb(tables: dict[str, Table], images: list[Path], project: str) -> None:
    import wandb

    run = wandb.init(project=project, job_type="report")
    for family, table in tables.items():
        header, *rows = csv_rows(table)
        run.log({f"{family}/table": wandb.Table(columns=header, data=rows)})
    for image in images:
        run.log({f"plots/{image.stem}": wandb.Image(str(image))})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grft_lightning.experiments.report",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", nargs="+", help="folders searched recursively for results.json")
    parser.add_argument("--out", help="output folder (default: RUNS_DIR/report)")
    parser.add_argument("--reference", help="YAML of published rows, e.g. "
                        "benchmarks/reference.yaml")
    parser.add_argument("--json", help="also write the measured cells as JSON rows to this file")
    parser.add_argument("--compare", nargs="+", default=[], metavar="A:B",
                        help="paired comparisons of method A against method B (seeds paired)")
    parser.add_argument("--compare-json", help="also write the comparisons as JSON rows to this file")
    parser.add_argument("--wandb", action="store_true", help="also log the tables to W&B")
    parser.add_argument("--wandb-project", default="grft-lightning")
    args = parser.parse_args(argv)

    results = [record for folder in args.runs_dir for record in load_results(folder)]
    if not results and not args.reference:
        parser.error(f"no results.json under {' '.join(args.runs_dir)}")
    tables = summarize(results)
    pairs = []
    for spec in args.compare:
        a, sep, b = spec.partition(":")
        if not (sep and a and b):
            parser.error(f"--compare {spec}: expected METHOD_A:METHOD_B, e.g. grft_row:random_row")
        pairs.append((a, b))
    try:
        comparisons = {family: compare(table, pairs) for family, table in tables.items()} if pairs else {}
    except ValueError as err:
        parser.error(str(err))
    if args.reference:
        add_reference(tables, args.reference)
    out = Path(args.out or Path(args.runs_dir[0]) / "report")
    written = write_report(tables, out)
    if comparisons:
        text = "\n".join(comparisons_markdown(c, f"Paired comparisons ({FAMILY_TITLES.get(f, f)})")
                         for f, c in comparisons.items())
        (out / "comparisons.md").write_text(text)
        with open(out / "report.md", "a") as handle:
            handle.write("\n" + text)
        written.append(out / "comparisons.md")
        print(text)
    if args.compare_json:
        rows = [{"family": f, **c.to_dict()} for f, cs in comparisons.items() for c in cs]
        Path(args.compare_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.compare_json).write_text(json.dumps(rows, indent=1) + "\n")
        written.append(Path(args.compare_json))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        lines = ",\n".join(" " + json.dumps(row) for row in json_rows(tables))  # one row per line
        Path(args.json).write_text(f"[\n{lines}\n]\n")
        written.append(Path(args.json))
    for table in tables.values():
        print(to_markdown(table))
    print(f"{len(results)} runs; wrote {', '.join(str(p) for p in written)}")
    if args.wandb:
        log_wandb(tables, [p for p in written if p.suffix == ".png"], args.wandb_project)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
