"""The README's commands work as written.

Every command in the README's ``bash`` blocks is listed below, with what this test does with it:
run as written (offline, in seconds), run with ``--print_config`` / ``--dry-run`` appended because
its real work needs prepared data, or skipped with the reason. A command added to the README
without a line here fails the test. The ``python`` blocks of the README and of docs/library.md
run as written (test_vit and a tiny BERT, nothing downloaded).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

AS_WRITTEN = "as written"
PRINT_CONFIG = "with --print_config: training needs the prepared VTAB-1k folder"
DRY_RUN = "with --dry-run: the runs need the prepared VTAB-1k folders"
SKIPPED = {
    "bash scripts/demo.sh": "minutes of set-up and a 30 s fit on the CPU; its config is resolved above "
                            "(configs/demo.yaml --print_config) and the demo data's pipeline is tested elsewhere",
    "bash scripts/test.sh": "the whole test suite, this test included (CI runs it)",
}
COMMANDS = {
    "python train.py fit --config configs/vtab/dtd.yaml": PRINT_CONFIG,
    "python train.py fit --config configs/vtab/dtd.yaml --config configs/methods/gps.yaml": PRINT_CONFIG,
    "python train.py fit --config configs/demo.yaml --print_config": AS_WRITTEN,
    "python -m grft_lightning.experiments.sweep --suite vtab --methods grft_row gps full --seeds 0 1 2 --mode local": DRY_RUN,
    "python -m grft_lightning.experiments.report runs --compare grft_row:random_row grft_row:gps": AS_WRITTEN,
    **SKIPPED,
}


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.S | re.M)


def readme_commands() -> list[str]:
    lines = [re.split(r"\s#\s", line)[0].strip() for block in blocks(ROOT / "README.md", "bash")
             for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def test_every_readme_command_is_listed():
    commands = readme_commands()
    assert "bash scripts/demo.sh" in commands and "bash scripts/test.sh" in commands
    unlisted = [c for c in commands if c not in COMMANDS]
    assert not unlisted, f"README commands this test does not know (add them to COMMANDS): {unlisted}"


def fake_runs(root: Path) -> None:
    """results.json files of three methods on one task, 3 seeds, for the report's command."""
    for method, base in (("grft_row", 80.0), ("random_row", 79.0), ("gps", 81.0)):
        for seed in range(3):
            folder = root / "runs" / "offline" / "mnist_digit" / method / f"seed{seed}"
            folder.mkdir(parents=True)
            record = {"method": method, "dataset": "offline/mnist_digit", "seed": seed,
                      "test_acc": (base + 0.5 * seed) / 100, "tuned_pct": 1.0}
            (folder / "results.json").write_text(json.dumps(record))


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, how in COMMANDS.items() if how not in SKIPPED.values()])
def test_readme_command_runs(command, tmp_path):
    assert command in readme_commands(), f"{command!r} is no longer in the README: drop it here"
    how = COMMANDS[command]
    argv = shlex.split(command)
    argv[0] = sys.executable if argv[0] == "python" else argv[0]
    cwd = ROOT
    if how == PRINT_CONFIG:
        argv.append("--print_config")
    elif how == DRY_RUN:
        argv += ["--dry-run", "--runs-dir", str(tmp_path / "runs")]
    elif "grft_lightning.experiments.report" in command:
        fake_runs(tmp_path)
        cwd = tmp_path
    out = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    if "--print_config" in argv:
        assert "class_path: grft_lightning.methods." in out.stdout
    if "--compare" in command:
        assert "grft_row - random_row" in out.stdout and "grft_row - gps" in out.stdout, out.stdout
    if how == DRY_RUN:
        assert "configs/methods/grft_row.yaml" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("doc, index", [(doc, i) for doc in ("README.md", "docs/library.md")
                                        for i in range(len(blocks(ROOT / doc, "python")))])
def test_python_block_runs(doc, index, tmp_path):
    code = blocks(ROOT / doc, "python")[index]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
