"""Prepared image folders on disk: root resolution, image checks and image loading.

Shared by the folder-based DataModules (VTAB-1k, FGVC) and by ``data/check_dataset.py`` so that
every problem with a prepared folder is found before training and reported the same way: the
message names the file and line (or json key) at fault and says what to do.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, NamedTuple

from PIL import Image

from grft_lightning.core.errors import UserError

log = logging.getLogger(__name__)

# Checking is I/O bound (network file systems on clusters): threads overlap the latency.
_CHECK_THREADS = 16


class DatasetError(UserError, ValueError):
    """A prepared dataset folder is missing, malformed, or holds unreadable images."""


class Sample(NamedTuple):
    """One image of a split before loading."""

    path: str  # image file (absolute, or relative to the working directory)
    label: int  # contiguous class index 0..num_classes-1
    where: str  # where it was declared, for messages: "list.txt:17" or "train.json key 'a.jpg'"


class ImageProblem(NamedTuple):
    kind: str  # "missing" or "unreadable"
    detail: str


def resolve_root(root: str, env_var: str, layout: str) -> str:
    """Expand ``~`` and ``$VARS`` in ``root`` and check that the folder exists.

    Raises:
        DatasetError: naming the unset environment variable or the missing folder, with the
            expected ``layout`` and the two ways to point the config at the data.
    """
    expanded = os.path.expanduser(os.path.expandvars(root))
    how = f"export {env_var}=/path/to/data, or pass --data.init_args.root /path/to/data"
    unset = re.findall(r"\$\{?(\w+)", expanded)
    if unset:
        names = ", ".join(sorted(set(unset)))
        raise DatasetError(
            f"data root {root!r} uses environment variable(s) that are not set: {names}. "
            f"Set it ({how}).\nExpected layout:\n{layout}"
        )
    if not os.path.isdir(expanded):
        raise DatasetError(
            f"data root {expanded!r} (from {root!r}) is not a folder. Fix the path ({how}).\n"
            f"Expected layout:\n{layout}"
        )
    return expanded


#: The data option that lets list files name images outside their folder.
OUTSIDE_ROOT_OPTION = "data.init_args.allow_outside_root"


def outside_folder(rel: str) -> bool:
    """Whether an image path read from a list file leaves the folder it is relative to: an
    absolute path (``/etc/passwd``) or one whose ``..`` climb above it (``\\`` counts as a separator
    too). Decided on the text alone: symbolic links inside the folder (an ``images/`` link to
    another disk) are followed as usual."""
    if os.path.isabs(rel) or rel.startswith("\\"):
        return True
    depth = 0
    for part in re.split(r"[/\\]+", rel):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def refuse_outside(where: str, rel: str, folder: str) -> DatasetError:
    """The error for an image path that leaves ``folder`` (:func:`outside_folder`)."""
    return DatasetError(
        f"{where}: image path {rel!r} is outside the folder {folder} (an absolute path or one that climbs "
        f"out with '..'); list files may name only images inside it. If that is intended, set "
        f"{OUTSIDE_ROOT_OPTION}: true")


def load_rgb(path: str) -> Image.Image:
    """Open an image with PIL and convert it to RGB, naming the file if that fails."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise DatasetError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err


def probe_image(path: str, verify: bool = True) -> ImageProblem | None:
    """Return what is wrong with one image file, or ``None``.

    ``verify`` runs PIL's ``Image.verify()``: it parses the header and, for PNG, checks every
    chunk's CRC; it does not fully decode a JPEG, so a truncated JPEG can still pass and then
    fails at load time (``load_rgb`` names it).
    """
    if not os.path.isfile(path):
        return ImageProblem("missing", "file does not exist")
    if not verify:
        return None
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:
        return ImageProblem("unreadable", f"{type(err).__name__}: {err}")
    return None


def probe_images(paths: Iterable[str], verify: bool = True) -> dict[str, ImageProblem | None]:
    """``probe_image`` over many files (threaded); keys are the unique paths."""
    unique = list(dict.fromkeys(paths))
    if len(unique) < 64:
        return {p: probe_image(p, verify) for p in unique}
    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        return dict(zip(unique, pool.map(lambda p: probe_image(p, verify), unique)))


def check_samples(
    samples: list[Sample],
    *,
    verify: bool,
    skip_bad: bool,
    skipped: dict[str, str],
    cache: dict[str, ImageProblem | None],
    missing_hint: str = "",
) -> list[Sample]:
    """Return the samples whose image exists and (with ``verify``) can be read.

    A missing file always raises (it means a wrong root or image folder). An unreadable file
    raises too, unless ``skip_bad``: then it is dropped with a warning naming it and recorded in
    ``skipped`` (path -> problem; shared across splits so that an image in two splits counts
    once). ``cache`` keeps probe results across splits for the same reason.
    """
    todo = [s.path for s in samples if s.path not in cache]
    cache.update(probe_images(todo, verify))
    kept = []
    for sample in samples:
        problem = cache[sample.path]
        if problem is None:
            kept.append(sample)
        elif problem.kind == "missing":
            raise DatasetError(f"{sample.where}: image {sample.path} does not exist.{missing_hint}")
        elif not skip_bad:
            raise DatasetError(
                f"{sample.where}: cannot decode image {sample.path} ({problem.detail}). Replace or "
                "delete the file, or set data.init_args.skip_bad_images: true to skip unreadable "
                "images (their number is recorded in results.json as skipped_images)."
            )
        elif sample.path not in skipped:
            skipped[sample.path] = problem.detail
            warnings.warn(
                f"skipping unreadable image {sample.path} ({sample.where}): {problem.detail}"
            )
    dropped = len(samples) - len(kept)
    if dropped:
        log.warning("skipped %d unreadable image(s) of %d", dropped, len(samples))
    return kept
