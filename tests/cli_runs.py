"""Helpers for tests that run ``python train.py fit`` in a subprocess (not a test module).

The runs are tiny (timm ``test_vit`` at 32x32, :class:`SyntheticImages`, CPU, one intra-op
thread per process) and carry :class:`rank_probe.RankProbe`, whose per-rank files the tests read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def fit_command(run_dir: Path, *extra: str, devices: int = 1, epochs: int = 2, n_train: int = 32, n_val: int = 15,
                n_test: int = 15, batch_size: int = 8, probe: dict | None = None) -> list[str]:
    """``train.py fit`` for a tiny GRFT run; ``devices > 1`` runs DDP on CPU (gloo)."""
    data = {"class_path": "grft_lightning.data.SyntheticImages",
            "init_args": {"num_classes": 4, "n_train": n_train, "n_val": n_val, "n_test": n_test,
                          "batch_size": batch_size, "num_workers": 0}}
    probe_cfg = {"class_path": "rank_probe.RankProbe", "init_args": {"out_dir": str(run_dir / "probe"), **(probe or {})}}
    return [
        sys.executable, str(REPO / "train.py"), "fit",
        "--model.backbone", "test_vit", "--model.pretrained", "false", "--model.image_size", "32",
        "--model.method", json.dumps({"class_path": "grft_lightning.methods.GRFT",
                                      "init_args": {"mode": "row", "rows_per_matrix": 2}}),
        "--data", json.dumps(data),
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        *(["--trainer.strategy", "ddp"] if devices > 1 else []),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0",
        "--selection.loss", "ce", "--selection.progress", "false", "--wandb.mode", "disabled",
        "--run_dir", str(run_dir), "--trainer.callbacks", json.dumps(probe_cfg),
        *extra,
    ]


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONWARNINGS="ignore")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"):
        env.pop(key, None)  # a test process inside another launcher must not pass its own rank on
    env.update(extra)
    return env


def start(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start ``command`` with its output in ``log`` (appended to); ``env``: extra variables."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        return subprocess.Popen(command, cwd=REPO, env=run_env(**env), stdout=handle, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    """Wait for ``process``; on failure the assertion shows the end of its log."""
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"timed out after {timeout} s:\n{log.read_text()[-4000:]}")
    assert code == 0, f"exit code {code}:\n{log.read_text()[-4000:]}"


def fit(run_dir: Path, *extra: str, timeout: float = 400, **kwargs) -> dict:
    """Run one fit to the end; returns its results.json."""
    log = run_dir.parent / f"{run_dir.name}.log"
    finish(start(fit_command(run_dir, *extra, **kwargs), log), log, timeout)
    return json.loads((run_dir / "results.json").read_text())


def probe_facts(run_dir: Path, rank: int = 0) -> dict:
    return torch.load(run_dir / "probe" / f"rank{rank}.pt", weights_only=False)


def saved_selection(run_dir: Path) -> dict[str, torch.Tensor]:
    """``{layer: int indices}`` from the run's tuned.safetensors."""
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir / "tuned.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("selection/") and k.endswith("/index")}


def tuned_values(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "tuned.safetensors"))
