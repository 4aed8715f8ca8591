"""Callbacks: the selection pass at ``setup`` (before the optimizer exists), per-rank seeding, and
run bookkeeping."""

from __future__ import annotations

import random
import resource
import time
from pathlib import Path
from typing import Iterator, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from grft_lightning.core.errors import check_choice
from grft_lightning.core.accounting import parameter_summary
from grft_lightning.methods.export import read_selection, read_tuned
from grft_lightning.core.heads import classifier
from grft_lightning.training.losses import pre_logits, selection_loss_fn
from grft_lightning.methods import method_class
from grft_lightning.training.budgets import BUDGET_ARGUMENTS
from grft_lightning.core.seeding import run_seed
from grft_lightning.core.gradients import accumulate_gradients


def _on_device(loader, device: torch.device) -> Iterator:
    for images, labels in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def _norm_statistics(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) for every BatchNorm running statistic: a train-mode pass updates them."""
    saved = []
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            saved += [(b, b.detach().clone()) for b in (layer.running_mean, layer.running_var,
                                                        layer.num_batches_tracked) if b is not None]
    return saved


class GradientSelection(L.Callback):
    """Select what the method tunes, once, before the optimizer is built.

    Runs in the ``setup`` hook, where the data is ready and DDP's process group exists but the
    optimizer and the DDP wrapper do not: the method's deltas are built from the selection there
    (``PEFTModule.apply_selection``), with exactly the selected sizes, and the optimizer then sees
    only them. Where the selection comes from, in order: a checkpoint being resumed
    (``trainer.ckpt_path``, which the CLI sets; its saved selection is applied and no pass runs),
    ``from_file``, or the pass below. A run resumed through ``trainer.fit(ckpt_path=...)`` instead
    runs the pass and the checkpoint's selection must equal it (``PEFTModule.on_load_checkpoint``).

    One pass over the training split with its own loader (``supcon``: two augmented views per
    image, GPS's head-free supervised contrastive loss; ``ce``: cross-entropy through the new
    head, deterministic transform), gradients summed over batches in fp32 and, under DDP, summed
    across ranks before scoring, so every rank selects the same indices. As in GPS's public code
    the batches are shuffled with the run's seed and the last partial batch is dropped
    (:meth:`~grft_lightning.data.ImageClassificationData.selection_dataloader`); the forward pass
    runs under the trainer's autocast, SupCon itself in fp32. The selection lives in the model's
    checkpoints (``checkpoint["selection"]``): a resumed run never selects again.

    Args:
        loss: selection loss, ``supcon`` or ``ce``.
        temperature: SupCon temperature.
        max_batches: stop the pass after this many batches, counted over all ranks (None: the
            whole split).
        from_file: take the selection from a previous run's ``tuned.safetensors`` instead of
            computing it (the same method; values start at zero). A file made at a larger budget is
            cut to this run's (``Selection.cut``): one selection pass serves a budget curve.
        progress: show a progress bar.
        mode: the model's mode during the pass. ``train`` is how GPS's public code runs it:
            drop-path and dropout active (random, reproducible from the run's seed and the
            rank), BatchNorm normalising with batch statistics (its running statistics are put
            back after the pass). ``eval`` (the default; a departure from GPS wherever the model
            has drop-path, dropout or BatchNorm) makes the gradients a deterministic function of
            the batches and the weights. The VTAB-1k and FGVC configs set ``train``.
        views: the views ``supcon`` contrasts. ``two_augmented`` (the default, GPS's) gives two
            augmented views per image (random resized crop, flip, colour jitter); ``one`` a single
            deterministic view per image (the evaluation transform), whose positives are then the
            other images of its label in the batch: for tasks whose labels the augmentations change
            (rotation, position, orientation). Ignored by ``ce``.
        head: the head the ``ce`` pass runs through (``supcon`` reads no head). ``random`` (the
            default) is the freshly initialised head. ``probe`` first fits the model's own head as
            a linear probe on the frozen pre-logits features of the whole training split
            (evaluation transform, model in eval mode): ``probe_steps`` iterations of full-batch
            L-BFGS (strong-Wolfe line search) on the mean cross-entropy plus ``1e-4 * ||W||^2``,
            from the fresh head, so the probe is a deterministic function of the seed and the
            data. Under DDP every rank fits it on the whole split (not its shard) and rank 0's head
            is then broadcast, so every rank holds the same head. Its cost (``probe_seconds``) and
            training accuracy (``probe_train_acc``) are logged and recorded in results.json
            (``selection``). Methods that select without data (random rows) and runs with
            ``from_file`` fit it only with ``keep_probe_head``.
        keep_probe_head: with ``head: probe``, train from the probe head (linear probing then
            fine-tuning, LP-FT: Kumar et al., ICLR 2022) instead of the fresh head, which is
            otherwise put back after the pass. A resumed run restores the head from its
            checkpoint and never fits the probe again.
        probe_steps: L-BFGS iterations of the probe (full batch).
    """

    def __init__(
        self,
        loss: Literal["supcon", "ce"] = "supcon",
        temperature: float = 0.07,
        max_batches: int | None = None,
        from_file: str | None = None,
        progress: bool = True,
        mode: Literal["train", "eval"] = "eval",
        views: Literal["two_augmented", "one"] = "two_augmented",
        head: Literal["random", "probe"] = "random",
        keep_probe_head: bool = False,
        probe_steps: int = 100,
    ):
        check_choice("selection.mode", mode, ("train", "eval"))
        check_choice("selection.views", views, ("two_augmented", "one"))
        check_choice("selection.head", head, ("random", "probe"))
        if keep_probe_head and head != "probe":
            raise ValueError("selection.keep_probe_head needs selection.head: probe")
        if probe_steps < 1:
            raise ValueError(f"selection.probe_steps must be >= 1, got {probe_steps}")
        self.views = views
        self.head = head
        self.keep_probe_head = keep_probe_head
        self.probe_steps = probe_steps
        #: the probe's cost and training accuracy (kept in checkpoints: a resumed run reports them)
        self.probe: dict[str, float] = {}
        self.loss = loss
        self.temperature = temperature
        self.mode = mode
        self.max_batches = max_batches
        self.from_file = from_file
        self.progress = progress

    def state_dict(self) -> dict:
        return {"probe": dict(self.probe)} if self.probe else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.probe = dict(state_dict.get("probe", {}))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if pl_module.selection is not None:  # a method that needs no data selected at construction
            if stage == "fit" and not trainer.ckpt_path and self.keep_probe_head:
                self._fit_probe(trainer, pl_module)  # the head training starts from (LP-FT)
            return
        if trainer.ckpt_path:
            pl_module.apply_selection(pl_module.checkpoint_selection(str(trainer.ckpt_path)))
            rank_zero_info(f"selection: restored from {trainer.ckpt_path} (not re-selected)")
            return
        if stage != "fit":
            return  # validate/test/predict: the checkpoint's selection is applied when it is loaded
        start = time.perf_counter()
        method = pl_module.method
        fresh_head = None
        if self.head == "probe" and (self.keep_probe_head or not self.from_file):
            pl_module.to(trainer.strategy.root_device)
            fresh_head = self._fit_probe(trainer, pl_module)
        if self.from_file:
            selection = self._load(pl_module)
        else:
            pl_module.to(trainer.strategy.root_device)
            grads = self._gradients(trainer, pl_module)
            selection = method.select(pl_module.model, grads, seed=run_seed())
        if fresh_head is not None and not self.keep_probe_head:
            _head_module(pl_module.model).load_state_dict(fresh_head)  # training starts from the fresh head
        pl_module.apply_selection(selection)
        pl_module.selection_seconds = time.perf_counter() - start
        rank_zero_info(f"selection: {selection.describe()} in {pl_module.selection_seconds:.1f} s")
        rank_zero_info(parameter_summary(pl_module.model, selection.head))
        for logger in trainer.loggers:
            logger.log_metrics({"selection/seconds": pl_module.selection_seconds}, step=0)
        self._figure(trainer, selection)

    @staticmethod
    def _figure(trainer: L.Trainer, selection) -> None:
        """``selection.png`` in the run directory, also logged to W&B (rank 0 only)."""
        if not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / "selection.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if selection.figure(str(path)) is None:
            return
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="selection", images=[str(path)])

    def _gradients(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "selection_dataloader"):
            raise RuntimeError("gradient selection needs a DataModule with selection_dataloader() "
                               "(subclass grft_lightning.data.ImageClassificationData)")
        if self.views == "two_augmented":
            loader = datamodule.selection_dataloader(self.loss)
        else:
            loader = datamodule.selection_dataloader(self.loss, views=self.views)
        batches = _on_device(loader, pl_module.device)
        if self.max_batches is not None:
            # A cap on the whole pass: this rank's share of the first max_batches batches
            # (the selection loader deals batch j to rank j % world).
            mine = len(range(trainer.global_rank, self.max_batches, trainer.world_size))
            batches = (b for i, b in zip(range(mine), batches))
        reduction = pl_module.method.gradient_reduction
        names = pl_module.method.gradient_names(pl_module.model)
        if reduction == "per_sample_squares" and self.loss == "supcon":
            raise ValueError("model.method.init_args.score: per-sample scores need a loss defined on one image; "
                             "set selection.loss: ce (SupCon contrasts the images of a batch)")
        loss_fn = selection_loss_fn(self.loss, self.temperature)
        was_training = pl_module.training
        norm_stats = _norm_statistics(pl_module)
        pl_module.train(self.mode == "train")
        try:
            with trainer.precision_plugin.forward_context():
                grads = accumulate_gradients(pl_module.model, batches, loss_fn, names=names,
                                             progress=self.progress and trainer.is_global_zero,
                                             reduction=reduction)
        finally:
            pl_module.train(was_training)
            with torch.no_grad():
                for buffer, saved in norm_stats:
                    buffer.copy_(saved)
        if trainer.world_size > 1:
            # Sum across ranks: each rank saw a disjoint shard of the split.
            for grad in grads.values():
                torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        return grads

    def _fit_probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """Fit the model's head as a linear probe (class docstring); returns the fresh head's state."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "probe_dataloader"):
            raise RuntimeError("selection.head: probe needs a DataModule with probe_dataloader() "
                               "(subclass grft_lightning.data.ImageClassificationData)")
        pl_module.to(trainer.strategy.root_device)
        head = _head_module(pl_module.model)
        fresh = {k: v.detach().clone() for k, v in head.state_dict().items()}
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                parts = [(pre_logits(pl_module.model, images.to(pl_module.device)).float(), labels.to(pl_module.device))
                         for images, labels in datamodule.probe_dataloader()]
        finally:
            pl_module.train(was_training)
        features = torch.cat([f for f, _ in parts])
        labels = torch.cat([y for _, y in parts])
        accuracy = fit_linear_probe(head, features, labels, self.probe_steps)
        if trainer.world_size > 1:  # identical on every rank whatever the float order: rank 0's
            for tensor in head.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        seconds = time.perf_counter() - start
        self.probe = {"probe_seconds": seconds, "probe_train_acc": accuracy}
        rank_zero_info(f"selection: linear probe fitted on {len(labels)} images in {seconds:.1f} s "
                       f"(training accuracy {accuracy:.4f}){'; training starts from it' if self.keep_probe_head else ''}")
        for logger in trainer.loggers:
            logger.log_metrics({"selection/probe_seconds": seconds, "selection/probe_train_acc": accuracy}, step=0)
        return fresh

    def record(self) -> dict:
        """The ``selection`` section of results.json."""
        record = {"loss": self.loss, "mode": self.mode, "temperature": self.temperature,
                  "max_batches": self.max_batches, "from_file": self.from_file}
        if self.views != "two_augmented":
            record["views"] = self.views
        if self.head != "random":
            record.update(head=self.head, keep_probe_head=self.keep_probe_head, probe_steps=self.probe_steps,
                          **self.probe)
        return record

    def _load(self, pl_module: L.LightningModule):
        """The Selection of a previous run's tuned file, for the same method and budget."""
        tensors, meta = read_tuned(self.from_file)
        source = f"selection.from_file: {self.from_file}"
        mine = pl_module.method
        if method_class(meta.get("method_class"), source) is not type(mine):
            raise ValueError(f"{source} was selected by {meta.get('method_class')}, this run uses {mine!r}")
        theirs, selection = read_selection(self.from_file)
        if theirs.config() == mine.config():
            return selection
        other = {k for k in set(theirs.config()) | set(mine.config()) if theirs.config().get(k) != mine.config().get(k)}
        if other <= set(BUDGET_ARGUMENTS) and hasattr(mine, "budget"):
            try:  # the same method at a smaller budget: a cut of the file's selection (no pass)
                return selection.cut(**mine.budget())
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from err
        raise ValueError(f"{source} was selected by {theirs!r}, this run uses {mine!r} (only the budget may "
                         "differ, and only downwards)")


def _head_module(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's classification head, which the probe fits: one ``nn.Linear``."""
    head = classifier(model)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"selection.head: probe fits one nn.Linear head; this model's is {type(head).__name__}")
    return head


def fit_linear_probe(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, steps: int = 100,
                     weight_decay: float = 1e-4) -> float:
    """Fit ``head`` in place on fixed ``features``: ``steps`` iterations of full-batch L-BFGS
    (strong-Wolfe line search, history 20) on the mean cross-entropy plus ``weight_decay *
    ||W||^2`` (the bias not decayed), in fp32, from the head's current values. Deterministic for
    given features, labels and starting head. Returns the training accuracy."""
    params = [p for p in head.parameters()]
    dtype = head.weight.dtype
    features = features.to(head.weight.device, torch.float32)
    labels = labels.to(head.weight.device)
    saved = [p.requires_grad for p in params]
    with torch.enable_grad():
        head.float().requires_grad_(True)
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(features), labels)
            loss = loss + weight_decay * head.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    for p, flag in zip(params, saved):
        p.grad = None
        p.requires_grad_(flag)
    head.to(dtype)
    with torch.no_grad():
        return float((head(features.to(dtype)).argmax(1) == labels).float().mean())


