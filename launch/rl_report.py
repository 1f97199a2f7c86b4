"""Writes the measured part of docs/rl.md and its plots from the runs of launch/rl.sh.

    held-out   each GRPO and PPO seed's accuracy on the held-out problems (evals/rl/, `workbench eval --task
               reasoning` with 8 samples per problem: pass@1 as DeepSeek-R1 reports it, pass@8 and the greedy
               answer's), its R1 format share and per-kind pass@1, beside the SFT start's and chance; the change
               over the start per seed, and how many seeds improved
    curves     the rollouts' mean reward and the validation accuracy over the steps of every run (metrics.jsonl)

The text between the `measured` markers of the document is replaced; the rest (hand-written) is kept.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from evals.measured import eval_results, fmt, report_main, times_table
from evals.plots import new_figure, save_figure
from workbench.train.metrics import METRICS_FILE, read_metrics

SCRIPT = "launch/rl_report.py"
OBJECTIVES = ("grpo", "ppo")


def reasoning(run: Path) -> dict:
    return eval_results(run, "rl").get("reasoning", {})


def accuracy(task: dict) -> float | None:
    return task.get("metrics", {}).get("accuracy")


def per_kind(task: dict) -> dict[str, float]:
    return {k: v["accuracy"] for k, v in task.get("details", {}).get("per_kind", {}).items()}


def heldout_section(runs: Path, seeds: list[str], images: Path, rel: str) -> list[str]:
    start = reasoning(runs / "post-sft")
    if not start:
        return []
    kinds = sorted(per_kind(start))
    k = start.get("details", {}).get("samples", 1)
    lines = ["### Held-out accuracy against the SFT start", "",
             f"{start.get('n')} held-out problems of the kinds {', '.join(kinds)} (seed 41, none a training prompt), "
             f"{k} completions each sampled at temperature {start.get('details', {}).get('temperature')}, answers "
             f"checked by a program. pass@1 is the mean correctness over the samples (DeepSeek-R1's protocol), "
             f"pass@{k} the share of problems with a right answer among them, greedy the one greedy answer's "
             f"accuracy; chance {fmt(start.get('baselines', {}).get('chance'))}. Per-kind columns are pass@1.", "",
             f"| model | seed | pass@1 | change | pass@{k} | greedy | R1 format | " + " | ".join(kinds) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(kinds)]
    a0 = accuracy(start)

    def row(name, seed, task, change):
        m = task["metrics"]
        return (f"| {name} | {seed} | {fmt(m.get('accuracy'))} | {change} | {fmt(m.get('pass_at_k'))} | "
                f"{fmt(m.get('greedy_accuracy'))} | {fmt(m.get('format'))} | "
                + " | ".join(fmt(per_kind(task).get(k)) for k in kinds) + " |")

    lines.append(row("SFT start", "-", start, "-"))
    summary, bars = [], {"SFT start": [per_kind(start).get(k, 0.0) for k in kinds]}
    for name in OBJECTIVES:
        deltas, by_kind = [], []
        for seed in seeds:
            task = reasoning(runs / f"rl-{name}-s{seed}")
            if not task:
                continue
            deltas.append(accuracy(task) - a0)
            by_kind.append([per_kind(task).get(k, 0.0) for k in kinds])
            lines.append(row(name.upper(), seed, task, f"{deltas[-1]:+.3f}"))
        if deltas:
            spread = f" (std {statistics.stdev(deltas):.3f})" if len(deltas) > 1 else ""
            summary.append(f"- {name.upper()}: held-out pass@1 {fmt(a0)} -> {fmt(a0 + statistics.mean(deltas))} on "
                           f"average, {statistics.mean(deltas):+.3f}{spread}; higher than the start in "
                           f"{sum(d > 0 for d in deltas)} of {len(deltas)} seeds, the smallest change "
                           f"{min(deltas):+.3f}.")
            bars[f"{name.upper()} (mean of {len(by_kind)})"] = [statistics.mean(c) for c in zip(*by_kind)]
    if len(bars) > 1:
        plot_kinds(images / "rl-kinds.png", kinds, bars, start)
        lines += ["", *summary, "", f"![per-kind accuracy]({rel}/rl-kinds.png)"]
    return lines


def plot_kinds(out: Path, kinds: list[str], bars: dict, start: dict) -> None:
    fig = new_figure((8, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        ax.bar([k + i * width for k in range(len(kinds))], values, width, label=label)
    chance = {k: v.get("chance") for k, v in start.get("details", {}).get("per_kind", {}).items()}
    for k, kind in enumerate(kinds):
        if chance.get(kind) is not None:
            ax.hlines(chance[kind], k - width / 2, k + 0.8 - width / 2, colors="black", linewidth=1.5,
                      label="chance" if k == 0 else None)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], kinds)
    ax.set_ylabel("held-out pass@1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Held-out pass@1 per kind: SFT start vs RL")
    save_figure(fig, out)


def curves_section(runs: Path, seeds: list[str], images: Path, rel: str) -> list[str]:
    series = {name: {seed: read_metrics(runs / f"rl-{name}-s{seed}" / METRICS_FILE) for seed in seeds
                     if (runs / f"rl-{name}-s{seed}" / METRICS_FILE).is_file()} for name in OBJECTIVES}
    if not any(series.values()):
        return []
    fig = new_figure((11, 4.0))
    for col, (key, title) in enumerate((("reward", "rollouts' mean reward (train)"),
                                        ("val_accuracy", "validation accuracy (greedy, 100 problems)"))):
        ax = fig.add_subplot(1, 2, col + 1)
        for c, (name, by_seed) in enumerate(series.items()):
            for i, records in enumerate(by_seed.values()):
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:
                    ax.plot(*zip(*points), color=f"C{c}", alpha=0.8, linewidth=1.0,
                            marker="o" if key.startswith("val_") else None, markersize=3,
                            label=f"{name.upper()}" if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    save_figure(fig, images / "rl-curves.png")
    lines = ["### Training curves", "", "Every seed of each objective (one colour per objective):", "",
             f"![RL curves]({rel}/rl-curves.png)", "", "| run | first reward | last reward | last KL | val accuracy |",
             "|---|---|---|---|---|"]
    for name, by_seed in series.items():
        for seed, records in by_seed.items():
            train = [r for r in records if "reward" in r]
            val = [r["val_accuracy"] for r in records if "val_accuracy" in r]
            if train:
                lines.append(f"| rl-{name}-s{seed} | {fmt(train[0]['reward'])} | {fmt(train[-1]['reward'])} | "
                             f"{fmt(train[-1].get('kl'))} | {' -> '.join(fmt(v) for v in val)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    return report_main(argv, __doc__.split("\n")[0], "docs/rl.md", SCRIPT, "launch/rl.sh",
                       lambda runs, images, rel, seeds, times: [
                           heldout_section(runs, seeds, images, rel), curves_section(runs, seeds, images, rel),
                           times_table(times, "launch/rl.sh")])


if __name__ == "__main__":
    raise SystemExit(main())
