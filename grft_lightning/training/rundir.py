"""The run directory's state: its lock, what defines the run, and starting it over.

**Lock.** One process at a time trains in a run directory. The first start takes
``<run_dir>/run.lock`` (created exclusively; it holds the owner's pid, host, SLURM job and start
time) and removes it when it exits, after an error too. A second start while the owner lives is
refused with one line naming the owner. A lock is *stale*, and taken over with a message, when its
owner is a dead process on this host, or when it was taken by an earlier run of the same SLURM job
(a requeued job keeps its job id, and SLURM runs it once at a time). A lock of another host whose
owner cannot be checked from here is left alone: remove the file by hand once that run is gone.

Under DDP every process runs the same command; only the process of global rank 0, the one with
no rank in its environment (Lightning's launcher, before it starts the other processes) or rank 0
of ``srun``/``torchrun``, takes the lock (:func:`holds_run_lock`).

**What defines a run.** :func:`run_defining_config` keeps, from the parsed config, the values
that change what a run computes: ``seed_everything``, ``model`` (backbone, method, budget,
optimizer, scheduler, learning rates, recipe), ``budget``, ``data`` and ``selection``, and from
``trainer`` the schedule's length and the arithmetic (``max_epochs``, ``max_steps``,
``precision``, ``accumulate_grad_batches``, ``gradient_clip_val``, ``gradient_clip_algorithm``).
Left out: :data:`FREE_KEYS` (loader workers and host memory pinning, the progress bar of the
selection pass, how often the loss is read on the host), and everything else (logging, W&B,
progress bars, checkpoint frequency, the run directory, the label, devices). Every checkpoint
holds it, and a resume with other values is refused naming the keys that differ
(``grft_lightning.training.records.RunRecorder``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from grft_lightning.core.errors import RunDirectoryBusy

LOCK_NAME = "run.lock"

#: Sections of the config that define the run (all their keys but :data:`FREE_KEYS`).
DEFINING_SECTIONS = ("seed_everything", "model", "budget", "data", "selection")
#: Trainer options that define the run.
DEFINING_TRAINER_KEYS = ("max_epochs", "max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val",
                         "gradient_clip_algorithm")
#: Keys inside the defining sections that may change between the segments of a run.
FREE_KEYS = ("data.init_args.num_workers", "data.init_args.pin_memory", "selection.progress",
             "model.check_finite_every_n_batches")


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def run_defining_config(config: dict[str, Any]) -> dict[str, Any]:
    """The values of ``config`` (one subcommand's config as plain data) that define the run,
    flattened to dotted keys (module docstring)."""
    flat: dict[str, Any] = {}
    _flatten(config, "", flat)
    keep = {}
    for key, value in flat.items():
        section = key.split(".", 1)[0]
        if key in FREE_KEYS:
            continue
        if section in DEFINING_SECTIONS or (section == "trainer" and key.split(".", 1)[-1] in DEFINING_TRAINER_KEYS):
            keep[key] = json.loads(json.dumps(value, default=str))  # plain data: loadable weights-only
    return keep


def differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two :func:`run_defining_config` results."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def holds_run_lock() -> bool:
    """Whether this process is the one that takes the run directory's lock: global rank 0, or a
    process without a rank in its environment (module docstring)."""
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(variable)
        if value not in (None, "", "0"):
            return False
    return True


def _slurm_job() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job is None:
        return None
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if task and os.environ.get("SLURM_ARRAY_JOB_ID") else job


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``<run_dir>/run.lock`` held by this process (module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self, owner: dict[str, Any]) -> str | None:
        """Why the lock of ``owner`` is stale, or None if it may be live."""
        host, pid = owner.get("host"), owner.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            return f"its process {pid} on {host} is gone"
        job = _slurm_job()
        if job is not None and owner.get("slurm_job") == job and pid != os.getpid():
            return f"it was taken by an earlier run of this SLURM job ({job})"
        if not owner:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "it is gone"
            # empty for a moment while its owner writes it; for longer, a start killed then
            return "it is unreadable (a start killed while writing it)" if age > 10 else None
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": _slurm_job(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                why = self._stale(owner)
                if why is None:
                    raise RunDirectoryBusy(
                        f"{self.path.parent} is in use by process {owner.get('pid')} on {owner.get('host')} "
                        f"(started {owner.get('started')}; {self.path}); wait for it to end, or give this run "
                        "another --run_dir. If that process is gone, delete the lock file.") from None
                print(f"taking over {self.path}: {why}", flush=True)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(record) + "\n")
            self.held = True
            return
        raise RunDirectoryBusy(f"{self.path}: another process took the lock at the same time; "
                               "give this run another --run_dir")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._owner().get("pid") == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


#: What ``--overwrite`` removes from a run directory before training starts over.
RUN_OUTPUTS = ("results.json", "tuned.safetensors", "metrics.csv", "hparams.yaml", "selection.png", "checkpoints")


def clear_run(run_dir: str | os.PathLike) -> list[Path]:
    """Remove a run's outputs (:data:`RUN_OUTPUTS` and SLURM's ``hpc_ckpt_*.ckpt``); returns them."""
    run_dir = Path(run_dir)
    removed = []
    for path in [*(run_dir / name for name in RUN_OUTPUTS), *run_dir.glob("hpc_ckpt_*.ckpt")]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed
