"""``results.json``: the small file of figures every run leaves behind.

:class:`Results` is the one definition of its keys; the table in docs/INTERFACES.md is generated
from it (``python tests/test_results_schema.py``) and a test keeps the two equal.
"""

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from typing_extensions import NotRequired, TypedDict  # NotRequired: typing's from Python 3.11

from grft_lightning.training.budgets import BUDGET_ARGUMENTS
from grft_lightning.core.io import write_text_atomic

# No ``from __future__ import annotations`` here: the TypedDicts' NotRequired keys must be evaluated
# to be told apart (``__required_keys__``).

REPO = Path(__file__).resolve().parents[2]


class Counts(TypedDict):
    """``results.json["counts"]``: the parts of ``tuned`` (``grft_lightning/core/accounting.py``)."""

    #: tuned weight entries outside the head (active delta entries, trainable pre-trained weights, LoRA/adapter weights)
    selected: int
    #: tuned pre-trained biases
    bias: int
    #: parameters of the new head
    head: int


class Budget(TypedDict):
    """``results.json["budget"]``: the budget the run used (:func:`budget_record`)."""

    #: the selection's one line (``Selection.describe()``); empty for methods without a selection
    description: str
    #: GRFT / random rows: ``row``, ``column`` or ``auto``
    mode: NotRequired[str]
    #: GRFT / random rows: how the budget is spread over the matrices
    allocation: NotRequired[str]
    #: fraction of backbone parameters for the selected entries, as resolved (null when a count was given)
    fraction: NotRequired[float | None]
    #: rows per matrix, as resolved
    rows_per_matrix: NotRequired[int | None]
    #: columns per matrix, as resolved
    columns_per_matrix: NotRequired[int | None]
    #: GPS: input connections per output neuron
    k: NotRequired[int | None]
    #: LoRA / DoRA rank
    r: NotRequired[int | None]
    #: adapter bottleneck width
    bottleneck: NotRequired[int | None]
    #: per selected layer ``[axis, count]``: rows, columns, or entries per row (GPS)
    per_matrix: NotRequired[dict[str, list]]
    #: selected weight entries in all layers
    entries: NotRequired[int]
    #: the task config's ``budget`` section the run was given (unset values left out)
    task: dict[str, Any]


class SelectionRecord(TypedDict):
    """``results.json["selection"]``: how the gradients for the selection were taken."""

    #: ``supcon`` or ``ce``
    loss: str
    #: model mode during the pass: ``eval`` or ``train``
    mode: str
    #: SupCon temperature
    temperature: float
    #: the pass stopped after this many batches (null: the whole training split)
    max_batches: int | None
    #: the run took its selection from this ``tuned.safetensors`` (null: its own pass)
    from_file: str | None
    #: the views SupCon contrasted, when not ``two_augmented`` (``one``: one deterministic view)
    views: NotRequired[str]
    #: ``probe``: the pass ran through a linear probe fitted on frozen features first
    head: NotRequired[str]
    #: with a probe head: whether training started from it (else from the fresh head)
    keep_probe_head: NotRequired[bool]
    #: with a probe head: the probe's optimisation steps
    probe_steps: NotRequired[int]
    #: with a probe head: seconds the probe took
    probe_seconds: NotRequired[float]
    #: with a probe head: the probe's accuracy on the training split (fraction 0-1)
    probe_train_acc: NotRequired[float]


class UpdateSize(TypedDict):
    """``results.json["update_size"]``: how far training moved the tuned groups
    (``accounting.update_size``, the one definition)."""

    #: median over the selected rows, columns or (GPS) output neurons' entry groups of ``||delta|| / ||W0 on them||``
    median: float
    #: 90th percentile of the same ratio
    p90: float
    #: how many groups the ratios are over
    groups: int


