"""Pre-train the ViT testbed (``vit_convstem_w128d6_32``) on synthetic printed characters, offline.

Reproduces ``grft_lightning/weights/vit_convstem_w128d6_32.glyphs62.safetensors`` and its card
(``docs/testbed_card.{md,json}``)::

    python scripts/pretrain_vit.py                    # the committed recipe (seed 0)
    python scripts/pretrain_vit.py --smoke            # 20 steps, for tests

Supervised 62-way classification of rendered characters (``grft_lightning.data.glyphs``: every
batch is a function of the seed and the step), AdamW with linear warm-up and cosine decay, label
smoothing 0.1, fp32. The run checkpoints to ``--work_dir`` every ``--checkpoint_every`` steps
(atomically) and the same command resumes from there; the result does not depend on where it was
interrupted. At the end it measures top-1 on a held-out stream of rendered characters (another
seed), writes the weights (safetensors, fp32) and the card with the recipe, the wall time, the
device, the SHA-256 and this command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grft_lightning.data.glyphs import CHARACTERS, glyph_batch, usable_fonts  # noqa: E402
from grft_lightning.core.io import atomic_path  # noqa: E402
from grft_lightning.core.testbed import NAME, TAG  # noqa: E402

HELD_OUT_SEED_OFFSET = 1_000_003  # the held-out stream: another seed, never drawn in training


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--ramp", type=int, default=3000,
                        help="curriculum length in steps (grft_lightning.data.glyphs.difficulty_at)")
    parser.add_argument("--label_smoothing", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: this small model gains little from a second thread, "
                             "and two threads on a busy 2-core machine stall each other)")
    parser.add_argument("--checkpoint_every", type=int, default=500)
    parser.add_argument("--eval_images", type=int, default=4096, help="held-out rendered characters")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "pretrain_vit"))
    parser.add_argument("--out", default=os.path.join(ROOT, "grft_lightning", "weights", f"{NAME}.{TAG}.safetensors"))
    parser.add_argument("--card", default=os.path.join(ROOT, "docs", "testbed_card"),
                        help="card path without extension (.md and .json are written)")
    parser.add_argument("--stop_at", type=int, default=None,
                        help="stop after this step (checkpoint written); the same command without it resumes")
    parser.add_argument("--smoke", action="store_true", help="20 steps, tiny evaluation (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.ramp, args.checkpoint_every, args.eval_images = 20, 5, 10, 10, 256
    if args.stop_at is not None and args.stop_at % args.checkpoint_every:
        parser.error(f"--stop_at {args.stop_at} must be a multiple of --checkpoint_every ({args.checkpoint_every})")
    return args


class GlyphStream(torch.utils.data.IterableDataset):
    """Batches ``start .. steps-1`` of the seeded glyph stream, normalised to mean = std = 0.5."""

    def __init__(self, seed: int, start: int, steps: int, batch_size: int, ramp: int):
        self.seed, self.start, self.steps, self.batch_size, self.ramp = seed, start, steps, batch_size, ramp

    def __iter__(self):
        for step in range(self.start, self.steps):
            images, labels = glyph_batch(self.seed, step, self.batch_size, ramp=self.ramp)
            yield step, (images.float() / 255 - 0.5) / 0.5, labels


def learning_rate(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def build(args):
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model(NAME, pretrained=False, num_classes=len(CHARACTERS))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    return model, optimizer


@torch.no_grad()
def held_out_accuracy(model, args) -> float:
    model.eval()
    correct = total = 0
    for index in range(0, args.eval_images, 256):
        images, labels = glyph_batch(args.seed + HELD_OUT_SEED_OFFSET, index // 256, min(256, args.eval_images - index))
        logits = model((images.float() / 255 - 0.5) / 0.5)
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
    model.train()
    return correct / total


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    checkpoint = os.path.join(args.work_dir, "last.pt")
    model, optimizer = build(args)
    state = {"step": 0, "seconds": 0.0, "log": []}
    if os.path.isfile(checkpoint):
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        recipe = ("seed", "steps", "batch_size", "lr", "weight_decay", "warmup", "ramp", "label_smoothing")
        if any(saved["args"][key] != getattr(args, key) for key in recipe):
            raise SystemExit(f"error: {checkpoint} is a run with another recipe; "
                             "remove it or pass another --work_dir")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        print(f"resuming at step {state['step']} ({state['seconds'] / 60:.1f} min done)", flush=True)
    stream = GlyphStream(args.seed, state["step"], args.steps, args.batch_size, args.ramp)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0 if args.smoke else 1)
    model.train()
    clock, running, seen = time.perf_counter(), 0.0, 0
    for step, images, labels in loader:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running, seen = running + loss.item(), seen + 1
        done = step + 1
        if done % args.checkpoint_every == 0 or done == args.steps:
            now = time.perf_counter()
            state["seconds"] += now - clock
            clock = now
            state["step"] = done
            state["log"].append({"step": done, "loss": running / seen, "minutes": state["seconds"] / 60})
            print(f"step {done}/{args.steps}  loss {running / seen:.4f}  lr {learning_rate(step, args):.2e}  "
                  f"{state['seconds'] / 60:.1f} min", flush=True)
            running, seen = 0.0, 0
            with atomic_path(checkpoint) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                            "args": vars(args)}, tmp)
        if args.stop_at is not None and done >= args.stop_at:
            print(f"stopped at step {done}; run the same command without --stop_at to resume", flush=True)
            return {}
    return finish(model, state, args)


def finish(model, state: dict, args) -> dict:
    from safetensors.torch import save_file

    accuracy = held_out_accuracy(model, args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    # no safetensors metadata: its key order varies between processes, and the SHA-256 must not
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    recipe = {k: getattr(args, k) for k in ("seed", "steps", "batch_size", "lr", "weight_decay", "warmup",
                                             "ramp", "label_smoothing", "threads")}
    card = {
        "model": f"{NAME}.{TAG}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": os.path.relpath(args.out, ROOT),
        "sha256": sha256(args.out),
        "bytes": os.path.getsize(args.out),
        "recipe": recipe,
        "data": {"classes": CHARACTERS, "fonts": [os.path.basename(f) for f in usable_fonts()],
                 "images_seen": args.steps * args.batch_size, "image_size": 32},
        "device": f"CPU ({platform.processor() or platform.machine()}, {args.threads} torch thread{'s' if args.threads > 1 else ''})",
        "torch": torch.__version__,
        "wall_minutes": round(state["seconds"] / 60, 1),
        "held_out_top1": accuracy,
        "held_out_images": args.eval_images,
        "loss_log": state["log"],
        "command": "python scripts/pretrain_vit.py" + (" --smoke" if args.smoke else ""),
    }
    with open(args.card + ".json", "w") as handle:
        json.dump(card, handle, indent=2)
    with open(args.card + ".md", "w") as handle:
        handle.write(card_markdown(card))
    print(f"held-out top-1 {accuracy:.4f}; weights {args.out} (sha256 {card['sha256'][:12]}...)", flush=True)
    return card


def card_markdown(card: dict) -> str:
    """The human-readable card (the JSON beside it has the same figures and the loss log)."""
    recipe = card["recipe"]
    log = card["loss_log"]
    checkpoints = [log[0], log[len(log) // 4], log[len(log) // 2], log[-1]] if len(log) >= 4 else log
    loss_line = ", ".join(f"{e['loss']:.3f} at step {e['step']:,}" for e in checkpoints)
    return "\n".join([
        f"# {card['model']}: the ViT testbed's pre-trained weights",
        "",
        f"- **Model**: timm `VisionTransformer` with a convolutional stem (`grft_lightning/core/testbed.py`), "
        f"{card['parameters']:,} parameters with its 62-class head, 32 px input, mean = std = 0.5.",
        f"- **Weights**: `{card['weights']}` ({card['bytes']:,} bytes, fp32 safetensors), "
        f"SHA-256 `{card['sha256']}`.",
        f"- **Data**: {len(card['data']['classes'])} printed characters (0-9, A-Z, a-z) rendered on the fly from "
        f"{len(card['data']['fonts'])} TrueType fonts shipped in matplotlib (`grft_lightning/data/glyphs.py`): "
        "random size, position, rotation (at most 12 degrees), shear, stroke, colours and backgrounds; "
        f"{card['data']['images_seen']:,} images seen. No MNIST digit and no photograph (the downstream data) is used.",
        f"- **Recipe**: {recipe['steps']:,} steps of batch {recipe['batch_size']}, AdamW (lr {recipe['lr']}, weight "
        f"decay {recipe['weight_decay']} on tensors of 2 or more dimensions), {recipe['warmup']} warm-up steps then cosine decay, label "
        f"smoothing {recipe['label_smoothing']}, fp32; a curriculum over the first {recipe['ramp']:,} steps (grey "
        "high-contrast digits and capitals with little jitter first; lower case, colours, textured backgrounds and "
        f"full jitter phased in), seed {recipe['seed']}.",
        f"- **Device and time**: {card['device']}, torch {card['torch']}, {card['wall_minutes']} min of training "
        "(evaluation and start-up not counted).",
        f"- **Quality**: top-1 {100 * card['held_out_top1']:.2f} % on {card['held_out_images']:,} held-out rendered "
        f"characters (another seed's stream, full difficulty; chance 1.6 %); training loss (label-smoothed) "
        f"{loss_line}. Downstream figures (fine-tuning and linear probes against a random initialisation): "
        "`benchmarks/results/vit_suite.md`.",
        f"- **Reproduce**: `{card['command']}` (about 40 minutes on one core; resumable: run the same command again "
        "after an interruption). The run is deterministic given the seed and the thread count.",
        "",
    ])


if __name__ == "__main__":
    main()
