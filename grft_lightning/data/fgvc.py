"""FGVC: five fine-grained datasets read from VPT's json splits.

A root holds one folder per dataset with ``train.json``, ``val.json`` and ``test.json``; each maps
an image path (relative to the dataset's image folder) to a class id. Ids are remapped to
contiguous indices 0..N-1 over the union of the three files, sorted by original id
(``docs/data.md``, ``data/README.md``).

Protocols:
    ``final``: train on train.json + val.json, test on test.json. ``val.json`` is also the
        validation split, so ``val_acc`` is optimistic (those images are trained on); report
        ``test_acc`` of the last epoch.
    ``tune``: train on train.json; val.json is both the validation and the test split.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, NamedTuple

from grft_lightning.data.base import Split
from grft_lightning.data.folders import DatasetError, Sample, outside_folder, refuse_outside, resolve_root
from grft_lightning.data.prepared import PreparedFolderData


class FGVCDataset(NamedTuple):
    folder: str  # holds train.json, val.json, test.json
    image_folder: str  # json keys are relative to <root>/<image_folder>
    num_classes: int


#: Config name -> (folder, image folder, classes), exactly as docs/data.md.
FGVC_DATASETS: dict[str, FGVCDataset] = {
    "cub": FGVCDataset("CUB_200_2011", "CUB_200_2011/images", 200),
    "nabirds": FGVCDataset("nabirds", "nabirds/images", 555),
    "flowers": FGVCDataset("oxfordflower", "oxfordflower", 102),
    "dogs": FGVCDataset("stanforddogs", "stanforddogs/Images", 120),
    "cars": FGVCDataset("stanfordcars", "stanfordcars", 196),
}

JSON_FILES = ("train", "val", "test")

#: Which json files make each split, per protocol.
PROTOCOL_JSONS: dict[str, dict[str, tuple[str, ...]]] = {
    "final": {"train": ("train", "val"), "val": ("val",), "test": ("test",)},
    "tune": {"train": ("train",), "val": ("val",), "test": ("val",)},
}


def _line_of(text: str, key: str) -> int | str:
    """The line of ``text`` (a json file) where the key ``key`` is written, or ``?``."""
    for spelling in (json.dumps(key), json.dumps(key, ensure_ascii=False)):
        at = text.find(spelling + ":")
        if at < 0:
            at = text.find(spelling)
        if at >= 0:
            return text.count("\n", 0, at) + 1
    return "?"


def layout(dataset: str) -> str:
    info = FGVC_DATASETS[dataset]
    return (
        f"  <root>/{info.folder}/train.json, val.json, test.json  (image path -> class id)\n"
        f"  <root>/{info.image_folder}/<image path from the json keys>"
    )


class FGVC(PreparedFolderData):
    """One of the FGVC datasets (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs/Cars).

    Args:
        dataset: ``cub``, ``nabirds``, ``flowers``, ``dogs`` or ``cars``.
        root: Folder holding the dataset folders. ``~`` and environment variables are expanded;
            the default reads ``$FGVC_ROOT``.
        protocol: ``final`` (train+val -> train, val -> val, test -> test; the val images are
            trained on, so val_acc is optimistic) or ``tune`` (train -> train, val -> val and
            test).
        skip_bad_images: Skip images that cannot be decoded (with a warning naming each) instead
            of stopping; their number is recorded in results.json as ``skipped_images``.
        verify_images: Check every image once with PIL before training (header and checksums;
            about a minute for the largest set, NABirds; turn off once a folder is checked).
        allow_outside_root: Accept json keys outside the image folder (absolute paths, or climbing
            out with ``..``). Off by default: such a key is refused, naming the json file and line.
            Symbolic links inside the image folder are followed either way.
        augmentation: ``fgvc`` (random resized crop + flip for training; resize 248/224 + center
            crop for eval) or ``resize``.
        **kwargs: loader and preprocessing options of :class:`ImageClassificationData`
            (batch_size, eval_batch_size, num_workers, pin_memory, augmentation, ...).
    """

    def __init__(
        self,
        dataset: str,
        root: str = "$FGVC_ROOT",
        protocol: Literal["final", "tune"] = "final",
        skip_bad_images: bool = False,
        verify_images: bool = True,
        allow_outside_root: bool = False,
        augmentation: Literal["resize", "fgvc"] = "fgvc",
        **kwargs,
    ):
        if dataset not in FGVC_DATASETS:
            raise ValueError(f"unknown FGVC dataset {dataset!r}; valid: {', '.join(FGVC_DATASETS)}")
        super().__init__(root, protocol, skip_bad_images, verify_images, allow_outside_root,
                         augmentation=augmentation, **kwargs)
        self.dataset_key = dataset
        self._jsons: dict[str, dict[str, int]] = {}
        self._class_index: dict[int, int] | None = None

    @property
    def info(self) -> FGVCDataset:
        return FGVC_DATASETS[self.dataset_key]

    @property
    def dataset_name(self) -> str:
        return f"fgvc/{self.dataset_key}"

    @property
    def resolved_root(self) -> str:
        return resolve_root(self.root, "FGVC_ROOT", layout(self.dataset_key))

    @property
    def missing_hint(self) -> str:
        return f" Json keys are relative to the image folder {self.image_dir}."

    @property
    def data_dir(self) -> str:
        """``<root>/<folder>``, holding the three json files."""
        path = os.path.join(self.resolved_root, self.info.folder)
        if not os.path.isdir(path):
            raise DatasetError(
                f"no folder {path} for dataset {self.dataset_key!r}. Expected layout:\n"
                f"{layout(self.dataset_key)}"
            )
        return path

    @property
    def image_dir(self) -> str:
        """``<root>/<image folder>``: json keys are relative to it."""
        return os.path.join(self.resolved_root, self.info.image_folder)

    def read_json(self, name: str) -> dict[str, int]:
        """``<name>.json`` as {image path relative to the image folder: original class id}."""
        if name not in self._jsons:
            self._jsons[name] = self._parse_json(os.path.join(self.data_dir, f"{name}.json"))
        return self._jsons[name]

    def _parse_json(self, path: str) -> dict[str, int]:
        if not os.path.isfile(path):
            raise DatasetError(
                f"{path} does not exist. Expected layout:\n{layout(self.dataset_key)}"
            )
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(mapping, dict):
            raise DatasetError(f"{path}: expected an object mapping image path -> class id")
        for key, value in mapping.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise DatasetError(f"{path} key {key!r}: class id {value!r} is not an integer")
            if not self.allow_outside_root and outside_folder(key):
                raise refuse_outside(f"{path}:{_line_of(text, key)}", key, self.image_dir)
        return mapping

    @property
    def class_index(self) -> dict[int, int]:
        """Original class id -> contiguous index, over the union of the three json files."""
        if self._class_index is None:
            ids = sorted({i for name in JSON_FILES for i in self.read_json(name).values()})
            if len(ids) != self.num_classes:
                raise DatasetError(
                    f"{self.data_dir}: train.json, val.json and test.json hold {len(ids)} "
                    f"distinct class ids, but {self.dataset_key} has {self.num_classes} classes. "
                    "Check that the folder holds the VPT json splits of this dataset."
                )
            self._class_index = {orig: index for index, orig in enumerate(ids)}
        return self._class_index

    def samples(self, name: str) -> list[Sample]:
        """The samples of one json file, labels remapped (no image checks)."""
        mapping, index = self.read_json(name), self.class_index
        path, image_dir = os.path.join(self.data_dir, f"{name}.json"), self.image_dir
        return [
            Sample(os.path.join(image_dir, key), index[cls], f"{path} key {key!r}")
            for key, cls in mapping.items()
        ]

    def split_samples(self, split: Split) -> list[Sample]:
        return [s for name in PROTOCOL_JSONS[self.protocol][split] for s in self.samples(name)]

    def split_source(self, split: Split) -> str:
        return " + ".join(f"{name}.json" for name in PROTOCOL_JSONS[self.protocol][split])

    def describe(self) -> dict[str, Any]:
        return {"benchmark": "fgvc", **super().describe()}
