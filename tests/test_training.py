"""The training system through the real CLI, in-process: tiny ViT, synthetic in-memory data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from grft_lightning.training.cli import cli_main

REPO = Path(__file__).resolve().parent.parent


def tiny_args(run_dir: Path, *extra: str, method: str = "grft_lightning.methods.GRFT",
              method_args: str = '{"mode": "row", "rows_per_matrix": 2}', epochs: int = 1) -> list[str]:
    return [
        "fit",
        "--model.backbone", "test_vit", "--model.pretrained", "false", "--model.image_size", "32",
        "--model.method", json.dumps({"class_path": method, "init_args": json.loads(method_args)}),
        "--data", json.dumps({"class_path": "grft_lightning.data.SyntheticImages",
                              "init_args": {"num_classes": 4, "n_train": 32, "n_val": 16, "n_test": 16}}),
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0",
        "--selection.progress", "false", "--wandb.mode", "disabled", "--run_dir", str(run_dir),
        *extra,
    ]


def selection_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("row_index", "col_index", ".index"))}


def test_fit_then_test_writes_the_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    cli = cli_main(tiny_args(run))
    out = capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    required = {"method", "dataset", "backbone", "seed", "tuned", "backbone_params", "tuned_pct",
                "selection_seconds", "train_seconds", "val_acc", "test_acc", "peak_memory_bytes", "git_sha"}
    assert required <= results.keys()
    assert (results["method"], results["dataset"], results["backbone"], results["seed"]) == \
        ("grft_row", "synthetic", "test_vit", 0)
    # 2 rows x (64 + 64 + 64 + 192) fan-in x 6 blocks, + biases, + head 64*4+4
    assert results["counts"]["selected"] == 2 * (64 + 64 + 64 + 192) * 6
    assert results["tuned"] == results["counts"]["selected"] + results["counts"]["bias"] + 260
    assert results["tuned_pct"] == pytest.approx(100 * results["tuned"] / results["backbone_params"])
    assert 0.0 <= results["test_acc"] <= 1.0 and 0.0 <= results["val_acc"] <= 1.0
    for name in ("config.yaml", "tuned.safetensors", "metrics.csv", "selection.png", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert "tuned params:" in out and f"run directory: {run}" in out and "test accuracy:" in out
    assert cli.trainer.global_step == 4  # 32 images / batch 8


def test_resume_keeps_the_selection_and_continues_the_step_count(tmp_path, monkeypatch):
    from grft_lightning.training.module import PEFTModule

    run = tmp_path / "run"
    picked = {}

    def preempted(self):  # once epoch 0's checkpoint is written
        if self.current_epoch == 1:
            picked.update(selection_of(self), global_step=self.global_step)
            raise RuntimeError("preempted")

    with monkeypatch.context() as patch:
        patch.setattr(PEFTModule, "on_train_epoch_start", preempted, raising=False)
        with pytest.raises(RuntimeError, match="preempted"):
            cli_main(tiny_args(run, epochs=2))
    assert picked.pop("global_step") == 4

    from grft_lightning.methods import GRFT

    def no_reselect(*args, **kwargs):
        raise AssertionError("selection ran again on resume")

    monkeypatch.setattr(GRFT, "select", no_reselect)
    second = cli_main(tiny_args(run, epochs=2))  # the same command: resumes last.ckpt
    assert second.trainer.global_step == 8
    again = selection_of(second.model)
    assert picked.keys() == again.keys() and all(torch.equal(picked[k], again[k]) for k in picked)


def test_checkpoint_of_another_budget_is_refused(tmp_path):
    run = tmp_path / "run"
    cli_main(tiny_args(run))
    with pytest.raises(ValueError, match="another method or budget"):
        cli_main(tiny_args(tmp_path / "other", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                           method_args='{"mode": "row", "rows_per_matrix": 3}'))


# test_vit at 32 px with 4 classes: embed 64, depth 6; per block qkv 64->192, proj 64->64, fc1 64->192,
# fc2 192->64; patch embedding conv 3x16x16 -> 64.
BACKBONE, HEAD = 300_096, 64 * 4 + 4
LINEAR_BIASES = 6 * (192 + 64 + 192 + 64) + 64  # every block Linear's bias + the patch embedding's
NORM_BIASES = (6 * 2 + 1) * 64  # two LayerNorms per block + the final one
EXPECTED_COUNTS = {  # method: (selected, bias), from the shapes above
    "GPS": (6 * (192 + 64 + 192 + 64) + 64, LINEAR_BIASES),  # k=1 per output row, patch embedding included
    "Full": (BACKBONE - LINEAR_BIASES - NORM_BIASES, LINEAR_BIASES + NORM_BIASES),
    "Linear": (0, 0),
    "BitFit": (0, LINEAR_BIASES),
    "RandomRows": (2 * (64 + 64 + 64 + 192) * 6, LINEAR_BIASES),  # 2 rows x fan-in; patch embedding excluded
}


@pytest.mark.parametrize("method", list(EXPECTED_COUNTS))
def test_every_method_trains_through_the_cli(tmp_path, one_torch_thread, method):
    """Exact tuned counts, and a test accuracy equal to the one recomputed from tuned.safetensors
    loaded onto the pre-trained weight file."""
    import timm

    from grft_lightning import load_tuned
    from grft_lightning.core.backbones import create_backbone

    torch.manual_seed(1)
    weights = tmp_path / "pretrained.pth"
    torch.save(timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=1000).state_dict(), weights)
    args = '{"k": 1}' if method == "GPS" else '{"rows_per_matrix": 2}' if method == "RandomRows" else "{}"
    run = tmp_path / "run"
    cli = cli_main(tiny_args(run, "--model.pretrained", "true", "--model.weights", str(weights),
                             method=f"grft_lightning.methods.{method}", method_args=args))
    results = json.loads((run / "results.json").read_text())

    selected, bias = EXPECTED_COUNTS[method]
    counts = results["counts"]
    assert (counts["selected"], counts["bias"], counts["head"]) == (selected, bias, HEAD)
    assert (results["tuned"], results["backbone_params"]) == (selected + bias + HEAD, BACKBONE)
    assert results["tuned_pct"] == pytest.approx(100 * (selected + bias + HEAD) / BACKBONE)

    model = load_tuned(create_backbone("test_vit", 4, weights=str(weights), image_size=32), run / "tuned.safetensors")
    correct = total = 0
    with torch.no_grad():
        for images, labels in cli.datamodule.test_dataloader():
            correct += int((model.eval()(images).argmax(-1) == labels).sum())
            total += len(labels)
    assert total == 16
    assert 0.0 <= results["test_acc"] <= 1.0
    assert results["test_acc"] == pytest.approx(correct / total, abs=1e-6)


def test_bf16_autocast_on_cpu(tmp_path):
    cli = cli_main(tiny_args(tmp_path / "run", "--trainer.precision", "bf16-mixed"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert cli.trainer.precision == "bf16-mixed"
    assert 0.0 <= results["test_acc"] <= 1.0 and torch.isfinite(torch.tensor(results["tuned_pct"]))


def test_wandb_offline_leaves_a_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    args = tiny_args(run)
    args[args.index("--wandb.mode") + 1] = "offline"
    cli_main(args)
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))


def test_selection_from_a_previous_run_file(tmp_path):
    first = cli_main(tiny_args(tmp_path / "a"))
    second = cli_main(tiny_args(tmp_path / "b", "--selection.from_file", str(tmp_path / "a" / "tuned.safetensors")))
    a, b = selection_of(first.model), selection_of(second.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_selection_file_of_another_method_is_refused(tmp_path):
    cli_main(tiny_args(tmp_path / "a"))
    with pytest.raises(ValueError, match="was selected by"):
        cli_main(tiny_args(tmp_path / "b", "--selection.from_file", str(tmp_path / "a" / "tuned.safetensors"),
                           method_args='{"mode": "column", "columns_per_matrix": 2}'))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        cli_main(["fit", "--config", str(tmp_path / "nope.yaml")])


def test_non_finite_loss_names_the_step_and_last_finite_loss():
    from grft_lightning.methods import Linear
    from grft_lightning.training.module import PEFTModule

    module = PEFTModule(Linear(), backbone="test_vit", num_classes=3, pretrained=False, image_size=32,
                        check_finite_every_n_batches=1)
    module._check_finite(torch.tensor(1.25))
    with pytest.raises(FloatingPointError, match=r"loss \(nan\) at global step 0 .*last finite loss: 1.25\."):
        module._check_finite(torch.tensor(float("nan")))
    first = PEFTModule(Linear(), backbone="test_vit", num_classes=3, pretrained=False, image_size=32,
                       check_finite_every_n_batches=1)
    with pytest.raises(FloatingPointError, match=r"loss \(inf\) at global step 0 .*last finite loss: None\."):
        first._check_finite(torch.tensor(float("inf")))
    with pytest.raises(ValueError, match="check_finite_every_n_batches must be >= 1"):
        PEFTModule(Linear(), backbone="test_vit", num_classes=3, pretrained=False, check_finite_every_n_batches=0)


def _nan_features_at(monkeypatch, batch: int) -> list[int]:
    """Make the training forward of the ``batch``-th training step (0-based) produce NaN
    logits; returns the list the patched function counts training steps in."""
    import grft_lightning.training.module as module

    original, calls = module.features_and_logits, []

    def features_and_logits(model, images):
        calls.append(len(calls))
        features, logits = original(model, images)
        return (features, logits * float("nan")) if calls[-1] == batch else (features, logits)

    # training_step's; the selection pass has its own
    monkeypatch.setattr(module, "features_and_logits", features_and_logits)
    return calls


def test_nan_loss_stops_training_at_the_next_read_naming_its_step(tmp_path, monkeypatch, one_torch_thread):
    from grft_lightning.training.module import PEFTModule

    losses = []
    record = PEFTModule._record_loss
    monkeypatch.setattr(PEFTModule, "_record_loss", lambda self, loss: (losses.append(float(loss)), record(self, loss)))
    calls = _nan_features_at(monkeypatch, batch=4)
    data = {"class_path": "grft_lightning.data.SyntheticImages", "init_args": {"num_classes": 4, "n_train": 64}}
    with pytest.raises(FloatingPointError) as error:  # 8 batches; read after batches 3 and 6
        cli_main(tiny_args(tmp_path / "run", "--model.check_finite_every_n_batches", "3", "--data", json.dumps(data)))
    assert len(calls) == 6  # the NaN of step 4 is found at the read after the sixth batch, not later
    assert losses[4] != losses[4] and all(loss == loss for loss in losses[:4])
    assert str(error.value) == (f"non-finite training loss (nan) at global step 4 (epoch 0); last finite loss: "
                                f"{losses[3]}. Lower the learning rate or check the data.")


def test_nan_loss_is_read_before_a_checkpoint_is_written(tmp_path, monkeypatch, one_torch_thread):
    calls = _nan_features_at(monkeypatch, batch=1)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"at global step 1 \(epoch 0\); last finite loss: \d"):
        cli_main(tiny_args(run, "--checkpoint_every_n_steps", "3"))  # default: a read every 50 batches
    assert len(calls) == 3  # the step checkpoint after step 3 reads it, and is not written
    assert not (run / "checkpoints" / "last.ckpt").exists()


def test_nan_loss_is_read_at_the_end_of_the_epoch(tmp_path, monkeypatch, one_torch_thread):
    calls = _nan_features_at(monkeypatch, batch=3)
    with pytest.raises(FloatingPointError, match=r"at global step 3 \(epoch 0\)"):
        cli_main(tiny_args(tmp_path / "run", "--checkpoint_every_n_steps", "0"))
    assert len(calls) == 4  # 4 batches in the epoch, fewer than the 50 between reads


def test_loss_check_reads_the_device_only_every_n_batches(tmp_path, monkeypatch, one_torch_thread):
    """No host read (item, tolist, cpu, numpy, float/int/bool conversion) in the per-batch
    check, except the one read every ``check_finite_every_n_batches`` batches."""
    from grft_lightning.training.module import PEFTModule

    inside, reads_per_call = [False], []
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if inside[0]:
                reads_per_call[-1] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    check = PEFTModule._check_finite

    def watched(self, loss):
        reads_per_call.append(0)
        inside[0] = True
        try:
            check(self, loss)
        finally:
            inside[0] = False

    monkeypatch.setattr(PEFTModule, "_check_finite", watched)
    cli = cli_main(tiny_args(tmp_path / "run", "--model.check_finite_every_n_batches", "3", epochs=2))
    assert cli.trainer.global_step == 8
    assert reads_per_call == [0, 0, 1, 0, 0, 1, 0, 0]


def test_optimizer_sees_only_tuned_tensors_without_decay_on_1d(tmp_path):
    from grft_lightning.methods import GRFT
    from grft_lightning.training.module import PEFTModule

    module = PEFTModule(GRFT(rows_per_matrix=2), backbone="test_vit", num_classes=3, pretrained=False,
                        image_size=32, head_lr=0.5)
    groups = module.parameter_groups()
    seen = [p for g in groups for p in g["params"]]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(seen) == len(trainable) and {id(p) for p in seen} == {id(p) for p in trainable}
    for group in groups:
        if any(p.ndim < 2 for p in group["params"]):
            assert group["weight_decay"] == 0.0 and all(p.ndim < 2 for p in group["params"])
    head = {id(p) for p in module.model.head.parameters()}
    assert all(g.get("lr") == 0.5 for g in groups if id(g["params"][0]) in head)


def test_weight_file_of_another_architecture_is_refused(tmp_path):
    import timm

    from grft_lightning.core.backbones import create_backbone

    path = tmp_path / "cnn.pth"
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="cnn.pth"):
        create_backbone("test_vit", num_classes=3, weights=str(path), image_size=32)


def test_timm_layout_weight_file_keeps_backbone_and_replaces_head(tmp_path):
    import timm

    from grft_lightning.core.backbones import create_backbone

    source = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=1000)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    model = create_backbone("test_vit", num_classes=3, weights=str(path), image_size=32)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.head.out_features == 3


@pytest.mark.slow
def test_every_shipped_yaml_parses(capsys):
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(configs) >= 30
    for path in configs:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", str(path), "--print_config"])
        assert exit_info.value.code in (0, None), path
        printed = capsys.readouterr().out
        assert "seed_everything:" in printed, path
        method = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("method") or {}
        if "class_path" in method:
            assert f"class_path: {method['class_path']}" in printed, path


def test_label_names_the_run(tmp_path, one_torch_thread):
    cli = cli_main(tiny_args(tmp_path / "run", "--label", "grft_row_scratch", "--model.pretrained", "false"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "grft_row_scratch" and results["method_name"] == "grft_row"
    assert cli.label() == "grft_row_scratch"
