"""VTAB-1k: 19 tasks of 1,000 training images each, read from NOAH/SSF/GPS-style folders.

One folder per task under a root (``<root>/<task folder>/`` or ``<root>/vtab-1k/<task folder>/``)
with four list files whose lines are ``images/<split>/000123.jpg <integer label>``, paths relative
to the task folder (``docs/data.md``, ``data/README.md``).

Protocols:
    ``final``: train on ``train800val200.txt``, validate on ``val200.txt``, test on ``test.txt``.
        The validation images are part of the training set, so ``val_acc`` is optimistic; the
        number to report is ``test_acc`` of the last epoch (we never select on test).
    ``tune``: train on ``train800.txt``; ``val200.txt`` is both the validation and the test split,
        for choosing hyper-parameters without looking at the test set.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Literal, NamedTuple

from grft_lightning.data.base import Split
from grft_lightning.data.folders import DatasetError, Sample, outside_folder, refuse_outside, resolve_root
from grft_lightning.data.prepared import PreparedFolderData


class VTABTask(NamedTuple):
    folder: str  # task folder under the root
    num_classes: int
    group: str  # natural | specialized | structured


#: Config name -> (task folder, classes, group), exactly as docs/data.md.
VTAB_TASKS: dict[str, VTABTask] = {
    "cifar100": VTABTask("cifar", 100, "natural"),
    "caltech101": VTABTask("caltech101", 102, "natural"),
    "dtd": VTABTask("dtd", 47, "natural"),
    "flowers102": VTABTask("oxford_flowers102", 102, "natural"),
    "pets": VTABTask("oxford_iiit_pet", 37, "natural"),
    "svhn": VTABTask("svhn", 10, "natural"),
    "sun397": VTABTask("sun397", 397, "natural"),
    "patch_camelyon": VTABTask("patch_camelyon", 2, "specialized"),
    "eurosat": VTABTask("eurosat", 10, "specialized"),
    "resisc45": VTABTask("resisc45", 45, "specialized"),
    "diabetic_retinopathy": VTABTask("diabetic_retinopathy", 5, "specialized"),
    "clevr_count": VTABTask("clevr_count", 8, "structured"),
    "clevr_dist": VTABTask("clevr_dist", 6, "structured"),
    "dmlab": VTABTask("dmlab", 6, "structured"),
    "kitti": VTABTask("kitti", 4, "structured"),
    "dsprites_loc": VTABTask("dsprites_loc", 16, "structured"),
    "dsprites_ori": VTABTask("dsprites_ori", 16, "structured"),
    "smallnorb_azi": VTABTask("smallnorb_azi", 18, "structured"),
    "smallnorb_ele": VTABTask("smallnorb_ele", 9, "structured"),
}

LIST_FILES = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")

#: Which list file each split reads, per protocol.
PROTOCOL_LISTS: dict[str, dict[str, str]] = {
    "final": {"train": "train800val200.txt", "val": "val200.txt", "test": "test.txt"},
    "tune": {"train": "train800.txt", "val": "val200.txt", "test": "val200.txt"},
}

#: How a task folder was made, written by data/prepare_vtab_tfds.py into every folder it builds:
#: a JSON object with a one-line ``summary`` plus the tool, the tfds dataset and version, the
#: package versions, the image format and JPEG quality and the tfds slices of each split. Read
#: into results.json (``extraction``, ``extraction_record``).
EXTRACTION_RECORD = "extraction.json"

#: A one-line note saying which extraction a folder is, for folders the script did not build
#: (add one by hand to a downloaded NOAH/SSF folder, see data/README.md).
EXTRACTION_FILE = "extraction.txt"

LAYOUT = """\
  <root>/<task folder>/               (or <root>/vtab-1k/<task folder>/), e.g. <root>/dtd/
      train800.txt  val200.txt  train800val200.txt  test.txt
      images/<split>/000123.jpg       (list lines: 'images/<split>/000123.jpg <label>')
  Task folders: """ + ", ".join(t.folder for t in VTAB_TASKS.values())


def read_list_file(path: str, num_classes: int, task: str, allow_outside_root: bool = False) -> list[Sample]:
    """Parse a VTAB list file into samples; image paths are made relative to its folder.

    Raises:
        DatasetError: missing file, malformed line, label outside ``0..num_classes-1`` or (unless
            ``allow_outside_root``) an image path outside the list file's folder (absolute, or
            climbing out with ``..``), naming ``file:line``.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"list file {path} does not exist. Expected layout:\n{LAYOUT}")
    base = os.path.dirname(path)
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            text = line.rstrip("\r\n")
            parts = text.rsplit(None, 1)
            try:
                rel, label = parts[0].strip(), int(parts[1])
            except (IndexError, ValueError):
                raise DatasetError(
                    f"{path}:{lineno}: malformed line {text!r}; expected "
                    "'images/<split>/<name>.jpg <integer label>'"
                ) from None
            if not 0 <= label < num_classes:
                raise DatasetError(
                    f"{path}:{lineno}: label {label} is outside 0..{num_classes - 1} "
                    f"({task} has {num_classes} classes)"
                )
            if not allow_outside_root and outside_folder(rel):
                raise refuse_outside(f"{path}:{lineno}", rel, base)
            samples.append(Sample(os.path.join(base, rel), label, f"{path}:{lineno}"))
    return samples


def write_list_file(path: str, entries: Iterable[tuple[str, int]]) -> None:
    """Write ``(relative image path, label)`` pairs in the list-file format read above."""
    with open(path, "w", encoding="utf-8") as f:
        for rel, label in entries:
            f.write(f"{rel} {int(label)}\n")


