"""``results.json``: the small file of figures every run leaves behind (keys in docs/INTERFACES.md)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from grft_lightning.budgets import BUDGET_ARGUMENTS
from grft_lightning.io import write_text_atomic

REPO = Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """The commit of this code; ``+dirty`` when tracked files have uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GRFT_GIT_SHA", "unknown")


def _fraction(value: Any) -> float | None:
    return None if value is None else float(value)


def budget_record(method: Any, selection: Any, task_budget: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's budget for ``results.json``: the selection's one-line description, the method's
    budget arguments as resolved (``mode``, ``allocation`` and those of
    :data:`~grft_lightning.budgets.BUDGET_ARGUMENTS` it has), the per-matrix counts that came out of the selection
    (``per_matrix``: ``{layer: [axis, count]}``, rows or columns per matrix, entries per row for GPS)
    and the task's ``budget`` section the run was given (``task``)."""
    config = method.config() if hasattr(method, "config") else {}
    record: dict[str, Any] = {"description": selection.describe() if selection is not None else ""}
    record.update({key: config[key] for key in ("mode", "allocation", *BUDGET_ARGUMENTS) if key in config})
    if selection is not None and selection.layers:
        record["per_matrix"] = selection.counts()
        record["entries"] = selection.entries()
    record["task"] = {k: v for k, v in (task_budget or {}).items() if v is not None}
    return record


def build_results(
    *,
    method: str,
    dataset: str,
    backbone: str,
    seed: int,
    counts: dict[str, float],
    selection_seconds: float,
    train_seconds: float,
    val_acc: Any,
    test_acc: Any,
    peak_memory_bytes: int,
    budget: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The fixed keys first, then ``budget`` (:func:`budget_record`), then extras (task group,
    protocol, skipped images, ...)."""
    results = {
        "method": method,
        "dataset": dataset,
        "backbone": backbone,
        "seed": seed,
        "tuned": int(counts["tuned"]),
        "backbone_params": int(counts["backbone"]),
        "tuned_pct": float(counts["tuned_pct"]),
        "selection_seconds": float(selection_seconds),
        "train_seconds": float(train_seconds),
        "val_acc": _fraction(val_acc),
        "test_acc": _fraction(test_acc),
        "peak_memory_bytes": int(peak_memory_bytes),
        "git_sha": git_sha(),
        "counts": {k: counts[k] for k in ("selected", "bias", "head")},
    }
    if budget is not None:
        results["budget"] = budget
    results.update(extra or {})
    return results


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(results, indent=2, sort_keys=False) + "\n")
