"""`report.md`: one page per run folder that says what the run is, how far it got and how good it is.

`write_run_report(run_dir, info)` (re)writes RUN_DIR/report.md with, in this order

    title and summary   the run folder's name; family/flavor, steps done / planned, the last val loss and
                        bits per byte
    Resolved config     config.toml as written by the trainer, verbatim
    Curves              loss.png (RunLog.plot's, redrawn from metrics.jsonl if it is missing) and lr.png
                        (learning rate and gradient norm against step, redrawn every time)
    Throughput          median and last tokens/s and GFLOP/s (CPU) or MFU (CUDA) over the train records of
                        metrics.jsonl, and the run's facts: parameters, FLOPs per token, device, layout
    Results             (fundamentals runs, workbench.train.fundamentals) the headline figures and pictures
                        that the task recorded in results.json
    Checkpoints         the complete checkpoints: step, size, when the COMPLETE marker was written, path
    Evaluations         one table per RUN_DIR/evals/<name>/results.json (the eval harness's output)

Everything comes from the run folder's own files, never from a process's memory: the trainer rewrites
the report after each checkpoint and at the end, and any other process (the eval command, someone after a
crash) can regenerate it the same way. The facts only the trainer knows (`info`) are kept in
run_info.json for that. The report is written to report.md.tmp and renamed into place, so a crash at any
moment leaves the previous complete report or the new one, never half a file, and a report is never
staler than the last regeneration.
"""

from __future__ import annotations

import json
import math
import numbers
import statistics
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from workbench.checkpoint.run import MARKER, list_checkpoints, step_of
from workbench.train.metrics import (
    LR_PLOT_FILE,
    METRICS_FILE,
    PLOT_FILE,
    atomic_write_text,
    plot_loss,
    plot_lr,
    read_metrics,
)

REPORT_FILE = "report.md"
INFO_FILE = "run_info.json"
CONFIG_FILE = "config.toml"
EVALS_DIR = "evals"
EVAL_RESULTS = "results.json"
RESULTS_FILE = "results.json"  # a fundamentals run's headline figures (workbench.train.fundamentals.runner)
EVAL_FORMAT = "workbench-eval/"  # + the major version: what evals.runner writes and this report reads

NONE = "—"


# ----------------------------------------------------------------------------------------------------
# Formatting


def format_number(x) -> str:
    """Four significant digits for floats (thousands grouped from 1000 up), ints as they are, grouped;
    None as a dash, anything else as str."""
    if x is None:
        return NONE
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return str(x)
    if isinstance(x, numbers.Integral):
        return f"{int(x):,}"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1000:
        digits = math.floor(math.log10(abs(x))) + 1
        return f"{round(x, 4 - digits):,.0f}"
    return f"{x:.4g}"


def format_si(x, unit: str) -> str:
    """1.235e7 -> '12.35 M<unit>' (four significant digits, SI prefix up to P)."""
    if not _is_number(x) or not math.isfinite(x):
        return f"{format_number(x)} {unit}"
    x = float(x)
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {prefix}{unit}"
    return f"{x:.4g} {unit}"


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _cell(x) -> str:
    """A markdown table cell: numbers formatted, pipes and newlines escaped."""
    text = format_number(x) if _is_number(x) or x is None else str(x)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _fenced(text: str, lang: str) -> list[str]:
    fence = "```"
    while fence in text:
        fence += "`"
    return [fence + lang, text.rstrip("\n"), fence]


# ----------------------------------------------------------------------------------------------------
# run_info.json


def _read_info(run_dir: Path) -> tuple[dict, str | None]:
    """(info, a note if run_info.json exists but cannot be read)."""
    path = run_dir / INFO_FILE
    if not path.is_file():
        return {}, None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return {}, f"{INFO_FILE} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(info, dict):
        return {}, f"{INFO_FILE} is not a JSON object"
    return info, None


# ----------------------------------------------------------------------------------------------------
# Sections


def _last(records: list[dict], key: str):
    return next((r[key] for r in reversed(records) if _is_number(r.get(key))), None)


def _summary(run_dir: Path, config: dict, records: list[dict]) -> list[str]:
    model = config.get("model", {}) if isinstance(config.get("model"), dict) else {}
    train = config.get("train", {}) if isinstance(config.get("train"), dict) else {}
    task = config.get("task", {}) if isinstance(config.get("task"), dict) else {}
    what = " ".join(str(model[k]) for k in ("family", "flavor") if k in model) or (
        f"task {task['name']}" if "name" in task else "unknown model")
    done = records[-1].get("step") if records else 0
    planned = train.get("steps", train.get("max_steps") or None)
    section = config.get("objective")
    objective = section.get("name", "lm") if isinstance(section, dict) else "lm"
    parts = [f"**{what}**" + (f", objective {objective}" if objective != "lm" else ""),
             f"step {format_number(done)} / {format_number(planned)}"]
    val_loss, val_bpb = _last(records, "val_loss"), _last(records, "val_bpb")
    if val_loss is None:
        parts.append("no validation yet")
    elif val_bpb is not None:
        parts.append(f"val loss {format_number(val_loss)} nats/token, {format_number(val_bpb)} bits/byte")
    else:  # an objective whose loss is not per token (DPO: per pair), with its own held-out metrics
        last = next((r for r in reversed(records) if "val_loss" in r), {})
        more = [f"{k[4:]} {format_number(v)}" for k, v in last.items() if k.startswith("val_") and k != "val_loss"]
        parts.append(", ".join([f"val loss {format_number(val_loss)}", *more[:3]]))
    return [f"# {run_dir.resolve().name}", "", " · ".join(parts)]