class RunClock(L.Callback):
    """Training wall time and peak memory, for results.json. The time trained so far is kept in
    every checkpoint (the callback's state), so a resumed run adds its segments up; the time
    between a segment's last checkpoint and its end (a kill) is not counted."""

    def __init__(self):
        self.train_seconds = 0.0
        self._start: float | None = None

    def state_dict(self) -> dict:
        running = 0.0 if self._start is None else time.perf_counter() - self._start
        return {"train_seconds": self.train_seconds + running}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))

    def on_train_start(self, trainer, pl_module) -> None:
        counts = pl_module.tuned_counts()  # after selection: final for every method
        for logger in trainer.loggers:
            logger.log_hyperparams({f"params/{k}": v for k, v in counts.items()})
        self._start = time.perf_counter()
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._start is not None:
            self.train_seconds += time.perf_counter() - self._start
            self._start = None

    @staticmethod
    def peak_memory_bytes(device: torch.device) -> int:
        """CUDA max allocated on a GPU; this process's max resident set size on the CPU."""
        if device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class RankSeed(L.Callback):
    """Give each process its own random stream, from ``(seed, rank)`` and, per epoch, ``epoch``.

    ``seed_everything`` leaves every DDP process with the same RNG state, so random augmentation
    in the main process (``num_workers: 0``), dropout, drop-path and mixup would draw the same
    numbers on every rank (Lightning's seeding of loader workers mixes in the rank, but from that
    same state). This callback re-seeds Python's, NumPy's and torch's global RNGs with a number
    mixed from ``(seed, rank)`` when fit starts (before the selection pass) and from
    ``(seed, rank, epoch)`` at the start of every training epoch. The
    model is built before, with the plain seed, so it starts the same everywhere (DDP also
    broadcasts rank 0's weights). The data order is unaffected: it comes from the seed and the
    epoch alone (:class:`~grft_lightning.data.samplers.EpochShuffle`), the same on every rank so
    that the shards do not overlap. Re-seeding per epoch also means that a run resumed in the
    middle of an epoch draws, in the main process, the same random numbers as an uninterrupted
    run again from the next epoch on (loader workers are seeded once, when they start;
    docs/cluster.md).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._seed(trainer, "fit")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seed(trainer, trainer.current_epoch)

    @staticmethod
    def _seed(trainer: L.Trainer, when: int | str) -> None:
        seed = run_seed()
        entropy = [seed & 0xFFFFFFFF, trainer.global_rank, 0 if when == "fit" else 1 + int(when)]
        value = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)
