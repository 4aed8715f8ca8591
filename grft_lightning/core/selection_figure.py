"""A picture of a Selection: per layer, where the tuned rows/columns/entries lie."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # for the annotations only: selection.py draws its figure with this module
    from grft_lightning.core.selection import Selection

BINS = 128


def selection_map(selection: Selection) -> tuple[torch.Tensor, list[str]]:
    """``(layers x BINS)`` density of selected indices along each layer's axis, and the row labels
    (``name [row|column|entry]``). Index positions are scaled to [0, 1) (the layer's rows, or its
    fan-in for columns and entries); layers with nothing selected are left out."""
    rows, labels = [], []
    for name, layer in selection.active().items():
        size = layer.shape[0] if layer.axis == "row" else layer.shape[1]
        position = (layer.index.reshape(-1).float() + 0.5) / size
        hist = torch.histc(position, bins=BINS, min=0.0, max=1.0)
        rows.append(hist / max(1.0, float(hist.max())))
        labels.append(f"{name} [{layer.axis}]")
    if not rows:
        return torch.zeros(0, BINS), labels
    return torch.stack(rows), labels


def save_selection_figure(selection: Selection, path: str):
    """Write the selection map as a PNG; returns the matplotlib figure (or None: nothing selected).

    The figure is drawn on its own Agg canvas: the process's matplotlib backend (``pyplot``'s) is
    neither read nor changed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    density, labels = selection_map(selection)
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
