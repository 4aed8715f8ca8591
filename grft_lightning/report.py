"""Accuracy tables and plots in the papers' layout, from a folder of runs.

    python -m grft_lightning.report RUNS_DIR [RUNS_DIR ...] [--out DIR] [--reference benchmarks/reference.yaml]
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
  family's mean (``grft_lightning.stats``: mean difference, 95 % interval, paired t-test, Holm's
  adjustment over the table's comparisons), printed, written to ``comparisons.md`` and appended
  to ``report.md``; ``--compare-json`` writes them as rows.

Reference rows (``--reference``) are published numbers, marked "(reported)"; columns they do not
give stay blank.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from grft_lightning.data.fgvc import FGVC_DATASETS as _FGVC
from grft_lightning.data.vtab import VTAB_TASKS as _VTAB
from grft_lightning.stats import Paired, comparisons_markdown, holm, paired

#: Group title -> task config names, in the standard column order (from grft_lightning.data.vtab).
VTAB_GROUPS: dict[str, list[str]] = {
    group.capitalize(): [name for name, task in _VTAB.items() if task.group == group]
    for group in ("natural", "specialized", "structured")
}
VTAB_TASKS: list[str] = [task for tasks in VTAB_GROUPS.values() for task in tasks]
# Task folder names of the NOAH/SSF layout that differ from our config names ("cifar" -> cifar100).
VTAB_ALIASES = {task.folder: name for name, task in _VTAB.items() if task.folder != name}
FGVC_DATASETS: list[str] = list(_FGVC)
MEAN_19 = "Mean (19 tasks)"
MEAN_GROUPS = "Mean of group means"
MEAN = "Mean"
FAMILY_TITLES = {"vtab": "VTAB-1k", "fgvc": "FGVC"}
BLANK_NOTE = ("A blank mean means a task entering it is missing for that method; means are never "
              "taken over a subset of tasks.")


@dataclass
class Cell:
    """A cell in percent: mean over seeds, sample std (None for one seed), per-seed values."""

    mean: float | None = None
    std: float | None = None
    per_seed: dict[int, float] = field(default_factory=dict)
    tuned_pct: float | None = field(default=None, compare=False)  # task cells: mean over runs

    def text(self) -> str:
        if self.mean is None:
            return ""
        return f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass
class Row:
    method: str
    cells: dict[str, Cell]
    tuned_pct: float | None = None
    seeds: str = ""
    reported: bool = False
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.method} (reported)" if self.reported else self.method


@dataclass
class Table:
    family: str
    tasks: list[str]
    aggregates: list[str]
    rows: list[Row] = field(default_factory=list)
    footnotes: list[str] = field(default_factory=list)
    members: dict[str, list[str]] = field(default_factory=dict)  # aggregate -> the columns it averages

    @property
    def columns(self) -> list[str]:
        return self.tasks + self.aggregates

    @property
    def title(self) -> str:
        return FAMILY_TITLES.get(self.family, self.family)


def _number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_problem(record) -> str | None:
    """Why a parsed ``results.json`` cannot enter the tables, or None when it can.

    Refused: not a JSON object, a missing key among ``dataset``, ``method``, ``seed`` and
    ``test_acc``, a ``dataset`` or ``method`` that is not a string, a ``seed`` that is not an
    integer (``3`` and ``"3"`` are; ``"three"``, ``3.5`` and null are not), a ``test_acc`` that is
    null (a run without a test figure) or not a finite number, a ``tuned_pct`` that is neither
    null nor a finite number.
    """
    if not isinstance(record, dict):
        return f"not a JSON object but a JSON {type(record).__name__}"
    missing = [key for key in ("dataset", "method", "seed", "test_acc") if key not in record]
    if missing:
        return f"missing keys {missing}"
    for key in ("dataset", "method"):
        if not isinstance(record[key], str) or not record[key]:
            return f"{key} {record[key]!r} is not a name"
    seed = record["seed"]
    if not (isinstance(seed, int) and not isinstance(seed, bool)
            or isinstance(seed, float) and seed.is_integer()
            or isinstance(seed, str) and seed.strip().lstrip("-").isdigit()):
        return f"seed {seed!r} is not an integer"
    if record["test_acc"] is None:
        return "test_acc is null (the run has no test figure)"
    if not _number(record["test_acc"]):
        return f"test_acc {record['test_acc']!r} is not a number"
    if record.get("tuned_pct") is not None and not _number(record["tuned_pct"]):
        return f"tuned_pct {record['tuned_pct']!r} is not a number"
    return None


def load_results(runs_dir: str | Path) -> list[dict]:
    """Every usable ``results.json`` under ``runs_dir``, sorted by path, each with ``_path`` added
    and its ``seed`` as an int. A file that cannot be read or parsed, or whose content
    :func:`record_problem` refuses (a null ``test_acc`` among them: such a run has no figure to
    show, and it is left out rather than shown as a blank cell), is skipped with a warning
    naming the file and the reason; the other runs are reported as usual."""
    results = []
    for path in sorted(Path(runs_dir).rglob("results.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            warnings.warn(f"{path}: unreadable ({err}); skipped")
            continue
        problem = record_problem(record)
        if problem is not None:
            warnings.warn(f"{path}: {problem}; skipped")
            continue
        results.append({**record, "seed": int(record["seed"]), "_path": str(path)})
    return results


def split_dataset(name: str) -> tuple[str, str]:
    """``"vtab/dtd"`` -> ``("vtab", "dtd")``; VTAB folder names map to config names."""
    family, _, task = name.partition("/")
    if not task:
        family, task = "other", family
    if family == "vtab":
        task = VTAB_ALIASES.get(task, task)
    return family, task


def _task_cell(runs: list[dict]) -> tuple[Cell, float | None]:
    """Cell over seeds of one (task, method), and the mean tuned %."""
    per_seed: dict[int, float] = {}
    for run in runs:
        seed = int(run["seed"])
        if seed in per_seed:
            warnings.warn(f"{run.get('_path', run['dataset'])}: seed {seed} seen twice; "
                          "keeping this run")
        per_seed[seed] = 100.0 * float(run["test_acc"])
    values = list(per_seed.values())
    std = statistics.stdev(values) if len(values) > 1 else None
    tuned = [float(run["tuned_pct"]) for run in runs if run.get("tuned_pct") is not None]
    tuned_pct = statistics.fmean(tuned) if tuned else None
    return Cell(statistics.fmean(values), std, per_seed, tuned_pct), tuned_pct


def aggregate(cells: list[Cell | None]) -> Cell:
    """Mean of cell means, blank if any cell is missing; std over seeds when seeds align."""
    if not cells or any(cell is None or cell.mean is None for cell in cells):
        return Cell()
    mean = statistics.fmean(cell.mean for cell in cells)
    seeds = set(cells[0].per_seed)
    if len(seeds) < 2 or any(set(cell.per_seed) != seeds for cell in cells):
        return Cell(mean)
    per_seed = {s: statistics.fmean(cell.per_seed[s] for cell in cells) for s in sorted(seeds)}
    return Cell(mean, statistics.stdev(per_seed.values()), per_seed)


def _layout(family: str, present: set[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Task columns and (aggregate name, the columns it averages), in the papers' order."""
    if family == "vtab":
        known, groups = VTAB_TASKS, list(VTAB_GROUPS.items())
        aggregates = groups + [(MEAN_19, VTAB_TASKS), (MEAN_GROUPS, list(VTAB_GROUPS))]
    elif family == "fgvc":
        known, aggregates = FGVC_DATASETS, [(MEAN, FGVC_DATASETS)]
    else:
        tasks = sorted(present)
        return tasks, [(MEAN, tasks)]
    return known + sorted(present - set(known)), aggregates


