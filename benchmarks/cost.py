"""What one training step costs under each tuning method, on one backbone, batch and seed.

    python benchmarks/cost.py --out benchmarks/results/cost_cpu   # ViT-B/16, 224 px, CPU fp32, batch 8
    python benchmarks/cost.py --small --out /tmp/cost             # tiny ViT, a few seconds (CI)

Writes ``OUT.json`` and ``OUT.md``. Each method runs in its own Python process (``--small``: all
in this one), from the same seed, weights and synthetic batch. Per method:

* ``step_seconds``: median time of a training step (zero_grad, forward, cross-entropy plus the
  method's regularizer, backward, ``method.on_before_optimizer_step``, AdamW step) over
  ``--steps`` steps after ``--warmup`` steps, on one fixed batch (no data loading). The clock
  (``--clock``) is wall time on a GPU (after synchronising). On a CPU it is the process's CPU
  time (user + system) with one torch thread by default: on a shared host wall time measures
  the neighbours' load as much as the method, while the CPU time of a one-thread process is
  what its wall time would be on an idle core. Both clocks are kept (``step_wall_seconds``,
  ``step_cpu_seconds``, extra keys). With ``--rounds R`` every method is measured R times
  (alternating order) and the median is kept.
* ``peak_memory_bytes``: GPU: ``torch.cuda.max_memory_allocated``. CPU: the process's maximum
  resident set size (``VmHWM``). Either peak is reset just before the first warm-up step, after
  the model, the selection and the optimizer are built: it is the peak *of training*. CPU
  processes run with ``MALLOC_ARENA_MAX=2`` and ``MALLOC_MMAP_THRESHOLD_=1048576`` (unless set):
  glibc then serves every tensor of 1 MiB or more by ``mmap`` and returns it to the system when
  freed, so the resident size follows the live tensors instead of what the allocator keeps.
* ``baseline_memory_bytes`` (extra): CPU: the resident size once the libraries the method needs
  are imported (torch, timm, grft_lightning; peft for LoRA), before the model exists -- the same
  for every method but LoRA; GPU: 0. ``peak_above_baseline_ratio`` compares ``peak - baseline``,
  the CPU figure closest to the GPU's tensor-only peak.
* ``tuned``, ``tuned_pct``: ``grft_lightning.count_parameters`` after selection.
* ``optimizer_state_bytes``: bytes of every tensor in ``optimizer.state`` after the steps.
* ``selection_seconds`` (gradient methods): ``accumulate_gradients`` with cross-entropy over
  ``--selection-batches`` synthetic batches of the training batch size, plus ``method.select``;
  it runs in a process of its own whose selection is handed to the timing process, so its
  gradient sums do not count in the training peak.
* ``export_bytes``: size of the ``grft_lightning.save_tuned`` file after the steps.
* ``step_time_ratio``, ``peak_memory_ratio``: divided by full fine-tuning's value of this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = ["full", "linear", "bitfit", "lora", "adapter", "gps", "gps_masked", "grft_row", "grft_column"]
LABELS = {"full": "full fine-tuning", "linear": "linear probing", "bitfit": "BitFit", "lora": "LoRA r=8",
          "adapter": "Adapter (b=8, sequential)", "gps": "GPS k=1 (index delta)", "gps_masked": "GPS k=1 (masked)",
          "grft_row": "GRFT row (4/matrix)", "grft_column": "GRFT column (3/matrix)"}
KEYS = ["method", "step_seconds", "peak_memory_bytes", "tuned", "tuned_pct", "optimizer_state_bytes",
        "selection_seconds", "export_bytes", "step_time_ratio", "peak_memory_ratio"]
EXTRA_KEYS = ["step_wall_seconds", "step_cpu_seconds", "baseline_memory_bytes", "peak_above_baseline_ratio"]
MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}
MARK = "COST_JSON "


def build_method(name: str):
    from grft_lightning.methods import GPS, GRFT, Adapter, BitFit, Full, GPSMasked, Linear, LoRA

    return {
        "full": Full, "linear": Linear, "bitfit": BitFit,
        "lora": lambda: LoRA(r=8),
        "adapter": lambda: Adapter(bottleneck=8),
        "gps": lambda: GPS(k=1),
        "gps_masked": lambda: GPSMasked(k=1),
        "grft_row": lambda: GRFT(mode="row", rows_per_matrix=4),
        "grft_column": lambda: GRFT(mode="column", columns_per_matrix=3),
    }[name]()


# -- memory ----------------------------------------------------------------------------------
def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            return int(re.search(rf"{field}:\s+(\d+) kB", handle.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def _baseline(device) -> int:
    return 0 if device.type == "cuda" else (_status_bytes("VmRSS") or 0)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets VmHWM to the current resident size
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's lifetime maximum


def _peak(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = _status_bytes("VmHWM")
    if peak is None:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    return peak


# -- one method -------------------------------------------------------------------------------
def _setup(name: str, args):
    import timm
    import torch

    import grft_lightning.export  # noqa: F401  (every library a method needs is loaded before the baseline)

    if name == "lora":
        import peft  # noqa: F401
    device = torch.device(args.device)
    baseline = _baseline(device)
    torch.manual_seed(args.seed)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **kwargs)
    method = build_method(name)
    method.apply(model)
    model.to(device)
    size = model.pretrained_cfg["input_size"][-1] if not args.img_size else args.img_size
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    return model, method, images, labels, device, baseline


def _autocast(args, device):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _select(model, method, images, labels, args, device) -> float:
    import torch.nn.functional as F

    from grft_lightning import accumulate_gradients

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]).float(), batch[1])

    model.eval()
    clock = _clock(args)
    start = clock()
    with _autocast(args, device):
        grads = accumulate_gradients(model, [(images, labels)] * args.selection_batches, loss_fn)
    method.select(model, grads)
    _sync(device)
    seconds = clock() - start
    model.train()
    return seconds


def _clock(args):
    return time.process_time if args.clock == "cpu" else time.perf_counter


def _selection_state(model) -> dict:
    from grft_lightning.deltas import delta_layers

    return {f"{path}.{key}": buf for path, layer in delta_layers(model) for key, buf in layer.named_buffers(recurse=False)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(model, args):
    import torch

    tuned = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in tuned if p.ndim >= 2]},
              {"params": [p for p in tuned if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, weight_decay=args.weight_decay)


def _train_step(model, method, optimizer, images, labels, args, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one training step."""
    import torch.nn.functional as F

    from grft_lightning.methods.base import classifier

    start, start_cpu = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    with _autocast(args, device):
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        loss = F.cross_entropy(classifier(model)(features).float(), labels)
        reg = method.regularizer(model, images, features)
        total = loss if reg is None else loss + reg
    total.backward()
    method.on_before_optimizer_step(model)
    optimizer.step()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def run_one(name: str, args) -> dict:
    """Everything measured for one method, in this process (see the module docstring)."""
    import torch

    from grft_lightning import count_parameters, save_tuned

    model, method, images, labels, device, baseline = _setup(name, args)
    selection_seconds = None
    if method.needs_gradients:
        if args.selection_file:
            with open(args.selection_file + ".json") as handle:
                selection_seconds = json.load(handle)["selection_seconds"]
            model.load_state_dict(torch.load(args.selection_file, map_location=device), strict=False)
        else:
            selection_seconds = _select(model, method, images, labels, args, device)
    optimizer = _optimizer(model, args)
    _reset_peak(device)
    times = [_train_step(model, method, optimizer, images, labels, args, device)
             for _ in range(args.warmup + args.steps)][args.warmup:]
    wall, cpu = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
    peak = _peak(device)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    counts = count_parameters(model)
    with tempfile.TemporaryDirectory() as tmp:
        export_bytes = os.path.getsize(save_tuned(model, os.path.join(tmp, "tuned.safetensors")))
    return {"method": name, "step_seconds": cpu if args.clock == "cpu" else wall, "step_wall_seconds": wall,
            "step_cpu_seconds": cpu, "peak_memory_bytes": peak,
            "tuned": int(counts["tuned"]), "tuned_pct": counts["tuned_pct"], "optimizer_state_bytes": int(state),
            "selection_seconds": selection_seconds, "export_bytes": export_bytes, "baseline_memory_bytes": baseline}


