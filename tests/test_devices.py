"""Nothing assumes one device or one dtype: selections are buffers that move with the module,
delta layers follow the input dtype under autocast, a resumed EMA follows the module."""

from __future__ import annotations

import pytest
import torch

from grft_lightning.core.deltas import selectable_layers
from grft_lightning.methods import GPS, GRFT, RandomRows
from tuning import tune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SELECTED = {
    "rows": lambda: RandomRows(mode="row", rows_per_matrix=2, seed=1),
    "columns": lambda: RandomRows(mode="column", columns_per_matrix=2, seed=1),
    "gps": lambda: GPS(k=2),
}


def _selected(model, kind):
    method = SELECTED[kind]()
    tune(model, method)  # GPS: random gradients
    with torch.no_grad():
        for _, layer in selectable_layers(model):
            layer.delta.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("kind", list(SELECTED))
def test_selection_buffers_move_with_the_module_and_keep_integer_dtypes(tiny_vit, kind):
    model = _selected(tiny_vit, kind)
    names = {name for name, _ in model.named_buffers()}
    for path, layer in selectable_layers(model):
        assert f"{path}.index" in names  # a buffer: in state_dict, moved by .to(), broadcast by DDP
        assert layer.index.dtype == torch.int64
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model.to(torch.float64)
    for _, layer in selectable_layers(model):
        assert layer.delta.dtype == torch.float64
        for name, buffer in layer.named_buffers(recurse=False):
            assert not buffer.is_floating_point(), name  # indices stay integers, flags stay bool
    torch.testing.assert_close(model(x.double()).float(), expected, rtol=1e-4, atol=1e-5)
    model.to("meta")
    assert all(t.device.type == "meta" for t in model.state_dict().values())


@pytest.mark.parametrize("kind", list(SELECTED))
def test_delta_layers_under_bf16_autocast(tiny_vit, kind):
    model = _selected(tiny_vit, kind).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1 * expected.abs().max().item())
    # and a training step's gradient reaches every delta in the delta's own dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    for _, layer in selectable_layers(model):
        assert layer.delta.grad is not None and layer.delta.grad.dtype == layer.delta.dtype == torch.float32


def test_a_resumed_ema_follows_the_module_to_its_device():
    """Lightning restores a checkpoint (the EMA callback's state) before it moves the module to its
    device; the EMA, plain tensors, must follow at fit start."""
    from grft_lightning.training.ema import TunedEMA, tuned_tensors
    from grft_lightning.training.module import PEFTModule

    module = PEFTModule(RandomRows(rows_per_matrix=1), backbone="test_vit", num_classes=3, pretrained=False,
                        image_size=32, ema_decay=0.9)
    ema = {n: p.detach().clone() for n, p in tuned_tensors(module).items()}
    callback = TunedEMA(0.9)
    callback.load_state_dict({"decay": 0.9, "ema": ema, "updated_at_step": 3})
    module.to("meta")  # stands for the accelerator: a device the checkpoint's tensors are not on
    callback.on_fit_start(None, module)
    assert callback.ema.keys() == ema.keys() and callback.updated_at_step == 3
    assert all(v.device.type == "meta" for v in callback.ema.values())
