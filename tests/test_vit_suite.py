"""The ViT testbed suite's one command, in its tiny CI form (TINY=1): the committed weights, the real
task and method configs, the sweep, the report with its paired comparison, and the markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grft_lightning.core.paths import resolve_path
from grft_lightning.core.testbed import WEIGHTS

REPO = Path(__file__).resolve().parents[1]


def test_committed_weights_match_their_card():
    import hashlib

    card = json.loads((REPO / "docs" / "testbed_card.json").read_text())
    path = resolve_path(WEIGHTS)
    assert Path(path).resolve() == (REPO / card["weights"]).resolve()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == card["sha256"]
    assert os.path.getsize(path) == card["bytes"] < 25 * 2**20


@pytest.mark.slow
def test_tiny_suite_end_to_end(tmp_path):
    env = {**os.environ, "TINY": "1", "RUNS": str(tmp_path / "runs"), "OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/vit_suite.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "vit_suite.json").read_text())
    cells = {(r["task"], r["method"]) for r in rows}
    methods = {"linear", "grft_row", "random_row"}  # the method configs' names, as in results.json
    assert cells == {(t, m) for t in ("mnist_digit", "mnistm", "Mean") for m in methods}
    for row in rows:
        assert set(row) >= {"task", "method", "acc_mean", "acc_std", "tuned_pct", "seeds", "acc_per_seed"}
        assert row["seeds"] == [0, 1] and 0.0 <= row["acc_mean"] <= 1.0 and row["tuned_pct"] > 0
    compared = json.loads((tmp_path / "out" / "vit_suite_compare.json").read_text())
    assert {(c["a"], c["b"], c["task"]) for c in compared} == {
        ("grft_row", "random_row", t) for t in ("mnist_digit", "mnistm", "Mean")}
    assert all(c["n"] == 2 for c in compared)
    text = (tmp_path / "out" / "vit_suite.md").read_text()
    assert "| grft_row - random_row | mnistm | 2 |" in text and "Wall time of this invocation" in text
    for run in (tmp_path / "runs").rglob("results.json"):
        assert json.loads(run.read_text())["backbone"] == "vit_convstem_w128d6_32.glyphs62"
