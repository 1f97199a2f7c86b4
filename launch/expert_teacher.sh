#!/usr/bin/env bash
# The expert-teacher chatbot recipe (docs/expert-teacher.md): from any source tree to `workbench chat`.
#
#   launch/expert_teacher.sh [SOURCE_TREE]      (default: the running Python's standard library)
#
#   1. corpus + tokenizer + shards   `workbench data` with the tree as data.source (its .py .v .sv .c .md ... files)
#   2. pretrain                      the ~2M Llama 3 of configs/llama3/demo.toml on that corpus
#   3. teaching data from the tree   instruction pairs (data_pipelines.instructions: docstrings, doctests,
#                                    signatures; Verilog comments, port lists, instantiations) and teacher-style
#                                    preference pairs (data_pipelines.preferences: Python examples that run,
#                                    Verilog answers checked against the module's real ports), each module or
#                                    function asked in PAIRS_PER_SUBJECT phrasings, DEMONSTRATIONS of them shown
#                                    in SFT, the rest DPO pairs; validation from held-out files
#   4. SFT                           configs/post/sft.toml from the pretrained model
#   5. teacher-DPO                   configs/post/dpo.toml (with RPO's NLL term) from the SFT model
#   (optional) GRPO=1                configs/post/grpo.toml from the DPO model on generated checkable reasoning
#                                    problems (data_pipelines.reasoning, also mixed into SFT so their answer
#                                    format is known; data made before GRPO=1 is not remade: remove DATA/sft)
#   6. held-out eval                 exact match (and token F1) on held-out instruction pairs, pretrained vs SFT
#                                    vs DPO; preference accuracy and reward margin on held-out pairs (DPO against
#                                    its SFT reference; for a Python tree also the teaching rubric)
#   7. `workbench chat --ckpt RUNS/NAME-dpo`: printed, and started when CHAT=1 and stdin is a terminal
#
# Every stage is resumable: a rerun reuses the built data and finished runs (runs are --resume'd).
# Settings (environment):
#   NAME (default expert-<tree's folder name>, expert-stdlib for the default); RUNS (runs); DATA (data/NAME);
#   CORPUS (DATA/corpus: the dataset folder; an existing one built from the same settings is reused)
#   VOCAB (4096), MAX_BYTES (4000000): the corpus and tokenizer; SEQ_LEN (512): the SFT/DPO/chat window
#   PRETRAIN_STEPS (300), SFT_STEPS (1000), DPO_STEPS (300); N_EVAL (150) held-out items per eval
#   MAX_PER_KIND (2500) instruction pairs per kind; PAIRS_PER_SUBJECT (5), DEMONSTRATIONS (3)
#   MODEL_ARGS (overrides for every training run, e.g. "--model.flavor debug"); PRETRAIN_ARGS, SFT_ARGS,
#   DPO_ARGS, GRPO_ARGS, EVAL_ARGS, MAKER_ARGS: extra overrides of one stage
#   PRETRAINED=RUN_DIR: start SFT from that run instead of pretraining (it must use the same corpus's tokenizer,
#   e.g. runs/llama3-demo with CORPUS=data/stdlib-4096 for the default tree; the trainer checks it)
#   GRPO=1: run the GRPO stage after DPO; CHAT=1: start the chat at the end (when stdin is a terminal)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh  # resolve_tools, stage, made
resolve_tools

SOURCE=${1:-}
if [[ -n "$SOURCE" ]]; then
    if [[ ! -e "$SOURCE" ]]; then
        echo "error: SOURCE_TREE $SOURCE does not exist (expected a folder of source files, e.g. a Verilog checkout)" >&2
        exit 2
    fi
    if [[ ! -d "$SOURCE" ]]; then
        echo "error: SOURCE_TREE $SOURCE is not a folder (expected a folder of source files)" >&2
        exit 2
    fi
    if [[ -z "$(find "$SOURCE" -type f \( -name '*.py' -o -name '*.v' -o -name '*.sv' \) -print -quit)" ]]; then
        echo "error: SOURCE_TREE $SOURCE holds no Python (.py) or Verilog (.v, .sv) files: the recipe's teaching data" \
             "are made from documented Python functions or Verilog modules" >&2
        exit 2
    fi
    SOURCE=$(cd "$SOURCE" && pwd)
fi
NAME=${NAME:-expert-$(if [[ -n "$SOURCE" ]]; then basename "$SOURCE"; else echo stdlib; fi)}
RUNS=${RUNS:-runs}
DATA=${DATA:-data/$NAME}
VOCAB=${VOCAB:-4096}
MAX_BYTES=${MAX_BYTES:-4000000}
SEQ_LEN=${SEQ_LEN:-512}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-300}
SFT_STEPS=${SFT_STEPS:-1000}
DPO_STEPS=${DPO_STEPS:-300}
N_EVAL=${N_EVAL:-150}
MAX_PER_KIND=${MAX_PER_KIND:-2500}
PAIRS_PER_SUBJECT=${PAIRS_PER_SUBJECT:-5}
DEMONSTRATIONS=${DEMONSTRATIONS:-3}
read -r -a model_args <<< "${MODEL_ARGS:-}"
read -r -a pre_args <<< "${PRETRAIN_ARGS:-}"
read -r -a sft_args <<< "${SFT_ARGS:-}"
read -r -a dpo_args <<< "${DPO_ARGS:-}"
read -r -a grpo_args <<< "${GRPO_ARGS:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
read -r -a maker_args <<< "${MAKER_ARGS:-}"
TIMES="$RUNS/$NAME-times.tsv"
mkdir -p "$RUNS" "$DATA"
touch "$TIMES"

