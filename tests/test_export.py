"""Merge, save and load of the tuned values: logits survive, files hold only what was tuned."""

from __future__ import annotations

import copy
import json
import os
import re
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from grft_lightning import load_tuned, merge, read_selection, save_tuned
from grft_lightning.core.deltas import DeltaLayer
from grft_lightning.core.layers import matrix_shape
from grft_lightning.methods.export import read_tuned
from tuning import tune
from grft_lightning.methods import GPS, GRFT, BitFit, Full, Linear, RandomRows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METHODS = {
    "grft_row": lambda: GRFT(mode="row"),
    "grft_column": lambda: GRFT(mode="column", columns_per_matrix=2),
    "grft_auto": lambda: GRFT(mode="auto", rows_per_matrix=3),
    "gps": lambda: GPS(k=2),
    "random_row": lambda: RandomRows(mode="column", seed=3),
    "full": Full,
    "linear": Linear,
    "bitfit": lambda: BitFit(tune_norm=True),
}


def _batch(seed=0, n=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _tune(model, method, steps=2):
    """select, apply, and a few training steps (train mode: BatchNorm statistics move too);
    returns the model (in eval mode) and the selection."""

    def one_column_matrix(grads):  # make one matrix choose columns
        if not (isinstance(method, GRFT) and method.mode == "auto"):
            return
        rows = method.rows_per_matrix
        name = next(n for n, l in method.eligible_layers(model) if rows * matrix_shape(l)[1] // matrix_shape(l)[0] > 0)
        g = torch.zeros_like(grads[f"{name}.weight"])
        g.view(g.shape[0], -1)[:, 0] = 1.0
        grads[f"{name}.weight"] = g

    selection = tune(model, method, [_batch(1)], _ce, edit=one_column_matrix if method.needs_gradients else None)
    if isinstance(method, GRFT) and method.mode == "auto":
        assert {axis for axis, _ in selection.counts().values()} == {"row", "column"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        _ce(model, _batch(10 + step)).backward()
        opt.step()
    return model.eval(), selection


@pytest.mark.parametrize("model_name", ["tiny_vit", "tiny_cnn"])
@pytest.mark.parametrize("method_name", list(METHODS))
def test_merge_and_save_load_round_trip(request, tmp_path, model_name, method_name):
    model = request.getfixturevalue(model_name)
    pre = copy.deepcopy(model)
    method = METHODS[method_name]()
    _, selection = _tune(model, method)
    x, _ = _batch(99)
    with torch.no_grad():
        logits = model(x)
        assert (logits - pre.eval()(x)).abs().max() > 1e-4  # training changed something

    path = save_tuned(model, tmp_path / "tuned.safetensors", method, selection,
                      metadata={"backbone": model_name, "budget": {"rows": 4}})
    assert os.listdir(tmp_path) == ["tuned.safetensors"]  # no temporary file left beside it
    fresh = copy.deepcopy(pre)
    assert load_tuned(fresh, path) is fresh
    saved_method, saved_selection = read_selection(path)
    assert type(saved_method) is type(method) and saved_method.config() == method.config()
    assert saved_selection == selection
    with torch.no_grad():
        assert (fresh.eval()(x) - logits).abs().max() < 1e-5

    merged = merge(model)
    assert not any(isinstance(m, DeltaLayer) for m in merged.modules())
    with torch.no_grad():
        assert (merged(x) - logits).abs().max() < 1e-5
    _, meta = read_tuned(path)
    assert json.loads(meta["budget"]) == {"rows": 4} and meta["backbone"] == model_name


def test_load_resets_a_head_of_another_size(tiny_vit, tmp_path):
    pre = copy.deepcopy(tiny_vit)
    method = GRFT(rows_per_matrix=2)
    model, selection = _tune(tiny_vit, method)
    path = save_tuned(model, tmp_path / "t.safetensors", method, selection)
    fresh = copy.deepcopy(pre)
    fresh.reset_classifier(11)
    load_tuned(fresh, path)
    assert fresh.get_classifier().out_features == 5
    x, _ = _batch(5)
    with torch.no_grad():
        assert (fresh.eval()(x) - model(x)).abs().max() < 1e-5


def test_file_holds_only_tuned_values_and_indices(tiny_vit, tmp_path):
    method = GRFT(mode="row", rows_per_matrix=4)
    model, selection = _tune(tiny_vit, method)
    path = tmp_path / "rows.safetensors"
    save_tuned(model, path, method, selection)
    tensors, meta = read_tuned(path)

    # embed 64, depth 6, mlp hidden 192: rows of qkv/proj/fc1 hold 64 entries, rows of fc2 192
    d, depth, hidden, classes = 64, 6, 192, 5
    values = depth * 4 * (d + d + d + hidden)  # 9,216 delta entries
    indices = depth * 4 * 4  # 4 row indices in each of 24 matrices (int32)
    scores = depth * (3 * d + d + hidden + d)  # the score of every candidate row (what a cut re-ranks)
    biases = depth * (3 * d + d + hidden + d) + d  # Linear biases + the patch-embedding conv's bias
    head = classes * d + classes
    payload = 4 * values + 4 * indices + 4 * scores + 4 * (biases + head)
    assert payload == 63_380

    for key, t in tensors.items():
        assert key.startswith(("selection/", "delta/", "param/")), key
        if key.startswith("selection/"):
            assert key.endswith(("/index", "/scores.row")), key
            assert t.dtype == (torch.int32 if key.endswith("/index") else torch.float32)
        else:
            assert t.dtype == torch.float32
        if key.startswith("delta/"):
            assert key.endswith("/delta") and t.shape in ((4, d), (4, hidden)), key
        if key.startswith("param/"):
            assert key.endswith(".bias") or key.startswith("param/head."), key  # never a full weight
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == payload

    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert len(raw) == 8 + header_len + payload  # the data section is exactly the tuned values
    # JSON header: per tensor its key, dtype, shape and offsets (< 80 bytes besides the key),
    # the metadata, and up to 7 bytes of alignment padding
    header_bound = sum(len(k) + 80 for k in tensors) + len(json.dumps(header["__metadata__"])) + 32
    assert header_len <= header_bound
    assert len(tensors) == 24 + 24 + 24 + 25 + 2  # deltas, indices, scores, biases, head
    # 75,332 bytes here: 1.18x, the header of 99 small tensors being ~15 % of this tiny payload
    assert len(raw) <= 1.2 * payload


def test_truncated_and_foreign_files_raise_clear_errors(tiny_vit, tmp_path):
    pre = copy.deepcopy(tiny_vit)
    method = GPS(k=1)
    model, selection = _tune(tiny_vit, method, steps=1)
    good = tmp_path / "good.safetensors"
    save_tuned(model, good, method, selection)
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=re.escape(str(truncated)) + r": not a readable safetensors file .*truncated"):
        load_tuned(copy.deepcopy(pre), truncated)
    header_only = tmp_path / "header_only.safetensors"
    header_only.write_bytes(raw[:5])
    with pytest.raises(ValueError, match=re.escape(str(header_only))):
        load_tuned(copy.deepcopy(pre), header_only)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match=re.escape(str(foreign)) + r": not a grft-lightning tuned file \(metadata format=None"):
        load_tuned(copy.deepcopy(pre), foreign)
    other_meta = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other_meta), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(str(other_meta)) + r": not a grft-lightning tuned file \(metadata format='pt'"):
        read_tuned(other_meta)

    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.safetensors"))):
        load_tuned(copy.deepcopy(pre), tmp_path / "absent.safetensors")


