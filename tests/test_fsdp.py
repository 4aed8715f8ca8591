"""FSDP with GRFT deltas, as far as it runs on the CPU (docs/cluster.md, "A larger backbone with FSDP").

Lightning's ``FSDPStrategy`` and torch's ``FullyShardedDataParallel`` (FSDP1, which it wraps) do not
run on the CPU: the first refuses a CPU accelerator, the second needs an accelerator device. What
runs here is torch's FSDP2 (``fully_shard``) in 2 CPU processes with gloo (``tests/fsdp_probe.py``):
it checks that our delta modules shard, train and resume under FSDP; the CLI's FSDP path stays
untested (docs/cluster.md says so).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_runs import run_env

TESTS = Path(__file__).resolve().parent


def test_lightning_fsdp_strategy_refuses_the_cpu():
    """Why the CLI's FSDP path is untested here; when this starts to fail, test that path on the CPU."""
    import lightning as L

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy="fsdp", logger=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_grft_deltas_under_fsdp2_on_two_cpu_processes(tmp_path):
    # the repository root first on the path: this checkout's package, whatever else is installed
    env = run_env(PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    done = subprocess.run([sys.executable, str(TESTS / "fsdp_probe.py"), str(tmp_path), str(_free_port())],
                          env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    first = ranks[0]

    # the selection: made, and identical on both ranks
    rows = {k: v for k, v in first["selection"].items() if k.endswith(".index")}
    assert len(rows) == 24 and any(v.any() for v in rows.values())  # 6 blocks x qkv, proj, fc1, fc2
    for key, value in first["selection"].items():
        assert torch.equal(value, ranks[1]["selection"][key]), key

    # only the deltas (with the biases and the head GRFT tunes) require gradients, and exactly they move
    trainable = set(first["trainable"])
    assert {name for name in trainable if name.endswith(".delta")} and all(
        name.endswith((".delta", ".bias")) or name.startswith("head.") for name in trainable), sorted(trainable)
    assert not [name for name in trainable if name.endswith("base_layer.weight")]
    moved = {name for name in first["before"] if not torch.equal(first["before"][name], first["after"][name])}
    assert moved == trainable
    frozen = [name for name in first["before"] if name.endswith("base_layer.weight")]
    assert len(frozen) == 24 and not moved & set(frozen)

    # the ranks hold the same model after training
    for name, value in first["continued"].items():
        assert torch.equal(value, ranks[1]["continued"][name]), name

    # a checkpoint saved under FSDP resumes: every tensor and the selection come back, and the
    # next step (AdamW moments included) is the one the uninterrupted model takes
    for rank in ranks:
        assert rank["selected_layers"] and len(rank["selected_layers"]) == 24
        for name, value in rank["after"].items():
            assert torch.equal(rank["restored"][name], value), name
        for name, value in rank["continued"].items():
            assert torch.equal(rank["resumed"][name], value), name
