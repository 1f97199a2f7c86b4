"""Auxiliary-loss-free balancing, shown: the same DeepSeek-V3 run with the router bias update and without.

    python benchmarks/moe_balance.py                      # configs/deepseek_v3/balance.toml, gamma 1e-2, 1e-3, 0
    python benchmarks/moe_balance.py --steps 400 --rates 0.001 0.0003 0
    python benchmarks/moe_balance.py --smoke              # the debug flavor and data, a few steps (CI)

Each rate trains the config's model from the same seed on the same batches (runs/moe-balance/gamma-RATE;
`--report-only` prints the tables and redraws the plot from those runs without training),
with the sequence-wise balance loss off, so the bias update is the only balancing force. Every logged step
records the expert load of the training batch: per MoE layer (the MTP module's included), max / mean (token, slot) assignments over
the experts (1 = perfectly even; E / k = every token on the same k experts), averaged over the layers
(`expert_load`) and the worst layer (`expert_load_max`). The script prints a table (load early, at the end,
and the LM loss at the end; the peak, the range at the end and the largest bias) and writes a plot, docs/images/moe-balance.png by default; docs/moe.md
records the numbers with the machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from workbench.config import load_config
from workbench.job import JobConfig
from workbench.train.metrics import read_metrics, save_png
from workbench.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def train(config: Path, rate: float, steps: int, out: Path, extra: list[str]) -> list[dict]:
    run = out / f"gamma-{rate:g}"
    job = load_config(JobConfig, config, ["--run.out_dir", str(out), "--run.name", run.name, "--train.steps",
                                          str(steps), "--model.bias_update_rate", str(rate), *extra])
    trainer = Trainer(job, run_dir=run, log=lambda *a, **k: None)
    t0 = time.perf_counter()
    trainer.fit()
    print(f"gamma {rate:g}: {steps} steps in {time.perf_counter() - t0:.0f} s -> {run}")
    return [r for r in read_metrics(run / "metrics.jsonl") if "expert_load" in r]


def window_mean(records: list[dict], key: str, first: bool, frac: float = 0.2) -> float:
    n = max(1, int(len(records) * frac))
    part = records[:n] if first else records[-n:]
    return sum(r[key] for r in part) / len(part)


def plot(results: dict[float, list[dict]], out: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_load, ax_loss = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    for i, (rate, recs) in enumerate(results.items()):
        steps = [r["step"] for r in recs]
        label = f"bias update, gamma = {rate:g}" if rate else "no bias update"
        ax_load.plot(steps, [r["expert_load"] for r in recs], color=f"C{i}", linewidth=1.4,
                     label=f"{label}: mean over layers")
        ax_load.plot(steps, [r["expert_load_max"] for r in recs], color=f"C{i}", linewidth=0.9, linestyle="--",
                     label=f"{label}: worst layer")
        ax_loss.plot(steps, [r["loss"] for r in recs], color=f"C{i}", linewidth=1.2, label=label)
    ax_load.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax_load.set_ylabel("expert load (max / mean tokens)")
    ax_load.set_title(title)
    ax_load.legend(fontsize=8)
    ax_load.grid(True, alpha=0.3)
    ax_loss.set_ylabel("train LM loss")
    ax_loss.set_xlabel("step")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(True, alpha=0.3)
    save_png(fig, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "deepseek_v3" / "balance.toml")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.001, 0.0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "moe-balance")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "images" / "moe-balance.png")
    ap.add_argument("--smoke", action="store_true", help="debug flavor and data, a few steps")
    ap.add_argument("--report-only", action="store_true", help="no training: tables and plot from the runs in --out")
    args = ap.parse_args()
    extra: list[str] = []
    if args.smoke:
        args.steps = min(args.steps, 4)
        extra = ["--model.flavor", "debug", "--data.dir", str(args.out / "data"), "--data.max_bytes", "300000",
                 "--data.vocab_size", "512", "--data.seq_len", "64", "--train.micro_batch_size", "4",
                 "--train.log_every", "2", "--train.eval_every", "0", "--train.ckpt_every", "0"]
    if args.report_only:  # the tables and the plot again, from the runs already under --out
        results = {rate: [r for r in read_metrics(args.out / f"gamma-{rate:g}" / "metrics.jsonl")
                          if "expert_load" in r] for rate in args.rates}
    else:
        results = {rate: train(args.config, rate, args.steps, args.out, extra) for rate in args.rates}
    print("\n| router bias update | expert load, first 20% of steps | expert load, last 20% | worst layer, last 20% "
          "| LM loss, last 20% |")
    print("|---|---|---|---|---|")
    for rate, recs in results.items():
        label = f"gamma = {rate:g}" if rate else "off"
        print(f"| {label} | {window_mean(recs, 'expert_load', True):.2f} | "
              f"{window_mean(recs, 'expert_load', False):.2f} | {window_mean(recs, 'expert_load_max', False):.2f} | "
              f"{window_mean(recs, 'loss', False):.3f} |")
    print("\n| router bias update | peak expert load (step) | expert load range, last 20% | largest router bias "
          "at the end |")
    print("|---|---|---|---|")
    for rate, recs in results.items():
        label = f"gamma = {rate:g}" if rate else "off"
        peak = max(recs, key=lambda r: r["expert_load"])
        last = recs[-max(1, len(recs) // 5):]
        bias = recs[-1].get("router_bias_absmax", 0.0)
        print(f"| {label} | {peak['expert_load']:.2f} ({peak['step']}) | {min(r['expert_load'] for r in last):.2f} "
              f"to {max(r['expert_load'] for r in last):.2f} | {bias:.2f} |")
    plot(results, args.plot, f"DeepSeek-V3 '{'debug' if args.smoke else 'small'}': expert load with and without "
                             f"the bias update")
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