def _results_section(run_dir: Path) -> list[str]:
    """The figures and pictures a fundamentals task recorded (results.json); nothing for other runs."""
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        results, figures = dict(data.get("results", {})), list(data.get("figures", []))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return ["## Results", "", f"{RESULTS_FILE} is unreadable ({type(e).__name__}: {e})"]
    lines = ["## Results", ""]
    if results:
        lines += markdown_table(["", "value", "note"], [[k, (r or {}).get("value"), (r or {}).get("note", "")]
                                                          for k, r in results.items()]) + [""]
    for fig in figures:
        if isinstance(fig, dict) and "file" in fig:
            lines += [f"![{fig.get('caption', '')}]({quote(str(fig['file']))})", "", f"*{fig.get('caption', '')}*", ""]
    return lines


def _config_section(config_text: str | None, note: str | None) -> list[str]:
    lines = ["## Resolved config", ""]
    if config_text is None:
        return lines + [note or f"no {CONFIG_FILE} in the run folder"]
    if note:
        lines += [note, ""]
    return lines + _fenced(config_text, "toml")


def _curves_section(run_dir: Path, records: list[dict]) -> list[str]:
    lines = ["## Curves", ""]
    if not records:
        return lines + [f"no metrics yet ({METRICS_FILE} is missing or empty)"]
    title = run_dir.resolve().name
    if not (run_dir / PLOT_FILE).is_file():  # RunLog.plot draws it with the baselines; this is the fallback
        plot_loss(records, run_dir / PLOT_FILE, title=title)
    plot_lr(records, run_dir / LR_PLOT_FILE, title=title)
    return lines + [f"![loss]({PLOT_FILE})", "", f"![learning rate and gradient norm]({LR_PLOT_FILE})"]


def _median_last(records: list[dict], key: str) -> tuple[float, float, int] | None:
    values = [float(r[key]) for r in records if _is_number(r.get(key)) and math.isfinite(r[key])]
    return (statistics.median(values), values[-1], len(values)) if values else None


def _throughput_section(records: list[dict], info: Mapping) -> list[str]:
    lines = ["## Throughput", ""]
    train = [r for r in records if "tokens_per_s" in r]
    speed = _median_last(train, "tokens_per_s")
    if speed is None:
        lines.append("no training steps recorded yet")
    else:
        med, last, n = speed
        lines.append(f"- tokens/s: median {format_number(med)}, last {format_number(last)} "
                     f"(over {n} train record{'s' if n != 1 else ''})")
        gflops, mfu = _median_last(train, "gflops"), _median_last(train, "mfu")
        if gflops:
            lines.append(f"- GFLOP/s: median {format_number(gflops[0])}, last {format_number(gflops[1])}")
        if mfu:
            lines.append(f"- MFU: median {format_number(100 * mfu[0])}%, last {format_number(100 * mfu[1])}%")
    facts = []
    if "parameters" in info:
        n = info["parameters"]
        short = f" ({format_si(n, '')})" if _is_number(n) and n >= 1000 else ""
        facts.append(f"- parameters: {format_number(n)}{short}")
    if "flops_per_token" in info:
        facts.append(f"- FLOPs per token: {format_si(info['flops_per_token'], 'FLOP')}")
    if "device" in info:
        facts.append(f"- device: {info['device']}")
    if "layout" in info:
        facts.append(f"- parallel layout: {info['layout']}")
    known = {"parameters", "flops_per_token", "device", "layout"}
    facts += [f"- {k}: {_cell(v)}" for k, v in info.items() if k not in known]
    if facts:
        lines += ([] if speed else [""]) + facts  # one list with the speeds, after a paragraph otherwise
    return lines


def _checkpoints_section(run_dir: Path) -> list[str]:
    lines = ["## Checkpoints", ""]
    rows = []
    for ckpt in list_checkpoints(run_dir):
        try:  # a trainer's keep_last may remove one while another process writes the report
            size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
            written = datetime.fromtimestamp((ckpt / MARKER).stat().st_mtime, tz=UTC)
        except OSError:
            continue
        rows.append([step_of(ckpt), f"{size / 2**20:.4g}", written.strftime("%Y-%m-%d %H:%M:%S UTC"),
                     f"`{ckpt.relative_to(run_dir).as_posix()}`"])
    if not rows:
        return lines + ["no checkpoint yet"]
    return lines + markdown_table(["step", "size (MiB)", "written at", "path"], rows)


