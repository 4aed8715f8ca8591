"""Files that survive a crash: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success it replaces ``path`` atomically.

    A crash (or exception) while writing leaves the previous file untouched and no partial file
    under the target's name.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) create 0600: the usual mode
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | os.PathLike, older_than: float) -> list[Path]:
    """Delete what a hard kill during :func:`atomic_path` leaves behind in ``folder``.

    Only hidden ``.<name>.<random>.tmp`` files last modified before ``older_than`` (a
    ``time.time()``, e.g. when this process started) are removed, so a save in progress in
    another live process of the same job is never touched. Returns the removed paths.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.glob(".*.tmp"):
        try:
            if path.is_file() and path.stat().st_mtime < older_than:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another rank removed it first
            continue
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def load_checkpoint_safely(path: str | os.PathLike, map_location=None) -> dict:
    """``torch.load`` with ``weights_only=True`` and a clear error for damaged or foreign files."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot load as a checkpoint with weights_only=True ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); it may be truncated, damaged, "
                         "or not a checkpoint of this project") from err


def make_atomic_checkpoint_io():
    """A Lightning CheckpointIO that writes via temp file + rename and loads weights-only."""
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return load_checkpoint_safely(path, map_location=map_location or (lambda storage, loc: storage))

    return AtomicCheckpointIO()
