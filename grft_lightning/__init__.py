"""grft-lightning: gradient-based parameter-efficient fine-tuning of timm vision models (the
library API takes any PyTorch model: name its head with ``apply(model, head=...)``).

Library API (usable without Lightning), in two stages -- select, then apply::

    method = GRFT(mode="row", fraction=0.003, allocation="global")
    grads = accumulate_gradients(model, loader, loss_fn, names=method.gradient_names(model))
    selection = method.select(model, grads)   # a Selection: indices and scores per layer
    method.apply(model, selection)            # freeze, build deltas of exactly the selected sizes
    count_parameters(model); merge(model)
    save_tuned(model, path, method, selection); load_tuned(fresh, path)
    selection.cut(fraction=0.001)             # a smaller budget from the same pass (cuts nest)
"""

from grft_lightning.core.accounting import count_parameters, parameter_summary
from grft_lightning.core.deltas import merge
from grft_lightning.methods.export import load_tuned, read_selection, save_tuned
from grft_lightning.core.gradients import accumulate_gradients
from grft_lightning.core.selection import Selection
from grft_lightning.core import testbed  # noqa: F401  (registers the testbed ViT with timm)

__all__ = [
    "Selection",
    "accumulate_gradients",
    "count_parameters",
    "parameter_summary",
    "merge",
    "save_tuned",
    "load_tuned",
    "read_selection",
]
__version__ = "0.1.0"
