"""The benchmarks: a package run from the repository root, no ``sys.path`` edits::

    python -m benchmarks.cost --small --out /tmp/cost        # the training-step cost per method
    bash scripts/gpu_check.sh                                # python -m benchmarks.gpu_check
    python -m benchmarks.saved_activations --model test_vit --batch 2

Their methods come from the method registry (``configs/methods/<method>.yaml``) with the
benchmark's own budgets on top (:func:`benchmarks.cost.method_config`); their optimizer groups and
losses are the package's. The performance targets are in one file, ``benchmarks/targets.yaml``
(:func:`targets`).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = HERE / "targets.yaml"


def targets(table: str | None = None) -> dict:
    """``benchmarks/targets.yaml``: every table of targets, or the one named ``table``
    (``cpu_vit_b16``, ``cpu_cnn``, ``gpu_vit_b16``)."""
    import yaml

    loaded = yaml.safe_load(TARGETS.read_text())
    return loaded if table is None else dict(loaded[table])
