"""Two CPU processes (gloo) training a tiny ViT with GRFT deltas under torch's FSDP2 (not a test module).

``PYTHONPATH=. python tests/fsdp_probe.py OUT_DIR [PORT]``, from the repository root (this
checkout's package first, whatever other install of it the interpreter would find), spawns two
ranks. Each one:

1. builds timm's ``test_vit`` (32 px) with ``GRFT(rows_per_matrix=2)`` applied, from the same seed;
2. selects as :class:`grft_lightning.training.callbacks.GradientSelection` does under DDP: its share of the
   selection batches (``selection_dataloader``, batch ``j`` to rank ``j % 2``), the gradient sums
   all-reduced, then ``method.select``;
3. shards the model with ``torch.distributed.fsdp.fully_shard`` (each transformer block, then the
   root), trains 3 AdamW steps on its own batches, saves a checkpoint (full model and optimizer
   state dicts, gathered), trains 1 more step;
4. builds a fresh model (GRFT applied with the saved selection), shards it, loads the checkpoint and
   trains the same last step.

Every rank writes ``OUT_DIR/rank<r>.pt``: the selection buffers, the full (gathered) tensors before
and after training, which tensors require gradients, and the full tensors after the last step in
the original and in the resumed model. The test (``tests/test_fsdp.py``) compares them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
SELECTION_KEYS = (".index",)


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered whole on this rank."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        out[name] = tensor.detach().cpu().clone()
    return out


def _build(seed: int) -> tuple[torch.nn.Module, object]:
    """The pre-trained model (deltas come later, from the selection) and the method."""
    from grft_lightning.core.backbones import create_backbone
    from grft_lightning.methods import GRFT

    torch.manual_seed(seed)
    return create_backbone("test_vit", 4, pretrained=False, image_size=32), GRFT(mode="row", rows_per_matrix=2)


def _shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _step(model, optimizer, batch) -> None:
    images, labels = batch
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PL_GLOBAL_SEED="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _run(rank, Path(out_dir))
    finally:
        dist.destroy_process_group()


def _run(rank: int, out_dir: Path) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from grft_lightning.data import SyntheticImages
    from grft_lightning.core.deltas import selectable_layers
    from grft_lightning.training.losses import selection_loss_fn
    from grft_lightning.core.gradients import accumulate_gradients

    data = SyntheticImages(num_classes=4, n_train=32, n_val=4, n_test=4, batch_size=4, backbone="test_vit",
                           image_size=32)
    data.check()
    model, method = _build(seed=0)

    # the selection pass, as GradientSelection runs it under DDP
    model.eval()
    grads = accumulate_gradients(model, data.selection_dataloader("ce"), selection_loss_fn("ce", 0.07),
                                 names=method.gradient_names(model), reduction=method.gradient_reduction)
    for grad in grads.values():
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
    selection = method.select(model, grads)
    method.apply(model, selection)  # deltas before sharding, as the selection callback builds them in setup
    model.train()

    _shard(model)
    before = _full(model)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    optimizer = _optimizer(model)
    batches = [batch for _, batch in zip(range(4), data.train_dataloader())]  # this rank's batches
    for batch in batches[:3]:
        _step(model, optimizer, batch)
    after = _full(model)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    checkpoint = {"model": get_model_state_dict(model, options=full),
                  "optimizer": get_optimizer_state_dict(model, optimizer, options=full)}
    path = out_dir / "checkpoint.pt"
    if rank == 0:
        torch.save(checkpoint, path)
    dist.barrier()
    _step(model, optimizer, batches[3])
    continued = _full(model)

    # resume: a fresh model with deltas built from the saved selection, sharded, then the checkpoint
    fresh, _ = _build(seed=1)  # another seed: every value must come from the checkpoint
    method.apply(fresh, type(selection).from_state_dict(selection.state_dict()))
    _shard(fresh)
    saved = torch.load(path, weights_only=True)
    set_model_state_dict(fresh, saved["model"], options=StateDictOptions(full_state_dict=True))
    fresh_optimizer = _optimizer(fresh)
    set_optimizer_state_dict(fresh, fresh_optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    restored = _full(fresh)
    _step(fresh, fresh_optimizer, batches[3])
    resumed = _full(fresh)
    torch.save({
        "selection": {k: v for k, v in before.items() if k.endswith(SELECTION_KEYS)},
        "trainable": trainable,
        "before": before, "after": after, "restored": restored, "continued": continued, "resumed": resumed,
        "selected_layers": [name for name, _ in selectable_layers(fresh)],
    }, out_dir / f"rank{rank}.pt")


def main(out_dir: str, port: int) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(port, out_dir), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 29517)
