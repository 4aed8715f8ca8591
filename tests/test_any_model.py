"""The library API on models that are not timm's: Hugging Face transformers, built from configs.

Tiny BERT (``BertForSequenceClassification``, 2 layers, hidden 32: ``nn.Linear`` layers, the head
named ``head="classifier"``) and tiny GPT-2 (``GPT2LMHeadModel``: transformers' transposed
``Conv1D`` layers, ``head=None``, the output layer tied to the token embedding). For every method
with selected entries: three AdamW steps with weight decay move only the selected entries, the
tuned biases and the head (every other parameter stays bit-identical), and the merged model's
logits equal the unmerged model's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from grft_lightning import accumulate_gradients, count_parameters, load_tuned, merge, read_selection, save_tuned
from grft_lightning.core.deltas import SelectableLayer, selectable_layers
from grft_lightning.core.layers import COLUMN, ENTRY, ROW
from grft_lightning.methods import GPS, GRFT, BitFit, GPSMasked, RandomRows
from tuning import random_grads

transformers = pytest.importorskip("transformers")

METHODS = {
    "grft_row": lambda: GRFT(mode="row", rows_per_matrix=2),
    "grft_column": lambda: GRFT(mode="column", columns_per_matrix=2),
    "grft_auto": lambda: GRFT(mode="auto", rows_per_matrix=2),
    "gps": lambda: GPS(k=2),
    "random_row": lambda: RandomRows(mode="row", rows_per_matrix=2, seed=0),
    "random_column": lambda: RandomRows(mode="column", columns_per_matrix=2, seed=0),
    "bitfit": lambda: BitFit(),
    "gps_masked": lambda: GPSMasked(k=2, restore_unselected=True),
}


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _batches(kind: str, n: int = 3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (4, 12), generator=gen)
        if kind == "bert":
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.randint(0, 3, (4,), generator=gen)})
        else:
            out.append({"input_ids": ids, "labels": ids})
    return out


MODELS = {"bert": (_bert, "classifier"), "gpt2": (_gpt2, None)}


def loss_fn(model, batch):
    return model(**batch).loss


def _randomize_biases(model):
    # transformers initialises biases to zero: random values make "unchanged" checks meaningful
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))


def _selected_mask(layer: SelectableLayer) -> torch.Tensor:
    """The selected entries of a layer's weight, in the weight's own layout, from its indices."""
    mask = torch.zeros(layer.out_features, layer.fan_in, dtype=torch.bool)
    if layer.selected_axis == ROW:
        mask[layer.index] = True
    elif layer.selected_axis == COLUMN:
        mask[:, layer.index] = True
    else:
        return layer.mask.clone() if hasattr(layer, "mask") else layer.from_matrix(mask.scatter(1, layer.index, True))
    return layer.from_matrix(mask)


@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("method_name", list(METHODS))
def test_adamw_moves_only_the_selected_entries_and_merge_keeps_the_logits(model_kind, method_name, one_torch_thread):
    build, head = MODELS[model_kind]
    model = build()
    _randomize_biases(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    head_names = {f"{head}.weight", f"{head}.bias"} if head else set()
    method = METHODS[method_name]()
    batches = _batches(model_kind)
    grads = None
    if method.needs_gradients:
        grads = accumulate_gradients(model, batches, loss_fn, names=method.gradient_names(model, head))
    selection = method.select(model, grads, head=head)
    assert selection.head == ([head] if head else None)
    method.apply(model, selection)
    layers = dict(selectable_layers(model))
    if method_name != "bitfit":
        assert layers and list(layers) == list(selection.active())
        for name, layer in layers.items():
            assert layer.num_tuned() == selection.layers[name].entries
    tuned_biases = {name for name, p in model.named_parameters() if p.requires_grad and name.endswith("bias")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for batch in batches:
        loss_fn(model, batch).backward()
        method.on_before_optimizer_step(model)
        optimizer.step()
        method.on_after_optimizer_step(model)
        optimizer.zero_grad()

    model.eval()
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    merged = merge(copy.deepcopy(model))
    assert not list(selectable_layers(merged))
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, logits, atol=1e-5, rtol=1e-5)

    after = dict(merged.named_parameters())
    assert set(after) == set(before)
    moved = 0
    for name, old in before.items():
        layer = layers.get(name.rpartition(".")[0])
        new = after[name].detach()
        if name in head_names:
            continue
        if layer is not None and name.endswith("weight"):
            mask = _selected_mask(layer)
            assert torch.equal(new[~mask], old[~mask]), f"{name}: an unselected entry moved"
            moved += int((new[mask] != old[mask]).sum())
            if not layer.base_layer.weight.requires_grad:
                assert torch.equal(layer.base_layer.weight, old), f"{name}: the frozen weight moved"
        elif any(name == tuned.replace(".base_layer", "") for tuned in tuned_biases):
            moved += int((new != old).sum())
        else:
            assert torch.equal(new, old), f"{name} moved"
    assert moved > 0


@pytest.mark.parametrize("model_kind", list(MODELS))
def test_heads_counts_and_eligible_layers(model_kind):
    build, head = MODELS[model_kind]
    model = build()
    method = GRFT(rows_per_matrix=2)
    method.apply(model, method.select(model, random_grads(model, method, head), head=head))
    names = [layer.original_name for _, layer in selectable_layers(model)]
    counts = count_parameters(model, head=head)
    if model_kind == "bert":
        assert "classifier" not in names and "bert.pooler.dense" in names and len(names) == 13
        assert counts["head"] == 32 * 3 + 3
        assert all(p.requires_grad for p in model.classifier.parameters())
    else:  # Conv1D layers; lm_head shares the token embedding (tied): left out, frozen, no head
        assert len(names) == 8 and all(".attn.c_" in n or ".mlp.c_" in n for n in names)
        assert counts["head"] == 0 and not model.lm_head.weight.requires_grad
        assert model.lm_head.weight is model.transformer.wte.weight
        layer = dict(selectable_layers(model))["transformer.h.0.attn.c_attn"]
        assert (layer.out_features, layer.fan_in) == (96, 32)  # Conv1D(nf=96, nx=32): weight 32 x 96
    assert counts["backbone"] == sum(p.numel() for n, p in build().named_parameters()
                                     if not (head and n.startswith(head)))


def test_a_model_without_get_classifier_must_name_its_head():
    with pytest.raises(ValueError, match=r"head='classifier'"):
        GRFT().gradient_names(_bert())
    with pytest.raises(ValueError, match=r"head='classifier'"):
        GRFT().select(_bert(), {})
    with pytest.raises(ValueError, match=r"head='classifier'"):
        BitFit().apply(_bert())  # no selection given: the one it makes needs the head too
    with pytest.raises(ValueError, match=r"no submodule 'clasifier'"):
        GRFT().select(_bert(), {}, head="clasifier")


def test_gradients_keep_each_weight_layout():
    model = _gpt2()
    method = GPS(k=1)
    grads = accumulate_gradients(model, _batches("gpt2", 1), loss_fn, names=method.gradient_names(model, head=None))
    assert grads["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: in x out, as stored
    selection = method.select(model, grads, head=None)
    assert selection.layers["transformer.h.0.attn.c_attn"].shape == (96, 32)  # read as out x fan_in
    method.apply(model, selection)
    layer = dict(selectable_layers(model))["transformer.h.0.attn.c_attn"]
    assert layer.selected_axis == ENTRY and layer.index.shape == (96, 1)
    # the selected entry of output 0 is the largest |gradient| in column 0 of the stored weight
    assert int(layer.index[0, 0]) == int(grads["transformer.h.0.attn.c_attn.weight"][:, 0].abs().argmax())


def test_save_and_load_tuned_on_bert_keeps_the_head(tmp_path):
    model = _bert()
    method = GRFT(mode="column", columns_per_matrix=2)
    grads = accumulate_gradients(model, _batches("bert", 1), loss_fn, names=method.gradient_names(model, "classifier"))
    selection = method.select(model, grads, head="classifier")
    method.apply(model, selection)
    with torch.no_grad():
        for _, layer in selectable_layers(model):
            layer.delta.normal_()
        model.classifier.weight.normal_()
    path = save_tuned(model, tmp_path / "tuned.safetensors", method, selection)
    fresh = load_tuned(_bert(), path)
    assert read_selection(path)[1].head == ["classifier"] and read_selection(path)[1] == selection
    assert count_parameters(fresh, head="classifier") == count_parameters(model, head="classifier")
    inputs = {k: v for k, v in _batches("bert", 1)[0].items() if k != "labels"}
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits)
