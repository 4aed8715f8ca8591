"""The command line: ``python train.py fit|validate|test|predict --config ...``.

LightningCLI builds every option from typed signatures; the method and the data are chosen in
YAML by ``class_path``. This module holds the command line only: its arguments and links, the
run directory, and the trainer's wiring. On top of Lightning's behaviour it:

* links ``data.num_classes`` -> ``model.num_classes`` and ``model.backbone``/``image_size`` ->
  the data (preprocessing comes from the backbone's pretrained config), and the task's
  ``budget`` -> ``model.task_budget`` (below);
* gives every run a directory (``run_dir``, default ``runs/<dataset>/<method>/seed<seed>``)
  holding ``config.yaml``, ``metrics.csv``, ``checkpoints/last.ckpt``, ``selection.png``,
  ``tuned.safetensors`` and ``results.json``, and a lock (``run.lock``) while a ``fit`` runs
  in it: a second start in the same directory is refused (``grft_lightning/training/rundir.py``);
* ``fit``: a directory with ``results.json`` holds a finished run, which is left as it is (the
  command says where its results are and exits 0); otherwise ``fit`` resumes from
  ``<run_dir>/checkpoints/last.ckpt`` when it exists (same command after a crash or
  preemption; a checkpoint of another run config is refused), and ``--overwrite`` trains from
  scratch. Checkpoints are written atomically and loaded weights-only;
* after ``fit``, tests the last-epoch model on the test split; the
  :class:`~grft_lightning.training.records.RunRecorder` callback then writes ``results.json`` and
  ``tuned.safetensors``;
* resolves config includes (``config: base.yaml`` inside a config file, below);
* checks the data (every split's files) before the model and its pre-trained weights are built,
  so a wrong data root fails in seconds;
* from ``train.py`` (:func:`main`), reports a user's mistake as one ``error: ...`` line without a
  traceback (``grft_lightning/core/errors.py``).

**Budgets.** A task config states its published budget once, in a top-level ``budget`` section
(per family in ``base.yaml``, per task where it differs): ``fraction`` for the methods with a
``fraction`` argument (GRFT and its random ablations) and ``k`` for those with a ``k`` argument
(GPS). Method configs do not state a budget. The section and the method are linked
(``link_arguments``) to ``model.task_budget``: the task's values for a method whose budget
arguments are all null, with which the module builds it (``grft_lightning/training/budgets.py``). The
config (``--print_config``, the run's ``config.yaml``, which leave link targets out) therefore
shows the method as configured, with its open budget null, and the task's ``budget`` section; the effective budget is recorded in ``results.json``
(``budget``), in every checkpoint's ``hyper_parameters.method_config`` and in
``tuned.safetensors``.

**Config includes.** A config file may include a base with a top-level ``config: base.yaml`` key
(relative to the file; the including file's values win). jsonargparse reads such a key itself,
but it checks the including file's values against the config as it was *before* the file, without
the base: a value that needs the base -- ``init_args`` without a ``class_path`` for ``model.method``,
``model.optimizer`` or ``data``, which every task config gives -- is rejected (jsonargparse 4.53).
So the parser expands every ``--config FILE`` into ``--config BASE --config FILE`` first
(:func:`expand_config_includes`, applied by :meth:`GRFTArgumentParser.parse_args`, the one place
it happens); ``sys.argv`` is left as it is (a DDP launcher that re-runs the command expands again).
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.callbacks import ModelCheckpoint
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from grft_lightning.training.budgets import TaskBudget, task_budget_for
from grft_lightning.training.callbacks import GradientSelection, RankSeed, RunClock
from grft_lightning.data.base import ImageClassificationData
from grft_lightning.core.errors import ConfigError, condense_parser_error, debug_enabled, report_user_errors
from grft_lightning.core.io import make_atomic_checkpoint_io, remove_stale_temporaries
from grft_lightning.training.module import PEFTModule
from grft_lightning.core.paths import make_run_dir
from grft_lightning.training.records import AppendingCSVLogger, RunRecorder, refuse_another_run
from grft_lightning.training.results import git_sha
from grft_lightning.training.rundir import RunLock, clear_run, holds_run_lock, run_defining_config

_STARTED = time.time()  # temporaries older than this process are leftovers of a killed one


class WandbOptions:
    """Weights & Biases logging (a CSV log is always written beside it).

    Args:
        mode: ``online``, ``offline`` (sync later with ``wandb sync``) or ``disabled``.
        project: W&B project.
        entity: W&B entity (team or user); None: the default of the login.
        name: run name (default ``<method>-<dataset>-seed<seed>``).
        group: W&B group (e.g. a sweep name).
        tags: extra tags (method, dataset and backbone are always added).
    """

    def __init__(self, mode: Literal["online", "offline", "disabled"] = "offline", project: str = "grft-lightning",
                 entity: str | None = None, name: str | None = None, group: str | None = None,
                 tags: list[str] | None = None):
        self.mode = os.environ.get("WANDB_MODE", mode) if mode != "disabled" else mode
        self.project, self.entity, self.name, self.group = project, entity, name, group
        self.tags = list(tags or [])


class GRFTArgumentParser(LightningArgumentParser):
    """The CLI's parser: one-line errors, and config includes resolved (the top-level parser's
    :meth:`parse_args` expands ``--config`` files that include a base with
    :func:`expand_config_includes`; the module docstring says why jsonargparse's own reading of a
    ``config:`` key is not enough)."""

    def error(self, message: str, ex: Exception | None = None):
        """A rejected value: one line ``error: <option>: <reason>`` and exit status 2, instead of
        the usage and jsonargparse's nested explanation (``GRFT_DEBUG=1`` shows those)."""
        if not self.exit_on_error or debug_enabled():
            return super().error(message, ex)
        print(f"error: {condense_parser_error(message)} (the accepted options: --help)", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args=None, *rest, **kwargs):
        if getattr(self, "parent_parser", None) is None:  # not a subcommand's parser
            #: every config file read, includes first, as results.json's ``config_files`` records them
            args, self.config_files = expand_with_files(sys.argv[1:] if args is None else list(args))
        return super().parse_args(args, *rest, **kwargs)


