"""The serving engine on CPU: decode against transformers' `generate`, and continuous against static batching.

    python benchmarks/engine_cpu.py                      # 20M and 124M, every case, 5 repeats, 2 threads
    python benchmarks/engine_cpu.py --flavors 20M --cases mixed --repeats 3
    python benchmarks/engine_cpu.py --smoke              # seconds: every case once on the debug flavor

Cases (same config, weights, fp32 and threads on both sides; alternating runs, median of the repeats)
    decode1   greedy, batch 1, a 16-token prompt, `--new-tokens` new tokens: `Engine.generate` against
              transformers' `generate(do_sample=False)` (its dynamic cache)
    decode16  the same with 16 prompts of 16 tokens at once (one batch for transformers, 16 requests for
              the engine); tokens/s counts every row's new tokens
    mixed     `--requests` requests with prompt lengths and output budgets drawn uniformly from
              [`--min-len`, `--max-len`] (seeded), all queued at once: continuous batching (the engine,
              max_batch 16) against static batching (`KVCacheGenerator` in batches of 16 in arrival order,
              each batch decoding until its longest request is done, as padded batch generation does).
              Both produce the same tokens per request (checked); tokens/s counts requested tokens only.

Ratios > 1 mean the engine is faster. Models are those of benchmarks/llama_cpu.py (`pair` builds both sides).
"""

from __future__ import annotations

import argparse
import platform
import random

import torch
from llama_cpu import pair, timed_pair

from workbench.inference.engine import Engine
from workbench.inference.generator import KVCacheGenerator, SamplingParams


def decode_case(ours, theirs, batch: int, prompt_len: int, new_tokens: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    engine = Engine(ours, eos_ids=[], max_batch=batch, max_step_tokens=max(512, batch * prompt_len),
                    max_len=prompt_len + new_tokens + 1)
    params = SamplingParams(max_new_tokens=new_tokens)
    rows = prompts.tolist()

    def run_ours():
        out = engine.generate(rows, params)
        assert all(len(c.tokens) == new_tokens for c in out)

    @torch.inference_mode()
    def run_theirs():
        out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.shape == (batch, prompt_len + new_tokens)

    return run_ours, run_theirs


def mixed_requests(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    params = [SamplingParams(max_new_tokens=rng.randint(lo, hi)) for _ in range(n)]
    return prompts, params


def mixed_case(ours, n: int, lo: int, hi: int, vocab: int, batch: int = 16):
    prompts, params = mixed_requests(n, lo, hi, vocab)
    engine = Engine(ours, eos_ids=[], max_batch=batch)
    static = KVCacheGenerator(ours, eos_ids=[])
    results = {}

    def run_continuous():
        results["continuous"] = [c.tokens for c in engine.generate(prompts, params)]

    def run_static():
        out = []
        for s in range(0, n, batch):
            out += [c.tokens for c in static.generate(prompts[s : s + batch], params[s : s + batch])]
        results["static"] = out

    return run_continuous, run_static, results, sum(p.max_new_tokens for p in params)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavors", nargs="+", default=["20M", "124M"])
    ap.add_argument("--cases", nargs="+", default=["decode1", "decode16", "mixed"], choices=["decode1", "decode16", "mixed"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="debug flavor, tiny sizes, one repeat")
    args = ap.parse_args()
    if args.smoke:
        args.flavors, args.repeats, args.new_tokens = ["debug"], 1, 8
        args.requests, args.min_len, args.max_len = 12, 2, 16
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"fp32, median of {args.repeats}")
    print("| model | case | engine | reference | ratio |")
    print("|---|---|---|---|---|")
    for flavor in args.flavors:
        ours, theirs, _ = pair(flavor)
        ours.eval()
        vocab = ours.cfg.vocab_size
        for case in args.cases:
            if case.startswith("decode"):
                batch = 1 if case == "decode1" else 16
                a, b = decode_case(ours, theirs, batch, 16, args.new_tokens, vocab)
                ta, tb = timed_pair(a, b, args.repeats)
                tok = batch * args.new_tokens
                print(f"| {flavor} | greedy decode, batch {batch}, 16-token prompts, {args.new_tokens} new | "
                      f"{tok / ta:.1f} tok/s | transformers {tok / tb:.1f} tok/s | {tb / ta:.2f}x speed |", flush=True)
            else:
                a, b, results, total = mixed_case(ours, args.requests, args.min_len, args.max_len, vocab)
                ta, tb = timed_pair(a, b, args.repeats)
                same = results["continuous"] == results["static"]
                if not same:
                    print("WARNING: continuous and static batching gave different tokens")
                print(f"| {flavor} | {args.requests} mixed requests, prompts and outputs {args.min_len}-{args.max_len} "
                      f"tokens | continuous {total / ta:.1f} tok/s ({ta:.1f} s) | static batches of 16 {total / tb:.1f} "
                      f"tok/s ({tb:.1f} s) | {tb / ta:.2f}x speed{'' if same else ' (TOKENS DIFFER)'} |", flush=True)
    print("\nTargets: decode >= 1.0x transformers (pass), >= 1.3x (good); continuous > static on mixed lengths.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