class Results(TypedDict):
    """The keys of ``results.json``, in the order they are written."""

    #: the run's name in reports: the method's name (its config file's name) or ``--label``
    method: str
    #: ``<family>/<task>``, e.g. ``vtab/dtd``, ``offline/mnist_digit``
    dataset: str
    #: the timm model name
    backbone: str
    #: the run's seed (``seed_everything``)
    seed: int
    #: tuned parameters, head included (``selected + bias + head``)
    tuned: int
    #: pre-trained parameters outside the head
    backbone_params: int
    #: ``100 * tuned / backbone_params`` (percent, head included)
    tuned_pct: float
    #: seconds of the selection pass (0 without one)
    selection_seconds: float
    #: seconds of training
    train_seconds: float
    #: validation accuracy (fraction 0-1) at the last epoch
    val_acc: float | None
    #: test accuracy (fraction 0-1) at the last epoch: the VTAB protocol, never an epoch picked on test
    test_acc: float | None
    #: CUDA max allocated on a GPU, max RSS of the process on the CPU
    peak_memory_bytes: int
    #: the commit of the code (``+dirty`` with uncommitted changes)
    git_sha: str
    #: the parts of ``tuned``
    counts: Counts
    #: the budget the run used
    budget: NotRequired[Budget]
    #: the method's own name, when ``--label`` gave the run another
    method_name: NotRequired[str]
    #: the config files of the run, in order
    config_files: NotRequired[list[str]]
    #: methods selected by gradients: how the selection pass ran
    selection: NotRequired[SelectionRecord]
    #: methods with row, column or entry deltas (GRFT, random rows, GPS): how far the tuned entries moved
    update_size: NotRequired[UpdateSize]
    #: the data's family: ``vtab-1k``, ``fgvc``, or an offline task's ``family`` (``offline`` by default)
    benchmark: NotRequired[str]
    #: VTAB-1k: ``natural``, ``specialized`` or ``structured``
    task_group: NotRequired[str]
    #: prepared folders: ``final`` (train on train+val, test on test) or ``tune`` (validation split as test split)
    protocol: NotRequired[str]
    #: prepared folders: images skipped as undecodable (``skip_bad_images``)
    skipped_images: NotRequired[int]
    #: prepared folders: the task folder, absolute
    data_dir: NotRequired[str | None]
    #: VTAB-1k: one line saying which extraction the task folder is
    extraction: NotRequired[str]
    #: VTAB-1k folders built by ``data/prepare_vtab_tfds.py``: the folder's ``extraction.json``
    extraction_record: NotRequired[dict[str, Any]]
    #: offline tasks: where the images come from
    source: NotRequired[str]
    #: offline tasks: training images
    n_train: NotRequired[int]
    #: offline tasks: validation images
    n_val: NotRequired[int]
    #: offline tasks: test images
    n_test: NotRequired[int]


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


def budget_record(method: Any, selection: Any, task_budget: dict[str, Any] | None = None) -> Budget:
    """The run's budget for ``results.json``: the selection's one-line description, the method's
    budget arguments as resolved (``mode``, ``allocation`` and those of
    :data:`~grft_lightning.training.budgets.BUDGET_ARGUMENTS` it has), the per-matrix counts that came out of the selection
    (``per_matrix``: ``{layer: [axis, count]}``, rows or columns per matrix, entries per row for GPS)
    and the task's ``budget`` section the run was given (``task``)."""
    config = method.config() if hasattr(method, "config") else {}
    record: dict[str, Any] = {"description": selection.describe() if selection is not None else ""}
    record.update({key: config[key] for key in ("mode", "allocation", *BUDGET_ARGUMENTS) if key in config})
    if selection is not None and selection.layers:
        record["per_matrix"] = selection.counts()
        record["entries"] = selection.entries()
    record["task"] = {k: v for k, v in (task_budget or {}).items() if v is not None}
    return record  # type: ignore[return-value]


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
    budget: Budget | None = None,
    extra: dict[str, Any] | None = None,
) -> Results:
    """The fixed keys first, then ``budget`` (:func:`budget_record`), then extras (task group,
    protocol, skipped images, ...), each a key of :class:`Results`."""
    results: Results = {
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
        "counts": {k: int(counts[k]) for k in ("selected", "bias", "head")},  # type: ignore[misc]
    }
    if budget is not None:
        results["budget"] = budget
    results.update(extra or {})  # type: ignore[typeddict-item]
    return results


def write_results(path: str | os.PathLike, results: Results) -> None:
    write_text_atomic(path, json.dumps(results, indent=2, sort_keys=False) + "\n")
