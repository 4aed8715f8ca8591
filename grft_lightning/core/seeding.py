"""The run's seed, as every part that draws from it reads it."""

from __future__ import annotations

import os


def run_seed() -> int:
    """The seed of the run: ``seed_everything``'s value, which Lightning keeps in the environment
    variable ``PL_GLOBAL_SEED`` (the same on every DDP rank and in loader workers); 0 outside a
    seeded run. The data order, the selection batches, per-rank reseeding and the random-rows
    draw all start from it."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
