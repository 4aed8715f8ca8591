"""A test-only callback that records what each process of a run did (not a test module).

Passed to the real CLI with ``--trainer.callbacks '{"class_path": "rank_probe.RankProbe", ...}'``
(``tests/`` on ``PYTHONPATH``). Every process writes its own files under ``out_dir``:

* ``rank<r>.pt``: the selection buffers when training starts, a fingerprint of every training
  sample read (per step) and the RNG seed at each epoch's first step, the tuned tensors when fit ends,
  the number of validation/test samples and correct predictions this rank saw (per validation
  epoch, and for the test) and the same figures summed over ranks;
* ``writes_rank<r>.txt``: one line per file this rank wrote through ``grft_lightning.core.io.atomic_path``
  (checkpoints, ``results.json``, ``tuned.safetensors``), with the global step at that moment.

With ``hang_at_step`` (or the environment variable ``RANK_PROBE_HANG_AT_STEP``, so that the
command line of a run and of its restart can be the same) the process writes
``hanging_rank<r>`` at the end of that optimizer step (before that step's checkpoint, since
Lightning runs checkpoint callbacks last) and then waits for the test to kill it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import lightning as L
import torch

SELECTION_KEYS = (".index",)


class RankProbe(L.Callback):
    """Record per-rank facts of a run (see the module docstring).

    Args:
        out_dir: folder for the per-rank files.
        hang_at_step: stop making progress after this optimizer step (None: never).
    """

    def __init__(self, out_dir: str, hang_at_step: int | None = None):
        self.out_dir = Path(out_dir)
        env = os.environ.get("RANK_PROBE_HANG_AT_STEP")
        self.hang_at_step = hang_at_step if hang_at_step is not None else (int(env) if env else None)
        self.facts: dict = {"val": [], "test": None}
        self._counts: torch.Tensor | None = None
        self._rank = 0
        self._trainer: L.Trainer | None = None

    # -- files written by this process ------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank
        self._trainer = trainer
        self.out_dir.mkdir(parents=True, exist_ok=True)
        import grft_lightning.methods.export as export
        import grft_lightning.core.io as io

        if getattr(io.atomic_path, "_probed", False):
            return
        original = io.atomic_path
        log = self.out_dir / f"writes_rank{self._rank}.txt"
        probe = self

        @contextlib.contextmanager
        def recorded(path):
            with original(path) as tmp:
                yield tmp
            step = probe._trainer.global_step if probe._trainer is not None else -1
            with open(log, "a") as handle:
                handle.write(f"{step}\t{path}\n")

        recorded._probed = True
        io.atomic_path = recorded
        export.atomic_path = recorded

    # -- selection and tuned tensors ----------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.facts["selection"] = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()
                                   if k.endswith(SELECTION_KEYS)}
        self._dump()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Which samples this step reads (a fingerprint per sample), and the RNG seed in force.
        images, labels = batch
        prints = images.double().flatten(1).sum(1).mul(1000).round().long().tolist()
        self.facts.setdefault("batches", []).append((trainer.current_epoch, trainer.global_step, prints))
        if batch_idx == 0:
            self.facts.setdefault("epoch_seeds", []).append((trainer.current_epoch, torch.initial_seed()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.hang_at_step is not None and trainer.global_step == self.hang_at_step:
            (self.out_dir / f"hanging_rank{self._rank}").write_text(str(trainer.global_step))
            while True:  # the test sends SIGKILL
                time.sleep(0.2)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.facts["tuned"] = {n: p.detach().cpu().clone() for n, p in pl_module.model.named_parameters()
                               if p.requires_grad}
        self.facts["global_step"] = trainer.global_step
        self._dump()

    # -- samples seen in evaluation -------------------------------------------------------------
    def _start(self, pl_module) -> None:
        self._counts = torch.zeros(2, dtype=torch.long, device=pl_module.device)  # samples, correct

    def _count(self, pl_module, batch) -> None:
        images, labels = batch
        with torch.no_grad():
            predicted = pl_module.model(images).argmax(-1)
        self._counts += torch.stack([torch.tensor(len(labels), device=labels.device), (predicted == labels).sum()])

    def _finish(self, trainer) -> dict:
        mine = self._counts.clone()
        total = trainer.strategy.reduce(self._counts.clone(), reduce_op="sum")
        return {"rank_samples": int(mine[0]), "rank_correct": int(mine[1]),
                "samples": int(total[0]), "correct": int(total[1])}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count(pl_module, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.facts["val"].append(self._finish(trainer))
        self._dump()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count(pl_module, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.facts["test"] = self._finish(trainer)
        self._dump()

    def _dump(self) -> None:
        torch.save(self.facts, self.out_dir / f"rank{self._rank}.pt")
