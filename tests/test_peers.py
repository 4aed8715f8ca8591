"""Peer methods (LoRA through peft, bottleneck adapters, GPS with masked gradients): only their
parameters move, exact counts, and merge/export round trips."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning import accumulate_gradients, count_parameters, load_tuned, merge, save_tuned
from grft_lightning.core.deltas import selectable_layers
from grft_lightning.methods import Adapter, GPSMasked, LoRA
from grft_lightning.methods.adapter import BottleneckAdapter
from grft_lightning.methods.masked import MaskedWeight

# timm test_vit at img_size=32: embed 64, depth 6, mlp ratio 3, patch 16 (conftest.tiny_vit); 5 classes.
D, DEPTH, HIDDEN, CLASSES = 64, 6, 3 * 64, 5
HEAD = CLASSES * D + CLASSES
OUTS = [3 * D, D, HIDDEN, D]  # rows of qkv, proj, fc1, fc2
INS = [D, D, D, HIDDEN]  # fan-in of qkv, proj, fc1, fc2
LINEAR_BIASES = DEPTH * sum(OUTS) + D  # every block Linear's bias + the patch-embedding conv's
BACKBONE = 300_096

METHODS = {
    "lora": lambda: LoRA(r=4),
    "lora_bias_dropout": lambda: LoRA(r=2, alpha=4, dropout=0.1, tune_bias=True),
    "adapter": lambda: Adapter(bottleneck=8),
    "adapter_parallel": lambda: Adapter(bottleneck=4, scale=0.1, placement="parallel", targets=["*.mlp"]),
    "gps_masked": lambda: GPSMasked(k=2, restore_unselected=True),
}
CNN_METHODS = {
    "lora": lambda: LoRA(r=2, targets=["conv_stem", "*.conv_pw", "*.conv_pwl"]),
    "gps_masked": lambda: GPSMasked(k=2, restore_unselected=True),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy host a 2-thread region stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(n=2, seed=0, size=32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=gen), torch.randint(0, CLASSES, (4,), generator=gen))
            for _ in range(n)]


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _original(name: str) -> str:
    return name.replace(".base_layer", "")  # wrappers (peft's, ours) keep the layer as base_layer


def _prepare(model, method, size=32):
    """Select (GPSMasked: on gradients of the pre-trained model) and apply; returns the gradients
    used for the selection (None for methods without one) and the selection."""
    grads = None
    if method.needs_gradients:
        grads = accumulate_gradients(model, _batches(1, seed=1, size=size), _ce, names=method.gradient_names(model))
    selection = method.select(model, grads)
    method.apply(model, selection)
    return grads, selection


def _train(model, method, size=32, weight_decay=0.5):
    """Take 3 AdamW steps in a plain loop, calling the method's hooks around each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=weight_decay)
    for batch in _batches(3, seed=2, size=size):
        opt.zero_grad()
        _ce(model, batch).backward()
        method.on_before_optimizer_step(model)
        opt.step()
        method.on_after_optimizer_step(model)


def _expected_masks(pre: nn.Module, method, grads) -> dict[str, torch.Tensor]:
    """Original name -> entries the method may move, from its definition: the head, biases when
    tuned, GPS's top-k per row of |gradient| (torch.topk here, not gradients.py)."""
    head = pre.get_classifier()
    masks = {}
    for mname, module in pre.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            key = f"{mname}.{pname}" if mname else pname
            tuned = module is head or (pname == "bias" and isinstance(module, (nn.Linear, nn.Conv2d)) and method.tune_bias)
            masks[key] = torch.full_like(p, tuned, dtype=torch.bool)
    for key, grad in (grads or {}).items():
        flat = grad.reshape(grad.shape[0], -1)
        masks[key] = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.abs().topk(2, dim=1).indices, True)
        masks[key] = masks[key].view_as(grad)
    return masks


def _check_only_tuned_moved(model, pre, method, grads):
    masks = _expected_masks(pre, method, grads)
    before = dict(pre.named_parameters())
    added = 0
    for name, new in model.named_parameters():
        key = _original(name)
        if key not in before:  # a parameter the method added: trainable, and trained
            added += 1
            assert new.requires_grad and not torch.equal(new, torch.zeros_like(new)), name
            continue
        old, mask = before[key], masks[key]
        assert torch.equal(new[~mask], old[~mask]), f"{key}: an entry outside the tuned set moved"
        if mask.any():
            moved = (new != old) & mask
            assert moved.sum() >= 0.9 * mask.sum(), f"{key}: only {int(moved.sum())}/{int(mask.sum())} tuned entries moved"
    assert added > 0 or isinstance(method, GPSMasked)
    # Buffers by name: the pre-trained model's (BatchNorm statistics) are all there, unchanged; the
    # only others are the selection a method adds (GPSMasked's mask).
    own = {_original(n): b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] != "mask"}
    pre_buffers = dict(pre.named_buffers())
    assert own.keys() == pre_buffers.keys()
    for name, old in pre_buffers.items():
        assert torch.equal(old, own[name]), name


