"""One method registry: ``configs/methods/<method>.yaml`` defines each method (class and arguments);
every suite's method file includes the registry file of its method (``config:``, loaded first) and
states only what differs from it on the suite's base. Composed as ``train.py`` composes them, the
suites' runs get their recipes: a few known values, and the variants (larger budgets, scratch
rows, ablations, the study's arms) keep their suite recipe's rates."""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path

import pytest
import yaml

from grft_lightning.training.cli import config_parser, expand_config_includes
from grft_lightning.methods import method_class

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
REGISTRY = CONFIGS / "methods"
#: folder of suite method files -> the task config they are composed with here
SUITES = {
    "offline/methods": "offline/mnist_digit.yaml",
    "vit_suite/methods": "vit_suite/mnist_digit.yaml",
    "vit_suite/ablations": "vit_suite/mnistm.yaml",
    "vit_suite/science": "vit_suite/science/tasks/mnist_digit.yaml",
    "demo": None,  # each demo file includes configs/demo.yaml itself
}
BUDGET_KEYS = {"k", "r", "rows_per_matrix", "columns_per_matrix", "fraction", "allocation"}


def suite_files() -> list[Path]:
    return [p for folder in SUITES for p in sorted((CONFIGS / folder).glob("*.yaml"))]


def task_of(path: Path) -> Path | None:
    task = SUITES[path.parent.relative_to(CONFIGS).as_posix()]
    return None if task is None else CONFIGS / task


def includes(path: Path) -> list[Path]:
    included = yaml.safe_load(path.read_text()).get("config") or []
    return [(path.parent / p).resolve() for p in ([included] if isinstance(included, str) else included)]


def registry_file(path: Path) -> Path:
    """The one registry file ``path`` includes."""
    found = [p for p in includes(path) if p.parent == REGISTRY]
    assert len(found) == 1, f"{path} includes {found}: one file of configs/methods/ expected"
    return found[0]


@functools.lru_cache(maxsize=None)
def parser():
    return config_parser()


@functools.lru_cache(maxsize=None)
def resolve(*configs: Path) -> dict:
    """``fit``'s config of these files, as ``train.py`` resolves it (includes expanded), as a dict."""
    args = ["fit"]
    for path in configs:
        args += ["--config", str(path)]
    return parser().parse_args(expand_config_includes(args)).fit.as_dict()


def run_config(path: Path) -> dict:
    task = task_of(path)
    return resolve(path) if task is None else resolve(task, path)


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(leaves(value, name))
        else:
            out[name] = value
    return out