source_args=()
[[ -z "$SOURCE" ]] || source_args=(--source "$SOURCE")
# the corpus every stage names (the tokenizer the runs share); SEQ_LEN is the post-training window
CORPUS=${CORPUS:-$DATA/corpus}
corpus=(--data.dir "$CORPUS" --data.vocab_size "$VOCAB" --data.max_bytes "$MAX_BYTES")
[[ -z "$SOURCE" ]] || corpus+=(--data.source "$SOURCE")
PRE=${PRETRAINED:-$RUNS/$NAME-pretrain} SFT="$RUNS/$NAME-sft" DPO="$RUNS/$NAME-dpo"

make_data() {
    made "$DATA/instructions" || "$PYTHON" -m data_pipelines.instructions "${source_args[@]}" \
        --out "$DATA/instructions" --max-per-kind "$MAX_PER_KIND" --max-prompt-chars 600 --max-answer-chars 400 \
        --tokenizer "$CORPUS/tokenizer.json" --max-tokens "$SEQ_LEN" "${maker_args[@]}"
    made "$DATA/preferences" || "$PYTHON" -m data_pipelines.preferences "${source_args[@]}" \
        --out "$DATA/preferences" --pairs-per-subject "$PAIRS_PER_SUBJECT" --demonstrations "$DEMONSTRATIONS" \
        "${maker_args[@]}"
    local reasoning=()
    if [[ "${GRPO:-0}" == 1 ]]; then  # GRPO's checkable questions; SFT shows their answer format first
        made "$DATA/reasoning" || "$PYTHON" -m data_pipelines.reasoning --sft --out "$DATA/reasoning" \
            --n-train 2000 --n-val 100 --seed 1
        reasoning=("$DATA/reasoning/train.jsonl")
    fi
    made "$DATA/sft" || {
        "$PYTHON" -m data_pipelines.mix --out "$DATA/sft/train.jsonl" "$DATA/instructions/train.jsonl" \
            "$DATA/preferences/sft.jsonl" "${reasoning[@]}"
        "$PYTHON" -m data_pipelines.mix --out "$DATA/sft/val.jsonl" "$DATA/instructions/val.jsonl:$N_EVAL"
    }
}

held_out() {  # held_out RUN_DIR [TASKS]: exact match on held-out instruction pairs, asked in the chat template
    local tasks=${2:-exact_match}
    local extra=()
    if [[ "$tasks" == *preference* ]]; then
        extra=(--preference.data "$DATA/preferences/val.jsonl" --preference.n "$N_EVAL" --preference.reference "$SFT")
    fi
    if [[ "$tasks" == *teaching* ]]; then
        extra+=(--teaching.data "$DATA/preferences/val.jsonl" --teaching.n "$N_EVAL" --teaching.max_new_tokens 160)
        [[ -z "$SOURCE" ]] || extra+=(--teaching.paths "$SOURCE")
    fi
    "${wb[@]}" eval --ckpt "$1" --out "$1/evals/held-out" --task "$tasks" --max-length "$SEQ_LEN" \
        --exact_match.data "$DATA/instructions/val.jsonl" --exact_match.n "$N_EVAL" --exact_match.chat true \
        --exact_match.max_new_tokens 128 "${extra[@]}" "${eval_args[@]}"
}

first_prompt() { "$PYTHON" -c 'import json, sys; print(json.loads(open(sys.argv[1]).readline())["prompt"])' "$1"; }

stage data "${wb[@]}" data configs/llama3/demo.toml "${corpus[@]}"
if [[ -z "${PRETRAINED:-}" ]]; then
    stage pretrain "${wb[@]}" train configs/llama3/demo.toml --run.name "$NAME-pretrain" --run.out_dir "$RUNS" \
        "${corpus[@]}" --train.steps "$PRETRAIN_STEPS" --train.sample_tokens 0 --resume "${model_args[@]}" \
        "${pre_args[@]}"
fi
stage teaching-data make_data
QUESTION=$(first_prompt "$DATA/preferences/val.jsonl")
post=(--run.out_dir "$RUNS" "${corpus[@]}" --data.seq_len "$SEQ_LEN" --train.sample_prompt "$QUESTION" --resume)
stage sft "${wb[@]}" train configs/post/sft.toml --run.name "$NAME-sft" "${post[@]}" \
    --data.train_file "$DATA/sft/train.jsonl" --data.val_file "$DATA/sft/val.jsonl" --train.init_from "$PRE" \
    --train.steps "$SFT_STEPS" --train.ckpt_every 0 "${model_args[@]}" "${sft_args[@]}"