@pytest.mark.parametrize("method_name", list(METHODS))
def test_three_adamw_steps_move_only_tuned_entries_vit(tiny_vit, method_name):
    pre = copy.deepcopy(tiny_vit)
    method = METHODS[method_name]()
    grads, selection = _prepare(tiny_vit, method)
    assert (selection.rule is None) == (not isinstance(method, GPSMasked))
    _train(tiny_vit, method)
    _check_only_tuned_moved(tiny_vit, pre, method, grads)
    if isinstance(method, GPSMasked):
        masks = _expected_masks(pre, method, grads)
        assert [layer.original_name for _, layer in selectable_layers(tiny_vit)] == list(selection.layers)
        for _, layer in selectable_layers(tiny_vit):
            assert torch.equal(layer.mask, masks[f"{layer.original_name}.weight"])
        for name in ("pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.bias"):
            assert not dict(tiny_vit.named_parameters())[name].requires_grad


@pytest.mark.parametrize("method_name", list(CNN_METHODS))
def test_three_adamw_steps_move_only_tuned_entries_cnn(tiny_cnn, method_name):
    tiny_cnn.eval()  # BatchNorm running statistics must not move: only parameters are compared
    pre = copy.deepcopy(tiny_cnn)
    method = CNN_METHODS[method_name]()
    grads, _ = _prepare(tiny_cnn, method, size=64)
    _train(tiny_cnn, method, size=64)
    _check_only_tuned_moved(tiny_cnn, pre, method, grads)


def test_gps_masked_weight_decay_moves_unselected_entries_unless_restored(tiny_vit):
    """The public code's flaw, reproduced by default: decoupled decay moves "frozen" entries."""
    results = {}
    for restore, decay in ((False, 0.5), (False, 0.0), (True, 0.5)):
        model, method = copy.deepcopy(tiny_vit), GPSMasked(k=1, restore_unselected=restore)
        _prepare(model, method)
        _train(model, method, weight_decay=decay)
        layer = model.blocks[0].attn.qkv
        old = tiny_vit.blocks[0].attn.qkv.weight
        results[(restore, decay)] = bool((layer.base_layer.weight != old)[~layer.mask].any())
    assert results == {(False, 0.5): True, (False, 0.0): False, (True, 0.5): False}


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5),  # decoupled decay
    lambda params: torch.optim.SGD(params, lr=1e-1, momentum=0.9, weight_decay=0.5),  # decay inside the gradient
], ids=["adamw", "sgd_momentum"])
def test_gps_masked_restore_is_exact_from_the_first_step_in_a_plain_loop(tiny_vit, make_optimizer):
    model, method = copy.deepcopy(tiny_vit), GPSMasked(k=1, restore_unselected=True)
    method.apply(model, method.select(model, accumulate_gradients(model, _batches(1, seed=1), _ce)))
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    before = {name: p.detach().clone() for name, p in tiny_vit.named_parameters()}
    for step, batch in enumerate(_batches(3, seed=2)):
        opt.zero_grad()
        _ce(model, batch).backward()
        method.on_before_optimizer_step(model)
        opt.step()
        method.on_after_optimizer_step(model)
        for _, layer in selectable_layers(model):
            weight, old = layer.base_layer.weight.detach(), before[f"{layer.original_name}.weight"]
            assert torch.equal(weight[~layer.mask], old[~layer.mask]), f"step {step}: {layer.original_name}"
            assert bool((weight != old)[layer.mask].all()), f"step {step}: {layer.original_name}"
            assert layer._saved is None  # the copy lives only from one hook to the other


def test_gps_masked_after_step_hook_needs_the_before_step_hook(tiny_vit):
    plain, method = GPSMasked(k=1), GPSMasked(k=1, restore_unselected=True)
    model = copy.deepcopy(tiny_vit)
    _prepare(model, plain)
    plain.on_after_optimizer_step(model)  # nothing to restore: a no-op
    _prepare(tiny_vit, method)
    with pytest.raises(RuntimeError, match=r"on_before_optimizer_step\(model\) after backward\(\)"):
        method.on_after_optimizer_step(tiny_vit)


