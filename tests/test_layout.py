"""The package's layers: each sub-package imports only from the layers below it, and every module
opens with a paragraph saying what it owns.

    core  <  methods  <  data  <  training  <  experiments

``data`` does not need ``methods`` (nor ``methods`` ``data``); the order above only says what may
be imported, read from every ``import`` statement of the source, function-level ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "grft_lightning"
LAYERS = ["core", "methods", "data", "training", "experiments"]
ALLOWED = {
    "core": {"core"},
    "methods": {"core", "methods"},
    "data": {"core", "data"},
    "training": {"core", "methods", "data", "training"},
    "experiments": {"core", "methods", "data", "training", "experiments"},
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every run-time import of ``grft_lightning`` in ``path``."""
    found = []
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name.split(".")[0] == "grft_lightning"]


def _layer(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_package_is_the_five_layers_and_its_entry_point():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists())
    assert top == ["__init__.py", *sorted(LAYERS)]


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer):
    wrong = []
    for path in (PACKAGE / layer).rglob("*.py"):
        for name, line in _imports(path):
            target = _layer(name)
            if name == "grft_lightning" or (target is not None and target not in ALLOWED[layer]):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    names = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in _modules()}
    for module, path in names.items():
        graph[module] = {name for name, _ in _imports(path) if name in names and name != module
                         and not name.startswith(module + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1 and not node.endswith("__init__"):
                cycle = trail[trail.index(nxt):] + [node, nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_opens_with_what_it_owns(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.split()) >= 8, f"{path.relative_to(PACKAGE.parent)}: no opening paragraph"
