"""Decoding + transform throughput of a DataModule's training loader, per worker count.

    python -m benchmarks.data_loading --root $VTAB_ROOT --task dtd --workers 0 1 2 4
    python -m benchmarks.data_loading --benchmark fgvc --root $FGVC_ROOT --task cub
    python -m benchmarks.data_loading             # synthetic VTAB folder in a temp dir

Prints a markdown table: images/second in all and per worker (the main process counts as one
worker when ``num_workers`` is 0), after one warm-up batch that pays for starting the workers
(reported separately as ``startup s``). Images are not verified first (``verify_images=False``):
only loading is timed. The synthetic folder holds random-noise JPEGs of 500x375 (about the size of
a natural VTAB image); noise is the slowest content for a JPEG decoder, so its numbers are a floor.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from grft_lightning.data import FGVC, VTAB1k
from grft_lightning.data.vtab import VTAB_TASKS, write_list_file


def make_synthetic_vtab(root: str, task: str, n_train: int, size=(500, 375), seed: int = 0) -> None:
    """A VTAB-layout folder for ``task`` with ``n_train`` training images (val/test: 8 each)."""
    rng = np.random.default_rng(seed)
    task_dir = os.path.join(root, VTAB_TASKS[task].folder)
    lists = {}
    for split, n in (("train800", n_train), ("val200", 8), ("test", 8)):
        os.makedirs(os.path.join(task_dir, "images", split), exist_ok=True)
        lists[split] = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(task_dir, rel), quality=90)
            lists[split].append((rel, i % VTAB_TASKS[task].num_classes))
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name, entries in lists.items():
        write_list_file(os.path.join(task_dir, f"{name}.txt"), entries)


def measure(make_datamodule, workers: int, batches: int) -> dict[str, float]:
    dm = make_datamodule(workers)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    start = time.perf_counter()
    next(loader)  # warm-up: worker start and the first batch
    startup = time.perf_counter() - start
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            x, _ = next(loader)
        except StopIteration:
            break
        images += x.shape[0]
    seconds = time.perf_counter() - start
    del loader
    total = images / seconds if seconds > 0 else float("nan")
    return {"workers": workers, "startup": startup, "images": images, "total": total,
            "per_worker": total / max(workers, 1)}


def format_table(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", ""]
    lines.append("| workers | startup s | images timed | images/s | images/s per worker |")
    lines.append("|---:|---:|---:|---:|---:|")
    for r in rows:
        lines.append(f"| {r['workers']} | {r['startup']:.2f} | {r['images']} | "
                     f"{r['total']:.1f} | {r['per_worker']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmark", choices=("vtab", "fgvc"), default="vtab")
    parser.add_argument("--root", default=None,
                        help="prepared data root (default: a synthetic VTAB folder)")
    parser.add_argument("--task", default=None,
                        help="VTAB task or FGVC dataset (default: dtd / cub)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=10, help="batches timed per worker count")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="vit_base_patch16_224.augreg_in21k")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--augmentation", choices=("resize", "fgvc"), default=None)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    task = args.task or ("dtd" if args.benchmark == "vtab" else "cub")
    tmp = None
    root = args.root
    if root is None:
        if args.benchmark != "vtab":
            parser.error("--root is required for fgvc (the synthetic folder is VTAB-layout)")
        tmp = tempfile.TemporaryDirectory()
        root = tmp.name
        make_synthetic_vtab(root, task, n_train=args.batch_size * (args.batches + 1))

    def make_datamodule(workers: int):
        cls, key = (VTAB1k, "task") if args.benchmark == "vtab" else (FGVC, "dataset")
        extra = {"augmentation": args.augmentation} if args.augmentation else {}
        return cls(
            **{key: task}, root=root, verify_images=False, batch_size=args.batch_size,
            num_workers=workers, pin_memory=False, backbone=args.backbone,
            image_size=args.image_size, **extra,
        )

    rows = [measure(make_datamodule, w, args.batches) for w in args.workers]
    where = "synthetic 500x375 noise JPEGs" if tmp else root
    title = f"{args.benchmark}/{task} train loader ({where}, batch {args.batch_size}, {args.backbone})"
    table = format_table(rows, title)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
