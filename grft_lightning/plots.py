"""A picture of a selection: per delta layer, where the tuned rows/columns/entries lie."""

from __future__ import annotations

import torch
from torch import nn

from grft_lightning.deltas import ROW, IndexDelta, StructuredDelta, delta_layers

BINS = 128


def selection_map(model: nn.Module) -> tuple[torch.Tensor, list[str]]:
    """``(layers x BINS)`` density of selected indices along each layer's selected axis, and the
    row labels (``name [rows|cols|entries]``). Index positions are scaled to [0, 1)."""
    rows, labels = [], []
    for _, layer in delta_layers(model):
        if not layer._is_selected:
            continue
        if isinstance(layer, StructuredDelta):
            axis_rows = layer._axis == ROW
            index = layer.row_index if axis_rows else layer.col_index
            size = layer.out_features if axis_rows else layer.fan_in
            kind = "rows" if axis_rows else "cols"
        elif isinstance(layer, IndexDelta):
            index, size, kind = layer.index.reshape(-1), layer.fan_in, "entries/in"
        else:
            continue
        position = (index.float().cpu() + 0.5) / size
        hist = torch.histc(position, bins=BINS, min=0.0, max=1.0)
        rows.append(hist / max(1.0, float(hist.max())))
        labels.append(f"{layer.original_name} [{kind}]")
    if not rows:
        return torch.zeros(0, BINS), labels
    return torch.stack(rows), labels


def save_selection_figure(model: nn.Module, path: str):
    """Write the selection map as a PNG; returns the matplotlib figure (or None: no deltas)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    density, labels = selection_map(model)
    if not labels:
        return None
    height = max(2.0, 0.18 * len(labels) + 1.0)
    fig, ax = plt.subplots(figsize=(9, height))
    ax.imshow(density.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", extent=(0, 1, len(labels), 0))
    ax.set_yticks([i + 0.5 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xlabel("position of the selected index along the layer's axis (0 = first, 1 = last)")
    ax.set_title("tuned rows / columns / entries per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
