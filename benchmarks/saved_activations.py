"""What each tuning method makes autograd keep for backward, per node type (activation memory).

    python -m benchmarks.saved_activations --out benchmarks/results/saved_activations_cpu
    python -m benchmarks.saved_activations --model test_vit --batch 2   # seconds

One forward pass (train mode, cross-entropy) of the same backbone, batch and seed per method;
:func:`grft_lightning.core.profiling.saved_tensor_bytes` then adds up the tensors the graph holds,
per autograd node type, leaving out parameters and buffers. The methods are the cost benchmark's
(``benchmarks.cost.build_method``: the registry files and its budgets); selections come from one
batch of gradients of the training's cross-entropy selection loss (the indices do not change the
sizes). This explains the activation
part of ``benchmarks/cost.py``'s peak memory; the rest is weights, gradients, optimizer state
and the temporaries of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.cost import LABELS, build_method  # the same methods and settings

DEFAULT_METHODS = ["full", "linear", "bitfit", "lora", "adapter", "gps", "grft_row", "grft_column"]
MIB = 2**20


def measure(name: str, model_name: str, batch: int, num_classes: int, seed: int) -> dict[str, int]:
    import timm
    import torch

    from grft_lightning import accumulate_gradients
    from grft_lightning.training.losses import selection_loss_fn
    from grft_lightning.core.profiling import saved_tensor_bytes

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    method = build_method(name)
    size = model.pretrained_cfg["input_size"][-1]
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)

    loss_fn = selection_loss_fn("ce")  # cross-entropy through the new head, as the training's selection

    grads = None
    if method.needs_gradients:  # the selection pass, on the pre-trained model
        model.eval()
        grads = accumulate_gradients(model, [(images, labels)], loss_fn, names=method.gradient_names(model))
    method.apply(model, method.select(model, grads))
    model.train()
    loss = loss_fn(model, (images, labels))
    return saved_tensor_bytes(loss, model)


def markdown(result: dict) -> str:
    methods = list(result["methods"])
    nodes: dict[str, int] = {}
    for per_node in result["methods"].values():
        for node, size in per_node.items():
            nodes[node] = max(nodes.get(node, 0), size)
    order = sorted(nodes, key=lambda n: -nodes[n])
    lines = [
        "# Activation memory per method (tensors saved for backward)",
        "",
        f"- backbone: `{result['model']}` (random weights, {result['num_classes']} classes); batch {result['batch']}; "
        f"fp32; one forward in train mode; torch {result['torch']}",
        "- MiB per autograd node type, parameters and buffers excluded; each storage counted once, under the "
        "first node that keeps it walking back from the loss",
        "- row and entry deltas (GRFT row, GPS) keep the input of the LayerNorm or GELU that feeds them and "
        "recompute its output in backward (`deltas.Recomputable`); those inputs, kept by the LayerNorm and GELU "
        "nodes too, are counted under `_DeltaLinearBackward`",
        "",
        "| node | " + " | ".join(LABELS.get(m, m) for m in methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for node in order:
        cells = [f"{result['methods'][m].get(node, 0) / MIB:.1f}" if result["methods"][m].get(node) else "–"
                 for m in methods]
        lines.append(f"| `{node}` | " + " | ".join(cells) + " |")
    totals = [f"**{sum(result['methods'][m].values()) / MIB:.1f}**" for m in methods]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {"model": args.model, "batch": args.batch, "num_classes": args.num_classes, "torch": torch.__version__,
              "methods": {}}
    for name in args.methods.split(","):
        result["methods"][name] = measure(name, args.model, args.batch, args.num_classes, args.seed)
        print(f"{name:12s} {sum(result['methods'][name].values()) / MIB:8.1f} MiB saved", file=sys.stderr, flush=True)
    table = markdown(result)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(table)
    return result


if __name__ == "__main__":
    main()
