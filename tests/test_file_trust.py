"""No file a user hands in chooses what is imported or called: a tuned file naming a foreign class
is refused before anything is built, and the indices a file holds are checked against the layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from grft_lightning import load_tuned, save_tuned
from grft_lightning.methods.export import read_tuned
from grft_lightning.methods import GPS, GRFT, REGISTRY, GPSMasked, method_from_config
from grft_lightning.core.gradients import accumulate_gradients
from test_errors import _error_line, _synthetic_args
from test_export import _batch, _ce
from conftest import _tiny_vit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hostile_file(path: Path, marker: Path, class_path: str = "subprocess.Popen") -> Path:
    """A tuned file whose metadata asks for a shell command that would create ``marker``."""
    meta = {"format": "grft-lightning/tuned/2", "method_class": class_path,
            "method_args": json.dumps({"args": ["touch", str(marker)]}), "num_classes": "5",
            "head": json.dumps("get_classifier()")}
    save_file({"param/head.weight": torch.zeros(5, 32)}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("class_path", ["subprocess.Popen", "os.system", "grft_lightning.training.cli.main",
                                        "grft_lightning.methods.base.Method"])
def test_a_tuned_file_naming_a_foreign_class_is_refused_and_nothing_runs(tmp_path, class_path):
    marker = tmp_path / "pwned"
    path = _hostile_file(tmp_path / "evil.safetensors", marker, class_path)
    with pytest.raises(ValueError, match="not one of this package's methods") as err:
        load_tuned(_tiny_vit(), path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_the_cli_refuses_a_hostile_selection_file_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = _hostile_file(tmp_path / "evil.safetensors", marker)
    line = _error_line(capsys, _synthetic_args(tmp_path / "run", "--selection.from_file", str(path)))
    assert "not one of this package's methods" in line and str(path) in line
    assert not marker.exists()
    assert not (tmp_path / "run" / "results.json").exists()


def test_saved_arguments_must_be_the_methods_own_and_plain():
    with pytest.raises(ValueError, match="takes no argument 'args'"):
        method_from_config("grft_lightning.methods.GRFT", {"args": ["touch", "x"]})
    with pytest.raises(ValueError, match="must be a mapping"):
        method_from_config("grft_lightning.methods.GRFT", ["row"])
    with pytest.raises(ValueError, match="plain JSON value"):
        method_from_config("grft_lightning.methods.GRFT", {"mode": object()})
    method = method_from_config("grft_lightning.methods.grft.GRFT", {"mode": "column", "columns_per_matrix": 2})
    assert isinstance(method, GRFT) and method.columns_per_matrix == 2
    # both the public and the defining module's path of every method are registered
    assert REGISTRY["grft_lightning.methods.GPS"] is REGISTRY["grft_lightning.methods.gps.GPS"] is GPS


def _saved(tmp_path, method) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    model = _tiny_vit()
    selection = method.select(model, accumulate_gradients(model, [_batch(1)], _ce))
    method.apply(model, selection)
    path = save_tuned(model, tmp_path / "good.safetensors", method, selection)
    return read_tuned(path)


def _load_edited(tmp_path, method_factory, key_suffix: str, edit) -> str:
    tensors, meta = _saved(tmp_path, method_factory())
    key = next(k for k in tensors if k.endswith(key_suffix) and k.startswith(("selection/", "delta/")))
    tensors[key] = edit(tensors[key])
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError) as err:
        load_tuned(_tiny_vit(), path)
    return str(err.value)


def _set(position, value):
    def edit(t):
        t = t.clone()
        t.view(-1)[position] = value
        return t
    return edit


@pytest.mark.parametrize("factory", [lambda: GRFT(rows_per_matrix=2), lambda: GRFT(mode="column", columns_per_matrix=2),
                                     lambda: GPS(k=2), lambda: GPSMasked(k=2)],
                         ids=["rows", "columns", "gps", "gps_masked"])
def test_indices_are_checked_on_load(tmp_path, factory):
    suffix = "/index"  # selection/<layer>/index: the Selection's indices, whatever the axis
    assert "out of range" in _load_edited(tmp_path, factory, suffix, _set(0, 10_000))
    assert "out of range" in _load_edited(tmp_path, factory, suffix, _set(0, -1))
    assert "ascending without repeats" in _load_edited(tmp_path, factory, suffix, lambda t: torch.zeros_like(t))
    assert "must be integers" in _load_edited(tmp_path, factory, suffix, lambda t: t.float())


def test_delta_values_of_the_wrong_shape_are_refused_on_load(tmp_path):
    message = _load_edited(tmp_path, lambda: GRFT(rows_per_matrix=2), "/delta", lambda t: t[:, :-1].contiguous())
    assert "delta of shape" in message and "expects" in message
