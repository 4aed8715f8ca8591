"""The GPU cost check: one command, a few minutes on one GPU, every figure from the same run.

    scripts/gpu_check.sh                 # ViT-B/16, bf16 autocast, batch 64, 224 px: about 5-8 minutes
    scripts/gpu_check.sh --smoke         # the same phases on the CPU, test_vit at 32 px (tests)

(``scripts/gpu_check.sh`` installs jsonargparse from ``.gpu_wheels/`` when it is missing, then
runs ``python -m benchmarks.gpu_check`` from the repository root.) Writes ``OUT.json`` and ``OUT.md`` (default ``benchmarks/results/cost_gpu``;
``--smoke``: a temporary folder) after every phase, so that a crash or a time-out late keeps the
tables already measured, prints the tables at the end and exits 1 when a phase failed.

Phases, each in its own process with its own time budget (``--budget-*``), all within
``--total`` seconds, in this order:

1. *methods*: :mod:`benchmarks.cost`'s select, memory and time phases in one process, for full,
   linear, BitFit, LoRA, Adapter, GPS (index deltas), GPS masked, GRFT row and column: images/s
   (batch / median synchronised step time, all methods round-robin), ``max_memory_allocated``
   over training steps (reset after the model, selection and optimizer exist), each as a ratio
   to full fine-tuning of the same run.
2. *selection*: the selection pass (``accumulate_gradients``, cross-entropy, on the pre-trained
   model, for the GRFT row method's weights, before the method is applied) over
   ``--epoch-images`` images against one full-fine-tuning epoch of
   the same images (training steps back to back, synchronised once), medians of ``--repeats``
   after one warm-up each.
3. *fit*: ``python train.py fit`` of the backbone under ``--trainer.precision bf16-mixed`` on
   ``grft_lightning.data.SyntheticImages`` for ``--fit-steps`` steps (one epoch), W&B disabled,
   for full fine-tuning and GRFT row (their registry files, ``configs/methods/full.yaml`` and
   ``grft_row.yaml``, GRFT at cost.py's 4 rows per matrix); images/s from ``results.json``'s
   ``train_seconds`` (the Lightning loop end to end: loader, logging and the epoch-end checkpoint
   included).
4. *compile*: full fine-tuning and GRFT row with the loss (forward, head, cross-entropy,
   regulariser) eager and under ``torch.compile``; backward and AdamW stay eager.

Every phase runs with ``wandb`` made unimportable (W&B is disabled; the GPU machine has none).

Targets beside the measured ratios (``benchmarks/targets.yaml``, ``gpu_vit_b16``): GRFT row at
least 1.35x full fine-tuning's images/s and at most 0.7x its peak memory; the selection pass at
most 1.2x one epoch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from benchmarks import ROOT as REPO, cost, targets  # cost: the methods, runs and phases

ROOT = str(REPO)

PHASES = ["methods", "selection", "fit", "compile"]
FIT_LABELS = {"full": "full fine-tuning", "grft_row": "GRFT row (4/matrix)"}


def _fit_method(name: str) -> list[str]:
    """``train.py`` options of a fitted method: its registry file and cost.py's budget on top."""
    options = ["--config", str(cost.REGISTRY_DIR / f"{name}.yaml")]
    for key, value in cost.BUDGETS.get(name, {}).items():
        options += [f"--model.method.init_args.{key}", str(value)]
    return options


FIT_METHODS = {name: _fit_method(name) for name in ("full", "grft_row")}
COMPILE_METHODS = ["full", "grft_row"]
#: the GPU targets (benchmarks/targets.yaml, gpu_vit_b16): images/s at least, peak and pass at most
TARGETS = targets("gpu_vit_b16")
BLOCKED = ["wandb"]  # W&B is disabled: nothing on the benchmark's path may import it

GPU = dict(model="vit_base_patch16_224", img_size=224, batch=64, dtype="bf16", device="cuda", steps=20, warmup=5,
           memory_steps=3, selection_batches=4, epoch_images=1024, repeats=3, fit_steps=300, fit_workers=8,
           compile_backend="inductor", compile_steps=20, compile_warmup=3, total=450,
           budget_methods=150, budget_selection=90, budget_fit=150, budget_compile=180, min_phase=30)
