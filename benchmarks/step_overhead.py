"""Where GRFT row's training step spends the time BitFit's does not (CPU, one thread).

    python -m benchmarks.step_overhead --out benchmarks/results/step_overhead_cpu   # ViT-B/16, ~6 min
    python -m benchmarks.step_overhead --small                                      # tiny ViT, seconds

BitFit is the floor of every sparse method here: the same frozen products forward and backward
(no weight gradient), so GRFT row's step minus BitFit's is what the row deltas cost. This runs, in
one process, the cost benchmark's runs (:class:`benchmarks.cost.Run`: its registry methods,
budgets, batch, seed and optimizer) of full fine-tuning, BitFit, GRFT row and GRFT row with the
input recomputation switched off (:func:`grft_lightning.core.recompute.untrack_layer_inputs`:
each delta layer keeps its input instead of recomputing it from the LayerNorm or GELU before it,
the memory it saves is in ``benchmarks/results/saved_activations_cpu.md``). The steps go
round-robin, the order reversed every other round, and each variant's median process CPU time is
reported with its ratio to full fine-tuning's. Then profiled steps of BitFit and GRFT row give each
operator's (name and input shapes) least self CPU time, and the table lists the operators whose
time differs most: those GRFT row alone runs are what its kernels add; the others are the same
work, whose time varies with the machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from benchmarks import cost

VARIANTS = ["full", "bitfit", "grft_row", "grft_row_no_recompute"]
LABELS = {"full": "full fine-tuning", "bitfit": "BitFit", "grft_row": "GRFT row (4/matrix)",
          "grft_row_no_recompute": "GRFT row, inputs kept (no recomputation)"}


def build_runs(args) -> dict:
    """The four variants' :class:`benchmarks.cost.Run`, GRFT row's selection made once."""
    from grft_lightning.core.recompute import untrack_layer_inputs

    selection_dir = tempfile.mkdtemp()
    cost.Run("grft_row", args, selection_dir, select=True)
    runs = {name: cost.Run(name, args, selection_dir) for name in ("full", "bitfit", "grft_row")}
    runs["grft_row_no_recompute"] = cost.Run("grft_row", args, selection_dir)
    untrack_layer_inputs(runs["grft_row_no_recompute"].model)
    return runs


def time_steps(runs: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Process CPU seconds of ``rounds`` steps per variant, round-robin, order reversed every other round."""
    for run in runs.values():
        for _ in range(warmup):
            run.step()
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds[name].append(runs[name].step()[1])
    return seconds


def operator_times(run, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per ATen operator and input shapes: the least over ``steps`` profiled
    steps (each profiled alone; the minimum drops what a busy machine adds to one step)."""
    from torch.profiler import ProfilerActivity, profile

    least: dict[str, float] = {}
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run.step()
        for e in prof.key_averages(group_by_input_shape=True):
            if e.key.startswith("aten::"):
                key = f"{e.key} {e.input_shapes}"
                least[key] = min(least.get(key, float("inf")), e.self_cpu_time_total / 1e3)
    return least


def measure(args) -> dict:
    runs = build_runs(args)
    seconds = time_steps(runs, args.rounds, args.warmup)
    full = statistics.median(seconds["full"])
    steps = {name: {"step_seconds": statistics.median(s), "step_over_full": statistics.median(s) / full,
                    "seconds": s} for name, s in seconds.items()}
    bitfit, grft = (operator_times(runs[name], args.profile_steps) for name in ("bitfit", "grft_row"))
    ops = [{"operator": key, "bitfit_ms": bitfit.get(key, 0.0), "grft_row_ms": grft.get(key, 0.0)}
           for key in set(bitfit) | set(grft)]
    ops.sort(key=lambda op: -abs(op["grft_row_ms"] - op["bitfit_ms"]))
    return {"model": args.model, "batch": args.batch, "rounds": args.rounds, "profile_steps": args.profile_steps,
            "steps": steps,
            "profiled_total_ms": {"bitfit": sum(bitfit.values()), "grft_row": sum(grft.values())},
            "operators": ops[:args.top]}


def markdown(result: dict) -> str:
    steps, total = result["steps"], result["profiled_total_ms"]
    lines = ["# GRFT row's step against BitFit's", "",
             f"- backbone `{result['model']}`, batch {result['batch']}, CPU fp32, one torch thread, the cost benchmark's "
             f"runs (`benchmarks/cost.py`); median process CPU time of {result['rounds']} steps per variant, "
             "round-robin in one process", "",
             "| variant | step (s) | step / full |", "|---|---:|---:|"]
    lines += [f"| {LABELS[name]} | {s['step_seconds']:.3f} | {s['step_over_full']:.3f} |" for name, s in steps.items()]
    lines += ["", f"Per operator, the least self CPU time over {result['profile_steps']} profiled steps each: in all "
              f"{total['bitfit']:.0f} ms (BitFit) and {total['grft_row']:.0f} ms (GRFT row). The operators whose time "
              "differs most (0.0: the operator does not run in that step):", "",
              "| GRFT row - BitFit (ms) | BitFit (ms) | GRFT row (ms) | operator and input shapes |", "|---:|---:|---:|---|"]
    lines += [f"| {op['grft_row_ms'] - op['bitfit_ms']:+.1f} | {op['bitfit_ms']:.1f} | {op['grft_row_ms']:.1f} | "
              f"`{op['operator'][:110]}` |" for op in result["operators"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=20, help="operators listed")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per variant (least time per operator)")
    p.add_argument("--small", action="store_true", help="tiny ViT (test_vit, 32 px, batch 2), 2 rounds: seconds")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    base = ["--small"] if args.small else []
    shared = cost.parse_args(base + ["--methods", "full,bitfit,grft_row"])
    shared.isolate = False
    for key in ("rounds", "warmup", "top", "profile_steps", "out"):
        setattr(shared, key, getattr(args, key))
    if args.small:
        shared.rounds, shared.warmup, shared.profile_steps = 2, 1, 2
    return shared


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = measure(args)
    cost.write_table(args.out, result, markdown(result), indent=1)
    return result


if __name__ == "__main__":
    main()
