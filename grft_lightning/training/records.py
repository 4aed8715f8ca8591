"""What a run leaves behind: ``results.json``, ``tuned.safetensors`` and ``metrics.csv``.

:class:`RunRecorder` is the callback that writes the results once ``fit`` has been followed by
the test pass (``train.py fit`` runs it; ``grft_lightning/training/cli.py``), keeps the run-defining config
in every checkpoint and refuses to resume one of another config. :class:`AppendingCSVLogger` is
Lightning's CSV logger, except that a resumed run appends to ``metrics.csv`` instead of starting
it over.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from grft_lightning.core.accounting import format_summary, update_size
from grft_lightning.core.errors import CheckpointRefused
from grft_lightning.methods.export import save_tuned
from grft_lightning.core.io import atomic_path
from grft_lightning.training.results import budget_record, build_results, write_results
from grft_lightning.training.rundir import differing_keys


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer over an existing ``metrics.csv``: its rows (those of steps below
    ``resume_step``, when given: a segment logs the steps after its checkpoint again) and its
    columns are kept, and new rows are appended."""

    def __init__(self, log_dir: str, resume_step: int | None = None):
        path = Path(log_dir) / self.NAME_METRICS_FILE
        header: list[str] = []
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                header = list(reader.fieldnames or [])
                rows = [row for row in reader if _step(row) is None or _step(row) < resume_step]
        super().__init__(log_dir)  # removes the file
        if header:
            self.metrics_keys = sorted(header)  # the writer's own column order
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/metrics.csv``; with ``resume_step`` (the global step of
    the checkpoint a run resumes from) the history before it is kept and the new rows appended."""

    def __init__(self, save_dir: str, resume_step: int | None = None):
        super().__init__(save_dir=save_dir, name="", version="")
        self.resume_step = resume_step
        self._writer: _AppendingWriter | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._writer is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._writer = _AppendingWriter(self.log_dir, self.resume_step)
        return self._writer

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        # Written with every checkpoint, so that a kill loses no row the checkpoint covers.
        if self._writer is not None:
            self.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._writer is not None:
            self.save()


def refuse_another_run(checkpoint: dict, run_config: dict[str, Any] | None, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointRefused`, naming the keys and values, when the run-defining config
    held by ``checkpoint`` differs from ``run_config`` (either missing: nothing to compare)."""
    saved = checkpoint.get("run_config")
    if saved is None or run_config is None:
        return
    keys = differing_keys(saved, run_config)
    if keys:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {run_config.get(k)!r})" for k in keys[:6])
        more = f", and {', '.join(keys[6:])}" if len(keys) > 6 else ""
        raise CheckpointRefused(
            f"checkpoint {path} is of another run: {shown}{more} differ; resume with the run's own config "
            "(its config.yaml), or start a new run with another --run_dir or --overwrite")


class RunRecorder(L.Callback):
    """Records a ``fit`` run: after the test pass that follows it, ``tuned.safetensors`` and
    ``results.json`` in ``run_dir`` (global rank 0), and a summary on stdout; in every
    checkpoint, the run-defining config (``grft_lightning.training.rundir.run_defining_config``), and on
    resume a refusal, naming the keys, of a checkpoint whose run-defining config differs.

    Args:
        run_dir: the run directory.
        label: the run's name in reports (results.json ``method``).
        seed: the run's seed.
        run_config: the run-defining config of this run.
        task_budget: the task's ``budget`` section, recorded under ``budget.task``.
        config_files: the ``--config`` files, recorded as ``config_files``.
    """

    def __init__(self, run_dir: str | os.PathLike, label: str, seed: int, run_config: dict[str, Any] | None = None,
                 task_budget: dict[str, Any] | None = None, config_files: list[str] | None = None):
        self.run_dir = Path(run_dir)
        self.label = label
        self.seed = seed
        self.run_config = run_config
        self.task_budget = dict(task_budget or {})
        self.config_files = list(config_files or [])
        self.val_acc: float | None = None
        self.fitted = False
        self.results: dict[str, Any] | None = None

    # -- checkpoints: what defines the run -------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        refuse_another_run(checkpoint, self.run_config, getattr(trainer, "ckpt_path", None) or "")

    # -- figures --------------------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/acc")
        if value is not None:
            self.val_acc = float(value)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fitted = True

    def on_test_end(self, trainer, pl_module) -> None:
        if not self.fitted:  # a test subcommand of its own records nothing
            return
        test_acc = trainer.callback_metrics.get("test/acc")
        test_acc = None if test_acc is None else float(test_acc)
        if trainer.is_global_zero:
            self.record(trainer, pl_module, test_acc)

    def record(self, trainer, model, test_acc: float | None) -> dict[str, Any]:
        from grft_lightning.training.callbacks import GradientSelection, RunClock

        data = trainer.datamodule
        clock = next((c for c in trainer.callbacks if isinstance(c, RunClock)), None)
        counts = model.tuned_counts()
        extra = dict(data.describe()) if hasattr(data, "describe") else {}
        extra.setdefault("skipped_images", getattr(data, "skipped_images", 0))
        extra["config_files"] = self.config_files
        selection = next((c for c in trainer.callbacks if isinstance(c, GradientSelection)), None)
        if selection is not None and (model.method.needs_gradients or selection.probe):
            extra["selection"] = selection.record()
        moved = update_size(model.model)
        if moved is not None:
            extra["update_size"] = moved
        if self.label != model.method.name:
            extra["method_name"] = model.method.name
        results = build_results(
            method=self.label, dataset=getattr(data, "dataset_name", "data"), backbone=model.hparams.backbone,
            seed=self.seed, counts=counts, selection_seconds=model.selection_seconds,
            train_seconds=clock.train_seconds if clock is not None else 0.0, val_acc=self.val_acc, test_acc=test_acc,
            peak_memory_bytes=clock.peak_memory_bytes(model.device) if clock is not None else 0,
            budget=budget_record(model.method, model.selection, self.task_budget), extra=extra)
        save_tuned(model.model, self.run_dir / "tuned.safetensors", model.method, model.selection, metadata={
            "backbone": model.hparams.backbone, "dataset": results["dataset"], "seed": results["seed"],
            "git_sha": results["git_sha"]})
        write_results(self.run_dir / "results.json", results)
        self.results = results
        print(format_summary(counts))
        if test_acc is not None:
            print(f"test accuracy: {test_acc:.4f} ({results['dataset']}, {results['method']}, last epoch)")
        print(f"run directory: {self.run_dir}")
        return results
