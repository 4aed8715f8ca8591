"""The one LightningModule: frozen timm backbone + new head + a method's trainable parts.

The method's parts are built from a Selection (``selection.py``): at construction for the methods
that need no data (full, linear, BitFit, LoRA, adapters, the random draws that read no
gradient), and for the gradient methods in the ``setup`` hook, where the selection callback
(``callbacks.GradientSelection``) runs the pass, or restores the selection of the checkpoint being
resumed, before Lightning builds the optimizer and wraps the model for DDP. The selection is
saved in every checkpoint; a checkpoint whose selection differs from the run's is refused.
"""

from __future__ import annotations

import copy
import json
import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy

from grft_lightning.core.accounting import count_parameters, parameter_groups
from grft_lightning.core.backbones import WeightsFormat, create_backbone
from grft_lightning.training.budgets import with_task_budget
from grft_lightning.training.ema import TunedEMA
from grft_lightning.core.errors import CheckpointRefused, TrainingDiverged
from grft_lightning.core.heads import DEFAULT
from grft_lightning.training.losses import features_and_logits
from grft_lightning.methods.base import Method
from grft_lightning.training.schedules import step_scheduler, warmup_cosine
from grft_lightning.core.seeding import run_seed
from grft_lightning.core.selection import Selection


class PEFTModule(L.LightningModule):
    """Fine-tune a pre-trained timm backbone with any tuning method.

    Args:
        method: the tuning method (``class_path`` in YAML), e.g. ``grft_lightning.methods.GRFT``.
        backbone: timm model name with its pretrained tag (recorded in results.json).
        num_classes: classes of the new head (linked from ``data.num_classes``).
        pretrained: load pre-trained weights (from ``weights`` or timm's hub cache).
        weights: local weight file instead of the hub.
        weights_format: layout of ``weights``: ``auto``, ``timm`` or ``ordered``.
        drop_path_rate: stochastic depth rate.
        image_size: input size (ViTs: position embeddings are resampled); linked to the data.
        optimizer: optimizer factory (default AdamW with its defaults: lr 1e-3, weight decay
            0.01); receives only tuned tensors, in groups (no weight decay on 1-D tensors; the
            head at ``head_lr``).
        scheduler: a per-step LR scheduler factory; default: linear warm-up + cosine from the
            arguments below.
        head_lr: learning rate of the head (default: the optimizer's lr).
        warmup_epochs: linear warm-up length, in epochs (fractions allowed).
        warmup_start_lr: learning rate at step 0 of the warm-up.
        min_lr: learning rate at the end of the cosine.
        label_smoothing: cross-entropy label smoothing.
        mixup: mixup alpha (0 disables); with ``cutmix`` uses timm's Mixup (FGVC recipes).
        cutmix: cutmix alpha (0 disables).
        ema_decay: keep an exponential moving average of the tuned tensors with this decay,
            updated once per optimizer step, and evaluate/export with it (None disables; the
            callback :class:`~grft_lightning.training.ema.TunedEMA`, from :meth:`configure_callbacks`).
        freeze_norm_stats: keep BatchNorm running statistics fixed (BatchNorm layers in eval mode
            during training).
        channels_last: hold 4-D weights channels-last, so convolutions run in NHWC (on the CPU
            about 2x faster training for MobileNetV2; no effect on a ViT's linear layers).
        check_finite_every_n_batches: how often the training loss is checked for NaN/inf on the
            host. Every batch's loss is checked on its device (no host sync); the outcome is read
            every this many training batches, at each epoch's end and before each checkpoint is
            written, and a non-finite loss stops training with an error naming the global step
            of the first one and the last finite loss before it. 1 reads it every batch (one
            device sync per batch on a GPU). Before each checkpoint the tuned tensors are checked
            too: no checkpoint holds non-finite weights.
        task_budget: the task's budget values for a method whose budget is open, e.g.
            ``{"fraction": 0.003}`` (the command line links them from the config's top-level
            ``budget`` section; ``grft_lightning/training/budgets.py``); the method is built with them
            (:func:`~grft_lightning.training.budgets.with_task_budget`). The effective method config is
            in ``hparams.method_config``, every checkpoint and results.json.
    """

    def __init__(
        self,
        method: Method,
        backbone: str = "vit_base_patch16_224.augreg_in21k",
        num_classes: int = 1000,
        pretrained: bool = True,
        weights: str | None = None,
        weights_format: WeightsFormat = "auto",
        drop_path_rate: float = 0.0,
        image_size: int | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        head_lr: float | None = None,
        warmup_epochs: float = 0.0,
        warmup_start_lr: float = 1e-7,
        min_lr: float = 1e-8,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        ema_decay: float | None = None,
        freeze_norm_stats: bool = False,
        channels_last: bool = False,
        check_finite_every_n_batches: int = 50,
        task_budget: dict[str, int | float | None] | None = None,
    ):
        super().__init__()
        if check_finite_every_n_batches < 1:
            raise ValueError(f"check_finite_every_n_batches must be >= 1, got {check_finite_every_n_batches}")
        self.save_hyperparameters(ignore=["method", "optimizer", "scheduler"])
        method = with_task_budget(method, task_budget)
        # Plain data only in the checkpoint (loadable with weights_only=True).
        self.hparams["method_config"] = {"class_path": method.class_path(), "init_args": method.config()}
        self.method = method
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model = create_backbone(backbone, num_classes, pretrained, weights, weights_format, drop_path_rate,
                                     image_size)
        if channels_last:  # convolutions follow their weight's memory format
            self.model.to(memory_format=torch.channels_last)
        #: what the method tunes (None until the selection callback sets it, for gradient methods)
        self.selection: Selection | None = None
        # The feature regulariser's frozen pre-trained copy, held in a tuple so that it is no
        # submodule: state_dict and checkpoints never see it, and it is never trained.
        self._reference: tuple[torch.nn.Module, ...] = ()
        if not method.needs_gradients:
            self.apply_selection(method.select(self.model, seed=run_seed()))
        # validate_args would check the labels on the host every step (a device sync); the loss
        # already rejects a label out of range, and the evaluation metrics keep the check
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.mixup_fn = self._make_mixup(num_classes)
        self.selection_seconds = 0.0
        # Device-side record of the training loss (see _check_finite), created at the first step.
        self._finite_state: dict[str, torch.Tensor] | None = None
        self._finite_batches = 0

    # -- model ------------------------------------------------------------------------------
    def apply_selection(self, selection: Selection) -> None:
        """Build the method's trainable parts from ``selection`` (once; before the optimizer exists)."""
        if self.selection is not None:
            raise RuntimeError("PEFTModule: the method was already applied with a selection")
        if self.method.needs_reference():
            self._reference = (copy.deepcopy(self.model).eval().requires_grad_(False),)
        self.method.apply(self.model, selection)
        if self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.selection = selection

    @property
    def head(self):
        """The head spec the selection records (timm's ``get_classifier()`` before one exists)."""
        return DEFAULT if self.selection is None else self.selection.head

    def _make_mixup(self, num_classes: int):
        if not (self.hparams.mixup > 0 or self.hparams.cutmix > 0):
            return None
        from timm.data import Mixup

        return Mixup(mixup_alpha=self.hparams.mixup, cutmix_alpha=self.hparams.cutmix,
                     label_smoothing=self.hparams.label_smoothing, num_classes=num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """With ``channels_last``, image batches are laid out channels-last too, so that the first
        convolution, whatever computes its kernel, starts the network in NHWC."""
        images = batch[0]
        if self.hparams.channels_last and torch.is_tensor(images) and images.dim() == 4:
            batch = (images.contiguous(memory_format=torch.channels_last), *batch[1:])
        return batch

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.hparams.freeze_norm_stats:
            for module in self.model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    # -- steps ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        targets = labels
        if self.mixup_fn is not None and len(images) % 2 == 0:  # timm's Mixup pairs the batch
            images, targets = self.mixup_fn(images, labels)
        features, logits = features_and_logits(self.model, images)
        if targets.ndim == 2:
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.hparams.label_smoothing)
        reg = self.method.regularizer(self.model, images, features, self._reference[0] if self._reference else None)
        total = loss if reg is None else loss + reg
        self._check_finite(total)
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True)
        if reg is not None:
            self.log("train/reg", reg)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return total

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Record this batch's loss on its device; every ``check_finite_every_n_batches`` calls,
        read the record on the host (:meth:`_raise_if_non_finite`)."""
        self._record_loss(loss)
        self._finite_batches += 1
        if self._finite_batches % self.hparams.check_finite_every_n_batches == 0:
            self._raise_if_non_finite()

    def _record_loss(self, loss: torch.Tensor) -> None:
        """Update, without a host sync, the last finite loss and the first non-finite one (its
        value, global step and epoch). Python numbers enter only as kernel arguments."""
        loss = loss.detach().float()
        state = self._finite_state
        if state is None:
            state = self._finite_state = {
                "last_finite": torch.full((), float("nan"), device=loss.device),  # nan: none yet
                "bad_value": torch.zeros((), device=loss.device),
                "bad_step": torch.full((), -1, dtype=torch.long, device=loss.device),  # -1: none yet
                "bad_epoch": torch.zeros((), dtype=torch.long, device=loss.device),
            }
        clean = state["bad_step"] < 0
        finite = torch.isfinite(loss)
        first_bad = clean & ~finite
        state["last_finite"] = torch.where(clean & finite, loss, state["last_finite"])
        state["bad_value"] = torch.where(first_bad, loss, state["bad_value"])
        state["bad_epoch"].masked_fill_(first_bad, self.current_epoch)
        state["bad_step"].masked_fill_(first_bad, self.global_step)

    def _raise_if_non_finite(self) -> None:
        """Read the device-side record (one host sync) and raise if a loss was NaN/inf."""
        state = self._finite_state
        if state is None:
            return
        step = int(state["bad_step"])
        if step < 0:
            return
        last = float(state["last_finite"])
        raise TrainingDiverged(
            f"non-finite training loss ({float(state['bad_value'])}) at global step {step} "
            f"(epoch {int(state['bad_epoch'])}); last finite loss: {None if math.isnan(last) else last}. "
            "Lower the learning rate or check the data.")

    def _last_finite_loss(self) -> float | None:
        state = self._finite_state
        last = float("nan") if state is None else float(state["last_finite"])
        return None if math.isnan(last) else last

    def _raise_if_weights_non_finite(self) -> None:
        """Raise if a tuned tensor holds NaN/inf (one host sync): a step can overflow the weights
        while the loss it was computed from is still finite."""
        bad = [name for name, p in self.model.named_parameters()
               if p.requires_grad and not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise TrainingDiverged(
                f"non-finite tuned weights ({bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}) after "
                f"global step {self.global_step} (epoch {self.current_epoch}); last finite loss: "
                f"{self._last_finite_loss()}. Lower the learning rate (model.optimizer.init_args.lr, "
                "model.head_lr) or check the data.")

    def on_train_start(self) -> None:
        self._finite_state, self._finite_batches = None, 0

    def on_train_epoch_end(self) -> None:
        self._raise_if_non_finite()

    def _require_selection(self) -> None:
        if self.selection is None:
            raise ValueError(f"{type(self.method).__name__} tunes a selection made while fitting: give the "
                             "checkpoint of a fitted run (--ckpt_path) to validate, test or predict")

    def on_test_start(self) -> None:
        self._require_selection()

    def on_predict_start(self) -> None:
        self._require_selection()

    def _eval_step(self, batch, metric: MulticlassAccuracy, stage: str) -> None:
        images, labels = batch
        logits = self.model(images)
        metric(logits, labels)
        self.log(f"{stage}/loss", F.cross_entropy(logits.float(), labels), sync_dist=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.model(images).softmax(-1)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.method.on_before_optimizer_step(self.model)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # The closure (training_step, backward, on_before_optimizer_step) runs inside step();
        # the method's after-step hook runs once the step is done. Lightning calls this only on
        # batches that step (not on those that only accumulate gradients).
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.method.on_after_optimizer_step(self.model)

    # -- optimizer --------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """Only tuned tensors; weight decay on tensors with ndim >= 2 only; the head at head_lr
        (:func:`grft_lightning.core.accounting.parameter_groups`)."""
        return parameter_groups(self.model, self.head, self.hparams.head_lr)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            total = max(1, int(self.trainer.estimated_stepping_batches))
            epochs = max(1, self.trainer.max_epochs or 1)
            warmup = int(round(self.hparams.warmup_epochs * total / epochs))
            scheduler = warmup_cosine(optimizer, total, warmup, self.hparams.warmup_start_lr, self.hparams.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # The default schedule is timm's, positioned by the optimizer step count; a torch
        # scheduler from ``scheduler:`` steps as Lightning steps it.
        if not step_scheduler(scheduler, self.global_step):
            super().lr_scheduler_step(scheduler, metric)

    # -- EMA of tuned tensors ---------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        """With ``ema_decay``, the EMA of the tuned tensors (:class:`~grft_lightning.training.ema.TunedEMA`);
        a later stage of the same trainer (``test`` after ``fit``) keeps the one it has."""
        if self.hparams.ema_decay is None or any(isinstance(c, TunedEMA) for c in self.trainer.callbacks):
            return []
        return [TunedEMA(self.hparams.ema_decay)]

    def on_validation_start(self) -> None:
        self._require_selection()

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # never write weights trained on a non-finite loss, or non-finite weights
        self._raise_if_non_finite()
        self._raise_if_weights_non_finite()
        checkpoint["selection_seconds"] = self.selection_seconds
        if self.selection is not None:
            checkpoint["selection"] = self.selection.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainer = self._trainer
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        where = f"checkpoint {path}" if path else "the checkpoint"
        fix = "resume with the run's own config, or start a fresh run directory (--run_dir)"
        saved = checkpoint.get("hyper_parameters", {}).get("method_config")
        mine = self.hparams["method_config"]
        if saved is not None and json.dumps(saved, sort_keys=True) != json.dumps(mine, sort_keys=True):
            raise CheckpointRefused(f"{where} was trained with another method or budget (checkpoint: {saved}; this "
                                    f"run: {mine}); {fix}")
        saved_backbone = checkpoint.get("hyper_parameters", {}).get("backbone")
        if saved_backbone is not None and saved_backbone != self.hparams.backbone:
            raise CheckpointRefused(f"{where} is of backbone {saved_backbone!r}, this run uses "
                                    f"{self.hparams.backbone!r}; {fix}")
        for key in ("num_classes", "image_size"):  # another head or position embedding: shapes differ
            if key in checkpoint.get("hyper_parameters", {}) and checkpoint["hyper_parameters"][key] != self.hparams[key]:
                raise CheckpointRefused(f"{where} has {key} {checkpoint['hyper_parameters'][key]}, this run "
                                        f"{self.hparams[key]}; {fix}")
        bad = next((name for name, value in checkpoint.get("state_dict", {}).items()
                    if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())),
                   None)
        if bad is not None:
            raise CheckpointRefused(f"{where} holds non-finite weights ({bad}): the run diverged before it was "
                                    "saved; start it again with a lower learning rate (--overwrite, or another "
                                    "--run_dir)")
        self._restore_selection(checkpoint, where, fix)
        self.selection_seconds = float(checkpoint.get("selection_seconds", 0.0))

    def _restore_selection(self, checkpoint: dict, where: str, fix: str) -> None:
        """The checkpoint's selection: applied when the run has none yet (a model loaded with
        ``load_from_checkpoint``), else checked against the run's."""
        if "selection" not in checkpoint:
            if self.selection is None or self.selection.rule is not None:
                raise CheckpointRefused(f"{where} holds no selection (written by an older version); {fix}")
            return
        saved = Selection.from_state_dict(checkpoint["selection"], where)
        if self.selection is None:
            self.apply_selection(saved)
        elif saved != self.selection:
            raise CheckpointRefused(f"{where} was trained on another selection ({saved.describe()}; this run: "
                                    f"{self.selection.describe()}); {fix}")

    @staticmethod
    def checkpoint_selection(path: str) -> Selection:
        """The Selection saved in the checkpoint at ``path`` (read weights-only)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if "selection" not in checkpoint:
            raise CheckpointRefused(f"checkpoint {path} holds no selection (written by an older version); resume "
                                    "with the version that wrote it, or start a fresh run directory (--run_dir)")
        return Selection.from_state_dict(checkpoint["selection"], f"checkpoint {path}")

    def tuned_counts(self) -> dict[str, float]:
        return count_parameters(self.model, self.head)