def select_one(name: str, args) -> None:
    """Run the selection pass and write the selection buffers to ``args.selection_file``."""
    import torch

    model, method, images, labels, device, _ = _setup(name, args)
    seconds = _select(model, method, images, labels, args, device)
    torch.save(_selection_state(model), args.selection_file)
    with open(args.selection_file + ".json", "w") as handle:
        json.dump({"selection_seconds": seconds}, handle)


# -- the parent: one child per method ------------------------------------------------------------
def _child(args, name: str, phase: str, selection_file: str | None) -> dict | None:
    command = [sys.executable, os.path.abspath(__file__), "--one", name, "--phase", phase] + _forward_args(args)
    if selection_file:
        command += ["--selection-file", selection_file]
    env = {**MALLOC, "HF_HUB_OFFLINE": "1", **os.environ}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"cost.py --one {name} --phase {phase} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    if phase == "select":
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    return json.loads(lines[-1][len(MARK):])


def _forward_args(args) -> list[str]:
    out = ["--model", args.model, "--num-classes", str(args.num_classes), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--selection-batches", str(args.selection_batches),
           "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed), "--lr", str(args.lr),
           "--weight-decay", str(args.weight_decay), "--clock", args.clock]
    out += ["--threads", str(args.threads)] if args.threads else []
    return out + (["--img-size", str(args.img_size)] if args.img_size else [])