def _method_row(method: str, by_task: dict[str, list[dict]], tasks: list[str],
                aggregates: list[tuple[str, list[str]]]) -> Row:
    cells: dict[str, Cell] = {}
    tuned: list[float] = []
    for task in tasks:
        if task in by_task:
            cells[task], tuned_pct = _task_cell(by_task[task])
            if tuned_pct is not None:
                tuned.append(tuned_pct)
    # Aggregates may average earlier aggregates (the mean of group means), hence the shared dict.
    for name, members in aggregates:
        cells[name] = aggregate([cells.get(member) for member in members])
    counts = sorted({len(cell.per_seed) for task, cell in cells.items() if task in by_task})
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return Row(method, cells, statistics.fmean(tuned) if tuned else None, seeds)


def _footnotes(table: Table, extra: list[str]) -> list[str]:
    notes = ["Top-1 test accuracy (%), last epoch: mean ± sample std over seeds (one seed: mean "
             "only). Tuned %: mean over tasks of results.json `tuned_pct`."]
    if table.family == "vtab":
        notes.append("Group means average the per-task means of their group; Mean (19 tasks) "
                     "weighs every task equally, Mean of group means every group equally.")
    notes.append(BLANK_NOTE)
    if extra:
        notes.append(f"Columns outside the standard list (in no mean): {', '.join(extra)}.")
    return notes


