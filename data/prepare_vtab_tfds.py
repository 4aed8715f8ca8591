"""Build VTAB-1k task folders from TensorFlow Datasets, in the layout VTAB1k reads.

    pip install .[tfds]
    python data/prepare_vtab_tfds.py --out $VTAB_ROOT [--tfds-dir DIR] [--tasks dtd ...] \
        [--format jpg|png] [--quality 75]

For each task it writes ``<out>/<task folder>/images/{train800,val200,test}/000000.jpg``, the four
list files (``train800.txt``, ``val200.txt``, ``train800val200.txt`` = train800 + val200,
``test.txt``) and ``extraction.json``: the tool, the tfds dataset and the version tfds resolved,
the versions of tensorflow-datasets, tensorflow and Pillow, the image format and JPEG quality and
each split's tfds slice. The VTAB1k DataModule puts it into every run's results.json, so runs on
different extractions can be told apart (data/README.md explains why that matters).

JPEG quality: 75 by default, PIL's default, which is what NOAH's extraction script wrote (the
folders NOAH, SSF and GPS trained on); VPT fed TFDS arrays to the model without any JPEG step.
Use ``--quality`` for another trade-off, or ``--format png`` (lossless) to come closest to VPT.

The splits follow VTAB's own task definitions (google-research/task_adaptation): VTAB defines a
train / val / test split per task, some as a percentage of a tfds split; VTAB-1k takes the first
800 examples of VTAB's train split (train800), the first 200 of VTAB's val split (val200), and
the whole VTAB test split (test). Order is tfds' deterministic order (``shuffle_files=False``).

Some tfds datasets need a manual download first (diabetic_retinopathy_detection from Kaggle,
resisc45); tfds says where to put the files when it stops.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import math
import os
import sys
from importlib import metadata
from typing import Any, NamedTuple

try:
    from grft_lightning.data.vtab import EXTRACTION_RECORD, VTAB_TASKS, write_list_file
except ImportError:  # run from a checkout without `pip install .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grft_lightning.data.vtab import EXTRACTION_RECORD, VTAB_TASKS, write_list_file

#: PIL's own default JPEG quality, which NOAH's extraction (get_vtab1k.py) wrote its JPEGs with.
DEFAULT_JPEG_QUALITY = 75
#: Packages whose versions decide the bytes written (the tfds generators, TF's decoders, the
#: JPEG encoder), recorded in extraction.json.
RECORDED_PACKAGES = ("tensorflow-datasets", "tensorflow", "pillow")
TOOL = "data/prepare_vtab_tfds.py"


class Part(NamedTuple):
    """A VTAB split as a percentage range of one tfds split: ``split[start% : stop%]``."""

    split: str
    start_pct: int = 0
    stop_pct: int = 100


class TFDSTask(NamedTuple):
    tfds_name: str  # name[/config]:version given to tfds.builder
    label: str  # feature key, or a derived label computed in derive_label()
    train: Part
    val: Part
    test: Part


def _official(train="train", val="validation", test="test") -> dict[str, Part]:
    return dict(train=Part(train), val=Part(val), test=Part(test))


def _split_train(train_pct: int, test="test") -> dict[str, Part]:
    """VTAB's val is the tail of tfds' train split."""
    return dict(
        train=Part("train", 0, train_pct), val=Part("train", train_pct, 100), test=Part(test)
    )


def _three_way(train_pct: int, val_pct: int) -> dict[str, Part]:
    """Only a tfds train split: VTAB cuts train / val / test out of it."""
    cut = train_pct + val_pct
    return dict(
        train=Part("train", 0, train_pct),
        val=Part("train", train_pct, cut),
        test=Part("train", cut, 100),
    )


_SMALLNORB = dict(train=Part("train"), val=Part("test", 0, 50), test=Part("test", 50, 100))

# config name -> tfds name, label, and VTAB's train / val / test as in task_adaptation/data/*.py.
# Boundaries are pct * n // 100, as VTAB computes its example counts; for every task the products
# below are whole numbers except svhn (90 % of 73,257 -> 65,931), where tfds' own "train[:90%]"
# rounds the same way.
TASKS: dict[str, TFDSTask] = {
    "cifar100": TFDSTask("cifar100:3.*.*", "label", **_split_train(90)),
    "caltech101": TFDSTask("caltech101:3.*.*", "label", **_split_train(90)),
    "dtd": TFDSTask("dtd:3.*.*", "label", **_official()),
    "flowers102": TFDSTask("oxford_flowers102:2.*.*", "label", **_official()),
    # Current tfds builds only oxford_iiit_pet 4.0.0 (3.x, which VTAB named, is gone): the same
    # images, labels and train/test splits. VTAB's pets validation is 20 % of train, not 10 %.
    "pets": TFDSTask("oxford_iiit_pet:4.*.*", "label", **_split_train(80)),
    "svhn": TFDSTask("svhn_cropped:3.*.*", "label", **_split_train(90)),
    "sun397": TFDSTask("sun397/tfds:4.*.*", "label", **_official()),
    "patch_camelyon": TFDSTask("patch_camelyon:2.*.*", "label", **_official()),
    "eurosat": TFDSTask("eurosat/rgb:2.*.*", "label", **_three_way(60, 20)),
    "resisc45": TFDSTask("resisc45:3.*.*", "label", **_three_way(60, 20)),
    "diabetic_retinopathy": TFDSTask(
        "diabetic_retinopathy_detection/btgraham-300:3.*.*", "label", **_official()
    ),
    # CLEVR's tfds test split has no labels: VTAB tests on tfds' validation split.
    "clevr_count": TFDSTask("clevr:3.*.*", "clevr_count", **_split_train(90, test="validation")),
    "clevr_dist": TFDSTask("clevr:3.*.*", "clevr_dist", **_split_train(90, test="validation")),
    "dmlab": TFDSTask("dmlab:2.0.1", "label", **_official()),
    # VTAB pins kitti:3.1.0, which current tfds no longer builds. tfds 4.9 resolves 3.*.* to
    # 3.3.0 (VPT and NOAH used 3.2.0), with the same generator and splits; that its labels equal
    # VTAB's 3.1.0 ones example by example is not verified here.
    "kitti": TFDSTask("kitti:3.*.*", "kitti_dist", **_official()),
    "dsprites_loc": TFDSTask("dsprites:2.*.*", "dsprites_loc", **_three_way(80, 10)),
    "dsprites_ori": TFDSTask("dsprites:2.*.*", "dsprites_ori", **_three_way(80, 10)),
    # smallNORB: VTAB validates on the first half of tfds' test split and tests on the second.
    "smallnorb_azi": TFDSTask("smallnorb:2.*.*", "label_azimuth", **_SMALLNORB),
    "smallnorb_ele": TFDSTask("smallnorb:2.*.*", "label_elevation", **_SMALLNORB),
}

TRAIN_SIZE, VAL_SIZE = 800, 200


def part_bounds(part: Part, sizes: dict[str, int]) -> tuple[int, int]:
    """Start and stop index of ``part`` in its tfds split, whose length is ``sizes[part.split]``."""
    n = sizes[part.split]
    return part.start_pct * n // 100, part.stop_pct * n // 100


def vtab1k_ranges(task: str, sizes: dict[str, int]) -> dict[str, tuple[str, int, int]]:
    """VTAB-1k splits of ``task`` as ``{name: (tfds split, start, stop)}``.

    ``train800`` is the first 800 of VTAB's train split, ``val200`` the first 200 of VTAB's val
    split, ``test`` the whole VTAB test split. ``sizes`` maps tfds split names to their lengths.
    """
    spec = TASKS[task]
    ranges = {}
    for name, part, take in (("train800", spec.train, TRAIN_SIZE), ("val200", spec.val, VAL_SIZE)):
        start, stop = part_bounds(part, sizes)
        if stop - start < take:
            raise ValueError(
                f"{task}: VTAB {name[:-3]} split {part} has {stop - start} examples, need {take}"
            )
        ranges[name] = (part.split, start, start + take)
    ranges["test"] = (spec.test.split, *part_bounds(spec.test, sizes))
    return ranges


def tfds_split_string(split: str, start: int, stop: int) -> str:
    """tfds slicing syntax for examples ``start..stop-1`` of ``split``."""
    return f"{split}[{start}:{stop}]"


def image_relpath(split: str, index: int, ext: str) -> str:
    return f"images/{split}/{index:06d}.{ext}"


def write_lists(task_dir: str, labels: dict[str, list[int]], ext: str) -> None:
    """Write the four list files for images saved as ``image_relpath(split, i, ext)``."""
    entries = {
        split: [(image_relpath(split, i, ext), label) for i, label in enumerate(labels[split])]
        for split in ("train800", "val200", "test")
    }
    entries["train800val200"] = entries["train800"] + entries["val200"]
    for name, rows in entries.items():
        write_list_file(os.path.join(task_dir, f"{name}.txt"), rows)


# -- labels VTAB derives from tfds features (pure Python on numpy values; tested) --------------
CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DIST_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
KITTI_VEHICLE_TYPES = (0, 1, 2)  # Car, Van, Truck in tfds' kitti type labels


def _bin(thresholds, value: float) -> int:
    """Index of the last threshold strictly below ``value`` (VTAB's reduce_max(where(t < v)))."""
    return bisect.bisect_left(thresholds, value) - 1


def derive_label(task: str, example: dict[str, Any]) -> int:
    """The VTAB label of a tfds example (as numpy) for ``task``."""
    key = TASKS[task].label
    objects = example.get("objects", {})
    if key == "clevr_count":  # 3..10 objects -> 0..7
        return len(objects["size"]) - 3
    if key == "clevr_dist":  # depth of the closest object, binned
        return _bin(CLEVR_DIST_THRESHOLDS, min(float(c[2]) for c in objects["pixel_coords"]))
    if key == "kitti_dist":  # depth of the closest vehicle, binned; 3 = no vehicle
        vehicles = zip(objects["type"], objects["location"])
        depths = [float(loc[2]) for kind, loc in vehicles if int(kind) in KITTI_VEHICLE_TYPES]
        return _bin(KITTI_DIST_THRESHOLDS, min(depths + [1000.0]))
    if key == "dsprites_loc":  # 32 x positions -> 16 classes
        return int(math.floor(float(example["label_x_position"]) / (32 / 16)))
    if key == "dsprites_ori":  # 40 orientations -> 16 classes
        return int(math.floor(float(example["label_orientation"]) / (40 / 16)))
    return int(example[key])


def to_uint8_image(task: str, image):
    """dSprites pixels are 0/1: scale to 0/255 as VTAB does. Grey images are saved as they are
    (the DataModule converts every image to RGB)."""
    if task.startswith("dsprites"):
        image = image * 255
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return image.astype("uint8")


# -- the extraction record (pure Python; tested) -------------------------------------------------
def package_versions(packages: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when absent), read without importing it."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def extraction_record(task: str, tfds_full_name: str, ext: str, quality: int | None,
                      ranges: dict[str, tuple[str, int, int]], versions: dict[str, str | None],
                      created: str | None = None) -> dict[str, Any]:
    """What ``extraction.json`` holds for one task folder (``summary`` is the one line that
    results.json's ``extraction`` shows)."""
    quality = quality if ext == "jpg" else None
    image = f"{ext} quality {quality}" if quality is not None else ext
    tfds_version = versions.get("tensorflow-datasets") or "unknown"
    return {
        "summary": f"tfds {tfds_full_name} ({image}, tensorflow-datasets {tfds_version}) via {TOOL}",
        "tool": TOOL,
        "task": task,
        "tfds_requested": TASKS[task].tfds_name,
        "tfds_dataset": tfds_full_name,
        "format": ext,
        "jpeg_quality": quality,
        "splits": {name: tfds_split_string(*bounds) for name, bounds in ranges.items()},
        "packages": dict(versions),
        "created": created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_extraction_record(task_dir: str, record: dict[str, Any]) -> str:
    """Write ``record`` as ``<task_dir>/extraction.json``; returns the path."""
    path = os.path.join(task_dir, EXTRACTION_RECORD)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return path


def jpeg_quality(text: str) -> int:
    """``--quality``: an integer in 1..100 (PIL advises against more than 95)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"JPEG quality must be an integer, got {text!r}") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"JPEG quality must be in 1..100, got {value}")
    return value


def build_task(task: str, out: str, tfds_dir: str | None, ext: str, quality: int) -> None:
    import tensorflow_datasets as tfds
    from PIL import Image

    spec = TASKS[task]
    builder = tfds.builder(spec.tfds_name, data_dir=tfds_dir)
    builder.download_and_prepare()
    sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
    task_dir = os.path.join(out, VTAB_TASKS[task].folder)
    labels: dict[str, list[int]] = {}
    ranges = vtab1k_ranges(task, sizes)
    for name, (split, start, stop) in ranges.items():
        os.makedirs(os.path.join(task_dir, "images", name), exist_ok=True)
        tfds_split = tfds_split_string(split, start, stop)
        dataset = builder.as_dataset(split=tfds_split, shuffle_files=False)
        labels[name] = []
        for i, example in enumerate(tfds.as_numpy(dataset)):
            image = Image.fromarray(to_uint8_image(task, example["image"]))
            options = {"quality": quality} if ext == "jpg" else {}
            image.save(os.path.join(task_dir, image_relpath(name, i, ext)), **options)
            labels[name].append(derive_label(task, example))
        print(f"{task}: {name} = {tfds_split} ({len(labels[name])} images)")
    write_lists(task_dir, labels, ext)
    record = extraction_record(task, builder.info.full_name, ext, quality, ranges, package_versions())
    print(f"{task}: {write_extraction_record(task_dir, record)}: {record['summary']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("VTAB_ROOT"),
                        help="root for the task folders (default: $VTAB_ROOT)")
    parser.add_argument("--tfds-dir", default=None, help="tfds data_dir (default: tfds' own)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS),
                        metavar="TASK")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg",
                        help="png is lossless and larger")
    parser.add_argument("--quality", type=jpeg_quality, default=DEFAULT_JPEG_QUALITY,
                        help=f"JPEG quality, 1..100 (default {DEFAULT_JPEG_QUALITY}: PIL's default, "
                             "as in NOAH's extraction; ignored for png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out is required when $VTAB_ROOT is not set")
    try:
        import tensorflow_datasets  # noqa: F401  (optional extra, imported here only)
    except ImportError:
        parser.error("TensorFlow Datasets is not installed: pip install .[tfds]")
    for task in args.tasks:
        build_task(task, args.out, args.tfds_dir, args.format, args.quality)
    return 0


if __name__ == "__main__":
    sys.exit(main())
