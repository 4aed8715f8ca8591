"""grft-lightning: gradient-based parameter-efficient fine-tuning of timm vision models (the
library API takes any PyTorch model: name its head with ``apply(model, head=...)``).

Library API (usable without Lightning)::

    method = GRFT(mode="row", rows_per_matrix=4)
    method.apply(model)                       # freeze, insert row deltas (timm: the head is get_classifier())
    grads = accumulate_gradients(model, loader, loss_fn)
    method.select(model, grads)               # fill the row indices
    count_parameters(model); merge(model); save_tuned(model, path); load_tuned(fresh, path)
"""

from grft_lightning.accounting import count_parameters, parameter_summary
from grft_lightning.deltas import merge
from grft_lightning.export import load_tuned, save_tuned
from grft_lightning.selection import accumulate_gradients
from grft_lightning import testbed  # noqa: F401  (registers the testbed ViT with timm)

__all__ = [
    "accumulate_gradients",
    "count_parameters",
    "parameter_summary",
    "merge",
    "save_tuned",
    "load_tuned",
]
__version__ = "0.1.0"
