"""A small learnable synthetic task for tests and smoke runs (no files, no downloads)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from grft_lightning.data.base import ImageClassificationData, ListDataset


class SyntheticImages(ImageClassificationData):
    """Images whose class sets a colour and a stripe orientation, plus noise; seeded.

    Args:
        num_classes: number of classes.
        n_train: training images.
        n_val: validation images.
        n_test: test images.
        size: side of the generated images in pixels.
        seed: seed of the generator.
        batch_size: training batch size.
        num_workers: loader worker processes (0: the images are generated in memory).
        **kwargs: loader and preprocessing options of :class:`ImageClassificationData`
            (batch_size, eval_batch_size, num_workers, pin_memory, augmentation, ...).
    """

    def __init__(
        self,
        num_classes: int = 4,
        n_train: int = 32,
        n_val: int = 16,
        n_test: int = 16,
        size: int = 32,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        **kwargs,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        self._num_classes = num_classes
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.size, self.seed = size, seed

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def dataset_name(self) -> str:
        return "synthetic"

    def split_source(self, split) -> str:
        return f"data.init_args.n_{split}: {self.sizes[split]}"

    def _image(self, rng: np.random.Generator, label: int) -> np.ndarray:
        s = self.size
        hue = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 31 + 160) % 256], dtype=np.float32)
        yy, xx = np.mgrid[0:s, 0:s]
        angle = np.pi * label / self._num_classes
        stripes = 0.5 + 0.5 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.8)
        img = stripes[..., None] * hue[None, None] + rng.normal(0, 25, (s, s, 3))
        return np.clip(img, 0, 255).astype(np.uint8)

    def build_split(self, split):
        offset = {"train": 0, "val": 1, "test": 2}[split]
        rng = np.random.default_rng(self.seed * 1000 + offset)
        labels = [i % self._num_classes for i in range(self.sizes[split])]
        samples = [(self._image(rng, lab), lab) for lab in labels]
        return ListDataset(samples, Image.fromarray)
