#!/usr/bin/env bash
# The VLM recipe (docs/vlm-training.md), on the CPU in minutes per stage:
#   1. data: diagram documents (flowcharts, logic circuits) and captioned shapes, each image with a caption and
#      questions whose answers need the picture (`workbench diagrams`; data/diagrams)
#   2. per seed: the blind baseline (every image a constant: configs/paligemma2/blind.toml), the warm-up from it
#      (language model frozen, the image side learns to feed it: warmup.toml), full fine-tuning (finetune.toml)
#   3. evals on the held-out test split (`workbench eval --task vqa`): each stage's exact match per question type,
#      the fine-tuned model beside the blind run and the majority answers, and with noise for images
# Ends by writing the measured part of docs/vlm-training.md and its plots (launch/vlm_report.py).
#
#   launch/vlm.sh                     # or: make vlm
#
# Reruns reuse what exists (the data folder, finished runs). Environment:
#   WORKBENCH  the workbench command (default .venv/bin/workbench if present, else workbench); PYTHON the
#              interpreter beside it
#   RUNS       folder of the runs (default runs); DATA the vision folder (default data/diagrams)
#   N_TRAIN, N_VAL, N_TEST   images per split (default 4000, 200, 300); SIZE their side in pixels (default 96)
#   SEEDS      training seeds (default "0 1"); DOC, IMAGES the markdown written and its plot folder
#   TRAIN_ARGS, EVAL_ARGS    extra overrides for every stage / every eval
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh  # resolve_tools, stage
resolve_tools
RUNS=${RUNS:-runs}
DATA=${DATA:-data/diagrams}
N_TRAIN=${N_TRAIN:-4000}
N_VAL=${N_VAL:-200}
N_TEST=${N_TEST:-300}
SIZE=${SIZE:-96}
SEEDS=${SEEDS:-0 1}
DOC=${DOC:-docs/vlm-training.md}
IMAGES=${IMAGES:-docs/images/vlm-training}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
TIMES="$RUNS/vlm-times.tsv"
mkdir -p "$RUNS"
touch "$TIMES"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# reused when it was built with the same settings
stage data "${wb[@]}" diagrams "$DATA" --train "$N_TRAIN" --val "$N_VAL" --test "$N_TEST" --size "$SIZE" --seed 0

vqa() {  # vqa RUN [extra options]: the held-out test split's exact match, into RUN/evals/vqa
    local run=$1
    shift
    "${wb[@]}" eval --task vqa --ckpt "$run" --out "$run/evals/vqa" "$@" "${eval_args[@]}"
}

evals() {  # evals SUFFIX: every stage of one seed, the warm-up and the fine-tuned model beside the blind run
    vqa "$RUNS/vlm-blind$1"
    vqa "$RUNS/vlm-warmup$1" --vqa.blind_run "$RUNS/vlm-blind$1"
    vqa "$RUNS/vlm-finetune$1" --vqa.blind_run "$RUNS/vlm-blind$1"
}

for seed in $SEEDS; do
    s="-s$seed"
    common=(--run.out_dir "$RUNS" --run.seed "$seed" --data.dir "$DATA" --resume)
    stage "blind$s" "${wb[@]}" train configs/paligemma2/blind.toml --run.name "vlm-blind$s" "${common[@]}" \
        "${train_args[@]}"
    stage "warmup$s" "${wb[@]}" train configs/paligemma2/warmup.toml --run.name "vlm-warmup$s" "${common[@]}" \
        --train.init_from "$RUNS/vlm-blind$s" "${train_args[@]}"
    stage "finetune$s" "${wb[@]}" train configs/paligemma2/finetune.toml --run.name "vlm-finetune$s" \
        "${common[@]}" --train.init_from "$RUNS/vlm-warmup$s" "${train_args[@]}"
    stage "evals$s" evals "$s"
done
"$PYTHON" launch/vlm_report.py --runs "$RUNS" --doc "$DOC" --images "$IMAGES" --times "$TIMES" --seeds "$SEEDS"
echo "report: $DOC (per run: $RUNS/vlm-finetune-s*/report.md, evals in $RUNS/vlm-*/evals/vqa/report.md)"
