#!/usr/bin/env bash
# Post-training stages that show their effect (docs/post-training.md), on the CPU in minutes per stage:
#   1. the pretrained start: the demo's ~2M Llama 3 (runs/llama3-demo; trained here if missing)
#   2. data: verifiable reasoning conversations, instruction pairs mined from the standard library's documented
#      code, teacher-style preference pairs (data/post/)
#   3. SFT on reasoning + instructions; held-out reasoning accuracy and exact match, pretrained vs SFT
#   4. DPO (with RPO's NLL term, and plain) from the SFT model; held-out preference accuracy and reward margin,
#      and the teaching rubric (the share of answers whose example runs and passes), SFT vs DPO
#   5. distillation: the demo model trained longer (1000 steps: the teacher) and a ~0.6M student distilled from
#      it against the same student trained without one, over three seeds
# Ends by writing the measured part of docs/post-training.md and its plots (launch/post_training_report.py).
#
#   launch/post_training.sh                     # or: make post-training
#
# Reruns reuse what exists (data files, finished runs, eval results). Environment:
#   WORKBENCH  the workbench command (default .venv/bin/workbench if present, else workbench); PYTHON the
#              interpreter for the data makers and the report (default: the one beside WORKBENCH)
#   RUNS       folder of the runs (default runs); DATA folder of the post-training data (default data/post)
#   DOC, IMAGES  the markdown written and its plot folder (default docs/post-training.md, docs/images)
#   SEEDS      distillation seeds (default "0 1 2"); N_EVAL held-out items per eval (default 150)
#   STOP_AFTER=sft ends after the SFT stage (what launch/rl.sh starts from)
#   PRETRAIN_ARGS, SFT_ARGS, DPO_ARGS, DISTILL_ARGS, EVAL_ARGS, MAKER_ARGS   extra overrides
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh  # resolve_tools, stage, made
resolve_tools
RUNS=${RUNS:-runs}
DATA=${DATA:-data/post}
DOC=${DOC:-docs/post-training.md}
IMAGES=${IMAGES:-docs/images}
SEEDS=${SEEDS:-0 1 2}
N_EVAL=${N_EVAL:-150}
read -r -a pre_args <<< "${PRETRAIN_ARGS:-}"
read -r -a sft_args <<< "${SFT_ARGS:-}"
read -r -a dpo_args <<< "${DPO_ARGS:-}"
read -r -a distill_args <<< "${DISTILL_ARGS:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
read -r -a maker_args <<< "${MAKER_ARGS:-}"
TIMES="$RUNS/post-training-times.tsv"
mkdir -p "$RUNS"
touch "$TIMES"

make_data() {
    made "$DATA/reasoning" || "$PYTHON" -m data_pipelines.reasoning --sft --out "$DATA/reasoning" --n-train 6000 \
        --n-val 300 --seed 1 --kinds add,compare,mod,count,parity,sort,chain,linear,boolean,poly
    made "$DATA/instructions" || "$PYTHON" -m data_pipelines.instructions --out "$DATA/instructions" \
        --max-per-kind 2500 --max-prompt-chars 600 "${maker_args[@]}"
    # each subject asked in 5 phrasings: 3 SFT demonstrations of the teaching style, 2 DPO pairs; a sixth phrasing
    # is held out (rephrased.jsonl), and validation subjects come from held-out files (val.jsonl)
    made "$DATA/preferences" || "$PYTHON" -m data_pipelines.preferences --out "$DATA/preferences" \
        --pairs-per-subject 5 --demonstrations 3 "${maker_args[@]}"
    made "$DATA/sft" || {
        "$PYTHON" -m data_pipelines.mix --out "$DATA/sft/train.jsonl" "$DATA/reasoning/train.jsonl" \
            "$DATA/instructions/train.jsonl" "$DATA/preferences/sft.jsonl"
        "$PYTHON" -m data_pipelines.mix --out "$DATA/sft/val.jsonl" "$DATA/reasoning/val.jsonl:$N_EVAL" \
            "$DATA/instructions/val.jsonl:$N_EVAL"
    }
}

