"""Task budgets: every task config composed with every method config, resolved as ``train.py``
resolves it, gives each budgeted method its published budget (counts exact on ViT-B/16, built
on the meta device); explicit budgets win; ``results.json`` records the run's budget."""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

from grft_lightning.core.accounting import count_parameters
from grft_lightning.training.budgets import effective_method_config
from grft_lightning.training.cli import cli_main, config_parser, expand_config_includes

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

VTAB = sorted(p for p in (CONFIGS / "vtab").glob("*.yaml") if p.name != "base.yaml")
FGVC = sorted(p for p in (CONFIGS / "fgvc").glob("*.yaml") if p.name != "base.yaml")
OFFLINE = sorted(p for p in (CONFIGS / "offline").glob("*.yaml") if p.name != "base.yaml")
TASKS = [*VTAB, *FGVC, *OFFLINE, CONFIGS / "demo.yaml"]
METHODS = sorted((CONFIGS / "methods").glob("*.yaml"))

# Published budgets: GRFT (and the random ablations) a fraction of the backbone; GPS's k as in
# the public GPS scripts.
FRACTION = {"vtab": 0.003, "fgvc": 0.0122, "offline": 0.007, "demo": 0.005}
GPS_K = {"patch_camelyon": 2, "cub": 2, "nabirds": 20, "cars": 15}

# ViT-B/16: one row of qkv, proj, fc1, fc2 is 768 + 768 + 768 + 3072 entries; one column
# 2304 + 768 + 3072 + 768; 12 blocks; biases of every Linear and the patch embedding.
D, DEPTH = 768, 12
ROW, COL = D + D + D + 4 * D, 3 * D + D + 4 * D + D
VIT_SELECTED = {  # (family, mode) -> selected entries at the family's fraction
    ("vtab", "row"): DEPTH * 4 * ROW, ("vtab", "column"): DEPTH * 3 * COL,
    ("fgvc", "row"): DEPTH * 16 * ROW, ("fgvc", "column"): DEPTH * 13 * COL,
}
# mode auto: per matrix the row budget, or the columns it pays for: floor(rows * fan_in / out)
VIT_AUTO = {"vtab": {"attn.qkv": (4, 1), "attn.proj": (4, 4), "mlp.fc1": (4, 1), "mlp.fc2": (4, 16)},
            "fgvc": {"attn.qkv": (16, 5), "attn.proj": (16, 16), "mlp.fc1": (16, 4), "mlp.fc2": (16, 64)}}


def family(task: Path) -> str:
    return "demo" if task.name == "demo.yaml" else task.parent.name


@functools.lru_cache(maxsize=None)
def parser():
    return config_parser()


def resolve(*configs: Path, extra: tuple[str, ...] = ()) -> dict:
    """``fit``'s config for these files, as ``train.py`` would run it (as a plain dict), with the
    method as the module builds it (its open budget filled from ``model.task_budget``)."""
    args = ["fit"]
    for path in configs:
        args += ["--config", str(path)]
    cfg = parser().parse_args(expand_config_includes([*args, *extra])).fit.as_dict()
    cfg["model"]["method"] = effective_method_config(cfg["model"]["method"], cfg["model"]["task_budget"])
    return cfg


def _gradients(model, method, shape: str) -> dict[str, torch.Tensor] | None:
    """Stand-in gradients without memory (stride-0 views; the counts do not depend on the values
    but for mode auto): ``zero`` (auto keeps the rows: columns must do strictly better) or
    ``column`` (every row's gradient in its first fan-in position: auto takes the columns)."""
    if not method.needs_gradients:
        return None
    grads = {}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for name in method.gradient_names(model):
        out, fan_in = shapes[name][0], shapes[name][1:].numel()
        row = torch.zeros(fan_in)
        if shape == "column":
            row[0] = 1.0
        grads[name] = row.expand(out, fan_in).reshape(shapes[name])
    return grads


@functools.lru_cache(maxsize=None)
def _applied(backbone: str, class_path: str, init_args_json: str, shape: str = "zero") -> tuple[dict, int]:
    """(per-matrix ``(axis, count)`` or {}, selected entries) of a method selected and applied on
    ``backbone`` on meta."""
    module, _, name = class_path.rpartition(".")
    method = getattr(importlib.import_module(module), name)(**json.loads(init_args_json))
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, num_classes=10)
    selection = method.select(model, _gradients(model, method, shape), seed=0)
    method.apply(model, selection)
    counts = {name: tuple(count) for name, count in selection.counts().items()}
    return counts, count_parameters(model)["selected"]


def applied(cfg: dict, shape: str = "zero") -> tuple[dict, int]:
    method = cfg["model"]["method"]
    return _applied(cfg["model"]["backbone"], method["class_path"],
                    json.dumps(method.get("init_args") or {}, sort_keys=True), shape)


