"""PNG figures for grft_lightning.experiments.report tables (matplotlib Agg canvas, no pyplot state).

- ``<family>_tradeoff.png``: headline accuracy against tuned % (log x), one point per method, the
  usual PEFT trade-off figure. The headline is "Mean (19 tasks)" for VTAB and "Mean" otherwise;
  a method whose headline is blank (a task missing) or that has no tuned % is left out and named
  under the plot. Reported rows are hollow markers. Families other than VTAB and FGVC (few
  tasks, e.g. the offline suite) also get ``<family>_tradeoff_<task>.png`` per task column.
- ``vtab_groups.png``: bars of the three VTAB group means and both overall means per method;
  error bars are the std over seeds where the table has one.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from grft_lightning.experiments.tables import MEAN, MEAN_19, MEAN_GROUPS, VTAB_GROUPS, Cell, Table


def headline_column(table: Table) -> str:
    return MEAN_19 if table.family == "vtab" else MEAN


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def plot_tradeoff(table: Table, path: Path, column: str | None = None) -> Path:
    """Accuracy in ``column`` (default: the headline) against tuned %, one point per row."""
    column = column or headline_column(table)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    left_out = []
    for index, row in enumerate(table.rows):
        cell = row.cells.get(column, Cell())
        tuned = cell.tuned_pct if cell.tuned_pct is not None else row.tuned_pct  # a task's own, if any
        if cell.mean is None or not tuned or tuned <= 0:
            left_out.append(row.label)
            continue
        color = f"C{index % 10}"
        ax.errorbar(tuned, cell.mean, yerr=cell.std, fmt="o", color=color,
                    mfc="none" if row.reported else color, capsize=3, label=row.label)
        ax.annotate(row.label, (tuned, cell.mean), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("tuned parameters (%)")
    ax.set_ylabel(f"{column} top-1 (%)")
    ax.set_title(f"{table.title}: accuracy vs tuned parameters" + ("" if column == headline_column(table) else f" ({column})"))
    ax.grid(True, which="both", alpha=0.3)
    if len(table.rows) > len(left_out):  # labels of close points overlap: a legend too
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if left_out:
        fig.text(0.01, -0.02, "not shown (blank mean or no tuned %): " + ", ".join(left_out),
                 fontsize=7, va="top", wrap=True)
    return _save(fig, path)


def plot_vtab_groups(table: Table, path: Path) -> Path:
    categories = [*VTAB_GROUPS, MEAN_19, MEAN_GROUPS]
    # Colours follow the row index, as in the trade-off plot; rows without any value are skipped.
    rows = [(index, row) for index, row in enumerate(table.rows)
            if any(row.cells.get(name, Cell()).mean is not None for name in categories)]
    fig = Figure(figsize=(max(6.0, 1.6 * len(categories)), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(rows))
    for position, (index, row) in enumerate(rows):
        cells = [row.cells.get(name, Cell()) for name in categories]
        heights = [math.nan if c.mean is None else c.mean for c in cells]
        errors = [0.0 if c.std is None else c.std for c in cells]
        xs = [i + (position - (len(rows) - 1) / 2) * width for i in range(len(categories))]
        ax.bar(xs, heights, width, yerr=errors if any(errors) else None, capsize=2, label=row.label,
               hatch="//" if row.reported else None, color=f"C{index % 10}")
    ax.set_xticks(range(len(categories)), categories, rotation=15)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("VTAB-1k group means (blank: a task of the group is missing)")
    if rows:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_table(table: Table, out: Path) -> list[Path]:
    """Every figure for one table, written into ``out``; returns their paths."""
    stem = table.family.replace("/", "_")
    paths = [plot_tradeoff(table, out / f"{stem}_tradeoff.png")]
    if table.family not in ("vtab", "fgvc"):
        paths += [plot_tradeoff(table, out / f"{stem}_tradeoff_{task}.png", task) for task in table.tasks]
    if table.family == "vtab":
        paths.append(plot_vtab_groups(table, out / "vtab_groups.png"))
    return paths
