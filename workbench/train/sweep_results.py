"""A sweep's results, drawn from its trial folders: the table, the plots, the best config, the report.

Everything here reads files the trials wrote (SWEEP/trials/trial-NNN/{sweep_trial.json, metrics.jsonl,
sweep_result.json}, SWEEP/attempts.jsonl, SWEEP/sweep.toml), so it needs no Ray and can be rerun at any time;
`workbench.train.sweep` calls `write_results` when a sweep ends or is interrupted.

    results.md / .csv  one row per trial, best first: its swept values, status (finished, stopped by the
                       scheduler at step N, failed, unfinished), the steps it ran, the metric at its last
                       validation, the best it reached, the eval metrics of finished trials, its attempts
    sweep.png          the metric against each swept field (one panel each; a log axis for loguniform, the
                       listed values in order for choice and grid): finished trials filled, stopped ones
                       hollow, the best starred
    curves.png         the metric against step for every trial: where the scheduler stopped which
    best.toml          the best finished trial's resolved config, renamed SWEEP-best in the base's out_dir,
                       ready for `workbench train best.toml` (or the task's verb)
    report.md          all of it, with the commands that reproduce and continue the sweep

Which trial is best: among finished trials, the one whose metric at its last validation is best (min or max
as the sweep says); a stopped trial's last value is from fewer steps, so it only wins when none finished.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from pathlib import Path

from workbench.config import dumps_toml, load_toml
from workbench.train.metrics import atomic_write_text, read_metrics

# a sweep folder's layout (workbench.train.sweep writes it; this module only reads it, so it needs no Ray)
TRIALS_DIR = "trials"
ATTEMPTS_FILE = "attempts.jsonl"
TRIAL_FILE = "sweep_trial.json"  # in a trial's run folder: its name, Ray id and sampled values
RESULT_FILE = "sweep_result.json"  # in a trial's run folder, once it finished: its final metrics
SWEEP_FILE = "sweep.toml"  # the resolved sweep, compared on --resume
BASE_COPY = "base.toml"  # the base config as it was when the sweep began
TASK_VERBS = {"diffusion": "diffusion", "nerf": "nerf", "video": "video", "video_vae": "video"}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def collect(sdir: Path, errors: dict[str, str] | None = None, interrupted: bool = False) -> list[dict]:
    """One dict per trial folder: name, params, status, steps, last / best metric, eval metrics, attempts.
    `interrupted`: the sweep did not end, so a trial that did not finish is unfinished, not stopped."""
    sweep = load_toml(sdir / SWEEP_FILE)
    metric, mode = sweep["sweep"]["metric"], sweep["sweep"]["mode"]
    attempts: dict[str, int] = {}
    for rec in read_metrics(sdir / ATTEMPTS_FILE):  # JSON lines; read_metrics only needs valid JSON
        if rec.get("trains", True):
            attempts[rec["trial"]] = attempts.get(rec["trial"], 0) + 1
    errors = errors or {}
    rows = []
    for trial_dir in sorted((sdir / TRIALS_DIR).glob("trial-*")):
        info = _read_json(trial_dir / TRIAL_FILE)
        if info is None:
            continue
        vals = [(r["step"], float(r[metric])) for r in read_metrics(trial_dir / "metrics.jsonl")
                if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        result = _read_json(trial_dir / RESULT_FILE)
        name = info["trial"]
        if result is not None:
            status = "finished"
        elif name in errors:
            status = "failed"
        elif vals and not interrupted:
            status = f"stopped at step {vals[-1][0]}"
        else:
            status = "unfinished"
        best = (min if mode == "min" else max)(v for _, v in vals) if vals else None
        evals = {k: v for k, v in (result or {}).get("metrics", {}).items() if "/" in k}
        rows.append({"trial": name, "dir": str(trial_dir), "params": info["params"], "status": status,
                     "steps": vals[-1][0] if vals else 0, "last": vals[-1][1] if vals else None, "best": best,
                     "curve": vals, "evals": evals, "attempts": attempts.get(name, 0),
                     "error": errors.get(name) or (result or {}).get("eval_error", "")})
    sign = 1 if mode == "min" else -1
    rows.sort(key=lambda r: (r["status"] != "finished", r["last"] is None,
                             sign * r["last"] if r["last"] is not None else 0, r["trial"]))
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def table(rows: list[dict], keys: list[str], metric: str) -> tuple[str, str]:
    """(markdown, csv) of the rows."""
    eval_keys = sorted({k for r in rows for k in r["evals"]})
    head = ["trial", *keys, "status", "steps", metric, f"best {metric}", *eval_keys, "attempts"]
    body = [[r["trial"], *[_fmt(r["params"].get(k)) for k in keys], r["status"], str(r["steps"]), _fmt(r["last"]),
             _fmt(r["best"]), *[_fmt(r["evals"].get(k)) for k in eval_keys], str(r["attempts"])] for r in rows]
    md = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                   + ["| " + " | ".join(row) + " |" for row in body]) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    for r in rows:
        w.writerow([r["trial"], *[r["params"].get(k, "") for k in keys], r["status"], r["steps"],
                    "" if r["last"] is None else r["last"], "" if r["best"] is None else r["best"],
                    *[r["evals"].get(k, "") for k in eval_keys], r["attempts"]])
    return md, buf.getvalue()


def plot_fields(rows: list[dict], space: dict, metric: str, out: Path) -> None:
    """sweep.png: the metric at each trial's last validation against each swept field."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from workbench.train.metrics import save_png

    keys = list(space)
    fig = Figure(figsize=(4.2 * len(keys), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    scored = [r for r in rows if r["last"] is not None]
    best = scored[0] if scored else None
    for ax, key in zip(axes, keys):
        kind, values = next(iter(space[key].items()))
        categorical = kind in ("grid", "choice")
        pos = {json.dumps(v): i for i, v in enumerate(values)}

        def x_of(r, key=key, pos=pos, categorical=categorical):
            v = r["params"].get(key)
            return pos.get(json.dumps(v), math.nan) if categorical else v

        for finished in (True, False):
            pts = [(x_of(r), r["last"]) for r in scored if (r["status"] == "finished") == finished
                   and isinstance(x_of(r), (int, float))]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=36, label="finished" if finished else
                           "stopped early", facecolors="C0" if finished else "none", edgecolors="C0")
        if best is not None and isinstance(x_of(best), (int, float)):
            ax.scatter([x_of(best)], [best["last"]], marker="*", s=220, color="C3", label=f"best ({best['trial']})",
                       zorder=3)
        if categorical:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
            ax.set_xlim(-0.5, len(values) - 0.5)
        elif kind == "loguniform":
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short decade overlap
        ax.set_xlabel(f"{key} ({kind})")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    if scored:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{metric} at each trial's last validation")
    save_png(fig, out)


def plot_curves(rows: list[dict], metric: str, out: Path) -> None:
    """curves.png: every trial's metric against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from workbench.train.metrics import save_png

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, r in enumerate(sorted(rows, key=lambda r: r["trial"])):
        if r["curve"]:
            ax.plot([s for s, _ in r["curve"]], [v for _, v in r["curve"]], marker="o", ms=3,
                    ls="-" if r["status"] == "finished" else "--", color=f"C{i % 10}",
                    label=f"{r['trial']} ({r['status']})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if any(r["curve"] for r in rows):
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{metric} of every trial (dashed: stopped before its end)")
    save_png(fig, out)


def write_best(sdir: Path, best: dict, sweep: dict) -> tuple[Path, str]:
    """best.toml from the best trial's resolved config: renamed, in the base config's out_dir; (path, command)."""
    cfg = load_toml(Path(best["dir"]) / "config.toml")
    base = load_toml(sdir / BASE_COPY)
    name = sweep["sweep"]["name"]
    cfg["run"]["name"] = f"{name}-best"
    cfg["run"]["out_dir"] = base.get("run", {}).get("out_dir", "runs")
    task = cfg.get("task", {}).get("name") if isinstance(cfg.get("task"), dict) else None
    verb = "train" if task is None else TASK_VERBS.get(task, "fundamentals")
    path = sdir / "best.toml"
    command = f"workbench {verb} {path}"
    values = ", ".join(f"{k} = {_fmt(v)}" for k, v in best["params"].items())
    header = (f"# The best trial of sweep {name}: {best['trial']} ({values}), {sweep['sweep']['metric']} "
              f"{_fmt(best['last'])} at step {best['steps']}.\n# Train it again, in its own run folder, with:\n"
              f"#   {command}\n\n")
    atomic_write_text(path, header + dumps_toml(cfg))
    return path, command


def write_results(sdir: Path, errors: dict[str, str] | None = None, log: Callable[[str], None] = print,
                  interrupted: bool = False) -> dict:
    """Write the table, plots, best.toml and report.md of sweep folder `sdir`; returns the summary."""
    sweep = load_toml(sdir / SWEEP_FILE)
    metric = sweep["sweep"]["metric"]
    space = sweep["space"]
    rows = collect(sdir, errors, interrupted)
    from workbench.train.report import write_run_report

    for r in rows:  # a trial stopped by the scheduler (or killed) may have ended before writing its report
        if r["status"] != "finished" and (Path(r["dir"]) / "config.toml").is_file():
            write_run_report(r["dir"])
    md, text = table(rows, list(space), metric)
    atomic_write_text(sdir / "results.md", md)
    atomic_write_text(sdir / "results.csv", text)
    plot_fields(rows, space, metric, sdir / "sweep.png")
    plot_curves(rows, metric, sdir / "curves.png")
    finished = [r for r in rows if r["status"] == "finished" and r["last"] is not None]
    best = finished[0] if finished else None
    best_path = command = None
    if best is not None:
        best_path, command = write_best(sdir, best, sweep)
    counts = {s: sum(r["status"].split(" ")[0] == s for r in rows) for s in ("finished", "stopped", "failed",
                                                                               "unfinished")}
    lines = [f"# Sweep {sweep['sweep']['name']}", "",
             f"Base config: `{sweep['sweep']['base']}` (copied to base.toml); {sweep['sweep']['scheduler']} on "
             f"`{metric}` ({sweep['sweep']['mode']}); {len(rows)} trials: "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".", ""]
    if best is not None:
        lines += [f"**Best:** {best['trial']}: " + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in best["params"].items())
                  + f", {metric} {_fmt(best['last'])} at step {best['steps']}. Its config: `best.toml`; "
                  f"`{command}` trains it again.", ""]
    else:
        lines += ["No trial finished yet, so there is no best config.", ""]
    lines += ["## Trials", "", md, "![metric against each swept field](sweep.png)", "",
              "![metric against step](curves.png)", ""]
    failed = [r for r in rows if r["error"]]
    if failed:
        lines += ["## Failures", ""] + [f"- {r['trial']} ({r['status']}): {r['error'].strip().splitlines()[-1][:300]}"
                                        f" (log: `trials/{r['trial']}/train.log`)" for r in failed] + [""]
    lines += ["## Reproduce", "", "```", f"workbench sweep {sdir / SWEEP_FILE}   # a new sweep needs another "
              "--sweep.name", f"workbench sweep {sdir / SWEEP_FILE} --resume   # continue this one", "```", ""]
    atomic_write_text(sdir / "report.md", "\n".join(lines))
    log(f"sweep results: {sdir / 'results.md'}; plots {sdir / 'sweep.png'}, {sdir / 'curves.png'}")
    if best is not None:
        log(f"best: {best['trial']} {json.dumps(best['params'])} {metric} {_fmt(best['last'])}; config {best_path} "
            f"(`{command}`)")
    return {"dir": str(sdir), "trials": rows, "best": best, "best_config": str(best_path) if best_path else None,
            "counts": counts}
