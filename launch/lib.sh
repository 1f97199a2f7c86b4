# Shared by the recipe scripts (sourced, not run): post_training.sh and expert_teacher.sh.
#   resolve_tools       sets the array wb (the workbench command: $WORKBENCH, else .venv/bin/workbench, else
#                       workbench on PATH) and PYTHON (the interpreter beside it, else python3)
#   stage NAME CMD...   runs CMD, echoing it, and records its wall time in the tab-separated file $TIMES; a rerun
#                       that reuses a finished stage (always the quicker) keeps the time of the run that did the work
#   made DIR            whether a data maker has written DIR/train.jsonl and DIR/val.jsonl (non-empty)

resolve_tools() {
    if [[ -z "${WORKBENCH:-}" ]]; then
        if [[ -x .venv/bin/workbench ]]; then WORKBENCH=.venv/bin/workbench; else WORKBENCH=workbench; fi
    fi
    read -r -a wb <<< "$WORKBENCH"
    if [[ -z "${PYTHON:-}" ]]; then
        PYTHON=$(dirname "$(command -v "${wb[0]}")")/python
        [[ -x "$PYTHON" ]] || PYTHON=python3
    fi
}

stage() {
    local name=$1 t0=$SECONDS took old
    shift
    echo "== $name: $*"
    "$@"
    took=$((SECONDS - t0))
    old=$(awk -F'\t' -v n="$name" '$1 == n {print $2}' "$TIMES")
    if [[ -n "$old" && "$old" -gt "$took" ]]; then took=$old; fi
    awk -F'\t' -v n="$name" '$1 != n' "$TIMES" > "$TIMES.tmp"
    printf '%s\t%s\n' "$name" "$took" >> "$TIMES.tmp"
    mv "$TIMES.tmp" "$TIMES"
}

made() { [[ -s "$1/train.jsonl" && -s "$1/val.jsonl" ]]; }
