"""Launch a grid of runs (task configs x method configs x seeds) locally, on SLURM or with W&B.

    python -m grft_lightning.experiments.sweep --suite vtab|fgvc|offline|CONFIG.yaml ... --methods grft_row gps \\
        --seeds 0 1 2 --runs-dir runs --mode local|inprocess|slurm|wandb [--dry-run] \\
        [--methods-dir configs/methods] [--extra "--trainer.max_epochs 1" ...]

Every run is one command, run from the repository root:

    python train.py fit --config TASK --config METHOD --label <method> --seed_everything SEED \\
        --run_dir RUNS/<suite>/<task>/<method>/seed<SEED> [extra ...]

``<method>`` is the method config's file name: the run directory, results.json's ``method`` and
the report's row all carry it.

- Suites: ``vtab`` is ``configs/vtab/<task>.yaml`` for the 19 VTAB-1k tasks, ``fgvc`` the 5 FGVC
  datasets under ``configs/fgvc/``, any other name every ``configs/<name>/*.yaml`` except
  ``base.yaml``; a path to a YAML file is a single task whose suite is its folder's name.
- Methods: ``<methods-dir>/<name>.yaml`` (default ``configs/methods/``; a suite with its own
  recipes passes e.g. ``--methods-dir configs/offline/methods``), or a path to a YAML file.
- A run is done when ``<run_dir>/results.json`` holds a JSON object (:func:`results_done`); done
  runs are skipped in every mode, so a sweep can be launched again after a failure or a
  preemption. A truncated or unreadable results.json is not done: the run is launched again (it
  resumes from its last checkpoint and writes the file anew).
- ``--extra`` strings are split like a shell line and appended to every command; pass one that
  starts with ``--`` and has no space as ``--extra=--trainer.fast_dev_run=true``.

Modes:
- ``local``: runs the pending runs one after the other (same Python interpreter), prints each run
  directory and its status, goes on after a failure, and exits non-zero if any run failed. A run
  that exits 0 without writing results.json counts as failed.
- ``inprocess``: like ``local``, but every run is a call of ``grft_lightning.training.cli.cli_main`` in
  this process, which saves the start-up of one interpreter per run (imports: seconds on a
  small CPU machine; the offline suite runs 81 short runs this way). Between runs it restores
  the global state a run may change (current directory, grad mode, default dtype, torch
  threads, an open W&B run) and frees the run. A run that raises counts as failed and the sweep
  goes on. Runs share the process, so pass ``--extra "--wandb.mode disabled"`` unless each run
  must log to W&B (each W&B run is finished before the next starts). ``--workers N`` runs N
  such processes side by side, each on every N-th pending run with ``cpu_count // N`` torch
  threads (on a small shared CPU machine, N one-thread processes beat one N-thread process).
- ``slurm``: writes a job-array script (one index per pending run) and its runs list under
  ``RUNS/slurm/`` and prints the ``sbatch`` command.
- ``wandb``: writes a grid sweep YAML under ``RUNS/wandb/`` and prints the ``wandb sweep`` and
  ``wandb agent`` commands. W&B passes grid values as ``--name=value``, which ``train.py`` cannot
  take as two ``--config`` files, so each agent run goes through ``python -m grft_lightning.experiments.sweep
  agent-run``, which builds the command above (and skips done runs) and then executes train.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

import yaml

from grft_lightning.experiments.tables import FGVC_DATASETS, VTAB_COLUMNS

REPO_ROOT = Path(__file__).resolve().parents[2]
KNOWN_SUITES = {"vtab": VTAB_COLUMNS, "fgvc": FGVC_DATASETS}


class SweepError(ValueError):
    """A sweep that cannot be planned (missing configs); the message says what to do."""


@dataclass(frozen=True)
class Run:
    """One (task config, method config, seed); paths are relative to the repository root."""

    suite: str
    task: str
    method: str
    seed: int
    task_config: str
    method_config: str
    run_dir: str
    extra: tuple[str, ...] = ()

    @property
    def args(self) -> list[str]:
        """Arguments after ``train.py``. ``--label`` is the method config's file name, so that the
        run directory, results.json's ``method`` and the report's row carry the same name."""
        return ["fit", "--config", self.task_config, "--config", self.method_config, "--label", self.method,
                "--seed_everything", str(self.seed), "--run_dir", self.run_dir, *self.extra]

    def command(self, python: str = sys.executable, train_script: str = "train.py") -> list[str]:
        return [python, train_script, *self.args]

    def done(self, root: Path = REPO_ROOT) -> bool:
        return results_done(Path(root) / self.run_dir / "results.json")


def results_done(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finished run's results.json: a file that parses as a JSON object.
    A missing, truncated or unreadable file (or one holding another JSON value) is not."""
    try:
        with open(path, encoding="utf-8") as handle:
            return isinstance(json.load(handle), dict)
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (commands stay portable), else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def _find(path: str, root: Path) -> Path | None:
    for candidate in (Path(root) / path, Path(path)):
        if candidate.is_file():
            return candidate
    return None


