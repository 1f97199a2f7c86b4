"""The CPU decode kernel (workbench/nn/linear.py) against F.linear on the weight shapes of the 20M and 124M
models, in GB/s of weights streamed, beside what the machine streams when it only sums memory.

    python benchmarks/skinny_linear.py [--threads 2] [--rows 1 2 4 8] [--smoke]

Each shape cycles through enough distinct matrices (>= 100 MB) that every product reads its weight from DRAM,
as decoding does. Best of 7 passes per cell; ratio = kernel speed / F.linear speed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from workbench.nn.linear import SKINNY_ROWS, skinny_linear_error, skinny_linear_op

SHAPES = {"20M wk (128x384)": (128, 384), "20M ffn (1152x384)": (1152, 384), "20M head (8192x384)": (8192, 384),
          "124M ffn (2048x768)": (2048, 768), "124M head (32000x768)": (32000, 768)}


def gbps(fn, weights, repeats: int = 7) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            fn(w)
        best = min(best, time.perf_counter() - t0)
    return sum(w.numel() * w.element_size() for w in weights) / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--smoke", action="store_true", help="one small shape, 1 row, about 4 MB: seconds")
    args = ap.parse_args()
    shapes, budget = (({"20M wk (128x384)": (128, 384)}, 4_000_000) if args.smoke else (SHAPES, 100_000_000))
    if args.smoke:
        args.rows = [1]
    torch.set_num_threads(args.threads)
    op = skinny_linear_op()
    if op is None:
        raise SystemExit(f"the kernel is unavailable: {skinny_linear_error()}")
    print(f"# {args.threads} threads, fp32; the kernel takes over up to {SKINNY_ROWS} rows\n")
    print("| weight | rows | F.linear GB/s | kernel GB/s | ratio | sum GB/s |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, shape in shapes.items():
            weights = [torch.randn(*shape) for _ in range(max(1, budget // (shape[0] * shape[1] * 4)))]
            total = gbps(lambda w: w.sum(), weights)
            for rows in args.rows:
                x = torch.randn(rows, shape[1])
                a = gbps(lambda w, x=x: F.linear(x, w), weights)
                b = gbps(lambda w, x=x: op(x, w), weights)
                print(f"| {name} | {rows} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {total:.1f} |")
            del weights


if __name__ == "__main__":
    main()
