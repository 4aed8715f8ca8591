"""EMA of the tuned tensors (grft_lightning.training.ema.TunedEMA, added by ``model.ema_decay``): one update
per optimizer step, validation and the end of fit with the EMA, exact across a resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from grft_lightning.data import SyntheticImages
from grft_lightning.training.ema import TunedEMA, tuned_tensors
from grft_lightning.methods import BitFit
from grft_lightning.training.module import PEFTModule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DECAY = 0.75  # far from 1, so that one update more or less shows


class Recording(PEFTModule):
    """Records the tuned tensors after every optimizer step and what validation runs with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.after_steps: list[dict[str, torch.Tensor]] = []
        self.validated_with: list[dict[str, torch.Tensor]] = []

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in tuned_tensors(self).items()}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_steps.append(self.snapshot())

    def validation_step(self, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self.validated_with.append(self.snapshot())
        super().validation_step(batch, batch_idx)


def module(ema_decay: float | None = DECAY) -> Recording:
    torch.manual_seed(0)
    return Recording(BitFit(), backbone="test_vit", num_classes=4, pretrained=False, image_size=32,
                     optimizer=lambda groups: torch.optim.AdamW(groups, lr=0.05), ema_decay=ema_decay)


def trainer(root, epochs: int = 2, accumulate: int = 1, callbacks=(), checkpoints: bool = False) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=checkpoints,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=1, accumulate_grad_batches=accumulate, callbacks=list(callbacks),
                     default_root_dir=root)


def data() -> SyntheticImages:
    return SyntheticImages(num_classes=4, n_train=32, n_val=8, n_test=8, batch_size=8, num_workers=0)  # 4 batches


def by_hand(snapshots: list[dict[str, torch.Tensor]], decay: float = DECAY) -> dict[str, torch.Tensor]:
    """The EMA of a sequence of tensors: the first as it is, then ``ema += (1 - decay) (x - ema)``."""
    ema = {n: t.clone() for n, t in snapshots[0].items()}
    for snap in snapshots[1:]:
        for n in ema:
            ema[n].lerp_(snap[n], 1.0 - decay)
    return ema


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_without_accumulation_one_update_per_batch(tmp_path):
    """One optimizer step per batch: the EMA of the tuned tensors after each batch (how it has
    always been computed), in validation and, from the end of fit, in the module."""
    model = module()
    fit = trainer(tmp_path)
    fit.fit(model, datamodule=data())
    assert fit.global_step == 8 and len(model.after_steps) == 8
    assert_equal(model.validated_with[0], by_hand(model.after_steps[:4]))  # end of epoch 0
    assert_equal(model.validated_with[1], by_hand(model.after_steps))
    assert_equal(model.snapshot(), by_hand(model.after_steps))  # what test and export see
    assert not torch.equal(model.snapshot()["head.weight"], model.after_steps[-1]["head.weight"])


def test_with_accumulation_one_update_per_optimizer_step(tmp_path):
    """accumulate_grad_batches=2: 8 batches, 4 optimizer steps, 4 updates (not 8)."""
    model = module()
    fit = trainer(tmp_path, accumulate=2)
    fit.fit(model, datamodule=data())
    assert fit.global_step == 4 and len(model.after_steps) == 4
    expected = by_hand(model.after_steps)
    assert_equal(model.snapshot(), expected)
    assert_equal(model.validated_with[0], by_hand(model.after_steps[:2]))
    # an update after every batch (the weights after a batch that only accumulates are those of
    # the step before) would give another average
    per_batch = by_hand([s for s in model.after_steps for _ in range(2)])
    assert not torch.equal(per_batch["head.weight"], expected["head.weight"])


def test_no_decay_no_callback_and_live_weights_at_the_end(tmp_path):
    model = module(ema_decay=None)
    fit = trainer(tmp_path, epochs=1)
    fit.fit(model, datamodule=data())
    assert not any(isinstance(c, TunedEMA) for c in fit.callbacks)
    assert_equal(model.snapshot(), model.after_steps[-1])
    assert_equal(model.validated_with[0], model.after_steps[-1])
    with pytest.raises(ValueError):
        TunedEMA(1.5)


def test_resumed_mid_epoch_equals_uninterrupted(tmp_path):
    """A checkpoint after step 3 (mid-epoch 0) holds the EMA of steps 1-3; resuming from it ends
    with the EMA of the uninterrupted run, bit for bit."""
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    whole = module()
    trainer(tmp_path / "a", callbacks=[every], checkpoints=True).fit(whole, datamodule=data())
    saved = torch.load(tmp_path / "ckpt" / "step=3.ckpt", map_location="cpu", weights_only=True)
    state = saved["callbacks"]["TunedEMA"]
    assert state["updated_at_step"] == 3 and "ema" not in saved
    assert_equal(state["ema"], by_hand(whole.after_steps[:3]))

    resumed = module()
    fit = trainer(tmp_path / "b")
    fit.fit(resumed, datamodule=data(), ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert fit.global_step == 8 and len(resumed.after_steps) == 5
    assert_equal(resumed.after_steps[-1], whole.after_steps[-1])
    assert_equal(resumed.snapshot(), whole.snapshot())


def test_checkpoint_of_an_earlier_version_loads_its_ema():
    """Earlier checkpoints kept the EMA under checkpoint["ema"]; it is restored, at the
    checkpoint's step, and follows the module to its device when fit starts."""
    model = module()
    ema = {n: torch.full_like(p, 0.5) for n, p in tuned_tensors(model).items()}
    callback = TunedEMA(DECAY)
    callback.on_load_checkpoint(None, model, {"ema": ema, "global_step": 7, "callbacks": {}})
    assert callback.updated_at_step == 7
    assert_equal(callback.ema, ema)
    model.to("meta")  # stands for the accelerator: a device the checkpoint's tensors are not on
    callback.on_fit_start(None, model)
    assert callback.ema.keys() == ema.keys() and all(v.device.type == "meta" for v in callback.ema.values())