def suite_configs(suite: str, root: Path = REPO_ROOT) -> list[tuple[str, str, Path]]:
    """(suite, task, config path) for every task of ``suite`` (a name or a YAML path)."""
    if suite.endswith((".yaml", ".yml")):
        path = _find(suite, root)
        if path is None:
            raise SweepError(f"--suite {suite}: no such config file (looked in {root} and .)")
        return [(path.resolve().parent.name, path.stem, path)]
    folder = Path(root) / "configs" / suite
    if "/" in suite or os.sep in suite:  # a folder of task configs
        folder = next((p for p in (Path(root) / suite, Path(suite)) if p.is_dir()), folder)
        suite = folder.resolve().name
    if suite in KNOWN_SUITES:
        paths = [folder / f"{task}.yaml" for task in KNOWN_SUITES[suite]]
        missing = [_rel(p, root) for p in paths if not p.is_file()]
        if len(missing) == len(paths):
            raise SweepError(f"suite {suite!r} has no configs: expected {folder}/<task>.yaml "
                             f"for {', '.join(KNOWN_SUITES[suite])}")
        if missing:
            raise SweepError(f"suite {suite!r} lacks {', '.join(missing)}; write them or pass "
                             "the task configs you have as --suite paths")
    else:
        paths = sorted(p for p in folder.glob("*.yaml") if p.name != "base.yaml")
        if not paths:
            others = sorted(p.name for p in (Path(root) / "configs").glob("*")
                            if p.is_dir() and p.name != "methods")
            raise SweepError(f"suite {suite!r} has no configs: {folder}/*.yaml matched no task "
                             f"(base.yaml is not one); suites with a folder: {others}")
    return [(suite, path.stem, path) for path in paths]


def method_config(name: str, root: Path = REPO_ROOT, methods_dir: str | Path = "configs/methods") -> Path:
    """``<methods_dir>/<name>.yaml`` (relative to ``root``), or ``name`` itself when it is a YAML path."""
    if name.endswith((".yaml", ".yml")):
        path = _find(name, root)
        if path is None:
            raise SweepError(f"--methods {name}: no such config file (looked in {root} and .)")
        return path
    path = Path(root) / methods_dir / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SweepError(f"method {name!r}: {path} not found; available in {path.parent}: "
                         f"{', '.join(available) or 'none'}")
    return path


def make_run(suite: str, task: str, task_config: Path, method: Path, seed: int,
             runs_dir: str | Path, extra: tuple[str, ...], root: Path) -> Run:
    run_dir = Path(runs_dir).resolve() / suite / task / method.stem / f"seed{seed}"
    return Run(suite, task, method.stem, int(seed), _rel(task_config, root), _rel(method, root),
               _rel(run_dir, root), tuple(extra))


def plan_runs(suites: list[str], methods: list[str], seeds: list[int],
              runs_dir: str | Path = "runs", extra: list[str] | tuple[str, ...] = (),
              root: Path = REPO_ROOT, methods_dir: str | Path = "configs/methods") -> list[Run]:
    """Every (task, method, seed) in order: tasks outermost, then methods, then seeds.

    A relative ``runs_dir`` is taken from the current directory. Raises ``SweepError`` naming
    the missing config file.
    """
    tasks = [entry for suite in suites for entry in suite_configs(suite, root)]
    method_paths = [method_config(name, root, methods_dir) for name in methods]
    runs = [make_run(suite, task, path, method, seed, runs_dir, tuple(extra), root)
            for (suite, task, path), method, seed in itertools.product(tasks, method_paths, seeds)]
    return list(dict.fromkeys(runs))  # the same config given twice runs once