# -- counts (hand-computed from the layer shapes above) ----------------------------------------------
LORA_R4 = DEPTH * 4 * sum(i + o for i, o in zip(INS, OUTS))  # r x in (A) + out x r (B) per layer
ADAPTER_B8 = DEPTH * 2 * (D * 8 + 8 + 8 * D + D)  # down (D->8) and up (8->D), with biases, after attn and mlp
ADAPTER_PARALLEL_B4 = DEPTH * (D * 4 + 4 + 4 * D + D)  # beside the MLP only
GPS_K1 = DEPTH * sum(OUTS) + D  # one entry per row of every Linear and of the patch conv


@pytest.mark.parametrize("method, selected, bias", [
    (LoRA(r=4), LORA_R4, 0),
    (LoRA(r=4, tune_bias=True), LORA_R4, LINEAR_BIASES),
    (LoRA(r=1, targets=["blocks.1.attn.qkv"]), D + 3 * D, 0),
    (Adapter(bottleneck=8), ADAPTER_B8, 0),
    (Adapter(bottleneck=4, placement="parallel", targets=["*.mlp"]), ADAPTER_PARALLEL_B4, 0),
    (GPSMasked(k=1), GPS_K1, LINEAR_BIASES),
    (GPSMasked(k=3), 3 * GPS_K1, LINEAR_BIASES),
], ids=repr)
def test_tiny_vit_counts_equal_hand_computed(tiny_vit, method, selected, bias):
    assert LORA_R4 == 21_504 and ADAPTER_B8 == 13_152 and GPS_K1 == 3_136
    grads = None
    if method.needs_gradients:
        grads = {n: torch.randn_like(p) for n, p in tiny_vit.named_parameters() if n in method.gradient_names(tiny_vit)}
    selection = method.select(tiny_vit, grads)
    method.apply(tiny_vit, selection)
    counts = count_parameters(tiny_vit)
    assert (counts["selected"], counts["bias"], counts["head"], counts["backbone"]) == (selected, bias, HEAD, BACKBONE)
    assert counts["tuned"] == selected + bias + HEAD
    if method.needs_gradients:  # the masked weights count exactly the selected entries
        assert selection.entries() == selected
    else:
        assert selection.rule is None and selection.entries() == 0


def test_lora_on_cnn_convs_counts_and_wraps_exactly_the_targets(tiny_cnn):
    LoRA(r=2, targets=["conv_stem", "*.conv_pw", "*.conv_pwl"]).apply(tiny_cnn)
    from peft.tuners.lora import LoraLayer

    wrapped = sorted(n for n, m in tiny_cnn.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == ["blocks.1.0.conv_pwl", "blocks.2.0.conv_pwl", "blocks.3.0.conv_pw", "blocks.3.0.conv_pwl",
                       "blocks.4.0.conv_pw", "blocks.4.0.conv_pwl", "conv_stem"]
    # A: conv(in -> r) with the layer's kernel; B: 1x1 conv(r -> out). (out, in, k) per layer:
    shapes = [(24, 3, 3), (24, 64, 1), (32, 96, 1), (128, 32, 1), (48, 128, 1), (192, 48, 1), (64, 192, 1)]
    expected = sum(2 * i * k * k + o * 2 for o, i, k in shapes)
    assert expected == 2_198
    assert count_parameters(tiny_cnn)["selected"] == expected


# -- merge and export -------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name, method_name",
                         [("tiny_vit", m) for m in METHODS] + [("tiny_cnn", m) for m in CNN_METHODS])
def test_export_and_merge_round_trip(request, tmp_path, model_name, method_name):
    model = request.getfixturevalue(model_name)
    size = 64 if model_name == "tiny_cnn" else 32
    pristine = copy.deepcopy(model)
    method = (CNN_METHODS if model_name == "tiny_cnn" else METHODS)[method_name]()
    _, selection = _prepare(model, method, size=size)
    _train(model, method, size=size)
    model.eval()
    x = _batches(1, seed=3, size=size)[0][0]
    with torch.no_grad():
        logits = model(x)
        path = save_tuned(model, tmp_path / "tuned.safetensors", method, selection)
        reloaded = load_tuned(copy.deepcopy(pristine), path).eval()
        assert (reloaded(x) - logits).abs().max() < 1e-5
        for (_, mine), (_, theirs) in zip(selectable_layers(model), selectable_layers(reloaded), strict=True):
            assert torch.equal(mine.mask, theirs.mask)  # GPSMasked: the selection travels with the file
        merge(model)
        assert (model(x) - logits).abs().max() < 1e-5
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, (BaseTunerLayer, MaskedWeight)) for m in model.modules())
    adapters = sum(isinstance(m, BottleneckAdapter) for m in model.modules())
    assert adapters == (0 if "adapter" not in method_name else 12 if method_name == "adapter" else 6)


