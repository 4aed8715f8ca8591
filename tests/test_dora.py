"""DoRA, a peft-backed method added in its own file (methods/dora.py), YAML and tests only."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from grft_lightning import count_parameters, load_tuned, merge, read_selection, save_tuned
from grft_lightning.methods.dora import DoRA

pytest.importorskip("peft")
REPO = Path(__file__).resolve().parent.parent


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _train(model, method, steps: int = 3):
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        method.on_before_optimizer_step(model)
        optimizer.step()
        method.on_after_optimizer_step(model)
        optimizer.zero_grad()
    return images


def test_dora_starts_as_the_pretrained_model_and_counts_its_magnitudes(tiny_vit, one_torch_thread):
    images = torch.randn(2, 3, 32, 32)
    tiny_vit.eval()
    with torch.no_grad():
        before = tiny_vit(images)
    method = DoRA(r=4)
    method.apply(tiny_vit)
    assert method.name == "dora"
    layers = _lora_layers(tiny_vit)
    assert len(layers) == 4 * 6 and all(layer.use_dora["default"] for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(tiny_vit(images), before, atol=1e-5, rtol=1e-5)
    added = sum(p.numel() for layer in layers for n, p in layer.named_parameters()
                if n.startswith(("lora_A", "lora_B", "lora_magnitude_vector")))
    magnitudes = sum(p.numel() for layer in layers for n, p in layer.named_parameters()
                     if n.startswith("lora_magnitude_vector"))
    assert magnitudes == 6 * (192 + 64 + 192 + 64)  # one per output of qkv, proj, fc1, fc2
    counts = count_parameters(tiny_vit)
    assert counts["selected"] == added and counts["bias"] == 0


def test_dora_trains_merges_and_reloads_with_the_same_logits(tiny_vit, tmp_path, one_torch_thread):
    pretrained = copy.deepcopy(tiny_vit)
    method = DoRA(r=4)
    method.apply(tiny_vit)
    images = _train(tiny_vit, method)
    tiny_vit.eval()
    with torch.no_grad():
        logits = tiny_vit(images)
    path = save_tuned(tiny_vit, tmp_path / "tuned.safetensors", method, method.select(pretrained))
    reloaded = load_tuned(pretrained, path).eval()
    saved_method, selection = read_selection(path)
    assert type(saved_method) is DoRA and saved_method.config() == method.config() and selection.rule is None
    assert len(_lora_layers(reloaded)) == 4 * 6
    merged = merge(copy.deepcopy(tiny_vit)).eval()
    assert not _lora_layers(merged) and not hasattr(merged, "peft_method")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(images), logits, atol=1e-5, rtol=1e-5)


def test_dora_method_config_parses():
    from grft_lightning.training.cli import config_parser

    cfg = config_parser().parse_args(["fit", "--config", str(REPO / "configs/demo.yaml"),
                                      "--config", str(REPO / "configs/methods/dora.yaml")])
    method = cfg.fit.model.method
    assert method.class_path == "grft_lightning.methods.dora.DoRA" and method.init_args.r == 8
