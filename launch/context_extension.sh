#!/usr/bin/env bash
# Context extension that shows (docs/context-extension.md): pretrain the ~2M Llama 3 at 256 tokens with
# synthetic passkeys mixed into its corpus, measure passkey retrieval up to 4096 tokens, extend the context
# with YaRN (factor 16) and a short continued training at 1024 tokens, measure again, and do the same
# continued training without YaRN as the control. Ends by writing the table and the plot into
# docs/context-extension.md and docs/images/context-extension.png.
#
#   launch/context_extension.sh                   # or: make context-extension
#
# Reruns reuse what exists (datasets, finished runs, eval results). Environment:
#   WORKBENCH  the workbench command (default: .venv/bin/workbench if present, else workbench); PYTHON the
#              interpreter that writes the report (default: the one beside WORKBENCH)
#   RUNS       folder of the three runs (default runs); DOC the markdown written (default
#              docs/context-extension.md); IMAGE its plot (default docs/images/context-extension.png)
#   LENGTHS    passkey prompt lengths (default "[256, 512, 1024, 2048, 4096]"); N samples per length and
#              depth (default 4, five depths: 20 per length)
#   PRETRAIN_ARGS, EXTEND_ARGS, EVAL_ARGS   extra overrides (e.g. "--train.steps 2" for a smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${WORKBENCH:-}" ]]; then
    if [[ -x .venv/bin/workbench ]]; then WORKBENCH=.venv/bin/workbench; else WORKBENCH=workbench; fi
fi
read -r -a wb <<< "$WORKBENCH"  # may be several words, e.g. "python3 -m workbench.cli"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=$(dirname "$(command -v "${wb[0]}")")/python
    [[ -x "$PYTHON" ]] || PYTHON=python3
fi
RUNS=${RUNS:-runs}
DOC=${DOC:-docs/context-extension.md}
IMAGE=${IMAGE:-docs/images/context-extension.png}
LENGTHS=${LENGTHS:-[256, 512, 1024, 2048, 4096]}
N=${N:-4}
read -r -a pre_args <<< "${PRETRAIN_ARGS:-}"
read -r -a ext_args <<< "${EXTEND_ARGS:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
TIMES="$RUNS/context-extension-times.tsv"
mkdir -p "$RUNS"
: > "$TIMES"

stage() {  # stage NAME COMMAND...: run it and record its wall time
    local name=$1 t0=$SECONDS
    shift
    echo "== $name: $*"
    "$@"
    printf '%s\t%s\n' "$name" "$((SECONDS - t0))" >> "$TIMES"
}

passkey_eval() {  # passkey_eval RUN_DIR: passkey retrieval at LENGTHS into RUN_DIR/evals/passkey
    "${wb[@]}" eval --task passkey --ckpt "$1" --out "$1/evals/passkey" --batch-size 4 \
        --passkey.lengths "$LENGTHS" --passkey.n "$N" "${eval_args[@]}"
}

pre=(configs/llama3/passkey-pretrain.toml --run.out_dir "$RUNS" "${pre_args[@]}")
from_pre=(--run.out_dir "$RUNS" --train.init_from "$RUNS/passkey-pretrain"
          --data.tokenizer "$RUNS/passkey-pretrain/tokenizer.json")
ext=(configs/llama3/passkey-extend.toml "${from_pre[@]}" "${ext_args[@]}")

stage data "${wb[@]}" data "${pre[@]}"
stage pretrain "${wb[@]}" train "${pre[@]}" --resume
stage eval-pretrain passkey_eval "$RUNS/passkey-pretrain"
stage extend-yarn "${wb[@]}" train "${ext[@]}" --resume
stage eval-yarn passkey_eval "$RUNS/passkey-extend"
stage extend-control "${wb[@]}" train "${ext[@]}" --run.name passkey-extend-control \
    --model.rope.scaling default --resume
stage eval-control passkey_eval "$RUNS/passkey-extend-control"
"$PYTHON" launch/context_extension_report.py --runs "$RUNS" --doc "$DOC" --image "$IMAGE" --times "$TIMES"
