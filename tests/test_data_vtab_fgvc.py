"""VTAB-1k and FGVC DataModules, their configs, and the data/ scripts, on tiny folders."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from synthetic_folders import (
    fgvc_class_id,
    label_color,
    make_fgvc_folder,
    make_vtab_folder,
    write_image,
)

from grft_lightning.data import FGVC, ImageClassificationData, VTAB1k
from grft_lightning.data.fgvc import FGVC_DATASETS
from grft_lightning.data.folders import DatasetError
from grft_lightning.data.vtab import VTAB_TASKS

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"data_{name}", REPO / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


prepare = load_script("prepare_vtab_tfds")
check_dataset = load_script("check_dataset")


def sizes(dm) -> dict[str, int]:
    dm.setup("fit")
    return {split: len(dm.raw_split(split)) for split in ("train", "val", "test")}


# -- splits and labels ------------------------------------------------------------------------
@pytest.mark.parametrize("protocol, expected", [
    ("final", {"train": 12, "val": 4, "test": 6}),  # train800val200 / val200 / test
    ("tune", {"train": 8, "val": 4, "test": 4}),  # train800 / val200 / val200
])
def test_vtab_split_sizes(tmp_path, protocol, expected):
    make_vtab_folder(tmp_path, "kitti")
    dm = VTAB1k("kitti", root=str(tmp_path), protocol=protocol)
    assert sizes(dm) == expected
    assert dm.num_classes == 4 and dm.dataset_name == "vtab/kitti"
    assert {label for _, label in dm.raw_split("train").samples} == {0, 1, 2, 3}
    facts = dm.describe()
    assert facts["task_group"] == "structured" and facts["protocol"] == protocol
    assert facts["benchmark"] == "vtab-1k" and facts["skipped_images"] == 0
    assert facts["extraction"] == "unrecorded"


def test_vtab_root_forms_and_extraction_note(tmp_path, monkeypatch):
    task_dir = make_vtab_folder(tmp_path / "vtab-1k", "dtd")  # <root>/vtab-1k/<task>/ is found too
    Path(task_dir, "extraction.txt").write_text("tfds dtd/3.0.1\n")
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    dm = VTAB1k("dtd", root="$MY_DATA")
    assert sizes(dm)["train"] == 12
    assert dm.describe()["extraction"] == "tfds dtd/3.0.1"
    assert VTAB1k("dtd", root="$MY_DATA", extraction="noah").describe()["extraction"] == "noah"


@pytest.mark.parametrize("protocol, expected", [
    ("final", {"train": 3 * 102, "val": 102, "test": 102}),  # train+val / val / test
    ("tune", {"train": 2 * 102, "val": 102, "test": 102}),  # train / val / val
])
def test_fgvc_split_sizes(tmp_path, protocol, expected):
    make_fgvc_folder(tmp_path, "flowers", {"train": 2, "val": 1, "test": 1})
    dm = FGVC("flowers", root=str(tmp_path), protocol=protocol)
    assert sizes(dm) == expected
    assert dm.augmentation == "fgvc" and dm.dataset_name == "fgvc/flowers"
    assert dm.describe()["benchmark"] == "fgvc" and dm.describe()["protocol"] == protocol


def test_fgvc_label_remapping(tmp_path):
    make_fgvc_folder(tmp_path, "flowers")
    dm = FGVC("flowers", root=str(tmp_path))
    # original ids 5, 8, 11, ... become 0, 1, 2, ... in order of the original id
    assert dm.class_index == {fgvc_class_id(c): c for c in range(102)}
    dm.setup()
    for path, label in dm.raw_split("test").samples:
        assert label == int(Path(path).parent.name.removeprefix("class_"))


# -- transforms -------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone, mean, std", [
    ("test_vit", (0.5,) * 3, (0.5,) * 3),  # AugReg-style ViT config: mean = std = 0.5
    ("resnet18.a1_in1k", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet statistics
])
def test_transform_shape_and_normalisation(tmp_path, backbone, mean, std):
    make_vtab_folder(tmp_path, "kitti")
    # 32: a size both backbones take (check() refuses one test_vit's patch size 16 does not divide)
    dm = VTAB1k("kitti", root=str(tmp_path), backbone=backbone, image_size=32, num_workers=0)
    dm.setup()
    image, label = dm.dataset("test")[0]  # a PNG, solid colour of label 0: exact after resize
    assert image.shape == (3, 32, 32) and label == 0
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(label_color(0), mean, std)])
    torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (min(dm.batch_size, 12), 3, 32, 32)
    assert labels.dtype == torch.int64


def test_fgvc_transforms_and_grey_images(tmp_path):
    make_fgvc_folder(tmp_path, "flowers")
    first = os.path.join(tmp_path, "oxfordflower", "class_000", "train_0.png")
    from PIL import Image

    Image.new("L", (10, 7), 128).save(first)  # a greyscale image is converted to RGB
    dm = FGVC("flowers", root=str(tmp_path), backbone="test_vit", image_size=32)
    dm.setup()
    raw, _ = dm.raw_split("train")[0]
    assert raw.mode == "RGB"
    assert dm.dataset("train")[0][0].shape == (3, 32, 32)  # random resized crop
    assert dm.dataset("test")[0][0].shape == (3, 32, 32)  # resize 36 + center crop


# -- bad data stops before training ------------------------------------------------------------
def test_unset_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("VTAB_ROOT", raising=False)
    with pytest.raises(DatasetError, match=r"VTAB_ROOT.*not set(.|\n)*Expected layout"):
        VTAB1k("dtd").setup()


def test_missing_root_and_task_folder(tmp_path):
    with pytest.raises(DatasetError, match="nowhere.*is not a folder"):
        VTAB1k("dtd", root=str(tmp_path / "nowhere")).setup()
    with pytest.raises(DatasetError, match=r"no folder for task 'cifar100'.*cifar(.|\n)*Expected layout"):
        VTAB1k("cifar100", root=str(tmp_path)).setup()
    with pytest.raises(DatasetError, match=r"CUB_200_2011(.|\n)*Expected layout"):
        FGVC("cub", root=str(tmp_path)).setup()


def test_unknown_names():
    with pytest.raises(ValueError, match="valid tasks: cifar100, caltech101"):
        VTAB1k("cifar10")
    with pytest.raises(ValueError, match="valid: cub, nabirds"):
        FGVC("birds")


def test_missing_list_file(tmp_path):
    task_dir = make_vtab_folder(tmp_path, "kitti")
    os.remove(os.path.join(task_dir, "test.txt"))
    with pytest.raises(DatasetError, match="test.txt does not exist"):
        VTAB1k("kitti", root=str(tmp_path)).setup()


def _append(path: str, line: str) -> int:
    with open(path, "a") as f:
        f.write(line + "\n")
    return sum(1 for _ in open(path))


@pytest.mark.parametrize("line, message", [
    ("images/test/000000.png", "malformed line 'images/test/000000.png'"),
    ("images/test/000000.png three", "malformed line 'images/test/000000.png three'"),
    ("images/test/000000.png 4", r"label 4 is outside 0..3 \(kitti has 4 classes\)"),
    ("images/test/000000.png -1", "label -1 is outside"),
])
def test_bad_list_line_names_file_and_line(tmp_path, line, message):
    list_file = os.path.join(make_vtab_folder(tmp_path, "kitti"), "test.txt")
    lineno = _append(list_file, line)
    with pytest.raises(DatasetError, match=f"test.txt:{lineno}: {message}"):
        VTAB1k("kitti", root=str(tmp_path)).setup()


def test_listed_image_missing(tmp_path):
    list_file = os.path.join(make_vtab_folder(tmp_path, "kitti"), "train800.txt")
    lineno = _append(list_file, "images/train800/gone.jpg 1")
    with pytest.raises(DatasetError, match=f"train800.txt:{lineno}: image .*gone.jpg does not exist"):
        VTAB1k("kitti", root=str(tmp_path), protocol="tune").setup()


def test_json_key_without_image(tmp_path):
    dataset_dir = make_fgvc_folder(tmp_path, "flowers")
    train_json = os.path.join(dataset_dir, "train.json")
    mapping = json.load(open(train_json))
    mapping["class_000/not_there.jpg"] = fgvc_class_id(0)
    json.dump(mapping, open(train_json, "w"))
    with pytest.raises(DatasetError, match=r"train.json key 'class_000/not_there.jpg': image .* does not exist"):
        FGVC("flowers", root=str(tmp_path)).setup()


def test_bad_json_files(tmp_path):
    dataset_dir = make_fgvc_folder(tmp_path, "flowers")
    val_json = os.path.join(dataset_dir, "val.json")
    mapping = json.load(open(val_json))
    json.dump({k: v for k, v in mapping.items() if v != fgvc_class_id(101)}, open(val_json, "w"))
    for name in ("train", "test"):  # class 101 gone from all three files: 101 ids, not 102
        path = os.path.join(dataset_dir, f"{name}.json")
        json.dump({k: v for k, v in json.load(open(path)).items() if v != fgvc_class_id(101)}, open(path, "w"))
    with pytest.raises(DatasetError, match="oxfordflower: .*hold 101 distinct class ids.*102 classes"):
        FGVC("flowers", root=str(tmp_path)).setup()
    Path(val_json).write_text('{\n"a.jpg": 1,\n')
    with pytest.raises(DatasetError, match=r"val.json:3: not valid JSON"):
        FGVC("flowers", root=str(tmp_path)).setup()
    Path(val_json).write_text('{"class_000/val_0.png": "first"}')
    with pytest.raises(DatasetError, match=r"val.json key 'class_000/val_0.png': class id 'first' is not an integer"):
        FGVC("flowers", root=str(tmp_path)).setup()


# -- paths outside the folder, empty splits, classes, image sizes ----------------------------
@pytest.mark.parametrize("rel", ["../secret.png", "images/../../secret.png", "/etc/passwd"])
def test_list_paths_outside_the_task_folder_are_refused(tmp_path, rel):
    task_dir = make_vtab_folder(tmp_path / "data", "kitti")
    outside = tmp_path / "data" / "secret.png"  # the task folder's parent: outside it
    write_image(str(outside), label_color(1))
    list_file = os.path.join(task_dir, "test.txt")
    lineno = _append(list_file, f"{rel} 1")
    expected = (f"{list_file}:{lineno}: image path '{rel}' is outside the folder {task_dir} "
                ".*data.init_args.allow_outside_root: true")
    with pytest.raises(DatasetError, match=expected):
        VTAB1k("kitti", root=str(tmp_path / "data")).check()
    if rel != "/etc/passwd":  # allowed explicitly, the image outside is read
        dm = VTAB1k("kitti", root=str(tmp_path / "data"), allow_outside_root=True)
        assert sizes(dm)["test"] == 7
        assert os.path.samefile(dm.raw_split("test").samples[-1][0], outside)


def test_paths_inside_the_folder_and_symlinks_are_accepted(tmp_path):
    task_dir = make_vtab_folder(tmp_path / "data", "kitti")
    elsewhere = tmp_path / "other_disk"
    os.rename(os.path.join(task_dir, "images"), elsewhere)
    os.symlink(elsewhere, os.path.join(task_dir, "images"))  # a link inside the folder: followed
    list_file = os.path.join(task_dir, "test.txt")
    _append(list_file, "images/./train800/../test/000001.jpg 1")
    assert sizes(VTAB1k("kitti", root=str(tmp_path / "data")))["test"] == 7


def test_fgvc_keys_outside_the_image_folder_are_refused(tmp_path):
    dataset_dir = make_fgvc_folder(tmp_path, "flowers")
    train_json = os.path.join(dataset_dir, "train.json")
    mapping = json.load(open(train_json))
    mapping["../../escape.png"] = fgvc_class_id(0)
    with open(train_json, "w") as f:
        json.dump(mapping, f, indent=0)
    lineno = next(i for i, line in enumerate(open(train_json), 1) if "escape" in line)
    with pytest.raises(DatasetError, match=f"train.json:{lineno}: image path '../../escape.png' is outside "
                                           ".*data.init_args.allow_outside_root: true"):
        FGVC("flowers", root=str(tmp_path)).check()


@pytest.mark.parametrize("split, where", [("train800", "train800val200.txt"), ("test", "test.txt")])
def test_an_empty_split_is_refused(tmp_path, split, where):
    counts = {"train800": 8, "val200": 4, "test": 6, split: 0}
    if split == "train800":
        counts["val200"] = 0  # train800val200 = train800 + val200: empty as well
    make_vtab_folder(tmp_path, "kitti", counts)
    split_name = "train" if split == "train800" else "test"
    with pytest.raises(DatasetError, match=f"the {split_name} split of vtab/kitti is empty "
                                           fr"\(list file {where}\); every split needs at least one image"):
        VTAB1k("kitti", root=str(tmp_path)).check()


def test_all_images_skipped_leaves_an_empty_split(tmp_path):
    task_dir = make_vtab_folder(tmp_path, "kitti", {"train800": 8, "val200": 4, "test": 1})
    _corrupt(os.path.join(task_dir, "images", "test", "000000.png"))
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="the test split of vtab/kitti is empty"):
        VTAB1k("kitti", root=str(tmp_path), skip_bad_images=True).check()


@pytest.mark.parametrize("classes", [0, 1])
def test_fewer_than_two_classes_are_refused(classes):
    from grft_lightning.data import SyntheticImages

    with pytest.raises(DatasetError, match=f"synthetic has {classes} class.*at least 2 .data.init_args.num_classes"):
        SyntheticImages(num_classes=classes).check()


def test_synthetic_empty_split_names_its_option():
    from grft_lightning.data import SyntheticImages

    with pytest.raises(DatasetError, match=r"the train split of synthetic is empty \(data.init_args.n_train: 0\)"):
        SyntheticImages(n_train=0).check()


@pytest.mark.parametrize("backbone, size, reason", [
    ("test_vit", 33, "divisible by patch size"),  # patch 16
    ("vit_convstem_w128d6_32.glyphs62", 30, ""),  # conv stem: 17 tokens for a 10-token embedding
    ("test_vit", 8, ""),  # smaller than one patch
])
def test_an_image_size_the_backbone_cannot_take_is_refused(backbone, size, reason):
    from grft_lightning.data import SyntheticImages
    from grft_lightning.core.errors import ConfigError

    dm = SyntheticImages(backbone=backbone, image_size=size)
    with pytest.raises(ConfigError, match=f"model.image_size: backbone '{backbone}' cannot take {size} px images "
                                          f".*{reason}.*its pretrained size is"):
        dm.check()
    assert dm._splits == {}  # refused before any split is read


@pytest.mark.parametrize("backbone, size", [("test_vit", 32), ("test_vit", None), ("vit_convstem_w128d6_32.glyphs62", 40),
                                            ("mobilenetv2_100", 33), ("no_such_backbone_xyz", 33)])
def test_image_sizes_the_backbone_takes_pass(backbone, size):
    from grft_lightning.core.backbones import check_image_size

    check_image_size(backbone, size)  # an unknown name is left to the model's own build


def _corrupt(path: str) -> None:
    Path(path).write_bytes(b"this is not an image")


def test_undecodable_image_stops_by_default(tmp_path):
    task_dir = make_vtab_folder(tmp_path, "kitti")
    _corrupt(os.path.join(task_dir, "images", "test", "000003.jpg"))
    with pytest.raises(DatasetError, match=r"test.txt:4: cannot decode image .*000003.jpg(.|\n)*skip_bad_images"):
        VTAB1k("kitti", root=str(tmp_path)).setup()


def test_skip_bad_images_counts_each_file_once(tmp_path):
    task_dir = make_vtab_folder(tmp_path, "kitti")
    # a val200 image is in train800val200 (train) and val200 (val) under `final`: counted once
    _corrupt(os.path.join(task_dir, "images", "val200", "000001.jpg"))
    _corrupt(os.path.join(task_dir, "images", "test", "000002.png"))
    dm = VTAB1k("kitti", root=str(tmp_path), skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipping unreadable image") as caught:
        assert sizes(dm) == {"train": 11, "val": 3, "test": 5}
    named = " ".join(str(w.message) for w in caught)
    assert "val200/000001.jpg" in named and "test/000002.png" in named
    assert dm.skipped_images == 2 and dm.describe()["skipped_images"] == 2


def test_fgvc_skip_bad_images(tmp_path):
    make_fgvc_folder(tmp_path, "flowers")
    _corrupt(os.path.join(tmp_path, "oxfordflower", "class_004", "test_0.png"))
    with pytest.raises(DatasetError, match=r"test.json key 'class_004/test_0.png': cannot decode"):
        FGVC("flowers", root=str(tmp_path)).setup()
    dm = FGVC("flowers", root=str(tmp_path), skip_bad_images=True)
    with pytest.warns(UserWarning, match="class_004/test_0.png"):
        assert sizes(dm)["test"] == 101
    assert dm.describe()["skipped_images"] == 1


def test_verify_images_off_only_checks_existence(tmp_path):
    task_dir = make_vtab_folder(tmp_path, "kitti")
    _corrupt(os.path.join(task_dir, "images", "test", "000000.png"))
    dm = VTAB1k("kitti", root=str(tmp_path), verify_images=False)
    assert sizes(dm)["test"] == 6
    with pytest.raises(DatasetError, match="cannot decode image .*000000.png"):
        dm.raw_split("test")[0]  # the loader still names the file


# -- the CLI surface ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [VTAB1k, FGVC])
def test_arguments_are_documented_and_reach_the_cli(cls):
    """Own arguments are in the docstring; the base class's arrive through **kwargs, which the
    CLI's parser resolves, so every loader option is settable (and shown in --help)."""
    from jsonargparse import ArgumentParser

    own = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    for name in own:
        assert f"    {name}: " in cls.__doc__, f"{cls.__name__}.{name} is not in the docstring"
    parser = ArgumentParser()
    parser.add_subclass_arguments(ImageClassificationData, "data")
    base = set(inspect.signature(ImageClassificationData.__init__).parameters) - {"self"}
    key = "task" if cls.__name__ == "VTAB1k" else "dataset"
    value = "dtd" if key == "task" else "cub"
    cfg = parser.parse_args(["--data", f"{cls.__module__}.{cls.__name__}", f"--data.{key}", value,
                             "--data.batch_size", "7", "--data.num_workers", "1"])
    assert base <= set(cfg.data.init_args.keys())
    data = parser.instantiate_classes(cfg).data
    assert (data.batch_size, data.num_workers) == (7, 1)


