"""The part VTAB-1k and FGVC share: a benchmark read from a prepared folder on disk.

A subclass names its data folder and which samples make each split; this base checks the images
once (missing or undecodable files named by the list line or json key that declares them),
optionally skips bad ones (counted for results.json), and implements the two protocols:
``final`` (train on train+val, test on test) and ``tune`` (the validation split is also the
test split, for choosing hyper-parameters without looking at the test set).
"""

from __future__ import annotations

import abc
import os
from typing import Any, Literal

from torch.utils.data import Dataset

from grft_lightning.core.errors import check_choice
from grft_lightning.data.base import ImageClassificationData, ListDataset, Split
from grft_lightning.data.folders import DatasetError, Sample, check_samples, load_rgb

PROTOCOLS = ("final", "tune")


class PreparedFolderData(ImageClassificationData):
    """Base of the DataModules that read a prepared benchmark folder (VTAB-1k, FGVC).

    Args:
        root: folder holding the benchmark's data folders (``~`` and variables expanded).
        protocol: ``final`` or ``tune`` (see the module docstring).
        skip_bad_images: skip undecodable images with a warning naming each, instead of stopping.
        verify_images: check every image once with PIL before training.
        allow_outside_root: accept image paths in list files that leave the data folder (absolute,
            or climbing out with ``..``); refused by default (``folders.outside_folder``).
        **kwargs: options of :class:`ImageClassificationData`.
    """

    #: Appended to the error about a missing image: how paths are resolved.
    missing_hint = ""

    def __init__(
        self,
        root: str,
        protocol: Literal["final", "tune"] = "final",
        skip_bad_images: bool = False,
        verify_images: bool = True,
        allow_outside_root: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.allow_outside_root = allow_outside_root
        check_choice("data.protocol", protocol, PROTOCOLS)
        self.root = root
        self.protocol = protocol
        self.skip_bad_images = skip_bad_images
        self.verify_images = verify_images
        self._skipped: dict[str, str] = {}
        self._probed: dict = {}

    @property
    @abc.abstractmethod
    def info(self):
        """This dataset's or task's facts: its folder and ``num_classes`` at least."""

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    @abc.abstractmethod
    def data_dir(self) -> str:
        """The folder of this dataset or task (raises :class:`DatasetError` if absent)."""

    @abc.abstractmethod
    def split_samples(self, split: Split) -> list[Sample]:
        """The samples of ``split`` under ``self.protocol`` (no image checks)."""

    def build_split(self, split: Split) -> Dataset:
        if self.protocol == "tune" and split == "test":
            return self.raw_split("val")  # the same file: build and check it once
        kept = check_samples(
            self.split_samples(split),
            verify=self.verify_images,
            skip_bad=self.skip_bad_images,
            skipped=self._skipped,
            cache=self._probed,
            missing_hint=self.missing_hint,
        )
        self.skipped_images = len(self._skipped)
        return ListDataset([(s.path, s.label) for s in kept], load_rgb)

    def describe(self) -> dict[str, Any]:
        try:
            data_dir = os.path.abspath(self.data_dir)
        except DatasetError:
            data_dir = None
        return {"protocol": self.protocol, "skipped_images": self.skipped_images, "data_dir": data_dir}
