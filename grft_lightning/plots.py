"""A picture of a selection: per selectable layer, where the tuned rows/columns/entries lie."""

from __future__ import annotations

import torch
from torch import nn

from grft_lightning.deltas import AXIS_NAMES, selectable_layers

BINS = 128


def selection_map(model: nn.Module) -> tuple[torch.Tensor, list[str]]:
    """``(layers x BINS)`` density of selected indices along each layer's selected axis, and the
    row labels (``name [row|column|entry]``). Index positions are scaled to [0, 1)
    (``SelectableLayer.index_positions``; layers that give none are left out)."""
    rows, labels = [], []
    for _, layer in selectable_layers(model):
        position = layer.index_positions() if layer.is_selected else None
        if position is None:
            continue
        hist = torch.histc(position, bins=BINS, min=0.0, max=1.0)
        rows.append(hist / max(1.0, float(hist.max())))
        labels.append(f"{layer.original_name} [{AXIS_NAMES[layer.selected_axis]}]")
    if not rows:
        return torch.zeros(0, BINS), labels
    return torch.stack(rows), labels


def save_selection_figure(model: nn.Module, path: str):
    """Write the selection map as a PNG; returns the matplotlib figure (or None: no deltas).

    The figure is drawn on its own Agg canvas: the process's matplotlib backend (``pyplot``'s) is
    neither read nor changed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    density, labels = selection_map(model)
    if not labels:
        return None
    height = max(2.0, 0.18 * len(labels) + 1.0)
    fig = Figure(figsize=(9, height))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(density.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", extent=(0, 1, len(labels), 0))
    ax.set_yticks([i + 0.5 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xlabel("position of the selected index along the layer's axis (0 = first, 1 = last)")
    ax.set_title("tuned rows / columns / entries per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig
