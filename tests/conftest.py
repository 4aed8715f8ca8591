"""Shared fixtures: offline hub, restored global state, tiny timm models with random weights."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests never download.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch


@pytest.fixture(autouse=True)
def _offline_and_global_state(monkeypatch):
    """No downloads; default dtype, grad mode and RNG restored after each test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dtype = torch.get_default_dtype()
    grad = torch.is_grad_enabled()
    rng = torch.get_rng_state()
    yield
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.set_rng_state(rng)


@pytest.fixture
def one_torch_thread():
    """Run a test on one intra-op thread (restored after).

    The tiny models here take milliseconds per step; on a 2-core machine shared with other jobs
    two intra-op threads spin against each other and make the same test 10-40x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_vit(seed: int = 0) -> torch.nn.Module:
    """timm ``test_vit`` at 32x32 with 5 classes, random weights (embed 64, depth 6, mlp ratio 3)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5)
    _perturb_init(model)
    return model


def _tiny_cnn(seed: int = 0) -> torch.nn.Module:
    """timm ``test_efficientnet`` (BatchNorm, depthwise convs, squeeze-excite), 5 classes."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    _perturb_init(model)
    return model


def _perturb_init(model: torch.nn.Module) -> None:
    # timm initialises biases (and the ViT head) to exactly zero and BN to identity; random values
    # make "changed" / "unchanged" and round-trip checks meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith(("pos_embed", "cls_token")) or p.abs().max() == 0:
                p.add_(0.02 * torch.randn_like(p))
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    """A fresh tiny ViT per test (timm ``test_vit``, img_size=32, num_classes=5, random weights)."""
    return _tiny_vit()


@pytest.fixture
def tiny_cnn() -> torch.nn.Module:
    """A fresh tiny CNN per test (timm ``test_efficientnet``, num_classes=5, random weights)."""
    return _tiny_cnn()
