"""Exponential moving average (EMA) of the tuned tensors, as a Lightning callback.

The FGVC recipes evaluate and export an EMA of the tuned tensors (``model.ema_decay``;
:meth:`PEFTModule.configure_callbacks <grft_lightning.training.module.PEFTModule.configure_callbacks>`
adds this callback when it is set). It owns the average's whole life:

- **update**: once per optimizer step (after the step; with ``accumulate_grad_batches`` the
  batches that only accumulate gradients leave it alone), ``ema = lerp(ema, tuned, 1 - decay)``
  by torch's ``get_ema_multi_avg_fn``. The first update copies the tuned tensors. Only tensors
  with ``requires_grad`` are averaged: the frozen backbone needs no copy.
- **evaluation**: validation runs with the EMA swapped in (and out again after it); when fit ends
  the EMA replaces the live tensors for good, so ``test`` and the exported ``tuned.safetensors``
  hold it.
- **checkpoints**: the EMA and the step of its last update are the callback's state
  (``checkpoint["callbacks"]["TunedEMA"]``); a resumed run continues it exactly. The callback
  runs before the checkpoint callbacks, so a checkpoint written after a step holds that step's
  update. Checkpoints of earlier versions kept the EMA under ``checkpoint["ema"]``; they load too.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


def tuned_tensors(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The tensors training changes: parameters with ``requires_grad``, by name."""
    model = getattr(pl_module, "model", pl_module)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class TunedEMA(L.Callback):
    """EMA of the tuned tensors with ``decay``, updated after every optimizer step (module docstring)."""

    def __init__(self, decay: float):
        self.decay = float(decay)
        self._average = get_ema_multi_avg_fn(self.decay)  # refuses a decay outside [0, 1]
        self.ema: dict[str, torch.Tensor] | None = None
        self.updated_at_step = 0  # the trainer's global step at the last update

    # -- averaging ------------------------------------------------------------------------------
    def update(self, pl_module: L.LightningModule) -> None:
        tuned = tuned_tensors(pl_module)
        with torch.no_grad():
            if self.ema is None:
                self.ema = {name: p.detach().clone() for name, p in tuned.items()}
                return
            self._average([self.ema[name] for name in tuned], [p.detach() for p in tuned.values()], None)

    def swap(self, pl_module: L.LightningModule) -> None:
        """Exchange the live tuned tensors with their EMA (call twice to undo)."""
        if self.ema is None:
            return
        with torch.no_grad():
            for name, p in tuned_tensors(pl_module).items():
                live = p.detach().clone()
                p.copy_(self.ema[name])
                self.ema[name].copy_(live)

    # -- hooks ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed EMA is restored before the strategy moves the module to its device.
        if self.ema is not None:
            self.ema = {name: v.to(pl_module.device) for name, v in self.ema.items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step > self.updated_at_step:  # this batch ended with an optimizer step
            self.update(pl_module)
            self.updated_at_step = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Evaluate and export what the EMA holds from here on.
        self.swap(pl_module)
        self.ema = None

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        ema = None if self.ema is None else {name: v.cpu() for name, v in self.ema.items()}
        return {"decay": self.decay, "ema": ema, "updated_at_step": self.updated_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema = state_dict["ema"]
        self.updated_at_step = int(state_dict["updated_at_step"])

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}) and checkpoint.get("ema") is not None:
            self.ema = dict(checkpoint["ema"])  # the layout of earlier versions: the module kept it
            self.updated_at_step = int(checkpoint.get("global_step", 0))