SMOKE = dict(model="test_vit", img_size=32, batch=4, dtype="bf16", device="cpu", steps=2, warmup=1,
             memory_steps=2, selection_batches=1, epoch_images=8, repeats=1, fit_steps=4, fit_workers=0,
             compile_backend="eager", compile_steps=2, compile_warmup=1, total=1500,
             budget_methods=600, budget_selection=300, budget_fit=600, budget_compile=400, min_phase=5)
# (the smoke budgets only catch a hang: on a shared CPU a phase of 10 CPU seconds can take minutes)


# -- small helpers -----------------------------------------------------------------------------
def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def _read_json(path: str) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _cost_args(cfg: dict, methods: list[str], selection_dir: str, **override):
    """benchmarks.cost's options for this check (its parser fills the rest)."""
    o = {**cfg, **override}
    argv = ["--methods", ",".join(methods), "--model", o["model"], "--img-size", str(o["img_size"]),
            "--batch", str(o["batch"]), "--steps", str(o["steps"]), "--warmup", str(o["warmup"]),
            "--memory-steps", str(o["memory_steps"]), "--selection-batches", str(o["selection_batches"]),
            "--device", o["device"], "--dtype", o["dtype"], "--clock", "wall"]
    if not o["device"].startswith("cuda"):
        argv += ["--threads", "1"]  # OpenMP's spinning threads crawl on a shared CPU
    args = cost.parse_args(argv)
    args.selection_dir, args.isolate = selection_dir, False
    return args


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _error() -> str:
    return traceback.format_exc(limit=6)[-3000:]