def test_file_from_another_backbone_is_rejected(tiny_vit, tiny_cnn, tmp_path):
    pristine = copy.deepcopy(tiny_vit)
    method = GRFT(rows_per_matrix=2)
    model, selection = _tune(tiny_vit, method, steps=1)
    path = save_tuned(model, tmp_path / "vit.safetensors", method, selection)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": the selection names layer 'blocks\.0\.attn\.qkv', "
                                                               r"which this EfficientNet does not have"):
        load_tuned(copy.deepcopy(tiny_cnn), path)
    bitfit = BitFit()  # no selection: the parameters are what does not fit
    bitfit.apply(pristine)
    path = save_tuned(pristine, tmp_path / "bitfit.safetensors", bitfit, bitfit.select(pristine))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": param/.* does not fit the model \(absent\)"):
        load_tuned(tiny_cnn, path)


def test_save_needs_the_applied_selection_and_overwrites_atomically(tiny_vit, tmp_path):
    method = GRFT(rows_per_matrix=1)
    selection = method.select(tiny_vit, {n: torch.randn(p.shape) for n, p in tiny_vit.named_parameters()
                                         if n in method.gradient_names(tiny_vit)})
    with pytest.raises(ValueError, match=r"save_tuned: the selection tunes 24 layers, but the model holds 0 "
                                         r"selectable layers"):
        save_tuned(tiny_vit, tmp_path / "x.safetensors", method, selection)
    assert not (tmp_path / "x.safetensors").exists()
    model, selection = _tune(tiny_vit, method, steps=1)
    path = tmp_path / "sub" / "x.safetensors"
    save_tuned(model, path, method, selection)
    first = path.read_bytes()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    save_tuned(model, path, method, selection)
    assert path.read_bytes() != first and os.listdir(path.parent) == ["x.safetensors"]


def test_a_merged_model_is_not_exported_as_tuned(tiny_vit, tmp_path):
    method = RandomRows(rows_per_matrix=2, seed=0)
    selection = tune(tiny_vit, method)
    merge(tiny_vit)
    with pytest.raises(ValueError, match=r"save_tuned: the selection tunes 24 layers, but the model holds 0 "
                                         r"selectable layers"):
        save_tuned(tiny_vit, tmp_path / "merged.safetensors", method, selection)


def test_a_file_without_the_values_of_a_selected_layer_is_refused(tiny_vit, tmp_path):
    pristine = copy.deepcopy(tiny_vit)
    method = GRFT(rows_per_matrix=2)
    model, selection = _tune(tiny_vit, method, steps=1)
    path = save_tuned(model, tmp_path / "tuned.safetensors", method, selection)
    tensors, meta = read_tuned(path)
    del tensors["delta/blocks.3.mlp.fc1/delta"]
    save_file(tensors, str(tmp_path / "partial.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"no delta values for 1 layer the selection tunes \(blocks\.3\.mlp\.fc1\)"):
        load_tuned(pristine, tmp_path / "partial.safetensors")