def test_data_blocks_of_configs_parse(monkeypatch):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(ImageClassificationData, "data")
    for family, key in (("vtab", "task"), ("fgvc", "dataset")):
        base = yaml.safe_load((REPO / "configs" / family / "base.yaml").read_text())["data"]
        for path in sorted((REPO / "configs" / family).glob("*.yaml")):
            if path.name == "base.yaml":
                continue
            own = yaml.safe_load(path.read_text())["data"]
            cfg = parser.parse_args(["--data", yaml.safe_dump(base), "--data", yaml.safe_dump(own)])
            dm = parser.instantiate_classes(cfg).data
            assert getattr(dm, "task" if family == "vtab" else "dataset_key") == path.stem
            assert dm.batch_size == own["init_args"]["batch_size"] and dm.num_workers == 8


# -- configs -----------------------------------------------------------------------------------
VTAB_RECIPES = {  # task: (batch, lr, drop-path), docs/data.md
    "cifar100": (32, 1e-2, 0), "caltech101": (16, 2e-3, 0), "dtd": (16, 2e-3, 0),
    "flowers102": (16, 2e-3, 0), "pets": (32, 3e-3, 0), "svhn": (32, 5e-3, 0),
    "sun397": (16, 2.5e-3, 0), "patch_camelyon": (32, 4e-3, 0), "eurosat": (16, 2e-3, 0),
    "resisc45": (16, 1.5e-3, 0.1), "diabetic_retinopathy": (32, 2e-3, 0.2),
    "clevr_count": (16, 3e-4, 0.1), "clevr_dist": (16, 2e-3, 0.1), "dmlab": (16, 1.5e-3, 0.1),
    "kitti": (16, 1e-3, 0), "dsprites_loc": (32, 7e-3, 0), "dsprites_ori": (16, 5e-4, 0.2),
    "smallnorb_azi": (32, 3e-3, 0.1), "smallnorb_ele": (32, 3e-4, 0.2),
}
FGVC_RECIPES = {  # dataset: (batch, lr, drop-path, EMA decay)
    "cub": (32, 3e-3, 0, 0.9998), "nabirds": (32, 1e-4, 0.1, 0.9998), "flowers": (32, 1e-3, 0.1, 0.99),
    "dogs": (64, 1e-4, 0, 0.9998), "cars": (32, 5e-4, 0, 0.9998),
}