@pytest.mark.parametrize("task", TASKS, ids=lambda p: f"{family(p)}-{p.stem}")
def test_every_method_gets_the_task_budget(task):
    fam = family(task)
    assert len(VTAB) == 19 and len(FGVC) == 5 and len(OFFLINE) >= 3
    names = {p.stem for p in METHODS}
    assert {"gps", "grft_row", "grft_column", "grft_auto", "random_row", "random_column"} <= names
    resolved = {p.stem: resolve(task, p) for p in METHODS}
    vit = resolved["grft_row"]["model"]["backbone"].startswith("vit_base_patch16_224")
    assert vit == (fam in ("vtab", "fgvc"))
    for name, cfg in resolved.items():
        method = cfg["model"]["method"]
        args = method.get("init_args") or {}
        cls = method["class_path"].rpartition(".")[2]
        if cls in ("GRFT", "RandomRows"):
            assert args["fraction"] == FRACTION[fam], name
            assert args["rows_per_matrix"] is None and args["columns_per_matrix"] is None, name
        elif cls in ("GPS", "GPSMasked"):
            assert args["k"] == GPS_K.get(task.stem, 1), name
        else:
            assert not {"fraction", "k"} & set(args), name

    # the random ablations: GRFT's exact shapes, matrix by matrix, on every family
    grft_row, grft_col = applied(resolved["grft_row"]), applied(resolved["grft_column"])
    assert applied(resolved["random_row"]) == grft_row
    assert applied(resolved["random_column"]) == grft_col
    assert {axis for axis, n in grft_row[0].values()} == {"row"} and 0 not in {n for _, n in grft_row[0].values()}
    assert {axis for axis, n in grft_col[0].values()} == {"column"} and 0 not in {n for _, n in grft_col[0].values()}
    for name in ("grft_row", "grft_column", "grft_auto", "random_row", "random_column"):
        for key in ("allocation", "targets", "exclude", "tune_bias", "tune_norm"):
            assert resolved[name]["model"]["method"]["init_args"][key] == \
                resolved["grft_row"]["model"]["method"]["init_args"][key], (name, key)

    if vit:  # exact selected-entry counts on ViT-B/16
        assert grft_row[1] == VIT_SELECTED[fam, "row"] and grft_col[1] == VIT_SELECTED[fam, "column"]
        assert len(grft_row[0]) == 48
        auto_rows, auto_selected = applied(resolved["grft_auto"])  # zero gradients: the rows
        assert auto_rows == {f"blocks.{i}.{m}": ("row", r) for i in range(DEPTH) for m, (r, _) in VIT_AUTO[fam].items()}
        assert auto_selected == VIT_SELECTED[fam, "row"]
        auto_columns, auto_selected = applied(resolved["grft_auto"], "column")  # column-shaped: the columns
        assert auto_columns == {f"blocks.{i}.{m}": ("column", c) for i in range(DEPTH)
                                for m, (_, c) in VIT_AUTO[fam].items()}
        outs = (3 * D, D, 4 * D, D)  # qkv, proj, fc1, fc2
        assert auto_selected == DEPTH * sum(c * out for (_, c), out in zip(VIT_AUTO[fam].values(), outs))
        k = GPS_K.get(task.stem, 1)
        assert applied(resolved["gps"])[1] == k * (DEPTH * COL + D) == k * 83_712
        # GRFT's published percentages of the backbone (85,798,656 parameters without the head)
        target = {"vtab": 0.30, "fgvc": 1.22}[fam]
        assert abs(100 * grft_row[1] / 85_798_656 - target) < 0.02  # 0.301 % and 1.203 %
    else:  # MobileNetV2: at least the target (every convolution gets one row or column at least)
        backbone = count_parameters(_meta_model(resolved["grft_row"]["model"]["backbone"]))["backbone"]
        assert grft_row[1] >= 0.9 * FRACTION[fam] * backbone and grft_col[1] >= 0.9 * FRACTION[fam] * backbone


def _meta_model(name: str):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=10)


def test_the_benchmark_selection_pass_runs_in_train_mode():
    for task in (CONFIGS / "vtab" / "dtd.yaml", CONFIGS / "fgvc" / "cub.yaml"):
        assert resolve(task, CONFIGS / "methods" / "gps.yaml")["selection"]["mode"] == "train"
    assert resolve(CONFIGS / "demo.yaml")["selection"]["mode"] == "eval"


def test_an_explicit_budget_wins():
    cub, gps, grft = CONFIGS / "fgvc" / "cub.yaml", CONFIGS / "methods" / "gps.yaml", CONFIGS / "methods" / "grft_row.yaml"
    assert resolve(cub, gps, extra=("--model.method.init_args.k", "3"))["model"]["method"]["init_args"]["k"] == 3
    assert resolve(cub, gps, extra=("--budget.k", "5"))["model"]["method"]["init_args"]["k"] == 5
    rows = resolve(cub, grft, extra=("--model.method.init_args.rows_per_matrix", "8"))["model"]["method"]["init_args"]
    assert rows["rows_per_matrix"] == 8 and rows["fraction"] is None
    frac = resolve(cub, grft, extra=("--model.method.init_args.fraction", "0.01"))["model"]["method"]["init_args"]
    assert frac["fraction"] == 0.01
    # the offline suite's recipes state their own budgets
    digit = CONFIGS / "offline" / "mnist_digit.yaml"
    assert resolve(digit, CONFIGS / "offline" / "methods" / "grft_column.yaml")["model"]["method"]["init_args"]["fraction"] == 0.003
    # no budget section: the method's own default
    plain = resolve(gps, extra=("--data", "grft_lightning.data.SyntheticImages"))
    assert plain["model"]["method"]["init_args"]["k"] is None and plain["budget"] == {"fraction": None, "k": None}