stage dpo "${wb[@]}" train configs/post/dpo.toml --run.name "$NAME-dpo" "${post[@]}" \
    --data.train_file "$DATA/preferences/train.jsonl" --data.val_file "$DATA/preferences/val.jsonl" \
    --train.init_from "$SFT" --train.steps "$DPO_STEPS" --train.ckpt_every 0 "${model_args[@]}" "${dpo_args[@]}"
FINAL=$DPO

# ---- optional: GRPO on generated checkable questions, from the DPO model --------------------------------------
if [[ "${GRPO:-0}" == 1 ]]; then
    stage grpo "${wb[@]}" train configs/post/grpo.toml --run.name "$NAME-grpo" --run.out_dir "$RUNS" \
        "${corpus[@]}" --data.seq_len "$SEQ_LEN" --data.train_file "$DATA/reasoning/train.jsonl" \
        --data.val_file "$DATA/reasoning/val.jsonl" --train.init_from "$DPO" --resume "${model_args[@]}" \
        "${grpo_args[@]}"
    FINAL="$RUNS/$NAME-grpo"
fi

# ---- held-out eval ------------------------------------------------------------------------------------------------
pair_tasks=preference
[[ -n "$SOURCE" && -z "$(find "$SOURCE" -type f -name '*.py' -print -quit)" ]] || pair_tasks=preference,teaching
stage eval-pretrained held_out "$PRE"
stage eval-sft held_out "$SFT"
stage eval-dpo held_out "$DPO" "exact_match,$pair_tasks"
reasoning_eval() {  # reasoning_eval RUN_DIR: held-out accuracy on GRPO's checkable questions, in the chat template
    "${wb[@]}" eval --ckpt "$1" --out "$1/evals/reasoning" --task reasoning --reasoning.data "$DATA/reasoning/val.jsonl" \
        --reasoning.n "$N_EVAL" --reasoning.chat true --reasoning.max_new_tokens 64
}
if [[ "${GRPO:-0}" == 1 ]]; then
    stage eval-dpo-reasoning reasoning_eval "$DPO"
    stage eval-grpo reasoning_eval "$FINAL"
fi
"$PYTHON" - "$PRE" "$SFT" "$DPO" "$TIMES" > "$RUNS/$NAME-figures.txt" <<'EOF'
import json, sys
from pathlib import Path
*runs, times = sys.argv[1:]
print(f"{'model':28s} {'exact match':>11s} {'token F1':>8s} {'pref. acc':>9s} {'margin':>7s} {'logp acc':>8s} {'teaching':>8s}")
for run in runs:
    tasks = json.loads((Path(run) / "evals" / "held-out" / "results.json").read_text())["tasks"]
    em = tasks["exact_match"]["metrics"]
    pref = tasks.get("preference", {}).get("metrics", {})
    teach = tasks.get("teaching", {}).get("metrics", {})
    cell = lambda d, k, f=".3f": format(d[k], f) if k in d else "-"
    print(f"{Path(run).name:28s} {cell(em, 'exact_match'):>11s} {cell(em, 'f1'):>8s} "
          f"{cell(pref, 'reward_acc'):>9s} {cell(pref, 'reward_margin', '.2f'):>7s} "
          f"{cell(pref, 'logp_acc'):>8s} {cell(teach, 'passes'):>8s}")
print("held-out items: " + ", ".join(f"{k} {v['n']}" for k, v in tasks.items()))
grpo = Path(runs[-1]).parent / (Path(runs[-1]).name[: -len("-dpo")] + "-grpo")
if (grpo / "evals" / "reasoning" / "results.json").is_file():  # GRPO=1
    acc = [json.loads((Path(r) / "evals" / "reasoning" / "results.json").read_text())["tasks"]["reasoning"]
           for r in (runs[-1], grpo)]
    print(f"reasoning accuracy on held-out checkable questions ({acc[0]['n']}): {Path(runs[-1]).name} "
          f"{acc[0]['metrics']['accuracy']:.3f} -> {grpo.name} {acc[1]['metrics']['accuracy']:.3f} "
          f"(chance {acc[0]['baselines']['chance']:.3f})")
print("stage times (s): " + ", ".join(line.replace("\t", " ") for line in Path(times).read_text().splitlines()))
EOF
cat "$RUNS/$NAME-figures.txt"

chat=("${wb[@]}" chat --ckpt "$FINAL" --max-new-tokens 160)
echo "== chat with it (one message per line; /reset starts over, /exit or Ctrl-D ends):"
printf '%q ' "${chat[@]}"
echo
echo "   e.g. ask: $QUESTION"
if [[ "${CHAT:-0}" == 1 && -t 0 ]]; then
    "${chat[@]}"
fi