VIT_B16 = "vit_base_patch16_224.augreg_in21k"


def _resolved(tmp_path, monkeypatch, config: str, *extra: str):
    """A shipped config as the real CLI parses and builds it (no fit). The backbone the module asks
    for is recorded and built as the tiny ``test_vit`` (nothing downloaded); everything else
    (trainer, method, optimizer factory, data module, links) is the real object."""
    import grft_lightning.training.module as module
    from grft_lightning.core.backbones import create_backbone
    from grft_lightning.training.cli import cli_main

    asked = {}

    def tiny(name, num_classes, pretrained=True, weights=None, weights_format="auto", drop_path_rate=0.0,
             image_size=None):
        asked.update(name=name, num_classes=num_classes, pretrained=pretrained, weights=weights,
                     drop_path_rate=drop_path_rate, image_size=image_size)
        return create_backbone("test_vit", num_classes, pretrained=False, drop_path_rate=drop_path_rate, image_size=32)

    monkeypatch.setattr(module, "create_backbone", tiny)
    cli = cli_main(["--config", str(REPO / config), "--wandb.mode", "disabled", "--run_dir", str(tmp_path / "run"),
                    *extra], run=False)
    return cli, asked


def _optimizer(cli) -> torch.optim.Optimizer:
    """The optimizer the run would train with (configure_optimizers' factory on the tuned tensors)."""
    return cli.model.optimizer_factory(cli.model.parameter_groups())