def test_print_config_shows_the_task_budget_and_the_open_method_budget(capsys):
    for task, method, key, expected in [("fgvc/nabirds", "gps", "k", "  k: 20\n"),
                                        ("fgvc/cars", "random_column", "fraction", "  fraction: 0.0122\n"),
                                        ("vtab/patch_camelyon", "random_row", "fraction", "  fraction: 0.003\n")]:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", str(CONFIGS / f"{task}.yaml"), "--config", str(CONFIGS / "methods" / f"{method}.yaml"),
                      "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = capsys.readouterr().out
        method_block = printed[printed.index("  method:\n"):printed.index("  backbone:")]
        assert f"      {key}: null\n" in method_block, (task, method, method_block)  # the module fills it
        budget_lines = printed[printed.index("\nbudget:\n"):].split("\n")[2:4]  # fraction, k
        assert expected.rstrip("\n") in budget_lines, (task, method, budget_lines)


def _tiny_fit(run_dir: Path, method: dict, *extra: str) -> dict:
    data = {"class_path": "grft_lightning.data.SyntheticImages",
            "init_args": {"num_classes": 4, "n_train": 16, "n_val": 8, "n_test": 8}}
    cli_main([
        "fit", "--model.backbone", "test_vit", "--model.pretrained", "false", "--model.image_size", "32",
        "--model.method", json.dumps(method), "--data", json.dumps(data),
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--selection.progress", "false", "--selection.loss", "ce",
        "--wandb.mode", "disabled", "--run_dir", str(run_dir), *extra])
    return json.loads((run_dir / "results.json").read_text())


def test_results_json_records_the_budget(tmp_path, one_torch_thread):
    grft = _tiny_fit(tmp_path / "grft_row", {"class_path": "grft_lightning.methods.GRFT", "init_args": {"mode": "row"}},
                     "--budget.fraction", "0.05", "--budget.k", "3")
    budget = grft["budget"]
    # test_vit: 6 blocks of qkv/proj/fc1/fc2 (fan-in 64, 64, 64, 192), backbone 300,096 parameters:
    # 0.05 * 300,096 / (6 * 384) = 6.5 -> 7 rows per matrix
    assert budget["fraction"] == 0.05 and budget["mode"] == "row" and budget["allocation"] == "uniform"
    assert budget["rows_per_matrix"] is None and "k" not in budget
    assert len(budget["per_matrix"]) == 24 and set(map(tuple, budget["per_matrix"].values())) == {("row", 7)}
    assert budget["description"] == ("row (uniform): 168 rows in 24 of 24 matrices = 16,128 weight entries "
                                     "(5.374 % of the backbone)")
    assert budget["entries"] == 16_128
    assert grft["counts"]["selected"] == 7 * 6 * 384 == 16_128
    assert budget["task"] == {"fraction": 0.05, "k": 3}
    assert grft["selection"]["mode"] == "eval" and grft["selection"]["loss"] == "ce"

    gps = _tiny_fit(tmp_path / "gps", {"class_path": "grft_lightning.methods.GPS"}, "--budget.k", "3",
                    "--selection.mode", "train")
    budget = gps["budget"]
    assert budget["k"] == 3 and budget["task"] == {"k": 3}
    assert set(map(tuple, budget["per_matrix"].values())) == {("entry", 3)}
    # 25 matrices: the 24 above (out 192, 64, 192, 64 per block) and the patch embedding (out 64)
    assert budget["description"] == ("entry (per_row): the top 3 entries of every row in 25 of 25 matrices = 9,408 "
                                     "weight entries (3.135 % of the backbone)")
    assert gps["counts"]["selected"] == 3 * (6 * 512 + 64) == 9_408
    assert gps["selection"]["mode"] == "train"
    saved = yaml.safe_load((tmp_path / "gps" / "config.yaml").read_text())
    assert saved["budget"] == {"fraction": None, "k": 3}  # the task budget the run was given
    assert saved["model"]["method"]["init_args"]["k"] is None  # the method as configured: open
    ckpt = torch.load(tmp_path / "gps" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["method_config"]["init_args"]["k"] == 3  # the effective budget


def test_gps_masked_takes_the_task_k():
    cars = CONFIGS / "fgvc" / "cars.yaml"
    masked = json.dumps({"class_path": "grft_lightning.methods.GPSMasked"})
    assert resolve(cars, extra=("--model.method", masked))["model"]["method"]["init_args"]["k"] == 15
    from grft_lightning.methods import GPSMasked

    assert GPSMasked().k == 1