def test_adapters_and_lora_start_as_the_pretrained_model(tiny_vit):
    x = _batches(1)[0][0]
    with torch.no_grad():
        reference = tiny_vit.eval()(x)
        for method in (Adapter(), Adapter(placement="parallel"), LoRA()):
            model = method.apply(copy.deepcopy(tiny_vit)).eval()
            assert torch.equal(model(x), reference) or (model(x) - reference).abs().max() < 1e-6


def test_lora_scale_defaults_to_one():
    from peft.tuners.lora import LoraLayer

    assert LoRA(r=8).scaling == 1.0 and LoRA(r=8, alpha=16).scaling == 2.0
    import timm

    model = LoRA(r=4, alpha=8, targets=["blocks.0.attn.qkv"]).apply(
        timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=CLASSES))
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, LoraLayer) and layer.scaling["default"] == 2.0


def test_peer_errors(tiny_vit):
    with pytest.raises(ValueError, match=r"LoRA: no eligible layer matched targets=\['decoder\.\*'\]"):
        LoRA(targets=["decoder.*"]).apply(copy.deepcopy(tiny_vit))
    with pytest.raises(ValueError, match="LoRA.r must be >= 1, got 0"):
        LoRA(r=0)
    with pytest.raises(ValueError, match=r"Adapter: blocks\.0\.mlp\.fc1 maps 64 -> 192 features; a parallel adapter"):
        Adapter(placement="parallel", targets=["*.mlp.fc1"]).apply(copy.deepcopy(tiny_vit))
    with pytest.raises(ValueError, match="Adapter: no sub-module matched"):
        Adapter(targets=["*.decoder"]).apply(copy.deepcopy(tiny_vit))
    names = GPSMasked().gradient_names(tiny_vit)
    grads = {n: torch.randn_like(p) for n, p in tiny_vit.named_parameters() if n in names}
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: 65 input connections per row requested"):
        GPSMasked(k=65).select(tiny_vit, grads)
    with pytest.raises(ValueError, match="GPSMasked.select needs accumulated gradients"):
        GPSMasked().select(tiny_vit)
    with pytest.raises(ValueError, match="GPSMasked.select needs accumulated gradients"):
        GPSMasked().apply(copy.deepcopy(tiny_vit))  # no selection: the method cannot make one without gradients


def test_config_round_trips_through_the_constructor():
    for make in list(METHODS.values()) + list(CNN_METHODS.values()):
        method = make()
        assert type(method)(**method.config()).config() == method.config()


# -- GPS's index delta on linear layers (deltas._IndexLinear: what the benchmark's GPS row runs) --------
@pytest.mark.parametrize("k", [1, 2, 5])  # 1 and 2 gather the gradient entry by entry; 5 takes the dense product
@pytest.mark.parametrize("autocast", [False, True])
def test_index_delta_linear_equals_dense_weight(k, autocast):
    from grft_lightning.core.deltas import IndexDelta

    torch.manual_seed(0)
    layer = nn.Linear(64, 7)
    gen = torch.Generator().manual_seed(1)
    index = torch.stack([torch.randperm(64, generator=gen)[:k] for _ in range(7)])
    delta = IndexDelta(copy.deepcopy(layer), "l", index)
    assert delta.delta.shape == (7, k)
    delta.base_layer.bias.requires_grad_(True)
    with torch.no_grad():
        delta.delta.normal_()
    dense = torch.zeros(7, 64).scatter_(1, index, delta.delta.detach())
    weight = (layer.weight.detach() + dense).requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    x1, x2 = (torch.randn(3, 5, 64, generator=gen).requires_grad_(True) for _ in range(2))
    with torch.no_grad():
        x2.copy_(x1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y1, y2 = delta(x1), F.linear(x2, weight, bias)
    assert y1.dtype == y2.dtype and y1.shape == y2.shape
    g = torch.randn(y1.shape, generator=gen)
    (y1.float() * g).sum().backward()
    (y2.float() * g).sum().backward()
    tol = 0.05 if autocast else 1e-5
    assert (y1.float() - y2.float()).abs().max() < tol
    assert (x1.grad - x2.grad).abs().max() < tol
    assert (delta.delta.grad - weight.grad.gather(1, index)).abs().max() < 10 * tol
    assert (delta.base_layer.bias.grad - bias.grad).abs().max() < 10 * tol
    assert delta.base_layer.weight.grad is None and delta.delta.grad.dtype == torch.float32
