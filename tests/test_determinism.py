"""Same seed, ``trainer.deterministic: true``: two runs are bit-identical on the CPU.

The config draws random numbers wherever a run can: SupCon selection (two random views per
image), random-resized-crop + flip augmentation in a loader worker, stochastic depth, shuffled
data order. Runs in-process through the real CLI; a third run with another seed shows that the
comparison can fail.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from grft_lightning.training.cli import cli_main

pytestmark = pytest.mark.slow


@pytest.fixture
def restore_determinism():
    """Lightning's deterministic mode and seeding set process-wide flags: put them back."""
    names = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")
    saved = {name: os.environ.get(name) for name in names}
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _args(run_dir: Path, seed: int) -> list[str]:
    data = {"class_path": "grft_lightning.data.SyntheticImages",
            "init_args": {"num_classes": 4, "n_train": 24, "n_val": 7, "n_test": 9, "batch_size": 8,
                          "num_workers": 1, "augmentation": "fgvc"}}
    return [
        "fit", "--seed_everything", str(seed),
        "--model.backbone", "test_vit", "--model.pretrained", "false", "--model.image_size", "32",
        "--model.drop_path_rate", "0.1",
        "--model.method", json.dumps({"class_path": "grft_lightning.methods.GRFT",
                                      "init_args": {"mode": "row", "rows_per_matrix": 2}}),
        "--data", json.dumps(data),
        "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.deterministic", "true",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0",
        "--selection.loss", "supcon", "--selection.progress", "false", "--wandb.mode", "disabled",
        "--run_dir", str(run_dir),
    ]


def _run(run_dir: Path, seed: int = 0) -> dict:
    from safetensors.torch import load_file

    cli = cli_main(_args(run_dir, seed))
    assert torch.are_deterministic_algorithms_enabled()
    with open(run_dir / "metrics.csv") as handle:
        losses = [row["train/loss"] for row in csv.DictReader(handle) if row.get("train/loss")]
    return {
        "selection": {k: v.clone() for k, v in cli.model.model.state_dict().items() if k.endswith(".index")},
        "tuned": load_file(str(run_dir / "tuned.safetensors")),
        "results": json.loads((run_dir / "results.json").read_text()),
        "losses": losses,
    }


def test_two_runs_with_the_same_seed_are_bit_identical(tmp_path, restore_determinism, one_torch_thread):
    first, second = _run(tmp_path / "a"), _run(tmp_path / "b")
    assert first["selection"] and first["selection"].keys() == second["selection"].keys()
    for key in first["selection"]:
        assert torch.equal(first["selection"][key], second["selection"][key]), key
    assert first["tuned"].keys() == second["tuned"].keys()
    for key in first["tuned"]:
        assert torch.equal(first["tuned"][key], second["tuned"][key]), key
    assert len(first["losses"]) == 6 and first["losses"] == second["losses"]  # every step's loss, as logged
    for key in ("val_acc", "test_acc", "tuned", "counts"):
        assert first["results"][key] == second["results"][key], key

    other = _run(tmp_path / "c", seed=1)
    assert other["losses"] != first["losses"]
