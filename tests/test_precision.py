"""Mixed precision: the selection pass sums gradients in fp32 and picks the same rows under bf16
autocast as in fp32 where the margins are clear; the benchmark configs train under bf16 autocast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning.methods import GRFT
from grft_lightning.core.gradients import accumulate_gradients

REPO = Path(__file__).resolve().parent.parent
DOMINANT = {"fc1": [3, 17, 40], "fc2": [5, 22, 33]}  # the rows the construction makes win


class TwoLayers(nn.Module):
    """``head(gelu(fc2(gelu(fc1(x)))))`` with a timm-style ``get_classifier``.

    The rows of ``fc1`` listed in DOMINANT feed ``fc2`` through columns scaled by 8, and those of
    ``fc2`` feed the head through columns scaled by 8: their output gradients, and so the sums of
    squares of their weight gradients, are ~64x those of the other rows.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(24, 48), nn.Linear(48, 48), nn.Linear(48, 5)
        with torch.no_grad():
            self.fc2.weight[:, DOMINANT["fc1"]] *= 8.0
            self.head.weight[:, DOMINANT["fc2"]] *= 8.0

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 24, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(6)]


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def _select(bf16: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = TwoLayers()
    method = GRFT(mode="row", rows_per_matrix=3, exclude=[])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        grads = accumulate_gradients(model, _batches(), _ce)
    selection = method.select(model, grads)
    method.apply(model, selection)
    rows = {name: model.get_submodule(name).index.clone() for name in DOMINANT}
    assert {n: r.tolist() for n, r in rows.items()} == {n: selection.layers[n].index.tolist() for n in DOMINANT}
    return grads, rows


def test_selection_under_bf16_autocast_sums_in_fp32_and_picks_the_fp32_rows():
    grads32, rows32 = _select(bf16=False)
    grads16, rows16 = _select(bf16=True)
    for name, expected in DOMINANT.items():
        assert rows32[name].tolist() == expected  # the construction works in fp32
        assert rows16[name].tolist() == expected, name  # and bf16 autocast picks the same rows
    for key in grads32:
        assert grads16[key].dtype == torch.float32  # accumulated in fp32 whatever the autocast dtype
        # bf16 forward/backward: close to fp32, not equal (so autocast really was on)
        assert not torch.equal(grads16[key], grads32[key])
        torch.testing.assert_close(grads16[key], grads32[key], rtol=0.1, atol=0.05 * grads32[key].abs().max().item())


def test_accumulation_is_fp32_even_when_each_gradient_is_bf16():
    """A model held in bf16 (``precision: bf16-true``) still gets an fp32 sum: many small
    per-batch gradients summed in bf16 would lose the low bits of the total."""
    model = TwoLayers().to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in _batches()]
    grads = accumulate_gradients(model, batches, _ce)
    assert all(g.dtype == torch.float32 for g in grads.values())
    by_hand = torch.zeros_like(grads["fc1.weight"])
    for batch in batches:
        by_hand += torch.autograd.grad(_ce(model, batch), model.fc1.weight)[0].float()
    torch.testing.assert_close(grads["fc1.weight"], by_hand, rtol=0, atol=0)


@pytest.mark.parametrize("config", ["configs/vtab/dtd.yaml", "configs/fgvc/flowers.yaml"])
def test_benchmark_configs_train_in_bf16_mixed(tmp_path, monkeypatch, one_torch_thread, config):
    """A benchmark task config (through its base), fitted for two steps with nothing said about
    precision on the command line: every training step runs under bf16 autocast (the head's
    output is bf16) and the loss is fp32."""
    from synthetic_folders import make_fgvc_folder, make_vtab_folder

    from grft_lightning.training.cli import cli_main
    from grft_lightning.methods.base import classifier
    from grft_lightning.training.module import PEFTModule

    root = tmp_path / "data"
    if "vtab" in config:
        make_vtab_folder(root, "dtd")
    else:
        make_fgvc_folder(root, "flowers")
    seen = []
    training_step = PEFTModule.training_step

    def observed(self, batch, batch_idx):
        head_outputs = []
        hook = classifier(self.model).register_forward_hook(lambda m, i, out: head_outputs.append(out.dtype))
        try:
            loss = training_step(self, batch, batch_idx)
        finally:
            hook.remove()
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), head_outputs, loss.dtype))
        return loss

    monkeypatch.setattr(PEFTModule, "training_step", observed)
    cli = cli_main([
        "fit", "--config", str(REPO / config),
        "--model.backbone", "test_vit", "--model.pretrained", "false", "--model.image_size", "32",
        "--data.init_args.root", str(root), "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
        "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--selection.max_batches", "1", "--selection.progress", "false", "--wandb.mode", "disabled",
        "--run_dir", str(tmp_path / "run"),
    ])
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 2
    assert seen == [(True, torch.bfloat16, [torch.bfloat16], torch.float32)] * 2
