#!/usr/bin/env bash
# The pre-registered ViT study (benchmarks/vit_science_plan.md), from scratch, in one command:
#   1. the task that replaces mnist_count, chosen on validation figures of full fine-tuning and
#      linear probing only (configs/vit_suite/science/candidates/);
#   2. per primary arm, the learning rate and L2-SP weight chosen on validation (seed 100);
#   3. the arms on the four tasks with the chosen settings: primary arms 10 seeds, exploratory 5;
#   4. the analysis: primary comparisons pooled over the tasks per seed, Holm over them only.
#
#   bash scripts/vit_science.sh [extra sweep arguments]
#
# Environment: RUNS (default runs/vit_science; finished runs are skipped, so a re-launch continues),
# OUT (default benchmarks/results: writes vit_science/ with grid.{md,json}, analysis.{md,json} and the report),
# WORKERS (default 2 one-thread processes), TINY=1 (smoke: 2 tasks, 1 setting, 2 seeds, 1
# exploratory arm, 100 training images, 1 epoch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
RUNS="${RUNS:-runs/vit_science}"
OUT="${OUT:-benchmarks/results}"
WORKERS="${WORKERS:-2}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
S=configs/vit_suite/science
M=configs/vit_suite/methods
TASKS="$S/tasks"                      # mnist_digit, mnist_rotation, mnistm (2,000 test images)
CANDIDATES="$S/candidates/mnist_count9.yaml $S/candidates/mnist_distance.yaml"
SEEDS="0 1 2 3 4 5 6 7 8 9"
EXPLORE_SEEDS="0 1 2 3 4"
CHOICE_SEEDS="100 101 102"
TUNE_SEED=100
LRS="0.03 0.01 0.003 0.001"
LAMBDAS="0 0.0001 0.01 0.1 1"
# primary arms, in the order of the plan; the GPS arms have no L2-SP weight (learning rate only)
PRIMARY="grft_row_probe random_row grft_row_lowest_probe grft_row_matched_probe gps_nostem_probe gps_random_nostem"
# exploratory arm -> the primary arm whose chosen setting it takes ("suite": the suite's recipe as committed)
EXPLORE="gps_probe:gps_nostem_probe gps_random:gps_random_nostem grft_row_stem_probe:grft_row_matched_probe \
random_row_global:random_row grft_row_lpft:grft_row_probe random_row_lpft:random_row \
grft_row_supcon1:grft_row_probe gps:suite grft_row:suite"
EXTRA="--wandb.mode disabled"
if [ "${TINY:-0}" = 1 ]; then
    TASKS="$S/tasks/mnist_digit.yaml"; SEEDS="0 1"; EXPLORE_SEEDS="0"; CHOICE_SEEDS="100"
    LRS="0.03"; LAMBDAS="0.0001"; EXPLORE="grft_row_supcon1:grft_row_probe"
    EXTRA="$EXTRA --data.init_args.n_train 100 --data.init_args.n_val 50 --data.init_args.n_test 100 --trainer.max_epochs 1"
fi
start=$(date +%s)
mkdir -p "$RUNS" "$OUT/vit_science"
LOG="$RUNS/vit_science.log"
sweep() {  # TASKS METHOD_PATHS SEEDS RUNS_DIR EXTRA [extra sweep arguments]
    "$PYTHON" -m grft_lightning.experiments.sweep --suite $1 --methods $2 --seeds $3 --mode inprocess \
        --workers "$WORKERS" --runs-dir "$4" --extra "$5" "${@:6}" 2>&1 | tee -a "$LOG"
}
arm() { if [ -f "$S/$1.yaml" ]; then echo "$S/$1.yaml"; else echo "$M/$1.yaml"; fi; }

# 1. the replacement for mnist_count: full fine-tuning and linear probing, validation only
sweep "$CANDIDATES" "$M/full.yaml $M/linear.yaml" "$CHOICE_SEEDS" "$RUNS/choice" "$EXTRA" "$@"
CHOSEN=$("$PYTHON" -m benchmarks.vit_science choose-task "$RUNS/choice")
echo "task replacing mnist_count: $CHOSEN" | tee -a "$LOG"
ALL_TASKS="$TASKS $CHOSEN"

# 2. per primary arm, the setting with the best mean validation accuracy over the tasks (seed 100)
for lr in $LRS; do
    sweep "$ALL_TASKS" "$(for a in gps_nostem_probe gps_random_nostem; do arm $a; done)" "$TUNE_SEED" \
        "$RUNS/tune/lr${lr}_lamnone" "$EXTRA --model.optimizer.init_args.lr $lr" "$@"
    for lam in $LAMBDAS; do
        sweep "$ALL_TASKS" "$(for a in grft_row_probe random_row grft_row_lowest_probe grft_row_matched_probe; do arm $a; done)" \
            "$TUNE_SEED" "$RUNS/tune/lr${lr}_lam${lam}" \
            "$EXTRA --model.optimizer.init_args.lr $lr --model.method.init_args.reg_lambda $lam" "$@"
    done
done
declare -A SETTING
for a in $PRIMARY; do
    SETTING[$a]=$("$PYTHON" -m benchmarks.vit_science choose-setting "$RUNS/tune" "$a")
    echo "setting of $a: ${SETTING[$a]}" | tee -a "$LOG"
done
SETTING[suite]=""
"$PYTHON" -m benchmarks.vit_science grid "$RUNS/tune" $PRIMARY --out "$OUT/vit_science" | tee -a "$LOG"

# 3. the arms with their settings, on the test splits
for a in $PRIMARY; do
    sweep "$ALL_TASKS" "$(arm "$a")" "$SEEDS" "$RUNS/main" "$EXTRA ${SETTING[$a]}" "$@"
done
for pair in $EXPLORE; do
    a="${pair%%:*}"; from="${pair##*:}"
    sweep "$ALL_TASKS" "$(arm "$a")" "$EXPLORE_SEEDS" "$RUNS/main" "$EXTRA ${SETTING[$from]}" "$@"
done
sweep_end=$(date +%s)

# 4. the analysis and the report
"$PYTHON" -m benchmarks.vit_science analyse "$RUNS/main" --out "$OUT/vit_science"
"$PYTHON" -m grft_lightning.experiments.report "$RUNS/main" --out "$OUT/vit_science" --json "$OUT/vit_science.json" > /dev/null
end=$(date +%s)
{
    echo "# ViT study (pre-registered: benchmarks/vit_science_plan.md)"
    echo
    echo "Produced by \`bash scripts/vit_science.sh\`$([ "${TINY:-0}" = 1 ] && echo ' (TINY=1 smoke settings: not a result)')."
    echo "Task replacing mnist_count: \`$CHOSEN\`. Settings chosen on validation:"
    echo
    for a in $PRIMARY; do echo "- $a: \`${SETTING[$a]}\`"; done
    echo
    cat "$OUT/vit_science/analysis.md"
    echo
    echo "Wall time: $((end - start)) s (sweeps $((sweep_end - start)) s) with $WORKERS one-thread workers on $(nproc) cores."
} > "$OUT/vit_science.md"
echo "wrote $OUT/vit_science.md, $OUT/vit_science.json, $OUT/vit_science/ ($((end - start)) s)"
