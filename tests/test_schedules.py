"""The default learning-rate schedule (grft_lightning.training.schedules): timm's warm-up + cosine gives, at
every optimizer step, the lr of the project's formula, through Lightning and across a resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from grft_lightning.training.schedules import WarmupCosine, step_scheduler, warmup_cosine


def formula(step: int, base_lr: float, total: int, warmup: int, start_lr: float, min_lr: float) -> float:
    """The schedule's definition, written out: linear warm-up from ``start_lr``, then a cosine from
    the group's lr to ``min_lr`` at ``total``, ``min_lr`` beyond; as a torch ``LambdaLR`` applied
    it (the group's lr times the ratio, which is how earlier runs got their lr)."""
    if step < warmup:
        lr = start_lr + (base_lr - start_lr) * step / max(1, warmup)
    else:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
    return base_lr * (lr / base_lr)


def optimizer(lrs=(1e-3, 0.5)) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.AdamW(groups)


SETTINGS = [  # (total, warmup, start_lr, min_lr)
    (100, 10, 1e-7, 1e-8),
    (100, 0, 1e-7, 1e-8),
    (1, 0, 1e-7, 1e-8),
    (7, 7, 1e-6, 0.0),  # all warm-up
    (2300, 230, 1e-7, 1e-8),  # an FGVC-sized run: 10 of 100 epochs warm-up
    (50, 3, 0.0, 1e-5),
]


@pytest.mark.parametrize("total, warmup, start_lr, min_lr", SETTINGS)
def test_every_step_has_the_formula_lr(total, warmup, start_lr, min_lr):
    opt = optimizer()
    schedule = warmup_cosine(opt, total, warmup, start_lr, min_lr)
    for step in range(total + 3):  # and a few steps past the end: min_lr
        for group in opt.param_groups:
            expected = formula(step, group["initial_lr"], total, warmup, start_lr, min_lr)
            assert group["lr"] == pytest.approx(expected, rel=1e-12, abs=0.0), (step, group["initial_lr"])
        assert step_scheduler(schedule, step + 1)


def test_known_values():
    opt = optimizer((1e-3,))
    schedule = warmup_cosine(opt, total_steps=10, warmup_steps=2, warmup_start_lr=1e-7, min_lr=0.0)
    seen = []
    for step in range(11):
        seen.append(opt.param_groups[0]["lr"])
        step_scheduler(schedule, step + 1)
    assert seen[:3] == [pytest.approx(1e-7, rel=1e-15), pytest.approx(0.00050005, rel=1e-13), pytest.approx(1e-3)]
    assert seen[6] == pytest.approx(0.5e-3, rel=1e-13)  # half-way through the 8 cosine steps
    assert seen[10] == 0.0


def test_state_dict_round_trip_keeps_the_run_settings():
    first = optimizer()
    schedule = warmup_cosine(first, 40, 4, 1e-7, 1e-8)
    for step in range(1, 13):
        step_scheduler(schedule, step)
    state = schedule.state_dict()
    torch.save(state, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == state  # plain data in the checkpoint
    resumed_opt = optimizer()
    resumed = warmup_cosine(resumed_opt, 40, 4, 1e-7, 1e-8)
    resumed.load_state_dict(state)
    for step in range(13, 45):
        step_scheduler(schedule, step)
        step_scheduler(resumed, step)
        assert [g["lr"] for g in resumed_opt.param_groups] == [g["lr"] for g in first.param_groups]
    # a longer run resumed from that state follows its own settings (as the config says)
    longer_opt = optimizer()
    longer = warmup_cosine(longer_opt, 80, 4, 1e-7, 1e-8)
    longer.load_state_dict(state)
    step_scheduler(longer, 40)
    assert longer_opt.param_groups[0]["lr"] == pytest.approx(formula(40, 1e-3, 80, 4, 1e-7, 1e-8), rel=1e-12)
    assert isinstance(longer, WarmupCosine) and not step_scheduler(torch.optim.lr_scheduler.StepLR(longer_opt, 1), 1)


class _LRLog(L.Callback):
    def __init__(self):
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_steps_it_once_per_optimizer_step(tmp_path, one_torch_thread, accumulate):
    """Through a Trainer: 12 batches of 8 (3 epochs), warm-up 1 epoch, head at its own lr; the lr
    of every batch is the formula's at the number of optimizer steps taken before it."""
    from grft_lightning.data import SyntheticImages
    from grft_lightning.methods import BitFit
    from grft_lightning.training.module import PEFTModule

    module = PEFTModule(BitFit(), backbone="test_vit", num_classes=4, pretrained=False, image_size=32,
                        optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3), head_lr=0.02,
                        warmup_epochs=1, warmup_start_lr=1e-6, min_lr=1e-5)
    data = SyntheticImages(num_classes=4, n_train=32, n_val=8, n_test=8, batch_size=8, num_workers=0)
    log = _LRLog()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, accumulate_grad_batches=accumulate, callbacks=[log],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    total = 12 // accumulate
    warmup = 4 // accumulate
    assert trainer.global_step == total
    bases = trainer.optimizers[0].param_groups
    assert {g["initial_lr"] for g in bases} == {1e-3, 0.02}
    for batch, lrs in enumerate(log.lrs):
        steps = batch // accumulate
        for lr, group in zip(lrs, bases):
            expected = formula(steps, group["initial_lr"], total, warmup, 1e-6, 1e-5)
            assert lr == pytest.approx(expected, rel=1e-12, abs=0.0), (batch, group["initial_lr"])


def test_training_ends_bit_identical_to_the_former_lambda_schedule(tmp_path, one_torch_thread):
    """The same 12 steps with the schedule as a torch ``LambdaLR`` of the formula (how runs were
    scheduled before) and with the default: the tuned tensors end bit for bit the same."""
    from torch.optim.lr_scheduler import LambdaLR

    from grft_lightning.data import SyntheticImages
    from grft_lightning.methods import BitFit
    from grft_lightning.training.module import PEFTModule

    total, warmup = 12, 4

    def former(optimizer):
        return LambdaLR(optimizer, [lambda s, b=g["lr"]: formula(s, b, total, warmup, 1e-6, 1e-5) / b
                                    for g in optimizer.param_groups])

    ends = []
    for scheduler in (former, None):
        torch.manual_seed(0)
        module = PEFTModule(BitFit(), backbone="test_vit", num_classes=4, pretrained=False, image_size=32,
                            optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-2), head_lr=0.05,
                            scheduler=scheduler, warmup_epochs=1, warmup_start_lr=1e-6, min_lr=1e-5)
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path)
        trainer.fit(module, datamodule=SyntheticImages(num_classes=4, n_train=32, batch_size=8, num_workers=0))
        assert trainer.global_step == total
        ends.append({n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad})
    assert ends[0].keys() == ends[1].keys()
    assert all(torch.equal(ends[0][n], ends[1][n]) for n in ends[0])
