"""Data preparation and preprocessing facts: the tfds versions and JPEG quality of
data/prepare_vtab_tfds.py, the extraction record it writes and the VTAB DataModule reads into
results.json, and normalisation from the weights timm actually loads (deprecated names too).
TensorFlow is not needed: only the script's pure parts are imported."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from synthetic_folders import make_vtab_folder

from grft_lightning.core.backbones import resolve_model_name
from grft_lightning.data import VTAB1k
from grft_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resolve_data_config
from grft_lightning.data.vtab import EXTRACTION_RECORD

REPO = Path(__file__).resolve().parents[1]


def _load_prepare():
    spec = importlib.util.spec_from_file_location("data_prepare_vtab_tfds_record", REPO / "data" / "prepare_vtab_tfds.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


prepare = _load_prepare()
RANGES = {"train800": ("train", 0, 800), "val200": ("train", 2944, 3144), "test": ("test", 0, 3669)}


# -- tfds versions and JPEG quality ------------------------------------------------------------
def test_pets_uses_the_tfds_version_that_exists():
    assert prepare.TASKS["pets"].tfds_name == "oxford_iiit_pet:4.*.*"
    assert not any(spec.tfds_name.startswith("oxford_iiit_pet:3") for spec in prepare.TASKS.values())


def test_jpeg_quality_defaults_to_pils_and_is_checked(capsys):
    parser = prepare.build_parser()
    assert prepare.DEFAULT_JPEG_QUALITY == 75
    assert parser.parse_args(["--out", "x"]).quality == 75
    assert parser.parse_args(["--out", "x", "--quality", "95"]).quality == 95
    for bad in ("0", "101", "high"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--out", "x", "--quality", bad])
    assert "JPEG quality must be" in capsys.readouterr().err


def test_pil_default_quality_is_75(tmp_path):
    """The default matches what PIL writes when no quality is given (NOAH's extraction)."""
    from PIL import Image

    image = Image.effect_noise((64, 64), 40).convert("RGB")
    image.save(tmp_path / "default.jpg")
    image.save(tmp_path / "q75.jpg", quality=prepare.DEFAULT_JPEG_QUALITY)
    assert (tmp_path / "default.jpg").read_bytes() == (tmp_path / "q75.jpg").read_bytes()


# -- the extraction record -------------------------------------------------------------------------
def test_extraction_record_contents():
    versions = {"tensorflow-datasets": "4.9.9", "tensorflow": "2.19.0", "pillow": "11.0.0"}
    record = prepare.extraction_record("pets", "oxford_iiit_pet/4.0.0", "jpg", 75, RANGES, versions,
                                       created="2025-01-01T00:00:00+00:00")
    assert record == {
        "summary": "tfds oxford_iiit_pet/4.0.0 (jpg quality 75, tensorflow-datasets 4.9.9) via "
                   "data/prepare_vtab_tfds.py",
        "tool": "data/prepare_vtab_tfds.py",
        "task": "pets",
        "tfds_requested": "oxford_iiit_pet:4.*.*",
        "tfds_dataset": "oxford_iiit_pet/4.0.0",
        "format": "jpg",
        "jpeg_quality": 75,
        "splits": {"train800": "train[0:800]", "val200": "train[2944:3144]", "test": "test[0:3669]"},
        "packages": versions,
        "created": "2025-01-01T00:00:00+00:00",
    }
    png = prepare.extraction_record("pets", "oxford_iiit_pet/4.0.0", "png", 75, RANGES, versions)
    assert png["jpeg_quality"] is None and "(png, " in png["summary"]


def test_package_versions_read_without_importing():
    versions = prepare.package_versions(("pillow", "surely-not-an-installed-package"))
    assert isinstance(versions["pillow"], str) and versions["surely-not-an-installed-package"] is None
    assert set(prepare.package_versions()) == {"tensorflow-datasets", "tensorflow", "pillow"}


def test_the_datamodule_reads_the_record_into_describe(tmp_path):
    task_dir = make_vtab_folder(tmp_path, "pets")
    record = prepare.extraction_record("pets", "oxford_iiit_pet/4.0.0", "jpg", 75, RANGES,
                                       prepare.package_versions())
    path = prepare.write_extraction_record(task_dir, record)
    assert Path(path).name == EXTRACTION_RECORD == "extraction.json"
    assert json.loads(Path(path).read_text()) == record
    facts = VTAB1k("pets", root=str(tmp_path)).describe()
    assert facts["extraction"] == record["summary"] and facts["extraction_record"] == record
    # a name given in the config still wins for the one-line key; the record stays
    facts = VTAB1k("pets", root=str(tmp_path), extraction="noah").describe()
    assert facts["extraction"] == "noah" and facts["extraction_record"] == record


def test_hand_written_note_and_unreadable_record(tmp_path):
    task_dir = Path(make_vtab_folder(tmp_path, "dtd"))
    (task_dir / "extraction.txt").write_text("noah-ssf download 2024-05\n")
    facts = VTAB1k("dtd", root=str(tmp_path)).describe()
    assert facts["extraction"] == "noah-ssf download 2024-05" and "extraction_record" not in facts
    (task_dir / EXTRACTION_RECORD).write_text("{not json")
    facts = VTAB1k("dtd", root=str(tmp_path)).describe()  # never raises: results.json is written after training
    assert facts["extraction"] == "unreadable extraction.json"
    assert str(task_dir / EXTRACTION_RECORD) in facts["extraction_record"]["error"]


# -- normalisation of the weights timm loads ---------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("vit_base_patch16_224_in21k", "vit_base_patch16_224.augreg_in21k"),  # GPS's and SSF's spelling
    ("swin_base_patch4_window7_224_in22k", "swin_base_patch4_window7_224.ms_in22k"),
    ("convnext_base_in22k", "convnext_base.fb_in22k"),
    ("vit_base_patch16_224.orig_in21k", "vit_base_patch16_224.orig_in21k"),  # current names unchanged
    ("test_vit", "test_vit"),
])
def test_deprecated_names_resolve_to_what_timm_creates(name, expected):
    assert resolve_model_name(name) == expected


@pytest.mark.parametrize("name, mean", [
    ("vit_base_patch16_224_in21k", (0.5, 0.5, 0.5)),
    ("vit_base_patch16_224.augreg_in21k", (0.5, 0.5, 0.5)),
    ("vit_base_patch16_224.orig_in21k", (0.5, 0.5, 0.5)),  # timm's config for Google's ViT-B_16.npz
    ("swin_base_patch4_window7_224_in22k", IMAGENET_MEAN),
    ("convnext_base.fb_in22k", IMAGENET_MEAN),
])
def test_normalisation_follows_the_loaded_weights(name, mean):
    cfg = resolve_data_config(name)
    assert cfg.mean == mean and cfg.std == (mean if mean != IMAGENET_MEAN else IMAGENET_STD)
    assert cfg.image_size == 224 and cfg.interpolation == "bicubic"


def test_old_vit_name_builds_the_same_weights_tag():
    import warnings

    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model("vit_base_patch16_224_in21k", pretrained=False, depth=1, embed_dim=32, num_heads=2)
    assert model.pretrained_cfg["tag"] == resolve_model_name("vit_base_patch16_224_in21k").split(".")[1]
    assert tuple(model.pretrained_cfg["mean"]) == resolve_data_config("vit_base_patch16_224_in21k").mean