post_eval() {  # post_eval RUN_DIR FOLDER CHAT: held-out reasoning and instruction exact match
    "${wb[@]}" eval --ckpt "$1" --out "$1/evals/$2" --task reasoning,exact_match \
        --reasoning.data "$DATA/reasoning/val.jsonl" --reasoning.n "$N_EVAL" --reasoning.chat "$3" \
        --reasoning.max_new_tokens 96 --exact_match.data "$DATA/instructions/val.jsonl" --exact_match.n "$N_EVAL" \
        --exact_match.chat "$3" --exact_match.max_new_tokens 48 "${eval_args[@]}"
}

pairs_eval() {  # pairs_eval RUN_DIR: preferences and the teaching rubric on unseen subjects (val) and on new
                # questions about the taught subjects (rephrased); DPO's rewards against the SFT model
    for split in val rephrased; do
        "${wb[@]}" eval --ckpt "$1" --out "$1/evals/pairs-$split" --task preference,teaching \
            --preference.data "$DATA/preferences/$split.jsonl" --preference.reference "$RUNS/post-sft" \
            --teaching.data "$DATA/preferences/$split.jsonl" --teaching.n 500 --teaching.max_new_tokens 160 \
            "${eval_args[@]}"
    done
}

copying_eval() {  # copying_eval RUN_DIR: can the model repeat a name it has just been shown (what the teaching
                  # rubric needs of it)?
    "${wb[@]}" eval --ckpt "$1" --out "$1/evals/copying" --task copying "${eval_args[@]}"
}

post_data=(--run.out_dir "$RUNS" --data.train_file)

stage data-pretrain "${wb[@]}" data configs/llama3/demo.toml
stage pretrain "${wb[@]}" train configs/llama3/demo.toml --run.out_dir "$RUNS" --train.sample_tokens 0 --resume \
    "${pre_args[@]}"
stage data-post make_data
stage sft "${wb[@]}" train configs/post/sft.toml "${post_data[@]}" "$DATA/sft/train.jsonl" \
    --data.val_file "$DATA/sft/val.jsonl" --train.init_from "$RUNS/llama3-demo" --resume "${sft_args[@]}"
if [[ "${STOP_AFTER:-}" == sft ]]; then exit 0; fi  # launch/rl.sh needs only the SFT start
stage eval-pretrained-chat post_eval "$RUNS/llama3-demo" post true
stage eval-pretrained-plain post_eval "$RUNS/llama3-demo" post-plain false
stage eval-pretrained-copying copying_eval "$RUNS/llama3-demo"
stage eval-sft post_eval "$RUNS/post-sft" post true
stage eval-sft-copying copying_eval "$RUNS/post-sft"
stage eval-sft-pairs pairs_eval "$RUNS/post-sft"
stage dpo "${wb[@]}" train configs/post/dpo.toml "${post_data[@]}" "$DATA/preferences/train.jsonl" \
    --data.val_file "$DATA/preferences/val.jsonl" --train.init_from "$RUNS/post-sft" --resume "${dpo_args[@]}"
stage eval-dpo post_eval "$RUNS/post-dpo" post true
stage eval-dpo-pairs pairs_eval "$RUNS/post-dpo"
stage dpo-plain "${wb[@]}" train configs/post/dpo.toml "${post_data[@]}" "$DATA/preferences/train.jsonl" \
    --data.val_file "$DATA/preferences/val.jsonl" --train.init_from "$RUNS/post-sft" --run.name post-dpo-plain \
    --objective.rpo_alpha 0 --resume "${dpo_args[@]}"
stage eval-dpo-plain-pairs pairs_eval "$RUNS/post-dpo-plain"
stage teacher "${wb[@]}" train configs/post/teacher.toml --run.out_dir "$RUNS" --resume "${pre_args[@]}"
stage eval-teacher-copying copying_eval "$RUNS/post-teacher"
for seed in $SEEDS; do
    stage "distill-s$seed" "${wb[@]}" train configs/post/distill.toml --run.out_dir "$RUNS" \
        --run.name "post-distill-s$seed" --run.seed "$seed" --objective.teacher "$RUNS/post-teacher" --resume \
        "${distill_args[@]}"
    stage "student-s$seed" "${wb[@]}" train configs/post/distill.toml --run.out_dir "$RUNS" \
        --run.name "post-student-s$seed" --run.seed "$seed" --objective.name lm --objective.teacher "" \
        --objective.alpha 0.5 --resume "${distill_args[@]}"
done
"$PYTHON" launch/post_training_report.py --runs "$RUNS" --doc "$DOC" --images "$IMAGES" --times "$TIMES" \
    --seeds "$SEEDS"
