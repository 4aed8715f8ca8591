"""GPSMasked with ``restore_unselected`` through the real CLI: under AdamW weight decay, every
unselected entry of a masked weight keeps its pre-trained value exactly, from the first optimizer
step on, with and without gradient accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grft_lightning.training.cli import cli_main
from grft_lightning.methods.masked import MaskedWeight

WEIGHT_DECAY = 0.5


def _args(run_dir: Path, *extra: str, epochs: int = 1) -> list[str]:
    method = {"class_path": "grft_lightning.methods.GPSMasked", "init_args": {"k": 2, "restore_unselected": True}}
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2, "weight_decay": WEIGHT_DECAY}}
    data = {"class_path": "grft_lightning.data.SyntheticImages",
            "init_args": {"num_classes": 4, "n_train": 32, "n_val": 8, "n_test": 8, "batch_size": 8}}
    return [
        "fit",
        "--model.backbone", "test_vit", "--model.pretrained", "false", "--model.image_size", "32",
        "--model.method", json.dumps(method), "--model.optimizer", json.dumps(optimizer),
        "--data", json.dumps(data),
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--selection.loss", "ce", "--selection.progress", "false", "--wandb.mode", "disabled",
        "--run_dir", str(run_dir), *extra,
    ]


def _masked(model: torch.nn.Module) -> dict[str, MaskedWeight]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedWeight)}


@pytest.mark.parametrize("accumulate, epochs", [(1, 1), (2, 2)])  # 4 optimizer steps either way
def test_fit_with_weight_decay_keeps_unselected_entries_exact(tmp_path, one_torch_thread, accumulate, epochs):
    extra = ("--trainer.accumulate_grad_batches", str(accumulate))
    # The same arguments without running (no subcommand): the pre-trained model as the run builds it,
    # same seed (the selection and its masked layers are made in setup, which does not run here).
    pristine = cli_main(_args(tmp_path / "pristine", *extra, epochs=epochs)[1:], run=False).model.model
    cli = cli_main(_args(tmp_path / "run", *extra, epochs=epochs))
    model = cli.model.model
    assert cli.trainer.global_step == 4
    # Same initial weights: the parameters no method touches are equal.
    frozen = dict(pristine.named_parameters())
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "norm.bias"):
        assert torch.equal(dict(model.named_parameters())[name], frozen[name]), name
    # The masked weights really were decayed by the optimizer.
    decayed = {id(p) for g in cli.trainer.optimizers[0].param_groups if g["weight_decay"] == WEIGHT_DECAY
               for p in g["params"]}
    layers = _masked(model)
    assert len(layers) == 6 * 4 + 1  # qkv, proj, fc1, fc2 per block + the patch embedding
    for name, layer in layers.items():
        weight, old, mask = layer.base_layer.weight.detach(), pristine.get_submodule(name).weight.detach(), layer.mask
        assert id(layer.base_layer.weight) in decayed, name
        assert int(mask.sum()) == 2 * layer.out_features, name
        assert torch.equal(weight[~mask], old[~mask]), \
            f"{name}: unselected entries moved (max {float((weight - old)[~mask].abs().max()):.3g})"
        assert bool((weight != old)[mask].all()), f"{name}: a selected entry did not move"
