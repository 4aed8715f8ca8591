"""The tables of a folder of runs: runs grouped by (family, task, method), cells over seeds.

Reads every ``results.json`` under a folder and builds one :class:`Table` per benchmark family
(the part of ``results["dataset"]`` before its first ``/``), with VTAB's group means and the
papers' column order. The definitions of every figure (a cell, a group mean, "Mean (19 tasks)",
Tuned %) are in ``report.py``'s opening text; this module is the one place they are computed, and
``report.py`` (markdown, CSV, JSON, comparisons) and ``figures.py`` (plots) read its tables.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from grft_lightning.data.fgvc import FGVC_DATASETS as _FGVC
from grft_lightning.data.vtab import VTAB_TASKS as _VTAB

#: Group title -> task config names, in the standard column order (from grft_lightning.data.vtab).
VTAB_GROUPS: dict[str, list[str]] = {
    group.capitalize(): [name for name, task in _VTAB.items() if task.group == group]
    for group in ("natural", "specialized", "structured")
}
VTAB_COLUMNS: list[str] = [task for tasks in VTAB_GROUPS.values() for task in tasks]
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
        known, groups = VTAB_COLUMNS, list(VTAB_GROUPS.items())
        aggregates = groups + [(MEAN_19, VTAB_COLUMNS), (MEAN_GROUPS, list(VTAB_GROUPS))]
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
        standard = {"vtab": VTAB_COLUMNS, "fgvc": FGVC_DATASETS}.get(family, tasks)
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