def _drop_path(model) -> float:
    """Stochastic depth of the last block (timm: linear from 0 to the rate over the depth)."""
    layer = model.blocks[-1].drop_path1
    return 0.0 if isinstance(layer, torch.nn.Identity) else layer.drop_prob


@pytest.mark.parametrize("family, first", [("vtab", "dtd"), ("fgvc", "flowers")])
def test_base_configs(tmp_path, monkeypatch, family, first):
    """base.yaml as built by the real CLI (with one task named on the command line)."""
    from timm.data import Mixup

    from grft_lightning.methods import GRFT

    monkeypatch.setenv(f"{family.upper()}_ROOT", str(tmp_path))
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    key = "task" if family == "vtab" else "dataset"
    cli, asked = _resolved(tmp_path, monkeypatch, f"configs/{family}/base.yaml", f"--data.init_args.{key}", first)
    dm, model, trainer = cli.datamodule, cli.model, cli.trainer
    assert os.environ["PL_GLOBAL_SEED"] == "0"  # seed_everything: 0
    assert (trainer.max_epochs, trainer.precision, trainer.log_every_n_steps) == (100, "bf16-mixed", 10)
    assert (cli.config["trainer"]["accelerator"], cli.config["trainer"]["devices"]) == ("auto", "auto")
    assert asked == {"name": VIT_B16, "num_classes": dm.num_classes, "pretrained": True, "weights": None,
                     "drop_path_rate": 0.0, "image_size": None}
    optimizer = _optimizer(cli)
    assert type(optimizer) is torch.optim.AdamW
    assert all(g["lr"] == 1e-3 and g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    assert (model.hparams.warmup_epochs, model.hparams.warmup_start_lr, model.hparams.min_lr) == (10, 1e-7, 1e-8)
    method = model.method
    assert type(method) is GRFT
    fraction = 0.003 if family == "vtab" else 0.0122
    assert (method.mode, method.fraction, method.regularization, method.reg_lambda) == ("row", fraction, "l2sp", 1e-4)
    assert type(dm) is (VTAB1k if family == "vtab" else FGVC)
    assert (dm.protocol, dm.num_workers) == ("final", 8)
    config = dm.data_config  # preprocessing follows the backbone's pretrained config (linked)
    assert (config.image_size, config.mean) == (224, (0.5, 0.5, 0.5))
    if family == "vtab":  # the root is $VTAB_ROOT
        (tmp_path / VTAB_TASKS[first].folder).mkdir()
        assert dm.data_dir == str(tmp_path / VTAB_TASKS[first].folder)
        assert dm.augmentation == "resize" and model.mixup_fn is None
        assert (model.hparams.label_smoothing, model.hparams.ema_decay) == (0.0, None)
    else:  # the root is $FGVC_ROOT
        assert dm.resolved_root == str(tmp_path) and dm.augmentation == "fgvc"
        mixup = model.mixup_fn
        assert isinstance(mixup, Mixup) and (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.8, 1.0, 0.1)
        assert model.hparams.ema_decay == 0.9998


@pytest.mark.parametrize("family", ["vtab", "fgvc"])
def test_task_configs_match_recipes(tmp_path, monkeypatch, family):
    """Every task file, through its base include, builds the recipe: batch size, lr, drop-path
    (and EMA on FGVC), with the base's trainer untouched."""
    recipes = VTAB_RECIPES if family == "vtab" else FGVC_RECIPES
    names = {p.stem for p in (REPO / "configs" / family).glob("*.yaml")} - {"base"}
    assert names == set(VTAB_TASKS if family == "vtab" else FGVC_DATASETS) == set(recipes)
    for name, (batch, lr, drop, *ema) in sorted(recipes.items()):
        cli, asked = _resolved(tmp_path / name, monkeypatch, f"configs/{family}/{name}.yaml")
        dm, model = cli.datamodule, cli.model
        assert (dm.task if family == "vtab" else dm.dataset_key) == name
        assert dm.batch_size == batch and model.hparams.num_classes == dm.num_classes, name
        groups = _optimizer(cli).param_groups
        assert all(type(g["lr"]) is float and g["lr"] == lr and g["weight_decay"] == 0.0 for g in groups), name
        assert (asked["name"], asked["drop_path_rate"]) == (VIT_B16, drop), name
        assert _drop_path(model.model) == pytest.approx(drop, abs=1e-6), name  # the blocks got it
        assert model.hparams.ema_decay == (ema[0] if ema else None), name
        assert (cli.trainer.precision, cli.trainer.max_epochs) == ("bf16-mixed", 100), name


# -- data/check_dataset.py ----------------------------------------------------------------------
def test_check_dataset_good_folder(tmp_path, capsys):
    make_vtab_folder(tmp_path, "kitti")
    make_fgvc_folder(tmp_path, "flowers")
    assert check_dataset.main(["vtab", "kitti", "--root", str(tmp_path), "--per-class"]) == 0
    out = capsys.readouterr().out
    assert "| train800 | 8 | 4 | 2 | 2 | 0 |" in out and "| 3 | 2 | 1 | 3 | 1 |" in out
    assert "vtab/kitti: OK" in out
    assert check_dataset.main(["fgvc", "flowers", "--root", str(tmp_path)]) == 0
    assert "| test | 102 | 102 | 1 | 1 | 0 |" in capsys.readouterr().out


def test_check_dataset_bad_folder(tmp_path, capsys):
    task_dir = make_vtab_folder(tmp_path, "kitti")
    _corrupt(os.path.join(task_dir, "images", "val200", "000000.png"))
    lineno = _append(os.path.join(task_dir, "test.txt"), "images/test/000000.png 9")
    assert check_dataset.main(["vtab", "kitti", "dtd", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM:")]
    unreadable = [line for line in problems if "val200/000000.png" in line]
    assert len(unreadable) == 1 and "val200.txt:1: image" in unreadable[0]  # once, first list
    assert f"test.txt:{lineno}: label 9 is outside" in out
    assert "| val200 | 4 | 4 | 1 | 1 | 1 |" in out and "| train800val200 | 12 | 4 | 3 | 3 | 1 |" in out
    assert "no folder for task 'dtd'" in out and "0 of 2 OK" in out


# -- data/prepare_vtab_tfds.py (pure parts) ------------------------------------------------------
def test_prepare_tasks_cover_vtab():
    assert set(prepare.TASKS) == set(VTAB_TASKS)


@pytest.mark.parametrize("task, split_sizes, expected", [
    ("cifar100", {"train": 50000, "test": 10000},
     {"train800": ("train", 0, 800), "val200": ("train", 45000, 45200), "test": ("test", 0, 10000)}),
    ("pets", {"train": 3680, "test": 3669},  # VTAB's pets val is the last 20 %, not 10 %
     {"train800": ("train", 0, 800), "val200": ("train", 2944, 3144), "test": ("test", 0, 3669)}),
    ("svhn", {"train": 73257, "test": 26032},
     {"train800": ("train", 0, 800), "val200": ("train", 65931, 66131), "test": ("test", 0, 26032)}),
    ("dtd", {"train": 1880, "validation": 1880, "test": 1880},
     {"train800": ("train", 0, 800), "val200": ("validation", 0, 200), "test": ("test", 0, 1880)}),
    ("eurosat", {"train": 27000},
     {"train800": ("train", 0, 800), "val200": ("train", 16200, 16400), "test": ("train", 21600, 27000)}),
    ("clevr_count", {"train": 70000, "validation": 15000, "test": 15000},
     {"train800": ("train", 0, 800), "val200": ("train", 63000, 63200), "test": ("validation", 0, 15000)}),
    ("dsprites_loc", {"train": 737280},
     {"train800": ("train", 0, 800), "val200": ("train", 589824, 590024), "test": ("train", 663552, 737280)}),
    ("smallnorb_ele", {"train": 24300, "test": 24300},
     {"train800": ("train", 0, 800), "val200": ("test", 0, 200), "test": ("test", 12150, 24300)}),
])
def test_prepare_split_arithmetic(task, split_sizes, expected):
    assert prepare.vtab1k_ranges(task, split_sizes) == expected
    assert prepare.tfds_split_string(*expected["val200"]).endswith(f"[{expected['val200'][1]}:{expected['val200'][2]}]")


def test_prepare_rejects_too_small_split():
    with pytest.raises(ValueError, match="need 800"):
        prepare.vtab1k_ranges("dtd", {"train": 500, "validation": 500, "test": 500})


def test_prepare_list_files_round_trip(tmp_path):
    task_dir = tmp_path / "kitti"
    task_dir.mkdir()
    labels = {"train800": [0, 1, 2], "val200": [3, 0], "test": [1, 1, 2, 3]}
    prepare.write_lists(str(task_dir), labels, "jpg")
    lines = (task_dir / "train800val200.txt").read_text().splitlines()
    assert lines == ["images/train800/000000.jpg 0", "images/train800/000001.jpg 1",
                     "images/train800/000002.jpg 2", "images/val200/000000.jpg 3",
                     "images/val200/000001.jpg 0"]
    for split, split_labels in labels.items():
        for i, label in enumerate(split_labels):
            write_image(str(task_dir / prepare.image_relpath(split, i, "jpg")), label_color(label))
    dm = VTAB1k("kitti", root=str(tmp_path))
    assert sizes(dm) == {"train": 5, "val": 2, "test": 4}
    assert [label for _, label in dm.raw_split("test").samples] == [1, 1, 2, 3]


def test_prepare_derived_labels():
    import numpy as np

    clevr = {"objects": {"size": np.zeros(5), "pixel_coords": np.array([[1, 2, 9.2], [3, 4, 8.4]])}}
    assert prepare.derive_label("clevr_count", clevr) == 2  # 5 objects -> class 2 (3..10 -> 0..7)
    assert prepare.derive_label("clevr_dist", clevr) == 1  # closest 8.4 in (8.0, 8.5]
    clevr["objects"]["pixel_coords"] = np.array([[0, 0, 8.0]])
    assert prepare.derive_label("clevr_dist", clevr) == 0  # thresholds are strict: 8.0 -> (0, 8]
    kitti = {"objects": {"type": np.array([3, 0, 1]), "location": np.array([[0, 0, 2.0], [0, 0, 25.0], [0, 0, 12.0]])}}
    assert prepare.derive_label("kitti", kitti) == 1  # closest vehicle (van) at 12 m; pedestrian ignored
    kitti["objects"]["type"] = np.array([3, 4, 5])
    assert prepare.derive_label("kitti", kitti) == 3  # no vehicle
    assert prepare.derive_label("dsprites_loc", {"label_x_position": np.int64(31)}) == 15
    assert [prepare.derive_label("dsprites_ori", {"label_orientation": v}) for v in (0, 2, 3, 39)] == [0, 0, 1, 15]
    assert prepare.derive_label("smallnorb_azi", {"label_azimuth": np.int64(17)}) == 17
    dsprite = prepare.to_uint8_image("dsprites_loc", np.ones((4, 4, 1), dtype=np.uint8))
    assert dsprite.shape == (4, 4) and dsprite.max() == 255


# -- the real CLI on a synthetic folder ---------------------------------------------------------
def _cli_args(tmp_path, configs):
    task_root = tmp_path / "data"
    make_vtab_folder(task_root, "dtd")
    args = ["fit"] + [a for c in configs for a in ("--config", str(REPO / c))]
    return args + [
        "--model.backbone", "test_vit", "--model.pretrained", "false", "--model.image_size", "32",
        "--model.warmup_epochs", "0",
        "--trainer.max_epochs", "1", "--trainer.precision", "32", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
        "--data.init_args.root", str(task_root), "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "4", "--selection.max_batches", "1", "--selection.progress", "false",
        "--wandb.mode", "disabled", "--run_dir", str(tmp_path / "run"),
    ]


def test_cli_fit_on_vtab_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from grft_lightning.training.cli import cli_main

    args = _cli_args(tmp_path, ["configs/vtab/base.yaml", "configs/vtab/dtd.yaml"])
    ranges = {"train800": ("train", 0, 800), "val200": ("validation", 0, 200), "test": ("test", 0, 1880)}
    record = prepare.extraction_record("dtd", "dtd/3.0.1", "jpg", 75, ranges, {"tensorflow-datasets": "4.9.9"})
    prepare.write_extraction_record(str(tmp_path / "data" / "dtd"), record)
    cli_main(args)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"] == "vtab/dtd" and results["task_group"] == "natural"
    assert results["protocol"] == "final" and results["skipped_images"] == 0
    assert results["benchmark"] == "vtab-1k"
    assert results["extraction"] == record["summary"] and results["extraction_record"] == record


def test_cli_task_config_includes_its_base(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from grft_lightning.training.cli import cli_main, expand_config_includes

    expanded = expand_config_includes(["fit", "--config", str(REPO / "configs/vtab/dtd.yaml")])
    assert expanded == ["fit", "--config", str(REPO / "configs/vtab/base.yaml"),
                        "--config", str(REPO / "configs/vtab/dtd.yaml")]
    cli = cli_main(_cli_args(tmp_path, ["configs/vtab/dtd.yaml"]))
    assert cli.model.hparams.backbone == "test_vit"
    assert cli.datamodule.task == "dtd" and cli.datamodule.batch_size == 4
    assert (tmp_path / "run" / "results.json").is_file()
