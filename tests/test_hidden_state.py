"""No hidden state travels with a tuned model: one copy of the network per model, picklable
methods, and a selection picture that leaves matplotlib's process-wide backend alone."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from grft_lightning.methods import GRFT, RandomRows
from grft_lightning.plots import save_selection_figure
from grft_lightning.selection import accumulate_gradients


def _size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def test_the_feature_regularizer_frozen_copy_does_not_travel_with_the_model(tiny_vit):
    import timm

    plain = GRFT(rows_per_matrix=2).apply(timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5))
    method = GRFT(rows_per_matrix=2, regularization="feature", reg_lambda=1.0)
    model = method.apply(tiny_vit)
    frozen = method._frozen_model(torch.device("cpu"))
    assert set(model.state_dict()) == set(plain.state_dict())  # no second network in the state
    twin = copy.deepcopy(model)
    assert twin.peft_method._frozen_model(torch.device("cpu")) is frozen  # shared, not copied
    assert {id(p) for p in twin.parameters()}.isdisjoint(id(p) for p in frozen.parameters())
    assert _size(model) < 1.1 * _size(plain)  # torch.save(model): one network, not two
    loaded = torch.load(_saved(model), weights_only=False)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="no frozen pre-trained copy"):
        loaded.peft_method.regularizer(loaded, images, torch.zeros(2, 64))
    reg = model.peft_method.regularizer(model, images, model.forward_head(model.forward_features(images),
                                                                          pre_logits=True))
    assert float(reg) == pytest.approx(0.0, abs=1e-10)  # nothing trained yet: the same features


def _saved(model) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


def test_a_random_draw_leaves_no_generator_behind(tiny_vit):
    method = RandomRows(rows_per_matrix=2, seed=3)
    method.apply(tiny_vit)
    method.select(tiny_vit)
    assert method._generator is None
    copy.deepcopy(tiny_vit)
    pickle.dumps(tiny_vit)


def test_the_selection_figure_keeps_the_process_backend(tiny_vit, tmp_path, monkeypatch):
    import matplotlib

    method = GRFT(rows_per_matrix=2)
    method.apply(tiny_vit)
    batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,)))]
    method.select(tiny_vit, accumulate_gradients(
        tiny_vit, batches, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])))
    backend = matplotlib.get_backend()

    def refuse(*args, **kwargs):
        raise AssertionError("matplotlib.use() called: the backend of the whole process would change")

    monkeypatch.setattr(matplotlib, "use", refuse)
    fig = save_selection_figure(tiny_vit, str(tmp_path / "selection.png"))
    assert fig is not None and (tmp_path / "selection.png").stat().st_size > 0
    assert matplotlib.get_backend() == backend