def measure(name: str, args) -> dict:
    if not args.isolate:
        return run_one(name, args)
    if build_method(name).needs_gradients:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "selection.pt")
            _child(args, name, "select", path)
            return _child(args, name, "train", path)
    return _child(args, name, "train", None)


def _combine(rounds: list[dict]) -> dict:
    """One row from several rounds: median step time and selection time, largest peak."""
    row = dict(rounds[0])
    for key in ("step_seconds", "step_wall_seconds", "step_cpu_seconds"):
        row[key] = statistics.median(r[key] for r in rounds)
    row["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in rounds)
    if row["selection_seconds"] is not None:
        row["selection_seconds"] = statistics.median(r["selection_seconds"] for r in rounds)
    return row


def run_all(args) -> dict:
    import timm
    import torch

    measured: dict[str, list[dict]] = {name: [] for name in args.methods}
    for r in range(args.rounds):
        for name in args.methods if r % 2 == 0 else args.methods[::-1]:
            start = time.perf_counter()
            row = measure(name, args)
            measured[name].append(row)
            print(f"round {r + 1} {name:12s} step {row['step_seconds']:7.3f} s  peak {row['peak_memory_bytes'] / 2**20:7,.0f} MiB"
                  f"  ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    rows = {name: _combine(rounds) for name, rounds in measured.items()}
    full = rows.get("full")
    for row in rows.values():
        above, above_full = (row["peak_memory_bytes"] - row["baseline_memory_bytes"],
                             full["peak_memory_bytes"] - full["baseline_memory_bytes"]) if full else (0, 0)
        row["step_time_ratio"] = row["step_seconds"] / full["step_seconds"] if full else None
        row["peak_memory_ratio"] = row["peak_memory_bytes"] / full["peak_memory_bytes"] if full else None
        row["peak_above_baseline_ratio"] = above / above_full if full else None
    device = torch.device(args.device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": label, "dtype": args.dtype, "batch": args.batch, "torch": torch.__version__, "timm": timm.__version__,
        "clock": args.clock, "model": args.model, "img_size": args.img_size, "num_classes": args.num_classes,
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "selection_batches": args.selection_batches, "isolated": args.isolate,
        "malloc": {k: os.environ.get(k, v) for k, v in MALLOC.items()} if args.isolate and device.type == "cpu" else None,
        "peak_memory": "cuda max allocated" if device.type == "cuda" else "VmHWM (max resident set) of the process",
        "rows": [{k: rows[n][k] for k in KEYS + EXTRA_KEYS} for n in args.methods],
    }


# -- report -----------------------------------------------------------------------------------
def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def checks(rows: list[dict]) -> list[tuple[str, bool]]:
    """The cost targets, judged on ``peak_memory_ratio`` and ``step_time_ratio`` (ratios to full
    fine-tuning of the same run), where the rows allow; the above-baseline ratio is shown too."""
    r = {row["method"]: row for row in rows}

    def mem(key: str) -> str:
        return f"{r[key]['peak_memory_ratio']:.3f}x (above imports {r[key]['peak_above_baseline_ratio']:.3f}x)"

    out = []
    if {"full", "grft_row", "lora"} <= r.keys():
        g, lora = r["grft_row"], r["lora"]
        out.append((f"GRFT row step time {g['step_time_ratio']:.3f}x full (<= 0.75) and <= LoRA's {lora['step_time_ratio']:.3f}x",
                    g["step_time_ratio"] <= 0.75 and g["step_seconds"] <= lora["step_seconds"]))
        for key in ("grft_row", "grft_column"):
            if key in r:
                ok = r[key]["peak_memory_ratio"] <= 0.75 and r[key]["peak_memory_bytes"] <= lora["peak_memory_bytes"]
                out.append((f"{LABELS[key]} peak memory {mem(key)} full (<= 0.75) and <= LoRA's {mem('lora')}", ok))
    if {"full", "grft_row"} <= r.keys():
        share = r["grft_row"]["optimizer_state_bytes"] / r["full"]["optimizer_state_bytes"]
        out.append((f"GRFT row optimizer state {100 * share:.3f} % of full's (< 1 %)", share < 0.01))
    if {"full", "gps"} <= r.keys():
        out.append((f"GPS index-delta peak memory {mem('gps')} full (<= 0.85)", r["gps"]["peak_memory_ratio"] <= 0.85))
    return out


def markdown(result: dict) -> str:
    cpu = result["malloc"] is not None
    rounds = f", median over {result['rounds']} rounds" if result["rounds"] > 1 else ""
    apart = ", in a process of its own" if result["isolated"] else ""
    clock = {"cpu": "process CPU time (user + system; one thread: the wall time of an idle core)",
             "wall": "wall time"}[result["clock"]]
    notes = [
        f"device: {result['device']}; dtype: {result['dtype']}; batch: {result['batch']}; torch {result['torch']}, "
        f"timm {result['timm']}; torch threads: {result['threads']}",
        f"backbone: `{result['model']}` (random weights, {result['num_classes']} classes"
        f"{', ' + str(result['img_size']) + ' px' if result['img_size'] else ''}); AdamW (weight decay on ndim >= 2); "
        "one fixed synthetic batch, same seed for every method",
        f"step: median {clock} of {result['steps']} steps after {result['warmup']} warm-up steps{rounds}; selection: "
        f"`accumulate_gradients` (cross-entropy) over {result['selection_batches']} batches + `select`{apart}",
        f"peak memory: {result['peak_memory']}, reset before the first warm-up step"
        + ("; one process per method, " + ", ".join(f"{k}={v}" for k, v in result["malloc"].items()) if cpu else "")
        + ("" if result["isolated"] else "; all methods in one process (indicative only)"),
        "above imports: (peak - resident size after importing the method's libraries) / the same for full fine-tuning"
        if cpu else "",
        "ratios: to full fine-tuning in the same run",
    ]
    head = "# Training-step cost per method\n\n" + "".join(f"- {n}\n" for n in notes if n) + "\n"
    lines = ["| method | step (s) | step / full | wall (s) | peak memory | peak / full | above imports / full | tuned | tuned % "
             "| optimizer state | selection (s) | export |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        sel = "–" if row["selection_seconds"] is None else f"{row['selection_seconds']:.1f}"
        lines.append(f"| {LABELS.get(row['method'], row['method'])} | {row['step_seconds']:.3f} | {_ratio(row['step_time_ratio'])} "
                     f"| {row['step_wall_seconds']:.2f} | {_size(row['peak_memory_bytes'])} | {_ratio(row['peak_memory_ratio'])} "
                     f"| {_ratio(row['peak_above_baseline_ratio'])} | {row['tuned']:,} "
                     f"| {row['tuned_pct']:.3f} | {_size(row['optimizer_state_bytes'])} | {sel} | {_size(row['export_bytes'])} |")
    found = checks(result["rows"]) if result["isolated"] else []
    tail = "" if not found else "\n\n## Targets (set for ViT-B/16, CPU fp32, batch 8)\n\n" + "\n".join(
        f"- [{'x' if ok else ' '}] {text}" for text, ok in found)
    return head + "\n".join(lines) + tail + "\n"


# -- command line -----------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on GPU")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1, help="measure every method this many times (median)")
    p.add_argument("--selection-batches", type=int, default=4, help="batches of the timed selection pass")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", default=None, choices=["wall", "cpu"],
                   help="step_seconds clock (default: cpu on a CPU, wall on a GPU; see the module docstring)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with the cpu clock or --small, else torch's)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="on tensors with ndim >= 2")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one process per method (default; off with --small)")
    p.add_argument("--small", action="store_true",
                   help="quick check: test_vit at 32 px, batch 2, 1+2 steps, 1 selection batch, one process")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (e.g. benchmarks/results/cost_cpu)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--phase", default="train", choices=["select", "train"], help=argparse.SUPPRESS)
    p.add_argument("--selection-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.model, args.img_size, args.steps, args.warmup, args.selection_batches = "test_vit", 32, 2, 1, 1
        args.batch = args.batch or 2
        args.threads = args.threads or 1  # a tiny model gains nothing from threads, and a busy CI host stalls them
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = args.device.startswith("cuda")
    args.batch = args.batch or (64 if on_gpu else 8)
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.clock = args.clock or ("wall" if on_gpu else "cpu")
    if args.clock == "cpu" and not args.threads:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.isolate = (not args.small) if args.isolate is None else args.isolate
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.one:
        if args.phase == "select":
            select_one(args.one, args)
            return None
        row = run_one(args.one, args)
        print(MARK + json.dumps(row), flush=True)
        return row
    result = run_all(args)
    text = markdown(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
        with open(args.out + ".md", "w") as handle:
            handle.write(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
