"""Writes the measured part of docs/context-extension.md and its plot from the runs of
launch/context_extension.sh: passkey accuracy by prompt length for the pretrained model, the YaRN extension
and the no-YaRN control (each run's evals/passkey/results.json), the stage wall times, and the machine.

The text between the `measured` markers of the document is replaced; the rest (hand-written) is kept. A
document without the markers gets them appended.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

from evals.plots import new_figure, save_figure

RUNS = {"pretrained (256, RoPE)": "passkey-pretrain", "extended: YaRN x16 + 1024-token training": "passkey-extend",
        "control: same training, no YaRN": "passkey-extend-control"}
BEGIN, END = "<!-- measured:begin (launch/context_extension_report.py) -->", "<!-- measured:end -->"


def passkey(run: Path) -> dict:
    results = json.loads((run / "evals" / "passkey" / "results.json").read_text())
    task = results["tasks"]["passkey"]
    by_length = {int(k): v for k, v in task["details"]["by_length"].items()}
    return {"by_length": by_length, "chance": task["baselines"]["chance"],
            "digit_chance": task["details"]["digit_chance"], "window": task["details"]["trained_window"],
            "step": results["source"].get("step"), "elapsed_s": task.get("elapsed_s")}


def final_val(run: Path) -> float | None:
    vals = [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    return vals[-1] if vals else None


def machine(runs: Path) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = runs / "passkey-pretrain" / "run_info.json"
    device = json.loads(info.read_text()).get("device", "?") if info.is_file() else "?"
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}; trained on {device}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--doc", default="docs/context-extension.md")
    ap.add_argument("--image", default="docs/images/context-extension.png")
    ap.add_argument("--times", default=None, help="stage<TAB>seconds lines (launch/context_extension.sh)")
    args = ap.parse_args()
    runs, doc, image = Path(args.runs), Path(args.doc), Path(args.image)
    measured = {label: passkey(runs / name) for label, name in RUNS.items() if (runs / name / "evals").is_dir()}
    if not measured:
        raise SystemExit(f"no passkey results under {runs}: run launch/context_extension.sh first")
    first = next(iter(measured.values()))
    lengths = sorted({n for m in measured.values() for n in m["by_length"]})

    fig = new_figure((7.0, 4.0))
    ax = fig.subplots()
    for i, (label, m) in enumerate(measured.items()):
        xs = [n for n in lengths if n in m["by_length"]]
        ax.plot(xs, [m["by_length"][n]["correct"] for n in xs], marker="o", color=f"C{i}", label=label)
        ax.plot(xs, [m["by_length"][n]["digit_accuracy"] for n in xs], marker=".", linestyle=":", color=f"C{i}",
                alpha=0.7, label=f"{label}: per digit")
    ax.axhline(first["digit_chance"], color="grey", linestyle="--", linewidth=1,
               label=f"chance per digit ({first['digit_chance']:.3g}); exact: {first['chance']:.1e}")
    ax.axvline(first["window"], color="k", linestyle=":", linewidth=1, label=f"pretrained window ({first['window']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_title("passkey retrieval before and after context extension")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", fontsize=7)
    image.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, image)

    n = {m["by_length"][lengths[0]]["n"] for m in measured.values() if lengths[0] in m["by_length"]}
    head = "| model | " + " | ".join(f"{L}" for L in lengths) + " | final val loss |"
    rows = [head, "|" + "---|" * (len(lengths) + 2)]
    for label, m in measured.items():
        cells = [f"{m['by_length'][L]['correct']:.2f} / {m['by_length'][L]['digit_accuracy']:.2f}"
                 if L in m["by_length"] else "-" for L in lengths]
        val = final_val(runs / RUNS[label])
        rows.append(f"| {label} | " + " | ".join(cells) + (f" | {val:.3f} |" if val is not None else " | - |"))
    times = []
    if args.times and Path(args.times).is_file():
        for line in Path(args.times).read_text().splitlines():
            stage, seconds = line.split("\t")
            times.append(f"{stage} {int(seconds)} s")
    rel = os.path.relpath(image, doc.parent)
    body = "\n".join([
        BEGIN,
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} by `launch/context_extension.sh` on {machine(runs)}.",
        "",
        f"Passkey accuracy, exact / per digit, by prompt length in tokens ({', '.join(map(str, sorted(n)))} prompts "
        f"per length: 5 depths; chance {first['chance']:.1e} exact, {first['digit_chance']:.3f} per digit):",
        "",
        *rows,
        "",
        f"![passkey accuracy by length]({rel})",
        "",
        f"Wall times: {', '.join(times) if times else 'not recorded'}.",
        END,
    ])
    text = doc.read_text() if doc.is_file() else "# Context extension\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    doc.write_text(text)
    print(f"wrote {doc} and {image}")


if __name__ == "__main__":
    main()
