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
