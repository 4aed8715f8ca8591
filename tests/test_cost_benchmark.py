"""The cost benchmark's --small run: the table's shape and its exact counts, not its timings; its
methods are the registry's (configs/methods/) with its budgets on top, its targets are the one
targets file's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["full", "linear", "bitfit", "lora", "adapter", "gps", "gps_masked", "grft_row", "grft_column"]
#: tuned parameters of each method in the --small run (test_vit, 32 px, 100 classes)
SMALL_TUNED = {"full": 306_596, "linear": 6_500, "bitfit": 9_636, "lora": 49_508, "adapter": 19_652, "gps": 12_772,
               "gps_masked": 12_772, "grft_row": 18_852, "grft_column": 18_852}
KEYS = {"method", "step_seconds", "peak_memory_bytes", "tuned", "tuned_pct", "optimizer_state_bytes",
        "selection_seconds", "export_bytes", "step_time_ratio", "peak_memory_ratio"}


def test_small_run_writes_every_method_and_key(tmp_path):
    out = tmp_path / "cost"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.cost", "--small", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "cost.json").read_text())
    assert {"device", "dtype", "batch", "torch"} <= set(result)
    assert (result["dtype"], result["batch"]) == ("fp32", 2)
    rows = {row["method"]: row for row in result["rows"]}
    assert [row["method"] for row in result["rows"]] == METHODS
    for name, row in rows.items():
        assert KEYS <= set(row), name
        assert row["step_seconds"] > 0 and row["peak_memory_bytes"] > 0 and row["export_bytes"] > 0, name
        assert (row["selection_seconds"] is not None) == (name in ("gps", "gps_masked", "grft_row", "grft_column")), name
    assert rows["full"]["step_time_ratio"] == 1.0 and rows["full"]["peak_memory_ratio"] == 1.0
    assert rows["full"]["step_wall_seconds"] > 0 and rows["full"]["step_cpu_seconds"] > 0
    # counts are exact even in a quick run: GPS trains the same entries either way; GRFT keeps tiny optimizer state
    assert rows["gps"]["tuned"] == rows["gps_masked"]["tuned"]
    assert rows["grft_row"]["optimizer_state_bytes"] < rows["full"]["optimizer_state_bytes"] / 10
    assert rows["gps_masked"]["optimizer_state_bytes"] == rows["full"]["optimizer_state_bytes"] - _norm_state(rows)
    # test_vit at 32 px, 100 classes: the counts of the methods as the registry and the budgets define them
    assert {name: row["tuned"] for name, row in rows.items()} == SMALL_TUNED
    table = (tmp_path / "cost.md").read_text()
    assert table.count("\n| ") == 1 + len(METHODS)  # header + one line per method


def _norm_state(rows) -> int:
    """AdamW state of what full fine-tuning trains and GPS does not: LayerNorms, pos_embed, cls_token
    of test_vit (depth 6, width 64, 5 tokens at 32 px): two fp32 moments plus one step counter each."""
    d, depth, tokens = 64, 6, 5
    norm_params = (2 * depth + 1) * 2 * d
    tensors = (2 * depth + 1) * 2 + 2
    return 2 * 4 * (norm_params + d + tokens * d) + tensors * 4


def test_saved_activations_table(tmp_path):
    out = tmp_path / "saved"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.saved_activations", "--model", "test_vit",
                           "--batch", "2", "--methods", "full,linear,grft_row,grft_column", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "saved.json").read_text())["methods"]
    total = {name: sum(per_node.values()) for name, per_node in saved.items()}
    # a frozen backbone keeps almost nothing; column deltas keep only their selected columns; row deltas
    # keep every linear input that no LayerNorm or GELU made (those they recompute: tests/test_recompute.py),
    # which on a ViT comes to what column deltas keep, within 2 %, and 30 % below full fine-tuning
    assert total["linear"] < min(total["grft_column"], total["grft_row"])
    assert abs(total["grft_row"] - total["grft_column"]) < 0.02 * total["grft_column"]
    assert total["grft_row"] < 0.7 * total["full"]
    assert "DeltaLinearBackward" in saved["grft_row"] and "DeltaLinearBackward" not in saved["full"]
    nodes = set().union(*saved.values())
    assert (tmp_path / "saved.md").read_text().count("\n| ") == 1 + len(nodes) + 1  # header, nodes, total


def test_the_methods_are_the_registry_files_with_the_benchmark_budgets():
    import yaml

    from benchmarks import cost
    from grft_lightning.methods import method_class

    assert cost.METHODS == METHODS
    for name in METHODS:
        registry = yaml.safe_load((cost.REGISTRY_DIR / f"{name}.yaml").read_text())["model"]["method"]
        class_path, init_args = cost.method_config(name)
        assert class_path == registry["class_path"], name
        assert init_args == {**(registry.get("init_args") or {}), **cost.BUDGETS.get(name, {})}, name
        assert type(cost.build_method(name)) is method_class(class_path), name
    # the settings the table's labels name
    lora, adapter = cost.build_method("lora"), cost.build_method("adapter")
    assert (lora.r, lora.targets) == (8, ["*.attn.qkv", "*.attn.proj", "*.mlp.fc1", "*.mlp.fc2"])
    assert adapter.bottleneck == 8 and adapter.placement == "sequential"
    assert cost.build_method("grft_row").rows_per_matrix == 4 and cost.build_method("grft_row").mode == "row"
    assert cost.build_method("grft_column").columns_per_matrix == 3
    assert cost.build_method("gps").k == cost.build_method("gps_masked").k == 1


def test_both_cost_benchmarks_read_the_one_targets_file():
    from benchmarks import cost, gpu_check, targets

    every = targets()
    assert set(every) == {"cpu_vit_b16", "cpu_cnn", "gpu_vit_b16"}
    # the values as they were written in cost.py and gpu_check.py before the file existed
    assert every["cpu_vit_b16"] == {"grft_row_step_time": 0.72, "grft_row_peak_memory": 0.65,
                                    "grft_column_peak_memory": 0.75, "grft_row_optimizer_state": 0.01,
                                    "gps_peak_memory": 0.85}
    assert every["cpu_cnn"] == {"grft_row_step_time": 1.0}
    assert every["gpu_vit_b16"] == gpu_check.TARGETS == {"grft_row_images_per_second": 1.35,
                                                         "grft_row_peak_memory": 0.7, "selection_vs_epoch": 1.2}

    def row(method, step, peak):
        return {"method": method, "step_seconds": step, "step_time_ratio": step, "peak_memory_ratio": peak,
                "peak_memory_bytes": peak, "peak_above_baseline_ratio": peak, "optimizer_state_bytes": 1000 * peak}

    rows = [row("full", 1.0, 1.0), row("lora", 0.9, 0.8), row("gps", 0.8, 0.86), row("grft_row", 0.7, 0.64),
            row("grft_column", 0.7, 0.76)]
    found = dict(cost.checks(rows))
    assert found["GRFT row step time 0.700x full (<= 0.72) and <= LoRA's 0.900x"] is True
    assert [ok for text, ok in found.items() if text.startswith("GRFT column (3/matrix) peak")] == [False]
    assert [ok for text, ok in found.items() if text.startswith("GPS index-delta")] == [False]
    assert found["GRFT row optimizer state 64.000 % of full's (< 1 %)"] is False


def test_cnn_options_reach_the_children_and_the_table():
    import torch

    from benchmarks import cost
    threads = torch.get_num_threads()
    try:  # parse_args sets the process's torch threads
        args = cost.parse_args(["--model", "mobilenetv2_100", "--img-size", "48", "--channels-last", "--device", "cpu"])
        small = cost.parse_args(["--small", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert args.cnn and args.channels_last and "--channels-last" in cost._forward_args(args)
    assert not small.cnn and "--channels-last" not in cost._forward_args(small)  # test_vit has attention blocks
    lora = cost.build_method("lora", cnn=True)
    assert (lora.targets, lora.exclude) == (["*conv*"], ["*conv_dw"])

    def row(method, step):
        return {"method": method, "step_seconds": step, "step_time_ratio": step / 0.1, "step_wall_seconds": step,
                "peak_memory_bytes": 2**20, "peak_memory_ratio": 1.0, "peak_above_baseline_ratio": 1.0, "tuned": 1,
                "tuned_pct": 1.0, "optimizer_state_bytes": 8, "selection_seconds": None, "export_bytes": 8}

    result = {"malloc": None, "clock": "cpu", "device": "cpu", "dtype": "fp32", "batch": 32, "torch": "t", "timm": "t",
              "threads": 1, "model": "mobilenetv2_100", "num_classes": 10, "img_size": 48, "steps": 1, "warmup": 1,
              "selection_batches": 1, "peak_memory": "VmHWM", "memory_steps": 1, "isolated": True, "cnn": True,
              "channels_last": True, "left_out": cost.CNN_LEFT_OUT, "rows": [row("full", 0.1), row("grft_row", 0.105)]}
    text = cost.markdown(result)
    assert "- [ ] GRFT row step time 1.050x full (<= 1.0)" in text
    assert "memory format: channels-last" in text and "left out: Adapter" in text
    result["rows"][1] = row("grft_row", 0.08)
    assert "- [x] GRFT row step time 0.800x full (<= 1.0)" in cost.markdown(result)
    result.update(model="vit_small_patch16_224", cnn=False, channels_last=False, left_out={})
    assert "## Targets" not in cost.markdown(result)  # the ViT-B checks only for ViT-B, the CNN check only for CNNs


def test_step_overhead_table(tmp_path):
    out = tmp_path / "overhead"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.step_overhead", "--small", "--top", "4", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "overhead.json").read_text())
    steps = result["steps"]
    assert list(steps) == ["full", "bitfit", "grft_row", "grft_row_no_recompute"]
    assert steps["full"]["step_over_full"] == 1.0
    assert all(len(s["seconds"]) == 2 for s in steps.values())  # --small: 2 rounds
    assert len(result["operators"]) == 4
    # the operators are ordered by the size of the difference
    gaps = [abs(op["grft_row_ms"] - op["bitfit_ms"]) for op in result["operators"]]
    assert gaps == sorted(gaps, reverse=True)
    text = (tmp_path / "overhead.md").read_text()
    assert "| GRFT row, inputs kept (no recomputation) |" in text and text.count("\n| ") == 1 + 4 + 1 + 4
