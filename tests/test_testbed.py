"""The ViT testbed: its timm registration, the glyph data it is pre-trained on, the pre-training
script (deterministic, resumable) and the MNIST-M task of its suite."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import grft_lightning  # noqa: F401  (registers the testbed model)
from grft_lightning.core.backbones import create_backbone
from grft_lightning.data.glyphs import CHARACTERS, difficulty_at, glyph_batch, usable_fonts
from grft_lightning.data.mnist import MNISTDigits
from grft_lightning.data.transforms import resolve_data_config
from grft_lightning.methods import GRFT
from grft_lightning.core.testbed import NAME, TAG

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_and_registration():
    model = timm.create_model(NAME, num_classes=10)
    assert isinstance(model, timm.models.VisionTransformer)
    assert len(model.blocks) == 6 and model.embed_dim == 128
    assert model.patch_embed.grid_size == (4, 4) and model.pos_embed.shape == (1, 17, 128)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # 6 blocks x (12 * 128^2 + 13 * 128 + 4 * 128 (norms)) + stem + pos/cls + final norm
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head")) == 1_257_432
    cfg = resolve_data_config(f"{NAME}.{TAG}")
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5) and cfg.image_size == 32


def test_weights_load_through_model_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model(NAME, num_classes=62)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_backbone(f"{NAME}.{TAG}", num_classes=10, weights=str(path))
    assert model.head.out_features == 10
    for name, tensor in model.state_dict().items():
        if not name.startswith("head"):
            assert torch.equal(tensor, source.state_dict()[name]), name


def test_sparse_methods_choose_among_the_block_matrices():
    model = timm.create_model(NAME, num_classes=10)
    method = GRFT(mode="row", rows_per_matrix=1)
    grads = {n: torch.randn(p.shape) for n, p in model.named_parameters() if n in method.gradient_names(model)}
    selection = method.select(model, grads)
    assert len(selection.layers) == 24 and not any(n.startswith("patch_embed") for n in selection.layers)
    method.apply(model, selection)
    chosen = [n for n, m in model.named_modules() if type(m).__name__ == "StructuredDelta"]
    assert len(chosen) == 24 and not any(n.startswith("patch_embed") for n in chosen)


def test_glyph_stream_is_a_function_of_seed_and_index():
    a_images, a_labels = glyph_batch(3, 7, 16)
    b_images, b_labels = glyph_batch(3, 7, 16)
    assert a_images.shape == (16, 3, 32, 32) and a_images.dtype == torch.uint8
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert not torch.equal(glyph_batch(3, 8, 16)[0], a_images)
    assert not torch.equal(glyph_batch(4, 7, 16)[0], a_images)


def test_curriculum():
    assert difficulty_at(0, 100) == 0.0 and difficulty_at(50, 100) == 0.5 and difficulty_at(500, 100) == 1.0
    assert difficulty_at(0, 0) == 1.0
    _, early = glyph_batch(0, 0, 256, ramp=1000)  # first half of the ramp: digits and capitals only
    assert int(early.max()) < 36
    _, late = glyph_batch(0, 2000, 256, ramp=1000)
    assert int(late.max()) >= 36 and int(late.max()) < len(CHARACTERS)


def test_fonts():
    names = [Path(p).name for p in usable_fonts()]
    assert len(names) >= 20 and "cmsy10.ttf" not in names and "DejaVuSans.ttf" in names


def _pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_vit", ROOT / "scripts" / "pretrain_vit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_pretraining_is_deterministic_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    script = _pretrain()

    def run(folder, *extra):
        return script.main(["--smoke", "--threads", "1", "--work_dir", str(tmp_path / folder / "work"),
                            "--out", str(tmp_path / folder / "w.safetensors"),
                            "--card", str(tmp_path / folder / "card"), *extra])

    card = run("straight")
    assert run("resumed", "--stop_at", "10") == {}  # stops after the step-10 checkpoint
    assert not (tmp_path / "resumed" / "w.safetensors").exists()
    resumed = run("resumed")
    straight_w = load_file(str(tmp_path / "straight" / "w.safetensors"))
    resumed_w = load_file(str(tmp_path / "resumed" / "w.safetensors"))
    assert straight_w.keys() == resumed_w.keys()
    assert all(torch.equal(straight_w[k], resumed_w[k]) for k in straight_w)
    assert card["sha256"] == resumed["sha256"]
    saved = json.loads((tmp_path / "straight" / "card.json").read_text())
    assert saved["recipe"]["steps"] == 20 and saved["parameters"] == 1_257_432 + 62 * 129
    assert 0.0 <= saved["held_out_top1"] <= 1.0 and len(saved["loss_log"]) == 2
    with pytest.raises(SystemExit):  # a checkpoint of another recipe is refused
        run("resumed", "--lr", "0.5")


def test_mnistm_task():
    data = MNISTDigits(task="mnistm", n_train=40, n_val=10, n_test=20, family="vit_suite")
    digits = MNISTDigits(task="digit", n_train=40, n_val=10, n_test=20)
    images, labels = data._split()["train"]
    plain, plain_labels = digits._split()["train"]
    assert images.shape == (40, 28, 28, 3) and images.dtype == np.uint8
    assert np.array_equal(labels, plain_labels)  # the same digits, blended
    assert data.dataset_name == "vit_suite/mnistm" and data.num_classes == 10
    assert "china.jpg" in data.describe()["source"]
    # |photo - digit|: where the digit is full white the colour is 255 - photo, where it is black the photo
    again = MNISTDigits(task="mnistm", n_train=40, n_val=10, n_test=20)._split()["train"][0]
    assert np.array_equal(images, again)
    assert np.abs(images.astype(int).mean(-1) - plain.astype(int)).mean() > 30
    with pytest.raises(ValueError, match="data.family"):
        MNISTDigits(family="a/b")
