"""Tiny VTAB-1k and FGVC folders on disk, in the layouts the DataModules read (docs/data.md).

Images are solid colours chosen by the label (so a test can predict a pixel value), alternately
PNG and JPEG, a few pixels wide: building a folder takes milliseconds.
"""

from __future__ import annotations

import json
import os

from PIL import Image

from grft_lightning.data.fgvc import FGVC_DATASETS
from grft_lightning.data.vtab import VTAB_TASKS, write_list_file

VTAB_COUNTS = {"train800": 8, "val200": 4, "test": 6}


def label_color(label: int) -> tuple[int, int, int]:
    return ((37 * label) % 256, (91 * label + 50) % 256, (53 * label + 100) % 256)


def write_image(path: str, color: tuple[int, int, int], size: int = 8) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def make_vtab_folder(root, task: str = "kitti", counts: dict[str, int] | None = None) -> str:
    """Write ``<root>/<task folder>/`` with images and the four list files; return the folder.

    Labels cycle through the task's classes; ``train800val200.txt`` is train800 + val200.
    """
    counts = counts or VTAB_COUNTS
    info = VTAB_TASKS[task]
    task_dir = os.path.join(str(root), info.folder)
    lists: dict[str, list[tuple[str, int]]] = {}
    for split, n in counts.items():
        lists[split] = []
        for i in range(n):
            label = i % info.num_classes
            rel = f"images/{split}/{i:06d}.{'png' if i % 2 == 0 else 'jpg'}"
            write_image(os.path.join(task_dir, rel), label_color(label))
            lists[split].append((rel, label))
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name, entries in lists.items():
        write_list_file(os.path.join(task_dir, f"{name}.txt"), entries)
    return task_dir


def fgvc_class_id(index: int) -> int:
    """Original ids are deliberately not contiguous and not zero-based (remapping is tested)."""
    return 3 * index + 5


def make_fgvc_folder(root, dataset: str = "flowers", per_split: dict[str, int] | None = None) -> str:
    """Write the json splits and images of ``dataset`` under ``root``; return the json folder.

    Every class gets ``per_split[split]`` images in each split; json keys are relative to the
    image folder and the class ids are ``fgvc_class_id(class index)``.
    """
    per_split = per_split or {"train": 1, "val": 1, "test": 1}
    info = FGVC_DATASETS[dataset]
    dataset_dir = os.path.join(str(root), info.folder)
    image_dir = os.path.join(str(root), info.image_folder)
    os.makedirs(dataset_dir, exist_ok=True)
    for split, n in per_split.items():
        mapping = {}
        for c in range(info.num_classes):
            for k in range(n):
                key = f"class_{c:03d}/{split}_{k}.{'png' if (c + k) % 2 == 0 else 'jpg'}"
                write_image(os.path.join(image_dir, key), label_color(c))
                mapping[key] = fgvc_class_id(c)
        with open(os.path.join(dataset_dir, f"{split}.json"), "w") as f:
            json.dump(mapping, f, indent=0)
    return dataset_dir