def get(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = (tree or {}).get(key)
    return tree


def test_every_suite_tree_is_covered():
    on_disk = {p.parent.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")
               if re.search(r"/(methods|ablations|science|demo)/[^/]+\.yaml$", p.as_posix())
               and p.parent != REGISTRY}
    assert on_disk == set(SUITES)
    assert len(suite_files()) == 10 + 20 + 17 + 13 + 5


@pytest.mark.parametrize("path", suite_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_a_suite_method_file_includes_its_registry_file_and_states_what_differs(path):
    registry = registry_file(path)
    others = [p for p in includes(path) if p != registry]
    assert others == ([CONFIGS / "demo.yaml"] if path.parent.name == "demo" else []), path
    stated = yaml.safe_load(path.read_text())
    method = (stated.get("model") or {}).get("method") or {}
    assert "class_path" not in method, f"{path}: the class is the registry file's"

    base = yaml.safe_load(registry.read_text())["model"]["method"]
    cls = method_class(base["class_path"])
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    registry_args = {**defaults, **(base.get("init_args") or {})}
    # what the run gets without this file: the registry file on the suite's base
    task = task_of(path)
    without = resolve(*[p for p in (task, *includes(path)) if p is not None])
    for key, value in leaves({k: v for k, v in stated.items() if k not in ("config", "label")}).items():
        if key.startswith("model.method.init_args."):
            assert value != registry_args[key.rsplit(".", 1)[1]], f"{path}: {key} repeats {registry.name}'s value"
        else:
            assert value != get(without, key), f"{path}: {key} repeats what {registry.name} on its base gives"

    resolved = run_config(path)
    assert resolved["model"]["method"]["class_path"] == base["class_path"]
    if "label" in stated:  # a variant names its runs; a suite's own method is named by its class
        assert stated["label"] == path.stem


def test_known_resolved_values():
    vit = run_config(CONFIGS / "vit_suite/methods/grft_row.yaml")
    assert vit["model"]["optimizer"]["init_args"]["lr"] == 0.03 and vit["model"]["head_lr"] == 0.01
    args = vit["model"]["method"]["init_args"]
    assert (args["mode"], args["rows_per_matrix"], args["regularization"], args["reg_lambda"]) == ("row", 1, "l2sp", 1e-4)

    probe = run_config(CONFIGS / "vit_suite/science/grft_row_probe.yaml")
    assert probe["selection"]["head"] == "probe" and probe["model"]["method"]["init_args"]["rows_per_matrix"] == 1
    matched = run_config(CONFIGS / "vit_suite/science/grft_row_matched_probe.yaml")["model"]["method"]["init_args"]
    assert (matched["rows_per_matrix"], matched["fraction"], matched["allocation"]) == (None, 0.005497, "global")
    nostem = run_config(CONFIGS / "vit_suite/science/gps_nostem_probe.yaml")["model"]["method"]
    assert nostem["class_path"].endswith(".GPS") and nostem["init_args"]["exclude"] == ["patch_embed.*"]
    assert nostem["init_args"]["k"] == 1

    scratch = run_config(CONFIGS / "vit_suite/methods/full_scratch.yaml")
    assert scratch["model"]["pretrained"] is False and scratch["model"]["weights"] is None
    assert scratch["model"]["optimizer"]["init_args"]["lr"] == 0.001 and scratch["model"]["head_lr"] is None
    lora = run_config(CONFIGS / "vit_suite/ablations/lora_x4.yaml")["model"]["method"]["init_args"]
    assert lora["r"] == 4 and lora["targets"] == ["*.attn.qkv", "*.mlp.fc1"]
    assert run_config(CONFIGS / "vit_suite/methods/adapter.yaml")["model"]["method"]["init_args"]["bottleneck"] == 1

    offline = run_config(CONFIGS / "offline/methods/grft_column.yaml")["model"]["method"]["init_args"]
    assert (offline["mode"], offline["fraction"], offline["allocation"], offline["tune_norm"]) == \
        ("column", 0.003, "proportional", True)
    assert (offline["regularization"], offline["reg_lambda"]) == ("l2sp", 1e-4)
    full = run_config(CONFIGS / "offline/methods/full.yaml")["model"]
    assert full["optimizer"]["init_args"]["lr"] == 0.001 and full["head_lr"] is None

    demo = run_config(CONFIGS / "demo/random_row.yaml")
    assert demo["model"]["method"]["class_path"].endswith(".RandomRows")
    assert demo["model"]["method"]["init_args"]["allocation"] == "proportional"
    assert demo["model"]["backbone"] == "mobilenetv2_100" and demo["budget"]["fraction"] == 0.005
    assert run_config(CONFIGS / "demo/gps.yaml")["model"]["method"]["init_args"]["tune_norm"] is True


def _parent(path: Path) -> Path:
    """The suite recipe a variant varies: the ViT suite's method file whose name its name extends."""
    recipes = sorted((p for p in (CONFIGS / "vit_suite/methods").glob("*.yaml") if p != path),
                     key=lambda p: len(p.stem), reverse=True)
    return next(p for p in recipes if path.stem == p.stem or path.stem.startswith(p.stem + "_"))


VARIANTS = [p for p in suite_files() if p.parent.name in ("ablations", "science")
            or re.search(r"_(1\.2pct|scratch)$", p.stem)]


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_a_variant_keeps_its_suite_recipe(path):
    """Budget variants differ from their suite recipe in the budget only, scratch rows in the
    pre-trained weights only; every variant keeps its recipe's learning rates."""
    parent, variant = _parent(path), run_config(path)
    recipe = resolve(task_of(path), parent)
    differ = {k for k in set(leaves(variant)) | set(leaves(recipe))
              if get(variant, k) != get(recipe, k)} - {"label", "config"}
    assert variant["model"]["optimizer"] == recipe["model"]["optimizer"], (path, parent)
    assert variant["model"]["head_lr"] == recipe["model"]["head_lr"], (path, parent)
    if re.search(r"_(1\.2pct|x\d+)$", path.stem):
        assert {k.rsplit(".", 1)[1] for k in differ} <= BUDGET_KEYS, (path, parent, differ)
        assert all(k.startswith("model.method.init_args.") for k in differ), (path, differ)
    if path.stem.endswith("_scratch"):
        assert differ == {"model.pretrained", "model.weights"}, (path, differ)


def test_results_record_every_config_file_read(monkeypatch):
    """``config_files`` lists the task file, the registry file and the suite's override, in the
    order they were read (an include first), whatever ``config:`` keys the files hold."""
    from grft_lightning.training.cli import expand_with_files

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    args = ["fit", "--config", "configs/vit_suite/mnistm.yaml", "--config", "configs/vit_suite/methods/grft_row.yaml",
            "--config", '{"seed_everything": 3}']
    assert expand_with_files(args)[1] == [
        "configs/vit_suite/base.yaml", "configs/vit_suite/mnistm.yaml", "configs/methods/grft_row.yaml",
        "configs/vit_suite/methods/grft_row.yaml"]
