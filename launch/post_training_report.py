"""Writes the measured part of docs/post-training.md and its plots from the runs of launch/post_training.sh.

    SFT      held-out reasoning accuracy (program-checked) and instruction exact match, per kind: the pretrained
             start asked in the chat template and as plain text, and the SFT model (each run's evals/post*/)
    DPO      held-out preference accuracy and reward margin, and the teaching rubric (answers whose example runs
             and passes), SFT start vs DPO; the DPO run's training curves (metrics.jsonl)
    distill  each seed's validation loss curve with the teacher and without, and the final values

The text between the `measured` markers of the document is replaced; the rest (hand-written) is kept. A document
without the markers gets them appended.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from evals.measured import eval_results, fmt, report_main, times_table
from evals.plots import new_figure, save_figure
from workbench.train.metrics import METRICS_FILE, read_metrics

SCRIPT = "launch/post_training_report.py"
results = eval_results


def metrics(run: Path) -> list[dict]:
    return read_metrics(run / METRICS_FILE)


# ---------------------------------------------------------------------------------------------------- SFT


def per_kind(task: dict) -> dict[str, float]:
    return {k: v["accuracy"] for k, v in task.get("details", {}).get("per_kind", {}).items()} if task else {}


def sft_section(runs: Path, images: Path, rel: str) -> list[str]:
    models = {"pretrained, chat prompt": results(runs / "llama3-demo", "post"),
              "pretrained, plain prompt": results(runs / "llama3-demo", "post-plain"),
              "SFT": results(runs / "post-sft", "post"), "DPO (after SFT)": results(runs / "post-dpo", "post")}
    lines = ["### SFT: held-out reasoning and instruction exact match", ""]
    rows = []
    for name, r in models.items():
        if not r:
            continue
        rz, em = r.get("reasoning", {}), r.get("exact_match", {})
        rows.append([name, rz.get("metrics", {}).get("accuracy"), rz.get("metrics", {}).get("format"),
                     rz.get("baselines", {}).get("chance"), em.get("metrics", {}).get("exact_match"),
                     em.get("baselines", {}).get("chance")])
    lines += ["| model | reasoning accuracy | R1 format | chance | instruction exact match | chance |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | " + " | ".join(fmt(x) for x in r[1:]) + " |" for r in rows]
    kinds = sorted({k for r in models.values() for k in per_kind(r.get("reasoning", {}))})
    em_kinds = sorted({k for r in models.values() for k in per_kind(r.get("exact_match", {}))})
    if kinds or em_kinds:
        lines += ["", "Per kind (reasoning accuracy; exact match for the instruction kinds):", "",
                  "| kind | " + " | ".join(n for n, r in models.items() if r) + " |",
                  "|---|" + "---|" * sum(1 for r in models.values() if r)]
        for k in kinds:
            lines.append(f"| {k} | " + " | ".join(fmt(per_kind(r.get("reasoning", {})).get(k))
                                                  for r in models.values() if r) + " |")
        for k in em_kinds:
            lines.append(f"| {k} | " + " | ".join(fmt(per_kind(r.get("exact_match", {})).get(k))
                                                  for r in models.values() if r) + " |")
        plot_sft(images / "post-sft.png", {n: r for n, r in models.items() if r}, kinds, em_kinds)
        lines += ["", f"![SFT per kind]({rel}/post-sft.png)"]
    copying = {name: results(runs / run, "copying").get("copying") for name, run in
               (("pretrained", "llama3-demo"), ("SFT", "post-sft"), ("pretrained 1000 steps (the teacher)",
                                                                    "post-teacher"))}
    copying = {name: c for name, c in copying.items() if c}
    if copying:
        lines += ["", "In-context copying (`workbench eval --task copying`: finish an identifier defined a few lines "
                      "earlier): " + ", ".join(f"{n} {fmt(c['metrics']['accuracy'])}" for n, c in copying.items())
                  + f" (chance {fmt(next(iter(copying.values()))['baselines']['chance'])})."]
    return lines


def plot_sft(out: Path, models: dict, kinds: list[str], em_kinds: list[str]) -> None:
    fig = new_figure((11, 4.2))
    ax = fig.subplots()
    labels = kinds + em_kinds
    width = 0.8 / max(len(models), 1)
    for i, (name, r) in enumerate(models.items()):
        values = [per_kind(r.get("reasoning", {})).get(k, 0.0) for k in kinds]
        values += [per_kind(r.get("exact_match", {})).get(k, 0.0) for k in em_kinds]
        ax.bar([j + (i - (len(models) - 1) / 2) * width for j in range(len(labels))], values, width, label=name)
    chance = {k: v.get("chance") for r in models.values() for k, v in
              r.get("reasoning", {}).get("details", {}).get("per_kind", {}).items()}
    for j, k in enumerate(kinds):
        if chance.get(k) is not None:
            ax.hlines(chance[k], j - 0.4, j + 0.4, colors="black", linewidth=1)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy (exact match)")
    ax.set_title("SFT: reasoning kinds (program-checked) and instruction kinds (exact match); black: chance")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, out)


# ---------------------------------------------------------------------------------------------------- DPO


SPLITS = {"val": "unseen subjects (val)", "rephrased": "taught subjects, new questions"}
DPO_COLUMNS = ("logp_acc", "reward_acc", "reward_margin", "has_example", "runs", "passes", "on_topic", "passes_on_topic")


def pair_metrics(run: Path, split: str) -> dict:
    r = results(run, f"pairs-{split}")
    return {**r.get("preference", {}).get("metrics", {}), **r.get("teaching", {}).get("metrics", {}),
            "n": r.get("teaching", {}).get("n")}


def dpo_section(runs: Path, images: Path, rel: str) -> list[str]:
    table = {(name, split): pair_metrics(runs / run, split)
             for name, run in (("SFT", "post-sft"), ("DPO + RPO", "post-dpo"), ("DPO, plain", "post-dpo-plain"))
             for split in SPLITS}
    if not any(table.values()):
        return []
    lines = ["### DPO: held-out preferences and the teaching rubric", "",
             "| model | questions | n | preference accuracy (log p) | reward accuracy | reward margin | has an example "
             "| example runs | example passes | on topic | passes, on topic |", "|---|---|---|" + "---|" * 8]
    for (name, split), m in table.items():
        if m:
            lines.append(f"| {name} | {SPLITS[split]} | {m.get('n', '-')} | "
                         + " | ".join(fmt(m.get(k)) for k in DPO_COLUMNS) + " |")
    base = results(runs / "post-dpo", "pairs-val").get("teaching", {}).get("baselines", {})
    if base:
        lines += ["", "The rubric on the held-out pairs' own answers: " +
                  ", ".join(f"{k} {fmt(v)}" for k, v in base.items()) + " (passes)."]
    lines += ["", "The SFT model is DPO's reference, so its rewards are 0 (every pair a tie, which counts as not "
                  "accurate); chance is 0.5 for both accuracies. *On topic*: an example names the function asked "
                  "about; a passing example of another function (a small model recites memorised ones) answers "
                  "another question."]
    plot_dpo(images / "post-dpo.png", metrics(runs / "post-dpo"), table)
    lines += ["", f"![DPO training and held-out metrics]({rel}/post-dpo.png)"]
    return lines


def plot_dpo(out: Path, records: list[dict], table: dict) -> None:
    fig = new_figure((12, 4.2))
    ax_curve, ax_bars = fig.subplots(1, 2, width_ratios=[1, 1.4])
    for key, label, style in (("reward_acc", "train reward accuracy", "-"), ("val_reward_acc", "val reward accuracy", "o-"),
                              ("reward_margin", "train reward margin", "-"),
                              ("val_reward_margin", "val reward margin", "o-")):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if pts:
            ax_curve.plot(*zip(*pts), style, label=label, markersize=3)
    ax_curve.set_xlabel("step")
    ax_curve.set_title("DPO training (val: unseen subjects)")
    ax_curve.legend(fontsize=8)
    ax_curve.grid(True, alpha=0.3)
    keys = ["logp_acc", "reward_acc", "has_example", "runs", "passes_on_topic"]
    present = [(k, m) for k, m in table.items() if m]
    width = 0.8 / max(len(present), 1)
    for i, ((name, split), m) in enumerate(present):
        ax_bars.bar([j + (i - (len(present) - 1) / 2) * width for j in range(len(keys))],
                    [m.get(k) or 0.0 for k in keys], width, label=f"{name}, {SPLITS[split]}")
    ax_bars.axhline(0.5, color="black", linewidth=0.8, linestyle="--", label="chance (accuracies)")
    ax_bars.set_xticks(range(len(keys)), ["pref. acc. (log p)", "reward acc.", "has example", "example runs",
                                         "passes, on topic"], rotation=15)
    ax_bars.set_title("held-out: SFT start vs DPO")
    ax_bars.legend(fontsize=7)
    ax_bars.grid(True, axis="y", alpha=0.3)
    save_figure(fig, out)


# ---------------------------------------------------------------------------------------------------- distill


def final_val(records: list[dict], key: str = "val_loss") -> float | None:
    vals = [r[key] for r in records if key in r]
    return vals[-1] if vals else None


def distill_section(runs: Path, images: Path, rel: str, seeds: list[str]) -> list[str]:
    pairs = [(s, metrics(runs / f"post-distill-s{s}"), metrics(runs / f"post-student-s{s}")) for s in seeds]
    pairs = [p for p in pairs if p[1] and p[2]]
    if not pairs:
        return []
    lines = ["### Distillation: the same student with and without a teacher", "",
             "| seed | student with teacher: val loss | without teacher: val loss | difference | teacher's val loss |",
             "|---|---|---|---|---|"]
    diffs = []
    for s, kd, lm in pairs:
        a, b = final_val(kd), final_val(lm)
        diffs.append(b - a)
        lines.append(f"| {s} | {fmt(a)} | {fmt(b)} | {fmt(b - a)} | {fmt(final_val(kd, 'val_teacher_loss'))} |")
    mean = statistics.mean(diffs)
    spread = f", range {min(diffs):.3f} to {max(diffs):.3f}" if len(diffs) > 1 else ""
    lines += ["", f"With the teacher the student ends {mean:.3f} nats/token lower on held-out text (mean over "
                  f"{len(diffs)} seeds{spread}); it is lower in {sum(d > 0 for d in diffs)} of {len(diffs)} seeds."]
    plot_distill(images / "post-distill.png", pairs)
    lines += ["", f"![distillation validation curves]({rel}/post-distill.png)"]
    return lines


def plot_distill(out: Path, pairs: list) -> None:
    fig = new_figure((7.5, 4.2))
    ax = fig.subplots()
    for i, (_, kd, lm) in enumerate(pairs):
        for records, color, label in ((kd, "C0", "with teacher"), (lm, "C3", "without teacher")):
            pts = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
            ax.plot(*zip(*pts), "o-", color=color, alpha=0.8, markersize=3, label=label if i == 0 else None)
    teacher = final_val(pairs[0][1], "val_teacher_loss")
    if teacher is not None:
        ax.axhline(teacher, color="gray", linestyle="--", label=f"teacher ({teacher:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"student validation loss, {len(pairs)} seeds each")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    save_figure(fig, out)


# ---------------------------------------------------------------------------------------------------- the doc


def times_section(times: Path | None) -> list[str]:
    return times_table(times, "launch/post_training.sh", "a stage whose run was already finished before the script "
                       "first ran (`pretrain`, when `make demo` trained the model) shows only the seconds it took to "
                       "find it.")


def main(argv: list[str] | None = None) -> int:
    return report_main(argv, __doc__.split("\n")[0], "docs/post-training.md", SCRIPT, "launch/post_training.sh",
                       lambda runs, images, rel, seeds, times: [
                           sft_section(runs, images, rel), dpo_section(runs, images, rel),
                           distill_section(runs, images, rel, seeds), times_section(times)])


if __name__ == "__main__":
    raise SystemExit(main())
