"""An eval folder's report.md: the headline table, then each task's metrics, plots and examples.

Written from results.json (and samples/*.jsonl) alone, atomically, so running another task into the same
folder rewrites a report that covers every task measured there.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.train.metrics import atomic_write_text
from workbench.train.report import format_number as fmt
from workbench.train.report import markdown_table

EXAMPLES = 4  # scored examples shown per task (all of them are in samples/TASK.jsonl)


def _clip(text: str, limit: int = 80) -> str:
    """A long cell's end (a prompt's last words matter most), newlines shown as a return symbol."""
    s = text.replace("\n", "\u23ce")
    return s if len(s) <= limit else "\u2026" + s[-limit:]


def _examples(out_dir: Path, task: str) -> list[dict]:
    path = out_dir / "samples" / f"{task}.jsonl"
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) >= EXAMPLES:
                break
            rows.append(json.loads(line))
    return rows


def write_eval_report(out_dir: Path, results: dict) -> Path:
    source = results.get("source", {})
    where = (f"checkpoint `{source['ckpt']}` (step {source.get('step')})" if "ckpt" in source
             else f"Hugging Face directory `{source.get('hf_dir')}`")
    lines = [f"# Evaluation: {out_dir.name}", "", f"Model: {where}. Updated {results.get('updated', '?')}.", ""]
    tasks = results.get("tasks", {})
    rows = []
    for name, t in tasks.items():
        arrow = "\u2191" if t.get("higher_is_better", True) else "\u2193"
        base = ", ".join(f"{k} {fmt(v)}" for k, v in t.get("baselines", {}).items()) or "-"
        rows.append([name, f"{t['primary']} {arrow}", t["metrics"][t["primary"]], base, t.get("n"), t.get("elapsed_s")])
    lines += markdown_table(["task", "metric", "value", "baselines", "n", "seconds"], rows)
    for name, t in tasks.items():
        lines += ["", f"## {name}", ""]
        lines += markdown_table(["metric", "value"], [[k, v] for k, v in t["metrics"].items()])
        details = t.get("details", {})
        per_kind = details.get("per_kind")
        if per_kind:
            lines += [""] + markdown_table(["kind", "accuracy", "chance", "n"],
                                          [[k, v["accuracy"], v.get("chance", "-"), v["n"]] for k, v in per_kind.items()])
        refs = details.get("references")  # {name: {metric: value}}: the task's metrics beside reference inputs
        if isinstance(refs, dict) and refs and all(isinstance(r, dict) for r in refs.values()):
            keys = [k for k in t["metrics"] if all(k in r for r in refs.values())]
            lines += [""] + markdown_table(["metric", "model", *refs], [[k, t["metrics"][k], *(r[k] for r in refs.values())]
                                                                       for k in keys])
        plain = {k: v for k, v in details.items() if k != "per_kind" and not isinstance(v, (dict, list))}
        if plain:
            lines += ["", "; ".join(f"{k}: {fmt(v)}" for k, v in plain.items())]
        lines += [""] + [f"![{name}]({p})" for p in t.get("plots", [])]
        examples = _examples(out_dir, name)
        if examples:
            keys = [k for k in examples[0] if k not in ("params",)][:6]
            lines += ["", f"First {len(examples)} of `samples/{name}.jsonl`:", ""]
            lines += markdown_table(keys, [[_clip(fmt(e.get(k, ""))) for k in keys] for e in examples])
        if t.get("config"):
            lines += ["", "Options: " + ", ".join(f"`{name}.{k} = {json.dumps(v)}`" for k, v in t["config"].items())]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