def summarize(results: list[dict]) -> dict[str, Table]:
    """Tables keyed by family (vtab, fgvc, then the others sorted) from results.json records."""
    runs: dict[str, dict[str, dict[str, list[dict]]]] = {}
    for record in results:
        family, task = split_dataset(str(record["dataset"]))
        by_method = runs.setdefault(family, {}).setdefault(str(record["method"]), {})
        by_method.setdefault(task, []).append(record)
    tables = {}
    for family in sorted(runs, key=lambda f: (f not in FAMILY_TITLES, f != "vtab", f)):
        present = {task for by_task in runs[family].values() for task in by_task}
        tasks, aggregates = _layout(family, present)
        table = Table(family, tasks, [name for name, _ in aggregates], members=dict(aggregates))
        table.rows = [_method_row(method, runs[family][method], tasks, aggregates)
                      for method in sorted(runs[family])]
        standard = {"vtab": VTAB_TASKS, "fgvc": FGVC_DATASETS}.get(family, tasks)
        table.footnotes = _footnotes(table, [t for t in tasks if t not in standard])
        tables[family] = table
    return tables


def add_reference(tables: dict[str, Table], path: str | Path) -> None:
    """Append the published rows of a reference YAML (format: benchmarks/reference.yaml)."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    for entry in spec.get("rows", []):
        source = entry.get("source") or {}
        families = {k: v for k, v in entry.items() if k != "source" and isinstance(v, dict)}
        for family, values in families.items():
            if family not in tables:
                tasks, aggregates = _layout(family, set())
                tables[family] = Table(family, tasks, [name for name, _ in aggregates])
                tables[family].footnotes = _footnotes(tables[family], [])
            table = tables[family]
            unknown = set(values) - set(table.columns) - {"tuned_pct"}
            if unknown:
                raise ValueError(f"{path}: row {entry['method']!r}, {family}: unknown columns "
                                 f"{sorted(unknown)}; use one of {table.columns}")
            cells = {col: Cell(float(values[col])) for col in table.columns if col in values}
            tuned = values.get("tuned_pct")
            row = Row(entry["method"], cells, None if tuned is None else float(tuned),
                      reported=True, note=entry.get("note", ""))
            table.rows.append(row)
            cite = ", ".join(str(source[key]) if key != "arxiv" else f"arXiv {source[key]}"
                             for key in ("paper", "arxiv", "table") if key in source)
            table.footnotes.append(f"{row.label}: " + (f"{row.note}. " if row.note else "")
                                   + f"Source: {cite or 'not given'}.")


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
    from grft_lightning import report_plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for family, table in tables.items():
        stem = family.replace("/", "_")
        (out / f"{stem}.md").write_text(to_markdown(table))
        with open(out / f"{stem}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(csv_rows(table))
        written += [out / f"{stem}.md", out / f"{stem}.csv"]
        written += report_plots.plot_table(table, out)
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
    parser = argparse.ArgumentParser(prog="python -m grft_lightning.report",
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