def pending(runs: list[Run], root: Path = REPO_ROOT) -> list[Run]:
    """The runs that are not done (no readable results.json)."""
    return [run for run in runs if not run.done(root)]


def _run_each(runs: list[Run], root: Path, execute, show, label: str = "") -> int:
    """Run the pending runs in turn with ``execute(run) -> exit code``; returns the failures.

    ``show(run)`` is the command printed for a run; ``label`` prefixes every line. A run that
    returns 0 without writing a readable results.json counts as failed.
    """
    failed, skipped, start = [], 0, time.perf_counter()
    for index, run in enumerate(runs, 1):
        tag = f"[{label}{index}/{len(runs)}]"
        if run.done(root):
            print(f"{tag} skip {run.run_dir} (results.json exists)", flush=True)
            skipped += 1
            continue
        print(f"{tag} run {run.run_dir}\n  {show(run)}", flush=True)
        began, cpu = time.perf_counter(), _cpu_seconds()
        code = execute(run)
        if code == 0 and not run.done(root):
            status = "failed (exit 0 but no readable results.json)"
        else:
            status = "ok" if code == 0 else f"failed (exit {code})"
        print(f"{tag} {run.run_dir}: {status} ({time.perf_counter() - began:.1f} s, "
              f"{_cpu_seconds() - cpu:.1f} CPU s)", flush=True)
        if status != "ok":
            failed.append((run, status))
    ran = len(runs) - skipped
    print(f"{label}sweep: {len(runs)} runs, {skipped} skipped, {ran - len(failed)} ok, "
          f"{len(failed)} failed ({time.perf_counter() - start:.0f} s)")
    for run, status in failed:
        print(f"  {status}: {run.run_dir}\n    {show(run)}")
    return len(failed)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (on a shared machine the wall time
    of a run depends on the others' load; its CPU time much less)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_local(runs: list[Run], root: Path = REPO_ROOT, python: str = sys.executable,
              train_script: str = "train.py") -> int:
    """Run every pending run in turn, one process each; returns the number of failed runs."""
    return _run_each(runs, root, lambda run: subprocess.run(run.command(python, train_script), cwd=root).returncode,
                     lambda run: shlex.join(run.command(python, train_script)))


def run_inprocess(runs: list[Run], root: Path = REPO_ROOT, workers: int = 1, label: str = "") -> int:
    """Run every pending run through ``cli_main`` in this process, or spread over ``workers``
    processes (worker ``i`` takes runs ``i, i + workers, ...``); returns the failures."""
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        shards = [runs[i::workers] for i in range(workers)]
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter, no forked torch state
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_inprocess_worker, shard, root, threads, f"w{i} ")
                       for i, shard in enumerate(shards) if shard]
            failed = sum(future.result() for future in futures)
        print(f"sweep: {len(runs)} runs over {workers} workers, {failed} failed")
        return failed
    return _run_each(runs, root, lambda run: _call_cli(run, root),
                     lambda run: shlex.join(["cli_main", *run.args]), label)


def _inprocess_worker(runs: list[Run], root: Path, threads: int, label: str) -> int:
    import torch

    torch.set_num_threads(threads)
    return run_inprocess(runs, root, 1, label)


def _call_cli(run: Run, root: Path) -> int:
    """One run through ``cli_main(run.args)`` from ``root``; 0 or 1 (the error is printed)."""
    import gc
    import traceback

    import torch

    from grft_lightning.training.cli import cli_main

    cwd, grad, dtype, threads = os.getcwd(), torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_num_threads()
    code = 0
    try:
        os.chdir(root)
        cli_main(run.args)
    except SystemExit as exit_:  # the argument parser exits on a bad config
        code = exit_.code if isinstance(exit_.code, int) and exit_.code else 1
    except Exception:  # noqa: BLE001 -- one failed run must not stop the sweep
        traceback.print_exc()
        code = 1
    finally:
        os.chdir(cwd)
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()  # else the next run's WandbLogger would log into this one
        gc.collect()
    return code


class _Script(Template):
    delimiter = "@@"  # bash uses $ and ${...}


