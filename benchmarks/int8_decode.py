"""Int8 weight-only (and LLM.int8) decoding against fp32 on a CPU: the same model, greedy, tokens/s and weight bytes.

    python benchmarks/int8_decode.py                         # 124M-shaped llama3: batch 1 and 4, per projection
    python benchmarks/int8_decode.py --models 20M 124M --batch 1 4 16 --repeats 7
    python benchmarks/int8_decode.py --llm-int8              # LLM.int8 too, batch 1 (no decode kernel: the reference)
    python benchmarks/int8_decode.py --smoke                 # seconds: debug model, one repeat

Models (random weights: speed does not depend on them)
    20M    the llama3 "20M" flavor (dim 384, 8 layers, 6 heads / 2 KV heads, ffn 1152, vocab 8192)
    124M   a GPT-2-small-shaped llama3 (dim 768, 12 layers, 12 heads / 4 KV heads, ffn 2048, vocab 32000, untied),
           the shape benchmarks/llama_cpu.py uses

Cases
    decode      greedy generation through KVCacheGenerator, `--batch` sequences of a 16-token prompt, `--new-tokens`
                new tokens each; fp32 and int8 (and llm-int8) interleaved, median of `--repeats`, one warm-up each
    projection  one product of `--rows` rows (1, 4, 16, 64) with each distinct weight shape of the model: fp32 `Linear`
                (its decode kernel up to 4 rows, F.linear above), the int8 kernel, and the int8 fallback (the weight
                widened to fp32, F.linear, the scale); each cycles through >= 100 MB of distinct matrices so every
                product reads DRAM, as decoding does; best of 7, interleaved
Linear-weight bytes are the `nn.Linear` weights (fp32) against the int8 weights plus their fp32 scales.
The goals of the quantization issue: int8 decode >= 1.5x fp32 tokens/s at batch 1, linear weights >= 3.5x smaller.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from workbench.inference import quant
from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.inference.quant import Int8Linear, int8_linear, linear_weight_bytes, quantize_model
from workbench.models.base import ModelSection, build_model, count_params
from workbench.nn.linear import Linear, int8_linear_op, skinny_linear_error

SHAPES = {"124M": ("20M", dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, vocab_size=32000))}
GOALS = {"speed": 1.5, "size": 3.5}


def build(name: str, seed: int = 0):
    flavor, over = SHAPES.get(name, (name, {}))
    torch.manual_seed(seed)
    return build_model(ModelSection.of("llama3", flavor, **over)).eval()


def timed(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up: the kernel build, allocator, caches
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit every variant
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def decode_fn(model, prompt: list[int], batch: int, new_tokens: int):
    gen = KVCacheGenerator(model, eos_ids=[])
    params = SamplingParams(max_new_tokens=new_tokens)

    def run():
        out = gen.generate([prompt] * batch, params)
        assert all(len(c.tokens) == new_tokens for c in out)

    return run


def projection_rows(model, qmodel, rows: int, budget: int = 100_000_000) -> list[tuple[str, float, float, float]]:
    """(shape, fp32 us, int8 kernel us, int8 fallback us) per distinct (out, in) of the model's linears: best of 7
    over >= budget bytes of distinct matrices (the fp32 side: `Linear`, its kernel up to 4 rows, then F.linear)."""
    shapes = {}
    for (name, m), q in zip(model.named_modules(), qmodel.modules()):
        if isinstance(m, torch.nn.Linear) and isinstance(q, Int8Linear):
            shapes.setdefault((m.out_features, m.in_features), name.split(".")[-1])
    out = []
    op = int8_linear_op()
    with torch.inference_mode():
        for (n, k), label in shapes.items():
            copies = max(1, budget // (n * k * 4))
            fps = [Linear(k, n, bias=False) for _ in range(copies)]
            q8 = [Int8Linear.from_linear(lin).eval() for lin in fps]
            x = torch.randn(rows, k)
            fns = {"fp32": lambda x=x, fps=fps: [m(x) for m in fps],
                   "kernel": lambda x=x, q8=q8: [op(x, q.weight, q.scale) for q in q8],
                   "fallback": lambda x=x, q8=q8: [int8_linear(x, q.weight, q.scale, kernel=False) for q in q8]}
            best = {key: float("inf") for key in fns}
            for _ in range(7):  # interleaved
                for key, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    best[key] = min(best[key], time.perf_counter() - t0)
            out.append((f"{label} ({n}x{k})", *(best[key] / copies * 1e6 for key in fns)))
            del fps, q8
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["124M"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llm-int8", action="store_true", help="time LLM.int8 (threshold 6) too, at batch 1")
    ap.add_argument("--no-projections", action="store_true")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64], help="rows of the projection case")
    ap.add_argument("--smoke", action="store_true", help="debug model, batch 1, 4 tokens, one repeat")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.batch, args.new_tokens, args.repeats, args.no_projections = ["debug"], [1], 4, 1, True
    torch.set_num_threads(args.threads)
    if int8_linear_op() is None:
        print(f"# WARNING: the int8 decode kernel is unavailable ({skinny_linear_error()}): int8 takes the fallback")
    print(f"# CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.repeats} interleaved runs, {args.new_tokens} new tokens after a 16-token prompt\n")
    verdicts = []
    for name in args.models:
        model = build(name)
        variants = {"fp32": model}
        qmodel = copy.deepcopy(model)
        quantize_model(qmodel, "int8")
        variants["int8"] = qmodel
        lmodel = None
        if args.llm_int8:
            lmodel = copy.deepcopy(model)
            quantize_model(lmodel, "llm-int8", threshold=6.0)
        fp_bytes, q_bytes = linear_weight_bytes(model), linear_weight_bytes(qmodel)
        size = fp_bytes / q_bytes
        print(f"## {name} ({count_params(model) / 1e6:.1f}M parameters): linear weights {fp_bytes / 2**20:.1f} MiB fp32, "
              f"{q_bytes / 2**20:.1f} MiB int8 + scales: {size:.2f}x smaller\n")
        verdicts.append(f"{name} linear weights {size:.2f}x smaller: "
                        f"{'goal met' if size >= GOALS['size'] else 'goal NOT met'} (>= {GOALS['size']}x)")
        prompt = torch.randint(0, model.cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(1)).tolist()
        print("| batch | fp32 tok/s | int8 tok/s | int8 / fp32 |" + (" llm-int8 tok/s | llm-int8 / fp32 |" if lmodel else ""))
        print("|---" * (4 + 2 * bool(lmodel)) + "|")
        for batch in args.batch:
            if lmodel is not None and batch == 1:  # LLM.int8 has no decode kernel: batch 1 only, it is slow
                variants["llm-int8"] = lmodel
            t = timed({k: decode_fn(m, prompt, batch, args.new_tokens) for k, m in variants.items()}, args.repeats)
            variants.pop("llm-int8", None)
            tps = {k: batch * args.new_tokens / v for k, v in t.items()}
            ratio = tps["int8"] / tps["fp32"]
            extra = ""
            if lmodel is not None:
                extra = (f" {tps['llm-int8']:,.1f} | {tps['llm-int8'] / tps['fp32']:.2f}x |" if "llm-int8" in tps
                         else " - | - |")
            print(f"| {batch} | {tps['fp32']:,.1f} | {tps['int8']:,.1f} | {ratio:.2f}x |{extra}")
            if batch == 1:
                verdicts.append(f"{name} batch-1 decode {ratio:.2f}x fp32 tokens/s: "
                                f"{'goal met' if ratio >= GOALS['speed'] else 'goal NOT met'} (>= {GOALS['speed']}x)")
        print()
        if not args.no_projections and int8_linear_op() is not None:
            print(f"| {name} projection | rows | fp32 us | int8 kernel us | int8 fallback us | kernel speedup |")
            print("|---|---|---|---|---|---|")
            for rows in args.rows:
                for label, a, b, c in projection_rows(model, qmodel, rows):
                    print(f"| {label} | {rows} | {a:.0f} | {b:.0f} | {c:.0f} | {a / b:.2f}x |")
            print()
        del variants, model, qmodel, lmodel
    print(f"int8: up to {quant.INT8_KERNEL_ROWS} rows per product (the prompt, batch <= {quant.INT8_KERNEL_ROWS}) take the kernel.")
    print("\nGoals:")
    for v in verdicts:
        print(f"- {v}")


if __name__ == "__main__":
    main()
