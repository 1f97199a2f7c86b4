"""Dense, sliding-window and MoBA attention on one CUDA GPU: forward + backward time against sequence length.

    python benchmarks/attention_patterns_gpu.py [--lengths 8192 32768 65536] [--reps 5]

One head layout as in a mid-size model (H = 16 query heads, KV = 4, D = 128, bf16, batch 1): dense causal through
SDPA (flash attention), a 4096-token sliding window and MoBA (blocks of 512, top-3) through compiled
FlexAttention (`AttentionCore(backend="flex", flex_compile=True)`); each row is the mean of `--reps` timed
forward + backward passes after one warm-up (which also compiles). The CPU version, with memory, is
benchmarks/attention_patterns.py; the figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from workbench.nn.attention import AttentionCore, MaskSpec
from workbench.nn.moba import MobaSpec


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--moba-block", type=int, default=512)
    ap.add_argument("--moba-topk", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark times GPU kernels (benchmarks/attention_patterns.py is the CPU one)")
    H, KV, D = 16, 4, 128
    cases = [("dense (sdpa)", "sdpa", MaskSpec()),
             (f"window {args.window} (flex)", "flex", MaskSpec(sliding_window=args.window)),
             (f"moba {args.moba_block}x{args.moba_topk} (flex)", "flex",
              MaskSpec(moba=MobaSpec(args.moba_block, args.moba_topk)))]
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; forward + backward, ms")
    print("| T | " + " | ".join(name for name, _, _ in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for T in args.lengths:
        q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        row = []
        for _, backend, spec in cases:
            core = AttentionCore(D**-0.5, backend=backend, flex_compile=True)

            def step(core=core, spec=spec, q=q, k=k, v=v):
                core(q, k, v, spec).sum().backward()

            row.append(f"{1000 * timed(step, args.reps):.1f}")
        print(f"| {T} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