SBATCH_ARRAY = _Script("""#!/bin/bash
# Job array written by `python -m grft_lightning.experiments.sweep --mode slurm`: array index i runs line i+1
# of RUNS_FILE (a run directory, then the train.py arguments, shell-quoted).
#SBATCH --job-name=@@name
#SBATCH --array=0-@@last@@throttle
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=@@gpus
#SBATCH --gres=gpu:@@gpus
#SBATCH --cpus-per-task=@@cpus
#SBATCH --time=@@time
#SBATCH --output=@@logs/%A_%a.out
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
@@options
# Lightning detects SLURM by itself (SLURMEnvironment). On SIGUSR1, 90 s before the time limit,
# it saves an hpc checkpoint and requeues this array task; the requeued task runs the same line,
# and the fit resumes from <run_dir>/checkpoints/last.ckpt. A finished run is skipped.
set -euo pipefail
cd @@root
RUNS_FILE=@@runs_file
PYTHON="${PYTHON:-@@python}"
LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$RUNS_FILE")
eval "ARGS=($LINE)"
RUN_DIR="${ARGS[0]}"
# Done: results.json holds a JSON object (sweep.results_done); a truncated one is run again.
if "$PYTHON" -c 'import json, sys; sys.exit(0 if isinstance(json.load(open(sys.argv[1])), dict) else 1)' \
        "$RUN_DIR/results.json" 2>/dev/null; then
    echo "skip $RUN_DIR (results.json exists)"
    exit 0
fi
# Lightning requires --ntasks-per-node to equal the devices per node.
srun "$PYTHON" train.py "${ARGS[@]:1}" @@trainer
""")


def write_slurm(runs: list[Run], out_dir: Path, root: Path = REPO_ROOT, gpus: int = 1,
                cpus: int = 8, time_limit: str = "12:00:00", partition: str | None = None,
                max_parallel: int | None = None, options: list[str] = (),
                python: str = sys.executable) -> tuple[Path, Path]:
    """Write ``<name>.sbatch`` and ``<name>.runs`` for ``runs``; returns both paths."""
    out_dir = Path(out_dir)
    name = time.strftime("sweep-%Y%m%d-%H%M%S")
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    runs_file, script = out_dir / f"{name}.runs", out_dir / f"{name}.sbatch"
    runs_file.write_text("".join(shlex.join([run.run_dir, *run.args]) + "\n" for run in runs))
    lines = ([f"#SBATCH --partition={partition}"] if partition else [])
    lines += [f"#SBATCH {option}" for option in options]
    trainer = f"--trainer.devices {gpus} --trainer.num_nodes 1"
    if gpus > 1:
        trainer += " --trainer.strategy ddp"
    script.write_text(SBATCH_ARRAY.substitute(
        name=name, last=len(runs) - 1, throttle=f"%{max_parallel}" if max_parallel else "",
        gpus=gpus, cpus=cpus, time=time_limit, logs=shlex.quote(str((out_dir / "logs").resolve())),
        options="\n".join(lines), root=shlex.quote(str(Path(root).resolve())),
        runs_file=shlex.quote(str(runs_file.resolve())), python=python, trainer=trainer))
    return script, runs_file


def write_wandb(runs: list[Run], path: Path, runs_dir: str) -> Path:
    """A W&B grid sweep over task config x method config x seed; returns the YAML path."""
    values = lambda attr: list(dict.fromkeys(getattr(run, attr) for run in runs))  # noqa: E731
    extra = list(runs[0].extra) if runs else []
    sweep = {
        "program": "train.py",
        "name": Path(path).stem,
        "method": "grid",
        "parameters": {"task_config": {"values": values("task_config")},
                       "method_config": {"values": values("method_config")},
                       "seed": {"values": values("seed")}},
        # train.py takes two --config files, which W&B's ${args} cannot express; agent-run
        # builds the real command (see the module docstring).
        "command": ["${env}", "${interpreter}", "-m", "grft_lightning.experiments.sweep", "agent-run",
                    "--runs-dir", runs_dir, "${args}", "--", *extra],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(sweep, sort_keys=False))
    return Path(path)


