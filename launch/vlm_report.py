"""Writes the measured part of docs/vlm-training.md and its plots from the runs of launch/vlm.sh.

    accuracy   held-out (test split) exact match of each stage per seed: the blind run, the warm-up and the
               fine-tuned model, each with noise for images, beside the majority answers; the margin over the
               blind run; the mean over the seeds
    per type   the fine-tuned model per question type beside its noise-image score, the blind run and the
               majority answers (means over the seeds), with the number of test items of each type
    curves     validation loss and exact match of the three stages one after another (every seed)
    variants   runs made by hand beside the recipe when they exist (a longer fine-tuning, one from scratch)
    examples   held-out images with the question, the fine-tuned model's answer and the truth (the first seed)

The text between the `measured` markers of the document is replaced; the rest (hand-written) is kept.
"""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

from evals.measured import eval_results, fmt, report_main, times_table
from evals.plots import new_figure, save_figure
from workbench.train.metrics import METRICS_FILE, read_metrics

SCRIPT = "launch/vlm_report.py"
STAGES = ("blind", "warmup", "finetune")
NAMES = {"blind": "blind run (constant image)", "warmup": "warm-up (language model frozen)",
         "finetune": "full fine-tuning"}


def vqa(runs: Path, stage: str, seed: str) -> dict:
    return eval_results(runs / f"vlm-{stage}-s{seed}", "vqa").get("vqa", {})


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def spread(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def accuracy_section(runs: Path, seeds: list[str]) -> list[str]:
    lines = ["### Held-out exact match (test split, questions; captions apart)", "",
             "| stage | seed | exact match | noise images | blind run | majority (train) | margin over blind |",
             "|---|---|---|---|---|---|---|"]
    found = False
    for stage in STAGES:
        cols: dict[str, list] = {k: [] for k in ("em", "noise", "blind", "majority", "margin")}
        for seed in seeds:
            task = vqa(runs, stage, seed)
            if not task:
                continue
            found = True
            m, b = task["metrics"], task["baselines"]
            row = {"em": m["exact_match"], "noise": m.get("exact_match_noise"), "blind": b.get("blind run"),
                   "majority": b.get("majority (train)"), "margin": m.get("margin_over_blind")}
            for k, v in row.items():
                cols[k].append(v)
            lines.append(f"| {NAMES[stage]} | {seed} | " + " | ".join(fmt(row[k]) for k in cols) + " |")
        if len(cols["em"]) > 1:
            lines.append(f"| {NAMES[stage]} | mean ± sd | " + " | ".join(spread(cols[k]) for k in cols) + " |")
    if not found:
        return []
    first = vqa(runs, "finetune", seeds[0]) or vqa(runs, "blind", seeds[0])
    d = first.get("details", {})
    lines += ["", f"{d.get('questions', '?')} questions and {d.get('captions', '?')} captions about "
              f"{d.get('images', '?')} held-out images. The blind run is scored with the constant image it was "
              f"trained on; its own row's \"noise images\" column feeds it noise instead."]
    return lines


# runs beside the recipe, made by hand (docs/vlm-training.md gives their commands): seed 0 only
VARIANTS = {"finetune-long": "full fine-tuning, 1600 steps instead of 800 (from the same warm-up)",
            "scratch": "no blind start, no warm-up: finetune.toml from random weights"}


def variants_section(runs: Path) -> list[str]:
    lines = ["### Variants (seed 0)", "",
             "| run | exact match | noise images | blind run | margin over blind | colour | count | output |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [("finetune", NAMES["finetune"] + ", the recipe's 800 steps")] + list(VARIANTS.items())
    found = 0
    for stage, name in rows:
        task = vqa(runs, stage, "0")
        if not task:
            continue
        found += stage != "finetune"
        m, b = task["metrics"], task["baselines"]
        lines.append(f"| {name} | {fmt(m['exact_match'])} | {fmt(m.get('exact_match_noise'))} | "
                     f"{fmt(b.get('blind run'))} | {fmt(m.get('margin_over_blind'))} | {fmt(m.get('em_colour'))} | "
                     f"{fmt(m.get('em_count'))} | {fmt(m.get('em_output'))} |")
    return lines if found else []


def per_type_section(runs: Path, seeds: list[str]) -> list[str]:
    tasks = [vqa(runs, "finetune", s) for s in seeds]
    tasks = [t for t in tasks if t]
    if not tasks:
        return []
    warm = [vqa(runs, "warmup", s) for s in seeds]
    types = sorted(tasks[0]["details"]["types"])
    lines = ["### Per question type (means over the seeds)", "",
             "| type | test items | fine-tuned | noise images | blind run | majority (train) | warm-up |",
             "|---|---|---|---|---|---|---|"]
    for t in types:
        def col(key: str, source=tasks) -> str:
            return fmt(mean([x["metrics"].get(key) for x in source if x]))
        lines.append(f"| {t} | {tasks[0]['details']['types'][t]} | {col(f'em_{t}')} | {col(f'em_noise_{t}')} | "
                     f"{col(f'blind_em_{t}')} | {col(f'majority_em_{t}')} | {col(f'em_{t}', warm)} |")
    return lines


def curves(runs: Path, seeds: list[str], images: Path, rel: str) -> list[str]:
    fig = new_figure((10.0, 3.6))
    ax_loss, ax_em = fig.subplots(1, 2)
    drawn = False
    for i, seed in enumerate(seeds):
        offset = 0
        for j, stage in enumerate(STAGES):
            run = runs / f"vlm-{stage}-s{seed}"
            if not (run / METRICS_FILE).is_file():
                break
            recs = read_metrics(run / METRICS_FILE)
            val = [r for r in recs if "val_loss" in r]
            train = [r for r in recs if "loss" in r and "val_loss" not in r]
            label = f"{stage} s{seed}"
            style = {"color": f"C{j}", "alpha": 1.0 if i == 0 else 0.5}
            ax_loss.plot([offset + r["step"] for r in train], [r["loss"] for r in train], lw=0.8, **style,
                         label=label)
            ax_loss.plot([offset + r["step"] for r in val], [r["val_loss"] for r in val], "o--", ms=3, **style)
            ax_em.plot([offset + r["step"] for r in val], [r["val_exact_match"] for r in val], "o-", ms=3, **style,
                       label=label)
            offset += max((r["step"] for r in recs if "step" in r), default=0)
            drawn = True
    if not drawn:
        return []
    ax_loss.set_title("answer loss: train (lines), validation (dots)")
    ax_loss.set_xlabel("step (stages one after another)")
    ax_loss.set_ylabel("nats / answer token")
    ax_em.set_title("validation exact match (val split subset)")
    ax_em.set_xlabel("step (stages one after another)")
    for ax in (ax_loss, ax_em):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, images / "vlm_curves.png")
    return ["### Training curves", "", f"![loss and exact match]({rel}/vlm_curves.png)"]


def examples(runs: Path, seeds: list[str], images: Path, rel: str) -> list[str]:
    out = []
    for name in ("vqa_types.png", "vqa_examples.png"):
        src = runs / f"vlm-finetune-s{seeds[0]}" / "evals" / "vqa" / name
        if src.is_file():
            shutil.copyfile(src, images / f"vlm_{name.removeprefix('vqa_')}")
            out.append(f"![{name}]({rel}/vlm_{name.removeprefix('vqa_')})")
    if not out:
        return []
    return ["### Per type and held-out examples (fine-tuned, seed " + seeds[0] + ")", "", *out]


def sections(runs: Path, images: Path, rel: str, seeds: list[str], times: Path | None) -> list[list[str]]:
    return [accuracy_section(runs, seeds), per_type_section(runs, seeds), variants_section(runs),
            curves(runs, seeds, images, rel),
            examples(runs, seeds, images, rel),
            times_table(times, "launch/vlm.sh", "two seeds ran side by side, one thread each, on a shared machine")]


if __name__ == "__main__":
    sys.exit(report_main(None, __doc__.splitlines()[0], "docs/vlm-training.md", SCRIPT, "launch/vlm.sh", sections))
