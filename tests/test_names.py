"""One name per method: the YAML file's name is the run's name (results.json ``method``, the run
directory, the report's row, ``--compare``), and every name the scripts and docs use is one of them."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
METHOD_TREES = ["configs/methods", "configs/offline/methods", "configs/vit_suite/methods",
                "configs/vit_suite/ablations", "configs/demo"]


def method_spec(path: Path) -> dict:
    """``model.method`` of a method file on top of the registry file it includes (a suite's method
    file names its class there, configs/methods/<method>.yaml, and states what differs)."""
    config = yaml.safe_load(path.read_text())
    included = config.get("config") or []
    spec: dict = {}
    for inc in [included] if isinstance(included, str) else included:
        base = (path.parent / inc).resolve()
        if base.parent == ROOT / "configs" / "methods":
            spec = dict(yaml.safe_load(base.read_text())["model"]["method"])
    own = (config.get("model") or {}).get("method") or {}
    spec["init_args"] = {**(spec.get("init_args") or {}), **(own.get("init_args") or {})}
    spec["class_path"] = own.get("class_path", spec.get("class_path"))
    return spec


def run_name(path: Path) -> str:
    """What a run of this config is called: its ``label``, else its method's ``name``."""
    config = yaml.safe_load(path.read_text())
    if config.get("label"):
        return config["label"]
    spec = method_spec(path)
    module, cls = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**(spec.get("init_args") or {})).name


def method_files() -> list[Path]:
    return [p for tree in METHOD_TREES for p in sorted((ROOT / tree).glob("*.yaml"))]


def all_names() -> set[str]:
    return {p.stem for p in method_files()}


@pytest.mark.parametrize("path", method_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_method_file_is_named_after_its_runs(path):
    assert run_name(path) == path.stem


def test_random_rows_and_grft_name_their_mode():
    from grft_lightning.methods import GRFT, RandomRows

    assert [GRFT(mode=m).name for m in ("row", "column", "auto")] == ["grft_row", "grft_column", "grft_auto"]
    assert [RandomRows(mode=m).name for m in ("row", "column")] == ["random_row", "random_column"]


COMPARE = re.compile(r"(?<![\w/.])([a-z][a-z0-9_.]*):([a-z][a-z0-9_.]*)(?![\w/])")


@pytest.mark.parametrize("doc", ["README.md", "docs/reproduce.md", "docs/results.md", "docs/training.md",
                                 "scripts/vit_suite.sh",
                                 "scripts/offline_suite.sh", "grft_lightning/experiments/report.py"])
def test_compared_names_are_method_names(doc):
    text = (ROOT / doc).read_text()
    pairs = [m.groups() for line in text.splitlines() if "compare" in line.lower() or line.startswith("grft")
             for m in COMPARE.finditer(line) if "_" in m.group(0)]
    # the scripts' COMPARE lists continue over several lines
    pairs += [m.groups() for m in COMPARE.finditer(" ".join(re.findall(r'COMPARE="([^"]*)"', text, re.S)))]
    names = all_names()
    unknown = {n for pair in pairs for n in pair if n not in names and n != "method_a" and n != "method_b"}
    assert not unknown, f"{doc} compares names no method config has: {sorted(unknown)}"


def test_the_suites_name_existing_method_files():
    text = (ROOT / "scripts/vit_suite.sh").read_text()
    listed = set(" ".join(re.findall(r'(?:SMALL|LARGE)="([^"]*)"', text)).split())
    assert listed and listed <= {p.stem for p in (ROOT / "configs/vit_suite/methods").glob("*.yaml")}
    text = (ROOT / "scripts/offline_suite.sh").read_text()
    listed = set(re.search(r"--methods ([a-z_ ]+)--seeds", text).group(1).split())
    assert listed and listed <= {p.stem for p in (ROOT / "configs/offline/methods").glob("*.yaml")}
