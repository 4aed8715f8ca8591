"""Bottleneck adapters (Houlsby et al., ICML 2019, arXiv 1902.00751; AdaptFormer, Chen et al.,
NeurIPS 2022, arXiv 2205.13535) for timm ViT blocks.

One idea: a small trainable bottleneck beside a frozen sub-block ``f`` (attention or MLP),

* ``sequential`` (Houlsby): ``h = f(x);  y = h + s * up(act(down(h)))``
* ``parallel`` (AdaptFormer): ``y = f(x) + s * up(act(down(x)))``

with ``down`` (d -> b), ``act`` = GELU, ``up`` (b -> d) initialised to zero, so the tuned model
starts as the pre-trained one. peft has no bottleneck adapter for arbitrary models, so this is
our own module: :class:`BottleneckAdapter` wraps the sub-block and keeps it as ``base_layer``,
so the accounting counts only the adapter's own parameters as added.

Unlike LoRA or our deltas, an adapter **cannot be merged**: the nonlinearity between ``down``
and ``up`` makes it a function of its input, not a change of any weight. ``grft_lightning.merge``
therefore leaves adapters in place (``Method.merge`` folds only selectable layers); the merged model
computes the same output, with the adapters' extra cost at inference.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

import torch
from torch import nn

from grft_lightning.core.errors import check_choice
from grft_lightning.core.deltas import set_submodule
from grft_lightning.core.heads import DEFAULT, head_module_ids
from grft_lightning.core.selection import Selection
from grft_lightning.methods.base import Method

#: the attention and MLP sub-blocks of every timm ViT block.
VIT_SITES = ["*.attn", "*.mlp"]


class BottleneckAdapter(nn.Module):
    """A frozen sub-block plus a zero-initialised bottleneck (see the module docstring).

    Args:
        base_layer: the wrapped sub-block (its output's last dimension is ``dim``).
        dim: width of the sub-block's output (and, for ``parallel``, of its input).
        bottleneck: hidden width ``b`` of the adapter.
        scale: ``s``, multiplies the adapter's output.
        placement: ``sequential`` (on the sub-block's output) or ``parallel`` (on its input).
    """

    def __init__(self, base_layer: nn.Module, dim: int, bottleneck: int, scale: float, placement: str):
        super().__init__()
        ref = next(base_layer.parameters())
        self.base_layer = base_layer
        self.placement = placement
        self.scale = scale
        self.down = nn.Linear(dim, bottleneck, device=ref.device, dtype=ref.dtype)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        source = h if self.placement == "sequential" else x
        return h + self.scale * self.up(self.act(self.down(source)))

    def extra_repr(self) -> str:
        return f"placement={self.placement}, scale={self.scale:g}"


def _io_width(name: str, module: nn.Module) -> tuple[int, int]:
    """(input width of its first Linear, output width of its last Linear) of a sub-block."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"Adapter: {name} ({type(module).__name__}) holds no nn.Linear, so its width is unknown; "
                        "target the attention/MLP sub-blocks of transformer blocks")
    return linears[0].in_features, linears[-1].out_features


class Adapter(Method):
    """Bottleneck adapters after (``sequential``) or beside (``parallel``) ViT sub-blocks.

    Args:
        bottleneck: hidden width of every adapter.
        scale: multiplier of the adapter's output (AdaptFormer uses 0.1 with ``parallel``).
        placement: ``sequential`` (Houlsby: on the output of the sub-block, default) or
            ``parallel`` (AdaptFormer: from the sub-block's input, added to its output).
        targets: ``fnmatch`` patterns of the *sub-modules* to wrap (default: the ``attn`` and
            ``mlp`` of every block; ``["*.mlp"]`` with ``parallel`` and ``scale=0.1`` is
            AdaptFormer). Their forward must return a tensor whose last dimension is the output
            width of their last nn.Linear.
        exclude: patterns removed from the targets.
        tune_bias: also train the biases of every pre-trained nn.Linear/nn.Conv2d (off).
        tune_norm: also train normalisation layers (Houlsby trains LayerNorm; off by default).
    """

    tag = "adapter"

    def __init__(
        self,
        bottleneck: int = 8,
        scale: float = 1.0,
        placement: Literal["sequential", "parallel"] = "sequential",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        tune_bias: bool = False,
        tune_norm: bool = False,
    ):
        super().__init__(list(VIT_SITES) if targets is None else targets, exclude, tune_bias, tune_norm)
        if bottleneck < 1:
            raise ValueError(f"Adapter.bottleneck must be >= 1, got {bottleneck}")
        check_choice("Adapter.placement", placement, ("sequential", "parallel"))
        self.bottleneck = bottleneck
        self.scale = scale
        self.placement = placement

    def sites(self, model: nn.Module, head=DEFAULT) -> list[tuple[str, nn.Module]]:
        """The sub-modules to wrap: names matching ``targets`` and not ``exclude``, outside the head."""
        head = head_module_ids(model, head)
        found = [
            (name, module) for name, module in model.named_modules()
            if name and id(module) not in head
            and any(fnmatch.fnmatchcase(name, p) for p in self.targets)
            and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
        ]
        if not found:
            raise ValueError(f"Adapter: no sub-module matched targets={self.targets}, exclude={self.exclude}")
        # A match inside another match would be wrapped twice: keep the outermost.
        names = [name for name, _ in found]
        return [(n, m) for n, m in found if not any(n.startswith(f"{other}.") for other in names)]

    def inject(self, model: nn.Module, selection: Selection) -> None:
        for name, module in self.sites(model, selection.head):
            width_in, width_out = _io_width(name, module)
            if self.placement == "parallel" and width_in != width_out:
                raise ValueError(f"Adapter: {name} maps {width_in} -> {width_out} features; a parallel adapter "
                                 "needs equal widths (use placement='sequential')")
            set_submodule(model, name, BottleneckAdapter(module, width_out, self.bottleneck, self.scale, self.placement))