class VTAB1k(PreparedFolderData):
    """A VTAB-1k task from a prepared folder (NOAH/SSF/GPS layout, or data/prepare_vtab_tfds.py).

    Args:
        task: Config name of the task: one of ``VTAB_TASKS`` (cifar100, caltech101, dtd,
            flowers102, pets, svhn, sun397, patch_camelyon, eurosat, resisc45,
            diabetic_retinopathy, clevr_count, clevr_dist, dmlab, kitti, dsprites_loc,
            dsprites_ori, smallnorb_azi, smallnorb_ele).
        root: Folder holding the task folders (or a ``vtab-1k/`` folder holding them). ``~`` and
            environment variables are expanded; the default reads ``$VTAB_ROOT``.
        protocol: ``final`` (train800val200 -> train, val200 -> val, test -> test; val images are
            also trained on, so val_acc is optimistic) or ``tune`` (train800 -> train, val200 ->
            val and test).
        extraction: Which extraction the folder is (e.g. ``noah`` or ``tfds``), recorded in
            results.json because numbers from different extractions are not comparable (the
            CIFAR-100 trap, data/README.md). Default: the ``summary`` of
            ``<task folder>/extraction.json`` (written by data/prepare_vtab_tfds.py, whose whole
            record also goes to results.json as ``extraction_record``), else the first line of
            ``<task folder>/extraction.txt``, else ``unrecorded``.
        skip_bad_images: Skip images that cannot be decoded (with a warning naming each) instead
            of stopping; their number is recorded in results.json as ``skipped_images``.
        verify_images: Check every image once with PIL before training (header and checksums).
        allow_outside_root: Accept list-file image paths outside the task folder (absolute, or
            climbing out with ``..``). Off by default: such a line is refused, naming the list file
            and line. Symbolic links inside the task folder are followed either way.
        **kwargs: loader and preprocessing options of :class:`ImageClassificationData`
            (batch_size, eval_batch_size, num_workers, pin_memory, augmentation, ...).
    """

    def __init__(
        self,
        task: str,
        root: str = "$VTAB_ROOT",
        protocol: Literal["final", "tune"] = "final",
        extraction: str | None = None,
        skip_bad_images: bool = False,
        verify_images: bool = True,
        allow_outside_root: bool = False,
        **kwargs,
    ):
        if task not in VTAB_TASKS:
            raise ValueError(f"unknown VTAB-1k task {task!r}; valid tasks: {', '.join(VTAB_TASKS)}")
        super().__init__(root, protocol, skip_bad_images, verify_images, allow_outside_root, **kwargs)
        self.task = task
        self.extraction = extraction

    @property
    def info(self) -> VTABTask:
        return VTAB_TASKS[self.task]

    @property
    def dataset_name(self) -> str:
        return f"vtab/{self.task}"

    missing_hint = " Paths in list files are relative to the task folder."

    @property
    def data_dir(self) -> str:
        """The task folder, ``<root>/<folder>`` or ``<root>/vtab-1k/<folder>``."""
        root = resolve_root(self.root, "VTAB_ROOT", LAYOUT)
        folder = self.info.folder
        candidates = [os.path.join(root, folder), os.path.join(root, "vtab-1k", folder)]
        for candidate in candidates:
            if os.path.isdir(candidate):
                return candidate
        present = ", ".join(sorted(os.listdir(root))[:20]) or "nothing"
        raise DatasetError(
            f"no folder for task {self.task!r}: looked for {candidates[0]} and {candidates[1]} "
            f"({root} holds: {present}). Expected layout:\n{LAYOUT}"
        )

    def read_list(self, filename: str) -> list[Sample]:
        """Parse one of the task's list files (no image checks)."""
        return read_list_file(os.path.join(self.data_dir, filename), self.num_classes, self.task,
                              self.allow_outside_root)

    def split_samples(self, split: Split) -> list[Sample]:
        return self.read_list(PROTOCOL_LISTS[self.protocol][split])

    def split_source(self, split: Split) -> str:
        return f"list file {PROTOCOL_LISTS[self.protocol][split]}"

    def extraction_record(self) -> dict[str, Any] | None:
        """The task folder's ``extraction.json`` (None when absent). Never raises: it is read
        when results.json is written, after training; an unreadable file is reported in it."""
        try:
            path = os.path.join(self.data_dir, EXTRACTION_RECORD)
        except DatasetError:
            return None
        return read_extraction_record(path)

    def recorded_extraction(self) -> str:
        """``extraction`` if set, else the summary of ``extraction.json``, else the note in
        ``extraction.txt``, else ``unrecorded``."""
        if self.extraction:
            return self.extraction
        record = self.extraction_record()
        if record is not None:
            return str(record.get("summary") or "extraction.json without a summary")
        try:
            with open(os.path.join(self.data_dir, EXTRACTION_FILE), encoding="utf-8") as f:
                return f.readline().strip() or "unrecorded"
        except (OSError, DatasetError):
            return "unrecorded"

    def describe(self) -> dict[str, Any]:
        facts = {"task_group": self.info.group, "benchmark": "vtab-1k", **super().describe(),
                 "extraction": self.recorded_extraction()}
        record = self.extraction_record()
        if record is not None:
            facts["extraction_record"] = record
        return facts


def read_extraction_record(path: str) -> dict[str, Any] | None:
    """An ``extraction.json`` as a dict; None when the file does not exist; for a file that is
    not a JSON object, ``{"summary": "unreadable ...", "error": ...}`` (so a run still records
    that its folder claims an extraction it cannot read)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
    except (OSError, ValueError) as err:
        return {"summary": f"unreadable {os.path.basename(path)}", "error": f"{path}: {err}"}
    return record