# -- phase 1: methods -----------------------------------------------------------------------------
def phase_methods(cfg: dict, work: str, save) -> bool:
    import torch

    out: dict = {"rows": {m: {"method": m, "selection_seconds": None} for m in cost.METHODS}, "errors": {}}
    cuda = cfg["device"].startswith("cuda")
    with tempfile.TemporaryDirectory(dir=work) as selection_dir:
        args = _cost_args(cfg, cost.METHODS, selection_dir)
        for name in cost.METHODS:
            if cost.build_method(name).needs_gradients:
                try:
                    out["rows"][name].update(cost.select_phase([name], args)[name])
                except Exception:
                    out["errors"][f"select {name}"] = _error()
                _free()
                save(out)
        for name in cost.METHODS:
            if f"select {name}" in out["errors"]:
                continue
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                out["rows"][name].update(cost.memory_phase([name], args)[name])
                if cuda:
                    out["rows"][name]["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
            except Exception:
                out["errors"][f"memory {name}"] = _error()
            _free()
            save(out)
        timed = [m for m in cost.METHODS if f"select {m}" not in out["errors"]]
        try:
            for name, values in cost.time_phase(timed, args).items():
                out["rows"][name].update(values)
                out["rows"][name]["images_per_second"] = args.batch / values["step_seconds"]
        except Exception:
            out["errors"]["time"] = _error()
        save(out)
    return not out["errors"]


# -- phase 2: selection pass against one epoch ---------------------------------------------------
def phase_selection(cfg: dict, work: str, save) -> bool:
    batches = max(1, cfg["epoch_images"] // cfg["batch"])
    out: dict = {"images": batches * cfg["batch"], "batches": batches, "batch": cfg["batch"],
                 "repeats": cfg["repeats"], "method": "grft_row", "errors": {}}
    with tempfile.TemporaryDirectory(dir=work) as selection_dir:
        args = _cost_args(cfg, ["full", "grft_row"], selection_dir, selection_batches=batches)
        full = None
        try:
            full = cost.Run("full", args, selection_dir)
            epochs = []
            for _ in range(1 + cfg["repeats"]):  # the first is a warm-up
                full._sync()
                start = time.perf_counter()
                for _ in range(batches):
                    full.train_step()
                full._sync()
                epochs.append(time.perf_counter() - start)
            out["epoch_seconds_all"] = epochs
            out["epoch_seconds"] = _median(epochs[1:])
        except Exception:
            out["errors"]["epoch"] = _error()
        full = None
        _free()
        save(out)
        passes, selects, run = [], [], None
        try:
            for _ in range(1 + cfg["repeats"]):  # a fresh model each time: the pass before GRFT row is applied
                run = cost.Run("grft_row", args, selection_dir, select=True)
                passes.append(run.pass_seconds)
                selects.append(run.selection_seconds - run.pass_seconds)
                run = None
                _free()
            out["pass_seconds_all"], out["select_seconds_all"] = passes, selects
            out["pass_seconds"], out["select_seconds"] = _median(passes[1:]), _median(selects[1:])
        except Exception:
            out["errors"]["pass"] = _error()
        if "epoch_seconds" in out and "pass_seconds" in out:
            out["pass_vs_epoch"] = out["pass_seconds"] / out["epoch_seconds"]
            out["pass_and_select_vs_epoch"] = (out["pass_seconds"] + out["select_seconds"]) / out["epoch_seconds"]
        save(out)
    return not out["errors"]


# -- phase 3: train.py fit ------------------------------------------------------------------------
def _blocker(work: str) -> str:
    """A folder that, first on PYTHONPATH, makes every module in BLOCKED fail to import."""
    folder = os.path.join(work, "blocked_imports")
    for name in BLOCKED:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        with open(os.path.join(folder, name, "__init__.py"), "w") as handle:
            handle.write(f"raise ModuleNotFoundError('{name} is not to be imported here (benchmarks.gpu_check)', "
                         f"name='{name}')\n")
    return folder


def fit_command(cfg: dict, method: str, run_dir: str) -> list[str]:
    steps, batch = cfg["fit_steps"], cfg["batch"]
    cuda = cfg["device"].startswith("cuda")
    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(cfg["dtype"], "32")
    return [sys.executable, os.path.join(ROOT, "train.py"), "fit",
            "--seed_everything", "0",
            "--trainer.accelerator", "gpu" if cuda else "cpu", "--trainer.devices", "1",
            "--trainer.precision", precision,
            "--trainer.max_epochs", "1", "--trainer.max_steps", str(steps),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", str(max(1, min(50, steps))),
            "--model.backbone", cfg["model"], "--model.pretrained", "false",
            "--model.image_size", str(cfg["img_size"]),
            *FIT_METHODS[method],
            "--data", "grft_lightning.data.SyntheticImages", "--data.num_classes", "100",
            "--data.n_train", str(steps * batch), "--data.n_val", str(batch), "--data.n_test", str(batch),
            "--data.size", "32", "--data.batch_size", str(batch), "--data.num_workers", str(cfg["fit_workers"]),
            "--selection.loss", "ce", "--selection.max_batches", str(max(1, cfg["epoch_images"] // batch)),
            "--selection.progress", "false",
            "--checkpoint_every_n_steps", "null", "--wandb.mode", "disabled",
            "--run_dir", run_dir]


def phase_fit(cfg: dict, work: str, save) -> bool:
    out: dict = {"rows": [], "errors": {}, "steps": cfg["fit_steps"], "batch": cfg["batch"]}
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")  # PYTHONPATH: see run_check
    for method in cfg["fit_methods"]:
        run_dir = os.path.join(work, "fit", method)
        command = fit_command(cfg, method, run_dir)
        out["command"] = " ".join(command[1:])
        print(f"[fit] {method}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env)
        wall = time.perf_counter() - start
        results = _read_json(os.path.join(run_dir, "results.json"))
        if done.returncode != 0 or not results:
            out["errors"][method] = f"train.py fit exited {done.returncode}" + ("" if results else ", no results.json")
            save(out)
            continue
        images = cfg["fit_steps"] * cfg["batch"]
        out["rows"].append({
            "method": method, "steps": cfg["fit_steps"], "images": images,
            "train_seconds": results["train_seconds"], "images_per_second": images / results["train_seconds"],
            "selection_seconds": results["selection_seconds"], "peak_memory_bytes": results["peak_memory_bytes"],
            "tuned": results["tuned"], "tuned_pct": results["tuned_pct"], "test_acc": results["test_acc"],
            "process_seconds": wall, "results": results,
        })
        save(out)
    full = next((r for r in out["rows"] if r["method"] == "full"), None)
    for row in out["rows"]:
        row["images_per_second_ratio"] = row["images_per_second"] / full["images_per_second"] if full else None
        row["peak_memory_ratio"] = row["peak_memory_bytes"] / full["peak_memory_bytes"] if full else None
    save(out)
    return not out["errors"]


# -- phase 4: torch.compile ------------------------------------------------------------------------
def _graph_counts() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
                "graph_breaks": int(sum(counters["graph_break"].values()))}
    except Exception:  # an internal API: figures only when it is there
        return {}


def _clear_counters() -> None:
    try:
        from torch._dynamo.utils import counters

        counters.clear()
    except Exception:
        pass


def _timed(run, cfg: dict, warmup: int) -> tuple[float, int]:
    """Median wall step time and peak memory over ``compile_steps`` steps after ``warmup``."""
    for _ in range(warmup):
        run.step()
    cost._reset_peak(run.device)
    times = [run.step()[0] for _ in range(cfg["compile_steps"])]
    return _median(times), cost._peak(run.device)


def phase_compile(cfg: dict, work: str, save) -> bool:
    import torch

    out: dict = {"rows": [], "errors": {}, "backend": cfg["compile_backend"], "steps": cfg["compile_steps"]}
    with tempfile.TemporaryDirectory(dir=work) as selection_dir:
        args = _cost_args(cfg, COMPILE_METHODS, selection_dir)
        for name in COMPILE_METHODS:
            row: dict = {"method": name}
            out["rows"].append(row)
            run = None
            try:
                run = cost.Run(name, args, selection_dir, select=cost.build_method(name).needs_gradients)
                step, peak = _timed(run, cfg, cfg["warmup"])
                row.update(eager_images_per_second=args.batch / step, eager_peak_memory_bytes=peak)
                save(out)
                torch._dynamo.reset()
                _clear_counters()
                run.loss_fn = torch.compile(run.loss, backend=cfg["compile_backend"])
                row["compile_seconds"] = run.step()[0]  # the first compiled step: tracing and code generation
                step, peak = _timed(run, cfg, cfg["compile_warmup"])
                row.update(compiled_images_per_second=args.batch / step, compiled_peak_memory_bytes=peak,
                           **_graph_counts())
                row["speedup"] = row["compiled_images_per_second"] / row["eager_images_per_second"]
            except Exception:
                out["errors"][name] = _error()
            run = None
            _free()
            save(out)
    r = {row["method"]: row for row in out["rows"]}
    if all(k in r and "compiled_images_per_second" in r[k] for k in ("full", "grft_row")):
        out["grft_row_vs_full_compiled"] = (r["grft_row"]["compiled_images_per_second"]
                                            / r["full"]["compiled_images_per_second"])
        out["grft_row_vs_full_eager"] = r["grft_row"]["eager_images_per_second"] / r["full"]["eager_images_per_second"]
    save(out)
    return not out["errors"]


PHASE_FUNCTIONS = {"methods": phase_methods, "selection": phase_selection, "fit": phase_fit, "compile": phase_compile}


# -- the whole check (parent process) -----------------------------------------------------------
def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_info(cfg: dict) -> dict:
    import torch

    info = {"torch": torch.__version__, "timm": _version("timm"), "lightning": _version("lightning"),
            "jsonargparse": _version("jsonargparse"),
            "python": platform.python_version(), "cuda_runtime": torch.version.cuda, "host": platform.node(),
            "cpus": os.cpu_count()}
    if cfg["device"].startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_bytes=int(props.total_memory), multiprocessors=props.multi_processor_count,
                    driver=_driver_version())
        try:
            api = int(torch._C._cuda_getDriverVersion())
            info["cuda_driver_api"] = f"{api // 1000}.{api % 1000 // 10}"
        except Exception:
            info["cuda_driver_api"] = None
    else:
        info["name"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def _driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as handle:
            first = handle.readline()
        return next(word for word in first.split() if word[:1].isdigit() and "." in word)
    except (OSError, StopIteration):
        return None


def targets(result: dict) -> list[dict]:
    """The targets, each with the measured ratio (None when its phase has no figure)."""
    rows = {r["method"]: r for r in result.get("methods", {}).get("rows", [])}
    g = rows.get("grft_row", {})
    sel = result.get("selection", {})
    found = [
        ("GRFT row images/s / full fine-tuning's", ">=", TARGETS["grft_row_images_per_second"],
         g.get("images_per_second_ratio")),
        ("GRFT row peak memory / full fine-tuning's", "<=", TARGETS["grft_row_peak_memory"], g.get("peak_memory_ratio")),
        ("selection pass / one full-fine-tuning epoch", "<=", TARGETS["selection_vs_epoch"], sel.get("pass_vs_epoch")),
    ]
    return [{"name": name, "op": op, "target": target, "measured": value,
             "ok": None if value is None else (value >= target if op == ">=" else value <= target)}
            for name, op, target, value in found]


def finish_methods(phase: dict, batch: int) -> dict:
    """Rows in cost.METHODS order with the ratios to full fine-tuning of the same run."""
    rows = [phase["rows"][m] for m in cost.METHODS if m in phase.get("rows", {})]
    full = phase.get("rows", {}).get("full", {})
    for row in rows:
        ips, peak = row.get("images_per_second"), row.get("peak_memory_bytes")
        row["images_per_second_ratio"] = ips / full["images_per_second"] if ips and full.get("images_per_second") else None
        row["peak_memory_ratio"] = peak / full["peak_memory_bytes"] if peak and full.get("peak_memory_bytes") else None
        row["step_time_ratio"] = (row["step_seconds"] / full["step_seconds"]
                                  if row.get("step_seconds") and full.get("step_seconds") else None)
    return {"rows": rows, "errors": phase.get("errors", {}), "batch": batch}


def _stop(child: subprocess.Popen) -> None:
    """End a phase's process group: SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(child.pid, sig)
            child.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _run_phase(name: str, work: str, timeout: float, progress) -> tuple[str, str | None, dict]:
    """Run one phase in a child process, in its own process group (a time-out ends all of it);
    ``progress(found)`` receives the phase's partial results whenever its file changes."""
    out_file = os.path.join(work, f"{name}.json")
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--phase", name, "--work", work]
    child = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    status, error, seen = "ok", None, None
    deadline = time.perf_counter() + timeout
    try:
        while True:
            try:
                rc = child.wait(timeout=max(0.1, min(5.0, deadline - time.perf_counter())))
                break
            except subprocess.TimeoutExpired:
                stamp = os.path.getmtime(out_file) if os.path.exists(out_file) else None
                if stamp != seen:
                    seen = stamp
                    progress(_read_json(out_file))
                if time.perf_counter() >= deadline:
                    raise
        if rc != 0:
            status, error = "failed", f"exit status {rc}"
    except subprocess.TimeoutExpired:
        status, error = "timed out", f"over its {timeout:.0f} s"
        _stop(child)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): end the phase, keep what it wrote
        _stop(child)
        raise
    found = _read_json(out_file)
    if found.get("errors") and status == "ok":
        status = "failed"
    if found.get("errors"):
        error = "; ".join(([error] if error else [])
                          + [f"{k}: {v.strip().splitlines()[-1]}" for k, v in found["errors"].items()])
    return status, error, found


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_check(cfg: dict) -> int:
    started = time.perf_counter()
    deadline = started + cfg["total"]
    if not cfg["device"].startswith("cuda"):
        os.environ["OMP_NUM_THREADS"] = "1"  # every child and train.py: one torch thread (see _cost_args)
    signal.signal(signal.SIGTERM, _interrupt)
    work = tempfile.mkdtemp(prefix="gpu_check_")
    _write_json(os.path.join(work, "config.json"), cfg)
    # every phase and train.py: W&B unimportable, this checkout's grft_lightning
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [_blocker(work), ROOT, os.environ.get("PYTHONPATH")] if p)
    result: dict = {"kind": "gpu cost check", "smoke": cfg["smoke"], "config": cfg, "work_dir": work,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "device": device_info(cfg),
                    "phases": {p: {"status": "pending" if p in cfg["phases"] else "not run",
                                   "budget_s": cfg[f"budget_{p}"]} for p in PHASES}}

    def write() -> None:
        result["targets"] = targets(result)
        result["elapsed_s"] = time.perf_counter() - started
        os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
        _write_json(cfg["out"] + ".json", result)
        with open(cfg["out"] + ".md", "w") as handle:
            handle.write(markdown(result))

    def record(name: str, found: dict) -> None:
        result[name] = finish_methods(found, cfg["batch"]) if name == "methods" else found

    write()
    print(f"[gpu_check] {result['device'].get('name')}; writing {cfg['out']}.{{json,md}}; work folder {work}",
          flush=True)
    name = None
    try:
        for name in PHASES:
            if name not in cfg["phases"]:
                continue
            left = deadline - time.perf_counter()
            entry = result["phases"][name]
            if left < cfg["min_phase"]:
                entry.update(status="skipped", error=f"{left:.0f} s left of --total {cfg['total']} s")
                write()
                continue
            timeout = min(cfg[f"budget_{name}"], left)
            print(f"[gpu_check] phase {name} (up to {timeout:.0f} s)", flush=True)
            start, cpu = time.perf_counter(), _children_cpu()
            entry["status"] = "running"

            def progress(found: dict, name: str = name) -> None:
                record(name, found)
                write()

            status, error, found = _run_phase(name, work, timeout, progress)
            entry.update(status=status, seconds=round(time.perf_counter() - start, 1), timeout_s=round(timeout),
                         cpu_seconds=round(_children_cpu() - cpu, 1), **({"error": error} if error else {}))
            record(name, found)
            print(f"[gpu_check] phase {name}: {status} in {entry['seconds']} s" + (f" ({error})" if error else ""),
                  flush=True)
            write()
    except KeyboardInterrupt as stop:
        if name is not None and result["phases"][name]["status"] == "running":
            result["phases"][name].update(status="interrupted", error=str(stop) or "interrupted")
            record(name, _read_json(os.path.join(work, f"{name}.json")))
        for entry in result["phases"].values():
            if entry["status"] == "pending":
                entry["status"] = "not reached"
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if not cfg["keep_work"]:  # the fits' checkpoints and exports (GBs on ViT-B/16)
        shutil.rmtree(work, ignore_errors=True)
        result["work_dir"] = None
    write()
    print(markdown(result), flush=True)
    failed = [p for p in cfg["phases"] if result["phases"][p]["status"] != "ok"]
    if failed:
        print(f"[gpu_check] FAILED phases: {', '.join(failed)} (partial results in {cfg['out']}.json)",
              file=sys.stderr)
    return 1 if failed else 0


# -- report ------------------------------------------------------------------------------------------
def _size(n) -> str:
    return "–" if n is None else cost._size(int(n))


def _num(x, fmt: str = "{:,.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(result: dict) -> str:
    cfg, dev = result["config"], result["device"]
    smoke = " (SMOKE: CPU, tiny model; the figures mean nothing)" if result["smoke"] else ""
    gpu = (f"{dev.get('name')}, compute capability {dev.get('capability')}, {_size(dev.get('memory_bytes'))}; "
           f"driver {dev.get('driver')}, CUDA driver API {dev.get('cuda_driver_api')}, CUDA runtime "
           f"{dev.get('cuda_runtime')}" if "capability" in dev else str(dev.get("name")))
    lines = [f"# GPU cost check{smoke}", "",
             f"- device: {gpu}",
             f"- torch {dev['torch']}, timm {dev['timm']}, lightning {dev['lightning']}, jsonargparse "
             f"{dev.get('jsonargparse')}, Python {dev['python']}; started {result['started']}, "
             f"{result.get('elapsed_s', 0):.0f} s in all",
             f"- backbone `{cfg['model']}` (random weights, 100 classes, {cfg['img_size']} px), batch {cfg['batch']}, "
             f"{cfg['dtype']} autocast, AdamW; one fixed synthetic batch per method (phases 1, 2, 4)",
             "- ratios: to full fine-tuning of the same phase and process", ""]
    lines += ["## Phases", "", "| phase | status | seconds | CPU seconds | budget (s) | note |",
              "|---|---|---:|---:|---:|---|"]
    for name in PHASES:
        p = result["phases"][name]
        lines.append(f"| {name} | {p['status']} | {_num(p.get('seconds'))} | {_num(p.get('cpu_seconds'))} "
                     f"| {p.get('timeout_s', p['budget_s'])} "
                     f"| {p.get('error', '').replace('|', '/')} |")
    lines += ["", "## Targets", ""]
    for t in result.get("targets", []):
        mark = {True: "x", False: " ", None: "?"}[t["ok"]]
        lines.append(f"- [{mark}] {t['name']}: {_num(t['measured'], '{:.3f}x')} (target {t['op']} {t['target']}x)")
    m = result.get("methods")
    if m:
        lines += ["", "## 1. Training step per method (eager)", "",
                  f"images/s: batch / median synchronised wall step time of {cfg['steps']} steps after "
                  f"{cfg['warmup']} warm-up steps, all methods in one process, round-robin; peak: "
                  f"`torch.cuda.max_memory_allocated` over {cfg['memory_steps']} steps, reset after the model, "
                  "selection and optimizer exist (CPU: the process's VmHWM); selection: "
                  f"`accumulate_gradients` over {cfg['selection_batches']} batches + `select`.", "",
                  "| method | images/s | / full | step (ms) | peak memory | / full | peak reserved | tuned % "
                  "| optimizer state | selection (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in m.get("rows", []):
            lines.append(
                f"| {cost.LABELS[row['method']]} | {_num(row.get('images_per_second'))} "
                f"| {_num(row.get('images_per_second_ratio'), '{:.2f}')} "
                f"| {_num(row['step_seconds'] * 1000 if row.get('step_seconds') else None)} "
                f"| {_size(row.get('peak_memory_bytes'))} | {_num(row.get('peak_memory_ratio'), '{:.2f}')} "
                f"| {_size(row.get('peak_reserved_bytes'))} | {_num(row.get('tuned_pct'), '{:.3f}')} "
                f"| {_size(row.get('optimizer_state_bytes'))} | {_num(row.get('selection_seconds'), '{:.2f}')} |")
    s = result.get("selection")
    if s:
        batches = max(1, cfg["epoch_images"] // cfg["batch"])
        lines += ["", "## 2. Selection pass against one epoch", "",
                  f"{batches * cfg['batch']} images ({batches} batches of {cfg['batch']}), medians of "
                  f"{cfg['repeats']} after a warm-up. Pass: `accumulate_gradients` (cross-entropy, eval mode) on "
                  "the pre-trained model (GRFT row's weights); select: GRFT's scoring and top-k; epoch: full "
                  "fine-tuning's training steps back to back. (The VTAB-1k configs select with SupCon: two views "
                  "per image, about twice this pass.)", "",
                  "| pass (s) | select (s) | full epoch (s) | pass / epoch | (pass + select) / epoch |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {_num(s.get('pass_seconds'), '{:.3f}')} | {_num(s.get('select_seconds'), '{:.3f}')} "
                  f"| {_num(s.get('epoch_seconds'), '{:.3f}')} | {_num(s.get('pass_vs_epoch'), '{:.3f}')} "
                  f"| {_num(s.get('pass_and_select_vs_epoch'), '{:.3f}')} |"]
    f = result.get("fit")
    if f:
        lines += ["", "## 3. `train.py fit` (Lightning, end to end)", "",
                  f"{cfg['fit_steps']} steps of batch {cfg['batch']} (one epoch of `SyntheticImages`, 32 px images resized "
                  "to the model's size by the loader), no validation, W&B disabled; images/s: "
                  "images / `results.json` `train_seconds` (training start to end: loader, logging, the epoch-end "
                  "checkpoint); peak: `results.json` `peak_memory_bytes`.", "",
                  "| method | steps | train (s) | images/s | / full | peak memory | / full | selection (s) | process (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in f.get("rows", []):
            lines.append(f"| {FIT_LABELS.get(row['method'], row['method'])} | {row['steps']} "
                         f"| {row['train_seconds']:.1f} | {row['images_per_second']:,.1f} "
                         f"| {_num(row.get('images_per_second_ratio'), '{:.2f}')} | {_size(row['peak_memory_bytes'])} "
                         f"| {_num(row.get('peak_memory_ratio'), '{:.2f}')} | {row['selection_seconds']:.1f} "
                         f"| {row['process_seconds']:.0f} |")
    c = result.get("compile")
    if c:
        lines += ["", "## 4. torch.compile", "",
                  f"The step's loss (forward, head, cross-entropy, regulariser) under `torch.compile` (backend "
                  f"`{cfg['compile_backend']}`), backward and AdamW eager; median of {cfg['compile_steps']} steps each; "
                  "compile: the "
                  "first compiled step.", "",
                  "| method | eager images/s | compiled images/s | compiled / eager | compile (s) | eager peak "
                  "| compiled peak | graphs | graph breaks |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in c.get("rows", []):
            lines.append(f"| {cost.LABELS[row['method']]} | {_num(row.get('eager_images_per_second'))} "
                         f"| {_num(row.get('compiled_images_per_second'))} | {_num(row.get('speedup'), '{:.2f}')} "
                         f"| {_num(row.get('compile_seconds'))} | {_size(row.get('eager_peak_memory_bytes'))} "
                         f"| {_size(row.get('compiled_peak_memory_bytes'))} | {row.get('graphs', '–')} "
                         f"| {row.get('graph_breaks', '–')} |")
        if "grft_row_vs_full_compiled" in c:
            lines += ["", f"GRFT row / full images/s: eager {c['grft_row_vs_full_eager']:.2f}x, "
                          f"compiled {c['grft_row_vs_full_compiled']:.2f}x."]
    return "\n".join(lines) + "\n"


# -- command line --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE", "") not in ("", "0"),
                   help="the CPU smoke run: test_vit, 32 px, batch 4, 2 steps per method, a fit of 4 steps, "
                        "into a temporary folder (also SMOKE=1)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (default: benchmarks/results/cost_gpu; "
                                               "--smoke: a new temporary folder)")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    p.add_argument("--fit-methods", default="full,grft_row", help="methods fitted with train.py")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (the fits' run directories: "
                   "checkpoints, tuned.safetensors, metrics.csv); by default it is removed at the end")
    for key, value in GPU.items():
        if key in ("model", "device", "dtype", "compile_backend"):
            p.add_argument(f"--{key.replace('_', '-')}", default=None, help=f"default {value} (smoke: {SMOKE[key]})")
        else:
            unit = " (seconds)" if key.startswith(("budget", "total", "min")) else ""
            p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                           help=f"default {value} (smoke: {SMOKE[key]}){unit}")
    p.add_argument("--phase", default=None, choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        return {"phase": args.phase, "work": args.work}
    cfg = dict(SMOKE if args.smoke else GPU)
    cfg.update({k: v for k, v in vars(args).items() if k in cfg and v is not None})
    cfg["smoke"], cfg["keep_work"] = args.smoke, args.keep_work
    cfg["phases"] = [x for x in args.phases.split(",") if x]
    cfg["fit_methods"] = [x for x in args.fit_methods.split(",") if x]
    bad = [x for x in cfg["phases"] if x not in PHASES] + [x for x in cfg["fit_methods"] if x not in FIT_METHODS]
    if bad:
        p.error(f"unknown phase or fit method: {bad}")
    cfg["out"] = args.out or (os.path.join(tempfile.mkdtemp(prefix="gpu_check_smoke_"), "cost_gpu") if args.smoke
                              else os.path.join(ROOT, "benchmarks", "results", "cost_gpu"))
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if "phase" in cfg:  # a child of run_check
        work = cfg["work"]
        config = _read_json(os.path.join(work, "config.json"))
        out_file = os.path.join(work, f"{cfg['phase']}.json")
        ok = PHASE_FUNCTIONS[cfg["phase"]](config, work, lambda data: _write_json(out_file, data))
        return 0 if ok else 1
    if cfg["device"].startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; --smoke runs the CPU smoke check", file=sys.stderr)
            return 2
    return run_check(cfg)


if __name__ == "__main__":
    sys.exit(main())
