#!/usr/bin/env bash
# Reinforcement learning on verifiable reasoning (docs/rl.md), on the CPU: GRPO and PPO from the SFT model of
# launch/post_training.sh, over several seeds, each scored on held-out problems against its SFT start.
#   1. the SFT start (runs/post-sft): made by launch/post_training.sh up to its SFT stage when missing
#   2. data (data/post/rl/): training prompts and a held-out set of the kinds RL is run on (RL_KINDS), problems the
#      SFT data never held (other seeds); the held-out set drops any prompt that is also a training prompt
#   3. GRPO and PPO runs per seed (configs/post/grpo.toml, configs/post/ppo.toml)
#   4. the reasoning eval (accuracy checked by a program, per kind, beside chance) of the SFT start and every run
# Ends by writing the measured part of docs/rl.md and its plots (launch/rl_report.py).
#
#   launch/rl.sh                     # or: make rl
#
# Reruns reuse what exists (data files, finished runs, eval results). Environment:
#   WORKBENCH, PYTHON (launch/lib.sh), RUNS, DATA as in launch/post_training.sh; DOC, IMAGES the markdown written and its plots
#   (default docs/rl.md, docs/images); SEEDS (default "0 1 2"); RL_KINDS (default parity,boolean,mod);
#   N_TRAIN training prompts (default 2000), N_EVAL held-out problems (default 400);
#   GRPO_ARGS, PPO_ARGS, EVAL_ARGS   extra overrides
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh  # resolve_tools, stage
resolve_tools
export WORKBENCH PYTHON
RUNS=${RUNS:-runs}
DATA=${DATA:-data/post}
DOC=${DOC:-docs/rl.md}
IMAGES=${IMAGES:-docs/images}
SEEDS=${SEEDS:-0 1 2}
RL_KINDS=${RL_KINDS:-parity,boolean,mod}
N_TRAIN=${N_TRAIN:-2000}
N_EVAL=${N_EVAL:-400}
read -r -a grpo_args <<< "${GRPO_ARGS:-}"
read -r -a ppo_args <<< "${PPO_ARGS:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
TIMES="$RUNS/rl-times.tsv"
mkdir -p "$RUNS" "$DATA/rl"
touch "$TIMES"

make_data() {  # seeds 40 and 41: never an SFT seed of launch/post_training.sh (its reasoning data uses 2 and 3)
    [[ -s "$DATA/rl/train.jsonl" ]] || "$PYTHON" -m data_pipelines.reasoning --out "$DATA/rl/train.jsonl" \
        --n "$N_TRAIN" --seed 40 --kinds "$RL_KINDS"
    [[ -s "$DATA/rl/heldout.jsonl" ]] || {
        "$PYTHON" -m data_pipelines.reasoning --out "$DATA/rl/heldout.jsonl" --n "$N_EVAL" --seed 41 \
            --kinds "$RL_KINDS" --exclude "$DATA/rl/train.jsonl"
        head -n 100 "$DATA/rl/heldout.jsonl" > "$DATA/rl/val.jsonl"  # what the runs score every eval_every steps
    }
}

rl_eval() {  # rl_eval RUN_DIR: held-out accuracy of the R1-style answers, per kind, beside chance: pass@1 over 8
            # samples at the rollouts' temperature (R1's protocol), pass@8, and the greedy answer's
    [[ -s "$1/evals/rl/results.json" ]] && return 0  # a rerun reuses it
    "${wb[@]}" eval --ckpt "$1" --out "$1/evals/rl" --task reasoning --reasoning.data "$DATA/rl/heldout.jsonl" \
        --reasoning.n "$N_EVAL" --reasoning.chat true --reasoning.max_new_tokens 64 --reasoning.samples 8 \
        --reasoning.temperature 1.0 "${eval_args[@]}"
}

[[ -d "$RUNS/post-sft" ]] || STOP_AFTER=sft RUNS="$RUNS" DATA="$DATA" launch/post_training.sh
stage data-rl make_data
stage eval-sft-rl rl_eval "$RUNS/post-sft"
rl_data=(--run.out_dir "$RUNS" --data.train_file "$DATA/rl/train.jsonl" --data.val_file "$DATA/rl/val.jsonl"
         --train.init_from "$RUNS/post-sft" --resume)
for seed in $SEEDS; do
    stage "grpo-s$seed" "${wb[@]}" train configs/post/grpo.toml --run.name "rl-grpo-s$seed" --run.seed "$seed" \
        "${rl_data[@]}" "${grpo_args[@]}"
    stage "eval-grpo-s$seed" rl_eval "$RUNS/rl-grpo-s$seed"
    stage "ppo-s$seed" "${wb[@]}" train configs/post/ppo.toml --run.name "rl-ppo-s$seed" --run.seed "$seed" \
        "${rl_data[@]}" "${ppo_args[@]}"
    stage "eval-ppo-s$seed" rl_eval "$RUNS/rl-ppo-s$seed"
done
"$PYTHON" launch/rl_report.py --runs "$RUNS" --doc "$DOC" --images "$IMAGES" --times "$TIMES" --seeds "$SEEDS"