class GRFTCLI(LightningCLI):
    def __init__(self, *args, run: bool = True, **kwargs):
        # A CLI built to run a subcommand checks the data before the model (checked_num_classes);
        # one built only to inspect the config (run=False) reads no data.
        self.check_data = run
        super().__init__(*args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(TaskBudget, "budget")
        # The task's budget reaches the module, which gives it to a method whose budget is open
        # (grft_lightning/training/budgets.py).
        parser.link_arguments(("budget.fraction", "budget.k", "model.method"), "model.task_budget",
                              compute_fn=task_budget_for, apply_on="parse")
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Run directory (default: runs/<dataset>/<method>/seed<seed>).")
        parser.add_argument("--label", type=str | None, default=None,
                            help="Name of the run's row in reports: results.json `method`, the run directory "
                                 "and the W&B run name (default: the method's name, e.g. grft_row). For "
                                 "variants of one method, e.g. full_scratch or grft_row_1.2pct.")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="Train from scratch in a run directory that holds a finished or interrupted "
                                 "run: its results, tuned file, metrics and checkpoints are removed first. "
                                 "Without it, a finished run is left as it is and an interrupted one resumes.")
        parser.add_argument("--checkpoint_every_n_steps", type=int | None, default=200,
                            help="Also save <run_dir>/checkpoints/last.ckpt every N optimizer steps "
                                 "(it is always saved at the end of each epoch).")
        parser.add_class_arguments(WandbOptions, "wandb")
        parser.add_lightning_class_args(GradientSelection, "selection")
        # The data is instantiated first and checked before the model exists (its pre-trained
        # weights can take minutes to load): a wrong root or list file fails in seconds.
        parser.link_arguments("data", "model.num_classes", compute_fn=self.num_classes_of_checked_data,
                              apply_on="instantiate")
        parser.link_arguments("model.backbone", "data.init_args.backbone")
        parser.link_arguments("model.image_size", "data.init_args.image_size")

    def num_classes_of_checked_data(self, data) -> int:
        """``data.num_classes``, once the DataModule has checked its splits (``check()``: the root,
        list files and images) when the CLI runs a subcommand: bad data stops the run before the
        model and its pre-trained weights are built."""
        check = getattr(data, "check", None)
        if self.check_data and callable(check):
            check()
        return data.num_classes

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse as LightningCLI does, with a ``ckpt_path`` given on the command line held back
        until :meth:`before_instantiate_classes`: Lightning would otherwise replace this run's
        model config with the checkpoint's hyper-parameters. The run's config is the source of
        truth; the checkpoint is checked against it when it is loaded (PEFTModule and RunRecorder
        refuse one of another method, budget, backbone or run config)."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        self._given_ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if self._given_ckpt_path is not None:
            self.config[sub]["ckpt_path"] = None

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if getattr(self, "_given_ckpt_path", None) is not None and sub:
            self.config[sub]["ckpt_path"] = self._given_ckpt_path
        if sub == "fit" and self.config[sub].get("run_dir"):
            self.claim_run_dir(Path(self.config[sub]["run_dir"]), self.config[sub])

    # -- run directory, loggers, checkpoints --------------------------------------------------
    def _cfg(self):
        return self.config_init[self.subcommand] if self.subcommand else self.config_init

    def label(self) -> str:
        """The run's name in reports: ``--label``, else the method's name."""
        return self._cfg().get("label") or self.model.method.name

    def run_dir(self) -> Path:
        cfg = self._cfg()
        if cfg.get("run_dir"):
            return Path(cfg["run_dir"])
        dataset = getattr(self.datamodule, "dataset_name", "data")
        return Path("runs") / dataset / self.label() / f"seed{cfg.get('seed_everything')}"

    def instantiate_trainer(self, **kwargs):
        cfg = self._cfg()
        run_dir = make_run_dir(self.run_dir())  # a path that cannot be one fails here, in one line
        self.resume_from, self._resume_step = None, None
        if self.subcommand == "fit":
            self.prepare_run_dir()
        trainer_cfg = cfg.get("trainer", {})
        kwargs.setdefault("default_root_dir", str(run_dir))
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = self._loggers(run_dir, cfg)
        plugins = _as_list(trainer_cfg.get("plugins"))
        kwargs["plugins"] = plugins + [make_atomic_checkpoint_io()]
        callbacks = _as_list(trainer_cfg.get("callbacks"))
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks += self._checkpoints(run_dir, cfg.get("checkpoint_every_n_steps"))
        recorder = RunRecorder(run_dir, self.label(), seed=int(cfg.get("seed_everything") or 0),
                               run_config=self.run_config() if self.subcommand == "fit" else None,
                               task_budget=_plain(cfg.get("budget")),
                               config_files=getattr(self.parser, "config_files", []))
        kwargs["callbacks"] = callbacks + [RunClock(), RankSeed(), recorder]
        return super().instantiate_trainer(**kwargs)

    def run_config(self) -> dict[str, Any]:
        """The values of this run's config that define it (``grft_lightning.training.rundir``)."""
        import yaml

        if getattr(self, "_run_config", None) is not None:
            return self._run_config
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        if self.subcommand:
            dumped = dumped.get(self.subcommand) or {}
        self._run_config = run_defining_config(dumped)
        return self._run_config

    @staticmethod
    def _checkpoints(run_dir: Path, every_n_steps: int | None) -> list[ModelCheckpoint]:
        # Two callbacks (Lightning forbids both triggers on one), each keeping one file named
        # last.ckpt: one every N steps, one at the end of every epoch (after validation). Not
        # save_last=True with save_top_k=0: in Lightning 2.6 that writes last.ckpt only on step
        # triggers and at the end of training, never at an epoch's end, and the second callback
        # then writes last-v1.ckpt. No version counter: both overwrite the same file.
        def keep_one(**trigger) -> ModelCheckpoint:
            return ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, save_last=False,
                                   enable_version_counter=False, **trigger)

        epoch_end = keep_one(every_n_epochs=1, save_on_train_epoch_end=True)
        if not every_n_steps:
            return [epoch_end]
        return [keep_one(every_n_train_steps=every_n_steps), epoch_end]

    def _loggers(self, run_dir: Path, cfg) -> list:
        loggers = [AppendingCSVLogger(save_dir=str(run_dir), resume_step=self._resume_step)]
        wandb = cfg.get("wandb")
        mode = getattr(wandb, "mode", None) or (wandb or {}).get("mode", "offline")
        if mode != "disabled":
            from lightning.pytorch.loggers import WandbLogger

            opts = wandb if isinstance(wandb, WandbOptions) else WandbOptions(**dict(wandb or {}))
            dataset = getattr(self.datamodule, "dataset_name", "data")
            method = self.label()
            seed = cfg.get("seed_everything")
            loggers.append(WandbLogger(
                project=opts.project, entity=opts.entity, group=opts.group, save_dir=str(run_dir),
                name=opts.name or f"{method}-{dataset}-seed{seed}", mode=opts.mode,
                tags=[method, dataset, self.model.hparams.backbone, *opts.tags]))
        return loggers

    # -- fit: the run directory, resume, then test (RunRecorder records) -------------------
    def claim_run_dir(self, run_dir: Path, cfg) -> None:
        """A finished run ends here (exit 0, nothing touched); otherwise this process takes the
        run directory's lock (global rank 0 only) and clears it with ``--overwrite``. Done before
        the model is built when ``--run_dir`` is given, else once the data names the default."""
        if getattr(self, "_claimed", None) is not None:
            return
        run_dir = make_run_dir(run_dir)  # a path that cannot be a run directory fails here, in one line
        self._claimed = run_dir
        overwrite = bool(cfg.get("overwrite"))
        results = run_dir / "results.json"
        if not overwrite and cfg.get("ckpt_path") is None and results.is_file():
            print(f"{run_dir} is a finished run: its results are in {results}; nothing to do "
                  "(--overwrite trains it again from scratch)", flush=True)
            raise SystemExit(0)
        if holds_run_lock():
            lock = RunLock(run_dir)
            lock.acquire()
            _HELD_LOCKS.append(lock)
            if overwrite:
                for path in clear_run(run_dir):
                    print(f"--overwrite: removed {path}", flush=True)

    def prepare_run_dir(self) -> None:
        """Before ``fit``'s trainer exists: :meth:`claim_run_dir`, then the checkpoint to resume
        (none with ``--overwrite`` or a ``ckpt_path`` of the user's)."""
        cfg = self._cfg()
        run_dir = self.run_dir()
        self.claim_run_dir(run_dir, cfg)
        self.resume_from: Path | None = None
        if cfg.get("overwrite") or cfg.get("ckpt_path") is not None:
            return
        for folder in (run_dir, run_dir / "checkpoints"):  # leftovers of a hard kill during a save
            for path in remove_stale_temporaries(folder, older_than=_STARTED):
                rank_zero_info(f"removed {path}: an unfinished save of an earlier, killed process")
        # The newest of last.ckpt and the checkpoint Lightning's SLURM plugin saves on SIGUSR1.
        found = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        if found:
            self.resume_from = max(found, key=lambda p: p.stat().st_mtime)
            self._check_resume()

    def _check_resume(self) -> None:
        """Read the checkpoint to resume (memory-mapped: its tensors are not read): its global
        step (metrics.csv keeps the rows before it), and a refusal, before anything in the run
        directory is written, of one whose run-defining config differs from this run's."""
        import torch

        try:
            checkpoint = torch.load(self.resume_from, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # a damaged file is reported when Lightning loads it
            return
        self._resume_step = int(checkpoint.get("global_step", 0))
        refuse_another_run(checkpoint, self.run_config(), self.resume_from)

    def before_fit(self) -> None:
        # Lightning's public setter, read by the selection callback in setup: the checkpoint's
        # selection is applied and no selection pass runs (a path given to fit() is only read
        # after setup). A --ckpt_path of the command line takes the same way.
        cfg = self._cfg()
        if cfg.get("ckpt_path") is not None:
            self.trainer.ckpt_path, cfg["ckpt_path"] = str(cfg["ckpt_path"]), None
        elif self.resume_from is not None:
            self.trainer.ckpt_path = str(self.resume_from)
            rank_zero_info(f"resuming from {self.resume_from}")

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if trainer.interrupted:
            return
        trainer.ckpt_path = None  # validate and test the model as fitted, not a checkpoint
        recorder = next(c for c in trainer.callbacks if isinstance(c, RunRecorder))
        if recorder.val_acc is None:  # resumed at the end of training: nothing was validated
            trainer.validate(model, datamodule=self.datamodule, verbose=False)
        trainer.test(model, datamodule=self.datamodule, verbose=False)  # RunRecorder writes the results


def _plain(value) -> dict[str, Any]:
    """A config section (Namespace, object or dict) as a plain dict."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    return dict(vars(value))


def _as_list(value) -> list:
    """A trainer option that takes one object or a list of them (callbacks, plugins), as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _includes(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """The files a config includes with a top-level ``config:`` key, deepest first, then itself."""
    import yaml

    path = path.resolve()
    if path in seen:
        raise ConfigError(f"--config: include cycle {' -> '.join(map(str, seen + (path,)))}; remove one `config:` key")
    if not path.is_file():
        raise FileNotFoundError(f"--config: file not found: {path}" + (f" (included by {seen[-1]})" if seen else ""))
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config: {path} is not valid YAML ({' '.join(str(err).split())})") from err
    included = content.get("config") if isinstance(content, dict) else None
    files: list[str] = []
    for inc in [included] if isinstance(included, str) else list(included or []):
        files += _includes(path.parent / inc, seen + (path,))
    return files + [str(path)]


def expand_config_includes(args: list[str]) -> list[str]:
    """``--config child.yaml`` -> ``--config base.yaml --config child.yaml`` for every file that
    includes a base with a top-level ``config: base.yaml`` key (paths relative to the file).

    Idempotent: a file whose includes stand right before it already is left as it is, so
    expanding expanded arguments changes nothing.
    """
    return expand_with_files(args)[0]


def expand_with_files(args: list[str]) -> tuple[list[str], list[str]]:
    """:func:`expand_config_includes`' arguments, and the config files they read in order (inline
    YAML left out), relative to the working directory where they lie below it: results.json's
    ``config_files``."""
    out: list[str] = []
    given: list[str] = []  # the config files emitted so far, in order
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args) or arg.startswith("--config="):
            value = args[i + 1] if arg == "--config" else arg.split("=", 1)[1]
            i += 2 if arg == "--config" else 1
            if value.lstrip().startswith("{") or not value.endswith((".yaml", ".yml")):
                out += ["--config", value]  # inline YAML or another format: leave it to the parser
                continue
            files = _includes(Path(value))
            bases = files[:-1]
            if bases and given[-len(bases):] == bases:
                files = files[-1:]
            for path in files:
                out += ["--config", path]
            given += files
            continue
        out.append(arg)
        i += 1
    cwd = Path.cwd().resolve()
    return out, [str(Path(f).relative_to(cwd)) if Path(f).is_relative_to(cwd) else f for f in given]


def _build(cli_class: type[GRFTCLI], args: list[str] | None, run: bool = True) -> GRFTCLI:
    return cli_class(
        PEFTModule,
        ImageClassificationData,
        subclass_mode_data=True,
        parser_class=GRFTArgumentParser,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        parser_kwargs={"parser_mode": "yaml"},
        # The run config is the source of truth; on_load_checkpoint checks method and budget.
        load_from_checkpoint_support=False,
    )


#: The run-directory locks this process holds (released when :func:`cli_main` returns or fails,
#: and at exit).
_HELD_LOCKS: list[RunLock] = []


def release_run_locks() -> None:
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().release()


atexit.register(release_run_locks)


def cli_main(args: list[str] | None = None, run: bool = True) -> GRFTCLI:
    """Run the CLI (``args`` like ``sys.argv[1:]``; tests and in-process sweeps call it). Errors
    propagate; :func:`main` is the command line's entry point. The run directory's lock is
    released when it returns, also on an error."""
    try:
        return _build(GRFTCLI, args, run)
    finally:
        release_run_locks()


def main(args: list[str] | None = None) -> None:
    """``python train.py ...``: :func:`cli_main`, with a user's mistake (bad data, config value,
    checkpoint, missing weights) reported as one ``error: ...`` line on stderr and exit status 1,
    without a traceback (``GRFT_DEBUG=1`` shows it; ``grft_lightning/core/errors.py``)."""
    with report_user_errors():
        cli_main(args)


class _ParserOnly(GRFTCLI):
    """A CLI that builds its parser and stops: nothing parsed, seeded or instantiated."""

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self.config = Namespace(subcommand=None, seed_everything=False)

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def config_parser() -> LightningArgumentParser:
    """The parser of ``train.py``, built without parsing or instantiating anything.

    ``config_parser().parse_args(["fit", "--config", TASK, "--config", METHOD])`` gives the config a
    run would use, includes resolved (what ``--print_config`` prints), in a fraction of a second
    per call once the parser exists. The method as the run builds it, its open budget filled from
    ``model.task_budget``: :func:`grft_lightning.training.budgets.effective_method_config`.
    """
    return _build(_ParserOnly, None).parser


__all__ = ["GRFTCLI", "TaskBudget", "cli_main", "config_parser", "git_sha", "main"]
