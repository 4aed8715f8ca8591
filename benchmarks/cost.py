"""What one training step costs under each tuning method, on one backbone, batch and seed.

    python -m benchmarks.cost --out benchmarks/results/cost_cpu   # ViT-B/16, 224 px, CPU fp32, batch 8
    python -m benchmarks.cost --small --out /tmp/cost             # tiny ViT, a few seconds (CI)
    python -m benchmarks.cost --model mobilenetv2_100 --img-size 48 --batch 32 --num-classes 10 \
        --channels-last --steps 40 --warmup 5 --out benchmarks/results/cost_cpu_cnn  # the offline suite's CNN

(from the repository root). Each method is its registry file, ``configs/methods/<method>.yaml``
(class and arguments), with this benchmark's budgets on top (:data:`BUDGETS`: GPS k = 1, GRFT 4
rows or 3 columns per matrix, VTAB-1k's 0.003 on ViT-B/16); :func:`method_config` gives both.
The optimizer groups are the training's (:func:`grft_lightning.core.accounting.parameter_groups`, no
head lr), the selection loss is the training's cross-entropy
(:func:`grft_lightning.training.losses.selection_loss_fn`), and the targets come from
``benchmarks/targets.yaml``.

A CNN (a model without transformer blocks' ``attn``/``mlp`` sub-modules) takes LoRA on its
convolutions except the depthwise ones (the offline suite's ``targets``/``exclude``,
``configs/offline/methods/lora.yaml``: ``*conv*`` minus ``*conv_dw``; peft refuses a rank that is
not a multiple of the groups) and leaves the bottleneck Adapter out (its sites are transformer
sub-blocks); the markdown says so. ``--channels-last`` puts the model and the images in
``torch.channels_last`` memory format (the offline suite's setting).

Writes ``OUT.json`` and ``OUT.md``. Three phases, each method from the same seed, weights and
synthetic batch (``--small`` runs all of them in this process, the others in child processes):

1. *select* (one process per gradient method): ``accumulate_gradients`` with cross-entropy over
   ``--selection-batches`` batches of the training batch size, plus ``method.select``, timed
   (``selection_seconds``); the selection is handed to the next phases, so its gradient sums
   never count in a training peak.
2. *memory* (one process per method): ``--memory-steps`` training steps. ``peak_memory_bytes``:
   GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's maximum resident set size
   (``VmHWM``). Either is reset just before the first step, after the model, selection and
   optimizer exist: the peak *of training*. CPU processes run with ``MALLOC_ARENA_MAX=2`` and
   ``MALLOC_MMAP_THRESHOLD_=1048576`` (unless set): glibc then serves every block of 1 MiB or
   more by ``mmap`` and returns it when freed, so the resident size follows the live tensors,
   not what the allocator keeps. Also ``tuned``/``tuned_pct`` (``count_parameters``),
   ``optimizer_state_bytes`` (every tensor in ``optimizer.state``) and ``export_bytes``
   (``save_tuned``). Extra: ``baseline_memory_bytes``, the resident size once the libraries the
   method needs are imported (peft for LoRA) and before the model exists (0 on a GPU), and
   ``peak_above_baseline_ratio``, which compares ``peak - baseline``: on a CPU the figure closest
   to the GPU's tensor-only peak.
3. *time* (one process for all methods): every method built side by side, then ``--warmup`` +
   ``--steps`` training steps (zero_grad, forward, cross-entropy plus the method's regularizer,
   backward, ``method.on_before_optimizer_step``, AdamW step) taken round-robin, the order
   reversed every other round, so that a shared host's changing load falls on all methods
   alike. ``step_seconds`` is the median over the timed steps, by ``--clock``: wall time on a
   GPU (synchronised); on a CPU the process's CPU time with one torch thread, which is the wall
   time of an idle core and counts none of the neighbours' work. Both clocks are kept
   (``step_wall_seconds``, ``step_cpu_seconds``).

``step_time_ratio`` and ``peak_memory_ratio`` divide by full fine-tuning's value of the same run.
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
from pathlib import Path

from benchmarks import ROOT, targets

METHODS = ["full", "linear", "bitfit", "lora", "adapter", "gps", "gps_masked", "grft_row", "grft_column"]
LABELS = {"full": "full fine-tuning", "linear": "linear probing", "bitfit": "BitFit", "lora": "LoRA r=8",
          "adapter": "Adapter (b=8, sequential)", "gps": "GPS k=1 (index delta)", "gps_masked": "GPS k=1 (masked)",
          "grft_row": "GRFT row (4/matrix)", "grft_column": "GRFT column (3/matrix)"}
KEYS = ["method", "step_seconds", "peak_memory_bytes", "tuned", "tuned_pct", "optimizer_state_bytes",
        "selection_seconds", "export_bytes", "step_time_ratio", "peak_memory_ratio"]
EXTRA_KEYS = ["step_wall_seconds", "step_cpu_seconds", "baseline_memory_bytes", "peak_above_baseline_ratio"]
MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}
MARK = "COST_JSON "
#: The method registry: configs/methods/<method>.yaml (class and arguments of each method)
REGISTRY_DIR = Path(ROOT) / "configs" / "methods"
#: This benchmark's budgets on top of the registry files (which state none): ViT-B/16 at VTAB-1k's
#: fraction 0.003 is 4 rows or 3 columns per matrix; GPS k = 1
BUDGETS = {"gps": {"k": 1}, "gps_masked": {"k": 1}, "grft_row": {"rows_per_matrix": 4},
           "grft_column": {"columns_per_matrix": 3}}
#: LoRA's targets on a CNN come from the offline suite's recipe: every convolution but the depthwise ones
CNN_LORA_RECIPE = Path(ROOT) / "configs" / "offline" / "methods" / "lora.yaml"
#: Methods a CNN leaves out, and why (the markdown's notes say it)
CNN_LEFT_OUT = {"adapter": "the bottleneck Adapter wraps transformer sub-blocks (`*.attn`, `*.mlp`) and adds its "
                           "bottleneck on the last (feature) dimension; a CNN has neither"}


def _method_section(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())["model"]["method"]


def method_config(name: str, cnn: bool = False) -> tuple[str, dict]:
    """``(class_path, init_args)`` of method ``name`` here: its registry file's, with
    :data:`BUDGETS` on top (and, on a CNN, LoRA's targets from the offline suite's recipe)."""
    spec = _method_section(REGISTRY_DIR / f"{name}.yaml")
    init_args = {**(spec.get("init_args") or {}), **BUDGETS.get(name, {})}
    if cnn and name == "lora":
        recipe = _method_section(CNN_LORA_RECIPE)["init_args"]
        init_args.update({key: recipe[key] for key in ("targets", "exclude")})
    return spec["class_path"], init_args


def build_method(name: str, cnn: bool = False):
    """The method ``name`` as :func:`method_config` defines it (a registered class only)."""
    from grft_lightning.methods import method_from_config

    class_path, init_args = method_config(name, cnn)
    return method_from_config(class_path, init_args, source=f"configs/methods/{name}.yaml")


# -- memory ----------------------------------------------------------------------------------
def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            return int(re.search(rf"{field}:\s+(\d+) kB", handle.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


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
class Run:
    """A fresh backbone, the method's selection made on it (or read from the select phase), the
    method applied with it, its optimizer built."""

    def __init__(self, name: str, args, selection_dir: str | None, select: bool = False):
        import timm
        import torch

        import grft_lightning.methods.export  # noqa: F401  (every library is loaded before the baseline)
        from grft_lightning.core.accounting import parameter_groups

        if name == "lora":
            import peft  # noqa: F401
        self.name, self.args = name, args
        self.device = torch.device(args.device)
        # GPU: what is allocated before the model exists (0 in a fresh process); CPU: resident size
        self.baseline = (int(torch.cuda.memory_allocated(self.device)) if self.device.type == "cuda"
                         else (_status_bytes("VmRSS") or 0))
        torch.manual_seed(args.seed)
        # a ViT's position embedding follows the image size; a CNN takes any size as it is
        kwargs = {"img_size": args.img_size} if args.img_size and not getattr(args, "cnn", False) else {}
        self.model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **kwargs)
        self.method = build_method(name, getattr(args, "cnn", False))
        self.model.to(self.device)
        memory_format = torch.channels_last if getattr(args, "channels_last", False) else torch.contiguous_format
        if memory_format is torch.channels_last:
            self.model.to(memory_format=memory_format)
        size = args.img_size or self.model.pretrained_cfg["input_size"][-1]
        gen = torch.Generator().manual_seed(args.seed)
        self.images = torch.randn(args.batch, 3, size, size, generator=gen).to(self.device,
                                                                               memory_format=memory_format)
        self.labels = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(self.device)
        self.selection_seconds = self.pass_seconds = None
        if self.method.needs_gradients:
            from grft_lightning.core.selection import Selection

            path = os.path.join(selection_dir, f"{name}.pt")
            if select:  # on the pre-trained model, before any delta exists
                self.selection_seconds = self._select()
                torch.save(self.selection.state_dict(), path)
            else:
                self.selection = Selection.from_state_dict(torch.load(path, weights_only=True))
        else:
            self.selection = self.method.select(self.model)
        self.method.apply(self.model, self.selection)
        if memory_format is torch.channels_last:  # the parameters the method added too
            self.model.to(memory_format=memory_format)
        # the training's groups: tuned tensors only, no weight decay on 1-D ones, the head at the same lr
        groups = parameter_groups(self.model, self.selection.head)
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
        self.loss_fn = self.loss  # what a step calls for its loss (benchmarks.gpu_check compiles it)

    def _autocast(self):
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.dtype)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _select(self) -> float:
        """``accumulate_gradients`` over ``--selection-batches`` batches, then ``method.select``;
        returns the seconds of both (``pass_seconds``: of the pass alone)."""
        clock = time.process_time if self.args.clock == "cpu" else time.perf_counter
        start = clock()
        grads = self.selection_pass(self.args.selection_batches)
        self._sync()
        self.pass_seconds = clock() - start
        self.selection = self.method.select(self.model, grads)
        self._sync()
        return clock() - start

    def selection_pass(self, batches: int) -> dict:
        """The selection pass: ``accumulate_gradients`` (the training's cross-entropy selection
        loss, eval mode, the run's autocast) over ``batches`` copies of the run's batch, for the
        weights the method's selection reads; returns the gradient sums."""
        from grft_lightning import accumulate_gradients
        from grft_lightning.training.losses import selection_loss_fn

        loss_fn = selection_loss_fn("ce")
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                return accumulate_gradients(self.model, [(self.images, self.labels)] * batches, loss_fn,
                                            names=self.method.gradient_names(self.model))
        finally:
            self.model.train(was_training)

    def loss(self):
        """Forward, cross-entropy plus the method's regularizer, under the run's autocast (the
        training step's features and logits, ``losses.features_and_logits``)."""
        import torch.nn.functional as F

        from grft_lightning.training.losses import features_and_logits

        model = self.model
        with self._autocast():
            features, logits = features_and_logits(model, self.images)
            loss = F.cross_entropy(logits.float(), self.labels)
            reg = self.method.regularizer(model, self.images, features)
            return loss if reg is None else loss + reg

    def train_step(self) -> None:
        """One training step, not synchronised: zero_grad, loss, backward, the method's hook, AdamW."""
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn().backward()
        self.method.on_before_optimizer_step(self.model)
        self.optimizer.step()

    def step(self) -> tuple[float, float]:
        """One training step; returns (wall seconds, process CPU seconds)."""
        start, start_cpu = time.perf_counter(), time.process_time()
        self.train_step()
        self._sync()
        return time.perf_counter() - start, time.process_time() - start_cpu


# -- the three phases (each runs in a child process unless --small) ---------------------------
def select_phase(names: list[str], args) -> dict:
    return {name: {"selection_seconds": Run(name, args, args.selection_dir, select=True).selection_seconds}
            for name in names}


def memory_phase(names: list[str], args) -> dict:
    import torch

    from grft_lightning import count_parameters, save_tuned

    (name,) = names
    run = Run(name, args, args.selection_dir)
    _reset_peak(run.device)
    for _ in range(args.memory_steps):
        run.step()
    peak = _peak(run.device)
    state = sum(t.numel() * t.element_size() for s in run.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    counts = count_parameters(run.model)
    with tempfile.TemporaryDirectory() as tmp:
        export_bytes = os.path.getsize(save_tuned(run.model, os.path.join(tmp, "tuned.safetensors"), run.method,
                                                  run.selection))
    return {name: {"peak_memory_bytes": peak, "baseline_memory_bytes": run.baseline, "tuned": int(counts["tuned"]),
                   "tuned_pct": counts["tuned_pct"], "optimizer_state_bytes": int(state), "export_bytes": export_bytes}}


def time_phase(names: list[str], args) -> dict:
    runs = {name: Run(name, args, args.selection_dir) for name in names}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i in range(args.warmup + args.steps):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(runs[name].step())
    out = {}
    for name, measured in times.items():
        wall = statistics.median(t[0] for t in measured[args.warmup:])
        cpu = statistics.median(t[1] for t in measured[args.warmup:])
        out[name] = {"step_seconds": cpu if args.clock == "cpu" else wall, "step_wall_seconds": wall,
                     "step_cpu_seconds": cpu}
    return out


PHASES = {"select": select_phase, "memory": memory_phase, "time": time_phase}


def _phase(phase: str, names: list[str], args) -> dict:
    """Run a phase here (``--small``) or in a fresh child process."""
    if not args.isolate:
        return PHASES[phase](names, args)
    command = [sys.executable, "-m", "benchmarks.cost", "--phase", phase, "--one", ",".join(names)] + _forward_args(args)
    env = {**MALLOC, "HF_HUB_OFFLINE": "1", **os.environ}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.cost --phase {phase} --one {','.join(names)} failed ({done.returncode}):\n"
                           + done.stderr[-4000:])
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    return json.loads(lines[-1][len(MARK):])


def _forward_args(args) -> list[str]:
    out = ["--model", args.model, "--num-classes", str(args.num_classes), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--memory-steps", str(args.memory_steps),
           "--selection-batches", str(args.selection_batches), "--device", args.device, "--dtype", args.dtype,
           "--seed", str(args.seed), "--lr", str(args.lr), "--weight-decay", str(args.weight_decay),
           "--clock", args.clock, "--selection-dir", args.selection_dir]
    out += ["--threads", str(args.threads)] if args.threads else []
    out += ["--channels-last"] if args.channels_last else []
    return out + (["--img-size", str(args.img_size)] if args.img_size else [])


def run_all(args) -> dict:
    import timm
    import torch

    left_out = {name: why for name, why in CNN_LEFT_OUT.items() if args.cnn and name in args.methods}
    names = [name for name in args.methods if name not in left_out]
    rows = {name: {"method": name, "selection_seconds": None} for name in names}
    with tempfile.TemporaryDirectory() as selection_dir:
        args.selection_dir = selection_dir
        for name in names:
            if build_method(name).needs_gradients:
                _merge(rows, _phase("select", [name], args), "select")
        for name in names:
            _merge(rows, _phase("memory", [name], args), "memory")
        _merge(rows, _phase("time", names, args), "time")
    full = rows.get("full")
    for row in rows.values():
        above = row["peak_memory_bytes"] - row["baseline_memory_bytes"]
        row["step_time_ratio"] = row["step_seconds"] / full["step_seconds"] if full else None
        row["peak_memory_ratio"] = row["peak_memory_bytes"] / full["peak_memory_bytes"] if full else None
        # in one process (--small) the resident size before a method includes the previous ones
        row["peak_above_baseline_ratio"] = (above / (full["peak_memory_bytes"] - full["baseline_memory_bytes"])
                                            if full and args.isolate else None)
    device = torch.device(args.device)
    label = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return {
        "device": label, "dtype": args.dtype, "batch": args.batch, "torch": torch.__version__, "timm": timm.__version__,
        "clock": args.clock, "model": args.model, "img_size": args.img_size, "num_classes": args.num_classes,
        "channels_last": args.channels_last, "cnn": args.cnn, "left_out": left_out,
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
        "memory_steps": args.memory_steps, "selection_batches": args.selection_batches, "isolated": args.isolate,
        "malloc": {k: os.environ.get(k, v) for k, v in MALLOC.items()} if args.isolate and device.type == "cpu" else None,
        "peak_memory": "cuda max allocated" if device.type == "cuda" else "VmHWM (max resident set) of the process",
        "rows": [{k: rows[n][k] for k in KEYS + EXTRA_KEYS} for n in names],
    }


def _merge(rows: dict, found: dict, phase: str) -> None:
    for name, values in found.items():
        rows[name].update(values)
        if phase != "time":
            print(f"{phase:6s} {name:12s} " + " ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr, flush=True)
        else:
            print(f"time   {name:12s} step {values['step_seconds']:.3f} s", file=sys.stderr, flush=True)


# -- report -----------------------------------------------------------------------------------
def _size(n: int | None) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def checks(rows: list[dict]) -> list[tuple[str, bool]]:
    """The CPU ViT-B/16 targets (``benchmarks/targets.yaml``, ``cpu_vit_b16``), judged on
    ``step_time_ratio`` and ``peak_memory_ratio`` (ratios to full fine-tuning of the same run) where
    the rows allow; the above-baseline ratio is shown too."""
    r = {row["method"]: row for row in rows}
    t = targets("cpu_vit_b16")

    def mem(key: str) -> str:
        return f"{r[key]['peak_memory_ratio']:.3f}x (above imports {r[key]['peak_above_baseline_ratio']:.3f}x)"

    out = []
    if {"full", "grft_row", "lora"} <= r.keys():
        g, lora = r["grft_row"], r["lora"]
        limit = t["grft_row_step_time"]
        out.append((f"GRFT row step time {g['step_time_ratio']:.3f}x full (<= {limit}) and <= LoRA's "
                    f"{lora['step_time_ratio']:.3f}x",
                    g["step_time_ratio"] <= limit and g["step_seconds"] <= lora["step_seconds"]))
        # rows keep only what no LayerNorm or GELU made (deltas.Recomputable): 0.65; columns 0.75
        for key, limit in (("grft_row", t["grft_row_peak_memory"]), ("grft_column", t["grft_column_peak_memory"])):
            if key in r:
                ok = (r[key]["peak_memory_ratio"] <= limit
                      and r[key]["peak_memory_bytes"] <= lora["peak_memory_bytes"])
                out.append((f"{LABELS[key]} peak memory {mem(key)} full (<= {limit}) and <= LoRA's {mem('lora')}",
                            ok))
    if {"full", "grft_row"} <= r.keys():
        share = r["grft_row"]["optimizer_state_bytes"] / r["full"]["optimizer_state_bytes"]
        limit = t["grft_row_optimizer_state"]
        out.append((f"GRFT row optimizer state {100 * share:.3f} % of full's (< {100 * limit:g} %)", share < limit))
    if {"full", "gps"} <= r.keys():
        limit = t["gps_peak_memory"]
        out.append((f"GPS index-delta peak memory {mem('gps')} full (<= {limit})",
                    r["gps"]["peak_memory_ratio"] <= limit))
    return out


def cnn_checks(rows: list[dict]) -> list[tuple[str, bool]]:
    """The cost target of a CNN table (``benchmarks/targets.yaml``, ``cpu_cnn``): a GRFT row step
    no slower than full fine-tuning's."""
    r = {row["method"]: row for row in rows}
    if not {"full", "grft_row"} <= r.keys():
        return []
    ratio, limit = r["grft_row"]["step_time_ratio"], targets("cpu_cnn")["grft_row_step_time"]
    return [(f"GRFT row step time {ratio:.3f}x full (<= {limit})", ratio <= limit)]


def markdown(result: dict) -> str:
    cpu = result["malloc"] is not None
    clock = {"cpu": "process CPU time (user + system, one thread: the wall time of an idle core)",
             "wall": "wall time"}[result["clock"]]
    notes = [
        f"device: {result['device']}; dtype: {result['dtype']}; batch: {result['batch']}; torch {result['torch']}, "
        f"timm {result['timm']}; torch threads: {result['threads']}",
        f"backbone: `{result['model']}` (random weights, {result['num_classes']} classes"
        f"{', ' + str(result['img_size']) + ' px' if result['img_size'] else ''}); AdamW (weight decay on ndim >= 2); "
        "one fixed synthetic batch, same seed for every method",
        f"step: median {clock} of {result['steps']} steps after {result['warmup']} warm-up steps, all methods in one "
        "process, round-robin (order reversed every other round); the wall column is the same steps' wall time",
        f"selection: `accumulate_gradients` (cross-entropy) over {result['selection_batches']} batches + `select`",
        f"peak memory: {result['peak_memory']} over {result['memory_steps']} steps, reset before the first"
        + ("; one process per method, " + ", ".join(f"{k}={v}" for k, v in result["malloc"].items()) if cpu else "")
        + ("" if result["isolated"] else "; all methods in one process (indicative only)"),
        "above imports: (peak - resident size after importing the method's libraries) / the same for full "
        "fine-tuning" if cpu else "",
        "ratios: to full fine-tuning in the same run",
        "memory format: channels-last (model and images)" if result.get("channels_last") else "",
        "LoRA on this CNN: every convolution but the depthwise ones (`*conv*` minus `*conv_dw`: peft refuses a rank "
        "that is not a multiple of the groups)" if result.get("cnn") else "",
    ] + [f"left out: {LABELS.get(name, name)}: {why}" for name, why in (result.get("left_out") or {}).items()]
    head = "# Training-step cost per method\n\n" + "".join(f"- {n}\n" for n in notes if n) + "\n"
    lines = ["| method | step (s) | step / full | wall (s) | peak memory | peak / full | above imports / full | tuned "
             "| tuned % | optimizer state | selection (s) | export |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        sel = "–" if row["selection_seconds"] is None else f"{row['selection_seconds']:.1f}"
        lines.append(f"| {LABELS.get(row['method'], row['method'])} | {row['step_seconds']:.3f} "
                     f"| {_ratio(row['step_time_ratio'])} | {row['step_wall_seconds']:.2f} "
                     f"| {_size(row['peak_memory_bytes'])} | {_ratio(row['peak_memory_ratio'])} "
                     f"| {_ratio(row['peak_above_baseline_ratio'])} | {row['tuned']:,} | {row['tuned_pct']:.3f} "
                     f"| {_size(row['optimizer_state_bytes'])} | {sel} | {_size(row['export_bytes'])} |")
    if result["isolated"] and result["model"] == "vit_base_patch16_224":
        found, title = checks(result["rows"]), "set for ViT-B/16, CPU fp32, batch 8"
    elif result["isolated"] and result.get("cnn"):
        found, title = cnn_checks(result["rows"]), "set for CNNs"
    else:
        found, title = [], ""
    tail = "" if not found else f"\n\n## Targets ({title})\n\n" + "\n".join(
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
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of the memory phase (the optimizer state "
                   "exists from the second on)")
    p.add_argument("--selection-batches", type=int, default=4, help="batches of the timed selection pass")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--clock", default=None, choices=["wall", "cpu"],
                   help="clock of step_seconds (default: cpu on a CPU, wall on a GPU; see above)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with the cpu clock)")
    p.add_argument("--channels-last", action="store_true", help="model and images in torch.channels_last memory format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="on tensors with ndim >= 2")
    p.add_argument("--small", action="store_true",
                   help="quick check: test_vit at 32 px, batch 2, 1+2 steps, 1 selection batch, all in this process")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (e.g. benchmarks/results/cost_cpu)")
    p.add_argument("--phase", default=None, choices=list(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--selection-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.model, args.img_size, args.steps, args.warmup, args.selection_batches = "test_vit", 32, 2, 1, 1
        args.memory_steps, args.batch = 2, args.batch or 2
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = args.device.startswith("cuda")
    args.batch = args.batch or (64 if on_gpu else 8)
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.clock = args.clock or ("wall" if on_gpu else "cpu")
    args.threads = args.threads or (1 if args.clock == "cpu" or args.small else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.isolate = not args.small
    args.cnn = is_cnn(args.model)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    return args


def is_cnn(model_name: str) -> bool:
    """Whether a timm model has no transformer blocks (no ``attn``/``mlp`` sub-module); built on
    the meta device, so nothing is allocated. False for a name timm does not know: building the
    model in a phase then fails with timm's message, where the caller records it."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False)
    except RuntimeError:  # timm: "Unknown model (...)"
        return False
    return not any(name.rsplit(".", 1)[-1] in ("attn", "mlp") for name, _ in model.named_modules())


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.phase:  # a child of run_all
        print(MARK + json.dumps(PHASES[args.phase](args.one.split(","), args)), flush=True)
        return None
    result = run_all(args)
    write_table(args.out, result, markdown(result))
    return result


def write_table(out: str | None, result: dict, text: str, indent: int = 2) -> None:
    """Print a benchmark's markdown and, with ``out``, write ``OUT.json`` and ``OUT.md``."""
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".json", "w") as handle:
            json.dump(result, handle, indent=indent)
            handle.write("\n")
        with open(out + ".md", "w") as handle:
            handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