def _eval_table(folder: Path, results: dict, run_dir: Path) -> list[str]:
    source = results.get("source") if isinstance(results.get("source"), dict) else {}
    about = []
    if source.get("ckpt"):
        about.append(f"checkpoint `{source['ckpt']}`")
    if source.get("hf_dir"):
        about.append(f"Hugging Face directory `{source['hf_dir']}` (not this run's model)")
    elif source.get("run_dir") and Path(source["run_dir"]).resolve() != run_dir.resolve():
        about.append(f"**another run's model** (`{source['run_dir']}`)")
    if source.get("step") is not None:
        about.append(f"step {format_number(source['step'])}")
    if results.get("updated"):
        about.append(f"updated {results['updated']}")
    link = f"[report]({quote(f'{EVALS_DIR}/{folder.name}/{REPORT_FILE}')})"
    rows = []
    for name, task in results["tasks"].items():
        task = task if isinstance(task, dict) else {}
        metrics = task.get("metrics") if isinstance(task.get("metrics"), dict) else {}
        baselines = task.get("baselines") if isinstance(task.get("baselines"), dict) else {}
        primary = task.get("primary")
        rows.append([task.get("task", name), primary or NONE, metrics.get(primary) if primary else None,
                     ", ".join(f"{k} {format_number(v)}" for k, v in baselines.items()) or NONE,
                     task.get("n"), link])
    lines = [f"### {folder.name}", ""]
    if about:
        lines += [", ".join(about), ""]
    if not rows:
        return lines + ["no tasks in this evaluation"]
    return lines + markdown_table(["task", "metric", "value", "baselines", "n", "details"], rows)


def _load_eval(folder: Path) -> tuple[dict | None, str | None]:
    """(results, None) or (None, why it is skipped)."""
    path = folder / EVAL_RESULTS
    if not path.is_file():
        return None, f"no {EVAL_RESULTS}"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"{EVAL_RESULTS} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
        return None, f"{EVAL_RESULTS} has no 'tasks' object"
    fmt = results.get("format")
    if not (isinstance(fmt, str) and fmt.startswith(EVAL_FORMAT)):
        return None, f"{EVAL_RESULTS} has format {fmt!r}, not {EVAL_FORMAT}N"
    return results, None


def _evals_section(run_dir: Path) -> list[str]:
    lines = ["## Evaluations", ""]
    root = run_dir / EVALS_DIR
    # step-9 before step-10: by the step number in the name, then by name
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (step_of(p), p.name)) \
        if root.is_dir() else []
    shown = 0
    for folder in folders:
        results, why = _load_eval(folder)
        if results is None:
            lines += [f"- skipped `{EVALS_DIR}/{folder.name}`: {why}", ""]
            continue
        lines += _eval_table(folder, results, run_dir) + [""]
        shown += 1
    if not shown:
        lines.append(f"no evaluation yet; run one with `workbench eval --task perplexity --ckpt {run_dir}`")
    return lines


# ----------------------------------------------------------------------------------------------------
# The report


def write_run_report(run_dir: str | Path, info: Mapping | None = None) -> Path:
    """(Re)write RUN_DIR/report.md from the run folder's files (see the module doc); its path.

    `info`: facts about the run the folder's files do not hold (parameters, flops_per_token, device,
    layout; any other JSON value is listed too). Given, it is saved to run_info.json (atomically);
    None, run_info.json is read back, so a regeneration by another process still shows them.
    """
    run_dir = Path(run_dir)
    notes: list[str] = []
    if info is not None:
        info = dict(info)
        atomic_write_text(run_dir / INFO_FILE, json.dumps(info, indent=1, default=str) + "\n")
    else:
        info, note = _read_info(run_dir)
        if note:
            notes.append(note)

    try:
        records = read_metrics(run_dir / METRICS_FILE)
    except (OSError, ValueError) as e:
        records = []
        notes.append(f"{METRICS_FILE} is unreadable ({e}); the sections below show no metrics")

    config, config_text, config_note = {}, None, None
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        try:
            config_text = config_path.read_text(encoding="utf-8")
            config = tomllib.loads(config_text)
        except (OSError, ValueError) as e:
            config_note = f"{CONFIG_FILE} does not parse ({type(e).__name__}: {e})"

    lines = _summary(run_dir, config, records) + [""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    for section in (_results_section(run_dir), _config_section(config_text, config_note),
                    _curves_section(run_dir, records), _throughput_section(records, info),
                    _checkpoints_section(run_dir), _evals_section(run_dir)):
        lines += section + [""]
    out = run_dir / REPORT_FILE
    atomic_write_text(out, "\n".join(lines).rstrip("\n") + "\n")
    return out
