"""GRFT's selection scores: the reductions of accumulate_gradients and the ``score`` option."""

import pytest
import torch
from torch import nn

from grft_lightning.methods import GRFT
from grft_lightning.core.gradients import accumulate_gradients


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    x = torch.randn(4, 3)
    c = torch.randn(4, 2)
    batches = [(x[:2], c[:2]), (x[2:], c[2:])]
    # loss = sum_n c_n . (W x_n), so dL/dW = sum_n c_n x_n^T: per sample, the outer product c_n x_n^T
    return model, batches, [torch.outer(c[n], x[n]) for n in range(4)]


def loss_fn(model, batch):
    x, c = batch
    return (model(x) * c).sum()


@pytest.mark.parametrize("reduction", ["sum", "sum_of_squares", "per_sample_squares"])
def test_reductions_known_answer(reduction):
    model, batches, per_sample = _setup()
    grads = accumulate_gradients(model, batches, loss_fn, reduction=reduction)["0.weight"]
    expected = {
        "sum": sum(per_sample),
        "sum_of_squares": (per_sample[0] + per_sample[1]) ** 2 + (per_sample[2] + per_sample[3]) ** 2,
        "per_sample_squares": sum(g ** 2 for g in per_sample),
    }[reduction]
    torch.testing.assert_close(grads, expected)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_unknown_reduction_and_unsplittable_batches():
    model, batches, _ = _setup()
    with pytest.raises(ValueError, match="^accumulate_gradients: reduction must be sum, sum_of_squares or per_sample_squares, got .mean.$"):
        accumulate_gradients(model, batches, loss_fn, reduction="mean")
    with pytest.raises(TypeError, match="tuples or dicts of tensors"):
        accumulate_gradients(model, [(batches[0][0], "text")], lambda m, b: m(b[0]).sum(), reduction="per_sample_squares")


def test_per_sample_squares_split_dict_batches():
    """Dict batches (Hugging Face style) are split into one-sample dicts, like tuples."""
    model, batches, _ = _setup()
    as_tuples = accumulate_gradients(model, batches, loss_fn, reduction="per_sample_squares")
    dicts = [{"x": x, "y": y} for x, y in batches]
    as_dicts = accumulate_gradients(model, dicts, lambda m, b: loss_fn(m, (b["x"], b["y"])),
                                    reduction="per_sample_squares")
    torch.testing.assert_close(as_dicts, as_tuples)


def test_score_option_ranks_rows_by_its_statistic():
    assert GRFT().gradient_reduction == "sum"
    assert GRFT(score="fisher_batch").gradient_reduction == "sum_of_squares"
    assert GRFT(score="fisher_sample").gradient_reduction == "per_sample_squares"
    with pytest.raises(ValueError, match="GRFT.score"):
        GRFT(score="magnitude")
    # an accumulated tensor whose rows rank differently squared (gradient) and summed (Fisher):
    # row 0 = [3, -3] (sum of squares 18, plain sum 0), row 1 = [2, 2] (8 and 4), row 2 = [0, 5] (25 and 5)
    accumulated = torch.tensor([[3.0, -3.0], [2.0, 2.0], [0.0, 5.0]])
    torch.testing.assert_close(GRFT()._scores(accumulated, "row"), torch.tensor([18.0, 8.0, 25.0]))
    torch.testing.assert_close(GRFT(score="fisher_batch")._scores(accumulated, "row"), torch.tensor([0.0, 4.0, 5.0]))


@pytest.mark.parametrize("score", ["gradient", "fisher_batch"])
def test_select_uses_the_score(score):
    import timm

    from grft_lightning.core.deltas import selectable_layers
    from grft_lightning.core.gradients import default_gradient_targets

    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    method = GRFT(mode="row", rows_per_matrix=1, score=score)
    torch.manual_seed(1)
    grads = {name: torch.randn(w.shape) for name, w in default_gradient_targets(model).items()}
    selection = method.select(model, grads)
    method.apply(model, selection)
    assert len(list(selectable_layers(model))) == 4 * 6  # test_vit: depth 6
    for _, layer in selectable_layers(model):
        g = grads[f"{layer.original_name}.weight"]
        statistic = g.pow(2).sum(1) if score == "gradient" else g.sum(1)
        assert layer.index.tolist() == [int(statistic.argmax())]
        torch.testing.assert_close(selection.layers[layer.original_name].scores["row"], statistic)


def test_score_reaches_the_selection_pass(tmp_path, monkeypatch, one_torch_thread):
    from grft_lightning.training import callbacks
    from tests.test_training import tiny_args
    from grft_lightning.training.cli import cli_main

    seen = []
    real = callbacks.accumulate_gradients

    def spy(*args, **kwargs):
        seen.append(kwargs.get("reduction"))
        return real(*args, **kwargs)

    monkeypatch.setattr(callbacks, "accumulate_gradients", spy)
    args = '{"mode": "row", "rows_per_matrix": 2, "score": "fisher_sample"}'
    cli_main(tiny_args(tmp_path / "ce", "--selection.loss", "ce", method_args=args))
    assert seen == ["per_sample_squares"]
    with pytest.raises(ValueError, match="selection.loss: ce"):
        cli_main(tiny_args(tmp_path / "supcon", "--selection.loss", "supcon", method_args=args))
