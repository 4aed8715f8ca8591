"""Mixed precision: the selection pass sums gradients in fp32 and picks the same rows under bf16
autocast as in fp32 where the margins are clear; the benchmark configs train in bf16-mixed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from grft_lightning.methods import GRFT
from grft_lightning.selection import accumulate_gradients

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
    method.apply(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        grads = accumulate_gradients(model, _batches(), _ce)
    method.select(model, grads)
    return grads, {name: model.get_submodule(name).row_index.clone() for name in DOMINANT}


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


@pytest.mark.parametrize("config", ["configs/vtab/base.yaml", "configs/fgvc/base.yaml"])
def test_benchmark_configs_train_in_bf16_mixed(config):
    content = yaml.safe_load((REPO / config).read_text())
    assert content["trainer"]["precision"] == "bf16-mixed"
