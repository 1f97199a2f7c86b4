"""Dense vs sliding-window vs MoBA attention on CPU: time and memory per token against sequence length.

    python benchmarks/attention_patterns.py                  # T = 1k .. 16k, writes docs/images/attention-patterns.png
    python benchmarks/attention_patterns.py --lengths 1024 4096 --reps 5
    python benchmarks/attention_patterns.py --smoke          # tiny shapes, seconds (CI)

One attention core call per row (B = 1, H query heads over KV heads, head width D, fp32), through
`workbench.nn.attention`:

    dense-sdpa   causal SDPA (`is_causal`; PyTorch's CPU flash kernel: O(T^2) time, O(T) memory)
    dense-math   the explicit formula (scores materialised: O(T^2) time and memory); up to --math-max
    window-block the banded sliding-window path, W = --window      (O(T W))
    moba-block   MoBA by block gather, --moba-block keys per block, --moba-topk blocks  (O(T (k B + T/B)))
    moba-flex    (--flex) compiled FlexAttention with MoBA's BlockMask, forward only (no CPU backward)

Time is the median of --reps runs (after one warm-up) of the forward and of forward + backward.
Memory is what autograd saves for the backward pass (bytes of the distinct tensors the forward keeps,
counted through `torch.autograd.graph.saved_tensors_hooks`): the activation memory a training step holds
per layer, the quantity the O(.) column of docs/attention-patterns.md is about. The table lists per-token
figures and each pattern's ratio to dense-sdpa at the same length.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from workbench.nn.attention import AttentionCore, MaskSpec, attention_flex, compiled_flex_attention
from workbench.nn.moba import MobaSpec

ROOT = Path(__file__).resolve().parents[1]


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while running fn() (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(T: int, args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    H, KV, D = args.heads, args.kv_heads, args.head_dim
    q = torch.randn(1, H, T, D, generator=g, requires_grad=True)
    k = torch.randn(1, KV, T, D, generator=g, requires_grad=True)
    v = torch.randn(1, KV, T, D, generator=g, requires_grad=True)
    scale = D**-0.5
    rows = [("dense-sdpa", AttentionCore(scale, "sdpa"), MaskSpec())]
    if T <= args.math_max:
        rows.append(("dense-math", AttentionCore(scale, "math"), MaskSpec()))
    rows.append(("window-block", AttentionCore(scale, "block"), MaskSpec(sliding_window=args.window)))
    moba = MaskSpec(moba=MobaSpec(args.moba_block, args.moba_topk))
    rows.append(("moba-block", AttentionCore(scale, "block"), moba))
    results = []
    for name, core, spec in rows:
        def fwd(core=core, spec=spec):
            with torch.no_grad():
                return core(q, k, v, spec)

        def fwd_bwd(core=core, spec=spec):
            out = core(q, k, v, spec)
            out.sum().backward()
            q.grad = k.grad = v.grad = None

        results.append({"T": T, "pattern": name, "fwd": timed(fwd, args.reps),
                        "fwd_bwd": timed(fwd_bwd, args.reps), "saved": saved_bytes(lambda c=core, s=spec: c(q, k, v, s))})
    if args.flex:
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        fn = compiled_flex_attention()
        results.append({"T": T, "pattern": "moba-flex", "fwd_bwd": None, "saved": None,
                        "fwd": timed(lambda: attention_flex(qd, kd, vd, moba, 0, scale, flex_fn=fn), args.reps)})
    return results


def table(results: list[dict]) -> str:
    lines = ["| T | pattern | forward ms | forward us/token | fwd+bwd ms | fwd+bwd us/token | saved KiB/token "
             "| x dense time (fwd+bwd) | x dense memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    dense = {r["T"]: r for r in results if r["pattern"] == "dense-sdpa"}
    for r in results:
        d, T = dense[r["T"]], r["T"]
        fb = r["fwd_bwd"]
        ratio_t = f"{fb / d['fwd_bwd']:.2f}x" if fb else f"{r['fwd'] / d['fwd']:.2f}x (fwd)"
        mem = f"{r['saved'] / T / 1024:.1f}" if r["saved"] is not None else "-"
        ratio_m = f"{r['saved'] / d['saved']:.2f}x" if r["saved"] is not None else "-"
        lines.append(f"| {T} | {r['pattern']} | {r['fwd'] * 1e3:.1f} | {r['fwd'] / T * 1e6:.2f} | "
                     f"{fb * 1e3 if fb else float('nan'):.1f} | {fb / T * 1e6 if fb else float('nan'):.2f} | {mem} "
                     f"| {ratio_t} | {ratio_m} |")
    return "\n".join(lines)


def plot(results: list[dict], out: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from workbench.train.metrics import save_png

    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.subplots(1, 2)
    for i, name in enumerate(dict.fromkeys(r["pattern"] for r in results)):
        rs = [r for r in results if r["pattern"] == name]
        Ts = [r["T"] for r in rs]
        key = "fwd_bwd" if rs[0]["fwd_bwd"] is not None else "fwd"
        label = name if key == "fwd_bwd" else f"{name} (forward only)"
        ax_t.plot(Ts, [r[key] / r["T"] * 1e6 for r in rs], marker="o", color=f"C{i}", label=label)
        if rs[0]["saved"] is not None:
            ax_m.plot(Ts, [r["saved"] / r["T"] / 1024 for r in rs], marker="o", color=f"C{i}", label=name)
    for ax, ylabel in ((ax_t, "time per token, forward + backward (us)"), (ax_m, "saved for backward (KiB / token)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_png(fig, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--moba-block", type=int, default=512)
    ap.add_argument("--moba-topk", type=int, default=3)
    ap.add_argument("--math-max", type=int, default=8192, help="longest T for the dense-math row (T^2 scores)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave the default)")
    ap.add_argument("--flex", action="store_true", help="add compiled FlexAttention MoBA (forward only on CPU)")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "images" / "attention-patterns.png")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one rep (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.lengths, args.heads, args.kv_heads, args.head_dim = [128, 256], 2, 1, 16
        args.window, args.moba_block, args.moba_topk, args.reps = 32, 32, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for T in args.lengths:
        results.extend(bench(T, args))
        print(f"T={T} done", flush=True)
    title = (f"H={args.heads}, KV={args.kv_heads}, D={args.head_dim}, fp32, {torch.get_num_threads()} threads; "
             f"window {args.window}; MoBA block {args.moba_block}, top-{args.moba_topk}")
    print(title)
    print(table(results))
    plot(results, args.plot, title)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