def agent_command(argv: list[str], root: Path = REPO_ROOT) -> tuple[Run, list[str]]:
    """The run and train.py command for ``agent-run --runs-dir R --task_config=T ... -- extra``."""
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m grft_lightning.experiments.sweep agent-run")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--task_config", required=True)
    parser.add_argument("--method_config", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--train-script", default="train.py")
    args = parser.parse_args(argv)
    [(suite, task, path)] = suite_configs(args.task_config, root)
    run = make_run(suite, task, path, method_config(args.method_config, root), args.seed,
                   Path(root) / args.runs_dir, tuple(extra), root)
    return run, run.command(sys.executable, args.train_script)


def _agent_run(argv: list[str]) -> int:
    run, command = agent_command(argv)
    if run.done():
        print(f"skip {run.run_dir} (results.json exists)")
        return 0
    print(shlex.join(command), flush=True)
    os.chdir(REPO_ROOT)
    os.execv(command[0], command)  # the agent then watches (and can stop) train.py itself
    return 1  # not reached


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grft_lightning.experiments.sweep", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", required=True,
                        help="vtab, fgvc, offline (any folder under configs/), a folder of "
                             "task configs, or task YAML paths")
    parser.add_argument("--methods", nargs="+", required=True,
                        help="names of <methods-dir>/<name>.yaml, or YAML paths")
    parser.add_argument("--methods-dir", default="configs/methods",
                        help="folder of the method configs named by --methods (relative to --root)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--runs-dir", default="runs", help="root of the run directories")
    parser.add_argument("--mode", choices=["local", "inprocess", "slurm", "wandb"], default="local",
                        help="local: one train.py process per run; inprocess: every run in this "
                             "process (no start-up per run); slurm, wandb: write a job array / sweep")
    parser.add_argument("--workers", type=int, default=1,
                        help="inprocess mode: processes running runs side by side")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the planned commands; run and write nothing")
    parser.add_argument("--extra", action="append", default=[],
                        help="arguments appended to every run (repeatable), e.g. "
                             "--extra \"--trainer.max_epochs 1\"")
    parser.add_argument("--train-script", default="train.py",
                        help="script run with the arguments above (local mode)")
    parser.add_argument("--root", type=Path, default=REPO_ROOT,
                        help="repository root: configs are found and runs started there")
    slurm = parser.add_argument_group("slurm mode")
    slurm.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per run (one node)")
    slurm.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per task")
    slurm.add_argument("--slurm-time", default="12:00:00")
    slurm.add_argument("--slurm-partition")
    slurm.add_argument("--slurm-max-parallel", type=int, help="array throttle (%%N)")
    slurm.add_argument("--sbatch-option", action="append", default=[],
                       help="extra #SBATCH line, e.g. --sbatch-option=--account=abc")
    parser.add_argument("--wandb-project", default="grft-lightning")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["agent-run"]:
        return _agent_run(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    extra = [token for text in args.extra for token in shlex.split(text)]
    try:
        runs = plan_runs(args.suite, args.methods, args.seeds, args.runs_dir, extra, args.root,
                         args.methods_dir)
    except SweepError as err:
        parser.error(str(err))
    todo = pending(runs, args.root)
    print(f"{len(runs)} runs planned: {len(runs) - len(todo)} done, {len(todo)} pending")
    if args.dry_run:
        for run in runs:
            state = "done" if run.done(args.root) else "todo"
            print(f"{state} {shlex.join(run.command(sys.executable, args.train_script))}")
        return 0
    if args.mode == "local":
        if not (args.root / args.train_script).is_file():
            parser.error(f"{args.root / args.train_script} not found; pass --train-script")
        return 1 if run_local(runs, args.root, sys.executable, args.train_script) else 0
    if args.mode == "inprocess":
        if args.workers < 1:
            parser.error(f"--workers must be >= 1, got {args.workers}")
        return 1 if run_inprocess(runs, args.root, args.workers) else 0
    if not todo:
        print("nothing to launch: every run has its results.json")
        return 0
    out = Path(args.runs_dir) / args.mode
    if args.mode == "slurm":
        script, runs_file = write_slurm(
            todo, out, args.root, args.slurm_gpus, args.slurm_cpus, args.slurm_time,
            args.slurm_partition, args.slurm_max_parallel, args.sbatch_option)
        print(f"wrote {script} and {runs_file} ({len(todo)} array tasks); submit with:\n"
              f"  sbatch {script}")
        return 0
    path = write_wandb(runs, out / time.strftime("sweep-%Y%m%d-%H%M%S.yaml"),
                       _rel(Path(args.runs_dir).resolve(), args.root))
    print(f"wrote {path} ({len(runs)} grid points, {len(todo)} pending; done ones are skipped)."
          f"\nFrom {args.root}:\n  wandb sweep --project {args.wandb_project} {path}\n"
          f"  wandb agent --count {len(todo)} <entity>/{args.wandb_project}/<sweep id>"
          "   # once per GPU or machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
