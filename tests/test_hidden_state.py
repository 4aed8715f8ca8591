"""No hidden state travels with a tuned model: one copy of the network per model, picklable
methods, and a selection picture that leaves matplotlib's process-wide backend alone."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from grft_lightning.methods import GRFT, RandomRows
from grft_lightning.core.gradients import accumulate_gradients
from grft_lightning.core.selection_figure import save_selection_figure
from tuning import random_grads, tune


def _size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def test_the_feature_regularizer_frozen_copy_does_not_travel_with_the_model(tiny_vit):
    import timm

    plain = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5)
    tune(plain, GRFT(rows_per_matrix=2), grads=random_grads(plain, GRFT(), seed=0))
    method = GRFT(rows_per_matrix=2, regularization="feature", reg_lambda=1.0)
    reference = copy.deepcopy(tiny_vit).eval()  # the caller's frozen pre-trained copy
    tune(tiny_vit, method, grads=random_grads(tiny_vit, method, seed=0))
    model = tiny_vit
    assert method.needs_reference()
    assert set(model.state_dict()) == set(plain.state_dict())  # no second network in the state
    assert not hasattr(model, "peft_method")  # nothing of the method is stored on the model
    assert _size(model) < 1.1 * _size(plain)  # torch.save(model): one network, not two
    assert _size(method) < 2_000  # nor on the method: it holds its configuration only
    assert all(not isinstance(v, (torch.nn.Module, torch.Tensor)) for v in vars(method).values())
    loaded = torch.load(_saved(model), weights_only=False)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"pass it as regularizer\(\.\.\., reference=\.\.\.\)"):
        method.regularizer(loaded, images, torch.zeros(2, 64))
    model.eval()
    reg = method.regularizer(model, images, model.forward_head(model.forward_features(images), pre_logits=True),
                             reference=reference)
    assert float(reg) == pytest.approx(0.0, abs=1e-10)  # nothing trained yet: the same features


def _saved(model) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


def test_a_random_draw_leaves_no_generator_behind(tiny_vit):
    method = RandomRows(rows_per_matrix=2, seed=3)
    before = dict(vars(method))
    selection = tune(tiny_vit, method)
    assert vars(method) == before  # the draw's generator lived inside select()
    assert not any(isinstance(v, torch.Generator) for v in vars(method).values())
    copy.deepcopy(tiny_vit)
    pickle.dumps(tiny_vit)
    pickle.dumps(method)
    assert pickle.loads(pickle.dumps(selection)) == selection


def test_the_selection_figure_keeps_the_process_backend(tiny_vit, tmp_path, monkeypatch):
    import matplotlib

    method = GRFT(rows_per_matrix=2)
    batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,)))]
    selection = method.select(tiny_vit, accumulate_gradients(
        tiny_vit, batches, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])))
    backend = matplotlib.get_backend()

    def refuse(*args, **kwargs):
        raise AssertionError("matplotlib.use() called: the backend of the whole process would change")

    monkeypatch.setattr(matplotlib, "use", refuse)
    fig = save_selection_figure(selection, str(tmp_path / "selection.png"))
    assert fig is not None and (tmp_path / "selection.png").stat().st_size > 0
    assert matplotlib.get_backend() == backend
    assert selection.figure(str(tmp_path / "again.png")) is not None and (tmp_path / "again.png").stat().st_size > 0
    assert matplotlib.get_backend() == backend
