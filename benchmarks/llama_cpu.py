"""Workbench decoders vs transformers on CPU (LlamaForCausalLM, MixtralForCausalLM, DeepseekV3ForCausalLM),
same config, weights, dtype and threads.

    python benchmarks/llama_cpu.py                 # 20M and 124M-shaped, every case, 5 interleaved repeats
    python benchmarks/llama_cpu.py --flavors 20M --cases decode --repeats 7 --threads 2
    python benchmarks/llama_cpu.py --flavors mixtral-small --cases train decode
    python benchmarks/llama_cpu.py --flavors deepseek-small --cases train decode
    python benchmarks/llama_cpu.py --smoke         # seconds: every default case once on the debug flavors
    python benchmarks/llama_cpu.py --flavors 20M --cases engine mixed    # the serving engine (not in the default)

Models
    20M    the "20M" flavor (dim 384, 8 layers, 6 heads / 2 KV heads, ffn 1152, vocab 8192)
    124M   a GPT-2-small-shaped Llama: the 20M flavor with dim 768, 12 layers, 12 heads / 4 KV heads,
           ffn 2048, vocab 32000 (124.7M parameters, untied)
    mixtral-small   a Mixtral of dim 256, 4 layers, 8 heads / 2 KV heads, 8 experts of width 512, top-2,
           vocab 8192; its training step includes the balance loss on both sides (ours: `aux_loss`;
           transformers: output_router_logits=True)
    deepseek-small  DeepSeek-V3's "small" flavor (dim 128, 4 layers: 1 dense + 3 MoE of 16 experts of width
           64, top-2 in 2 of 4 groups, 1 shared; MLA with q/kv ranks 64/32, vocab 4096) without the MTP
           module and with no auxiliary loss (transformers' class has neither); decode is ours with the
           absorbed MLA cache against transformers' expanded keys and values
    FAMILY:FLAVOR is that family's flavor (mixtral:debug); any other name is a llama3 flavor as is.

Cases (each timed for both implementations, alternating, median of the repeats)
    train   one AdamW step (forward, loss, backward, update) on random tokens; the batch shape is per model
            (`TRAIN_SHAPES`: 8x256 for 20M, 4x256 for 124M, sized to run in seconds on 2 cores)
    decode  greedy generation, batch 1, a 16-token prompt, `--new-tokens` new tokens through the KV cache
            (ours: KVCacheGenerator; theirs: generate(do_sample=False) with its dynamic cache)
    cache   ours only: greedy generation of `--cache-tokens` tokens with the KV cache vs recomputing the
            whole prefix every token (the first flavor only: the no-cache side is quadratic)
    engine  the serving engine (`Engine.generate`: paged cache, continuous batching) against transformers'
            `generate`, batch 1 and batch 16 (16 prompts of 16 tokens, one batch for transformers); tokens/s
            counts every row's new tokens
    mixed   ours only: `--requests` requests with prompt lengths and output budgets drawn uniformly from
            [`--min-len`, `--max-len`] (seeded), all queued at once: continuous batching (the engine,
            max_batch 16) against static batching (`KVCacheGenerator` over batches of 16 in arrival order,
            each decoding until its longest request is done); the same tokens per request (checked);
            tokens/s counts requested tokens

A ratio < 1 means the workbench takes less time (train) / > 1 means it decodes faster (decode), or the
cache is faster than recomputing (cache). Results go to stdout as a markdown table followed by the targets
of the benchmark issue; docs/benchmarks.md records them with the machine.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

from workbench.checkpoint.hf import adapter_for
from workbench.inference.engine import Engine
from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.models.base import ModelSection, build_model, count_params

# named shapes that are not flavors: (family, base flavor, overrides)
SHAPES = {
    "124M": ("llama3", "20M", dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, vocab_size=32000)),
    "mixtral-small": ("mixtral", "debug", dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=512,
                                               n_experts=8, top_k=2, vocab_size=8192)),
    "deepseek-small": ("deepseek_v3", "small", {}),
}
TRAIN_SHAPES = {"20M": (8, 256), "124M": (4, 256), "mixtral-small": (8, 256), "deepseek-small": (8, 256)}  # (batch, seq); others: --batch x --seq
HF_CLASSES = {"llama3": ("LlamaConfig", "LlamaForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
              "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM")}
TARGETS = {  # the benchmark issue's targets: (goal, bound) per case; bound None = the goal is the bound
    "train": (0.8, 1.05),  # time ratio, lower is better
    "decode": (1.3, None),  # speed ratio, higher is better
    "cache": (5.0, None),  # cache speedup over recomputing, higher is better
}


def section_of(name: str) -> ModelSection:
    family, _, flavor = name.rpartition(":")
    family, flavor, over = SHAPES.get(name, (family or "llama3", flavor, {}))
    if family == "deepseek_v3":  # what transformers' class has: no MTP module, no auxiliary loss
        over = {"mtp_layers": 0, "seq_aux_loss_coef": 0.0, **over}
    return ModelSection.of(family, flavor, **over)


def pair(name: str, seed: int = 0):
    """Our model and transformers' with the identical config and weights (fp32, eager attention off: SDPA)."""
    torch.manual_seed(seed)
    section = section_of(name)
    ours = build_model(section)
    adapter = adapter_for(section.family)
    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[section.family])
    hf = adapter.config_to_hf(section.config)
    if section.family == "mixtral":
        hf["output_router_logits"] = True  # its loss then adds the balance loss, as ours does
    hf_cfg = config_cls(**hf, attn_implementation="sdpa")
    theirs = model_cls(hf_cfg)
    theirs.load_state_dict(adapter.state_dict_to_hf(ours.state_dict()), strict=not section.config.tie_embeddings)
    return ours, theirs, section


def train_steps(ours, theirs, batch: torch.Tensor):
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_t = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def step_ours():
        out = ours({"input_ids": inputs})
        loss = F.cross_entropy(ours.logits(out.hidden).flatten(0, 1).float(), labels.flatten())
        if hasattr(ours, "aux_loss"):  # a mixture of experts: + coef * balance loss, as transformers adds it
            loss = loss + ours.aux_loss(out.aux)[0]
        loss.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    def step_theirs():
        # HF shifts labels itself: pass the unshifted sequence
        loss = theirs(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)

    return step_ours, step_theirs


def decode_fns(ours, theirs, prompt: list[int], new_tokens: int):
    gen = KVCacheGenerator(ours.eval(), eos_ids=[])
    params = SamplingParams(max_new_tokens=new_tokens)
    ids = torch.tensor([prompt])
    theirs.eval()

    def dec_ours():
        out = gen.generate([prompt], params)[0]
        assert len(out.tokens) == new_tokens

    @torch.inference_mode()
    def dec_theirs():
        out = theirs.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == len(prompt) + new_tokens

    return dec_ours, dec_theirs


def cache_fns(ours, prompt: list[int], new_tokens: int):
    """Ours with the KV cache vs ours recomputing the whole prefix for every new token (greedy, batch 1)."""
    gen = KVCacheGenerator(ours.eval(), eos_ids=[])
    params = SamplingParams(max_new_tokens=new_tokens)

    def with_cache():
        gen.generate([prompt], params)

    @torch.inference_mode()
    def without_cache():
        ids = torch.tensor([prompt])
        for _ in range(new_tokens):
            hidden = ours({"input_ids": ids}).hidden  # (1, T, dim): every position again
            ids = torch.cat([ids, ours.logits(hidden[:, -1:]).argmax(-1)], dim=1)  # (1, T + 1)

    return with_cache, without_cache


def engine_fns(ours, theirs, batch: int, prompt_len: int, new_tokens: int, vocab: int):
    """The serving engine vs transformers' generate on `batch` random prompts of `prompt_len` tokens."""
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


def mixed_fns(ours, n: int, lo: int, hi: int, vocab: int, batch: int = 16):
    """Continuous batching (the engine) vs static batches of `batch` (KVCacheGenerator) on mixed lengths."""
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


def memory_bandwidth(repeats: int = 5) -> float:
    """Bytes/s this machine streams with the current thread count: best of `repeats` sums of 512 MB."""
    big = torch.ones(128 * 2**20)  # fp32: 512 MB, far past any cache
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t0)
    return big.numel() * big.element_size() / best


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every matrix but the embedding table (one row of it is
    read), plus the table again when it is the tied output head; of stacked experts (E, ., .) only the
    top_k a token is routed to."""
    total = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                if p.ndim == 2 and "tok_embeddings" not in name)
    cfg = model.cfg
    active = getattr(cfg, "top_k", 1) / getattr(cfg, "n_experts", 1)
    total += sum(int(p.numel() * p.element_size() * active) for p in model.parameters() if p.ndim == 3)
    if model.output is None:
        total += model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    return total


def verdict(case: str, ratio: float) -> str:
    goal, bound = TARGETS[case]
    if case == "train":
        if ratio <= goal:
            return f"goal met (<= {goal}x)"
        return f"within bound (<= {bound}x), goal {goal}x not met" if ratio <= bound else f"FAILS bound {bound}x"
    return f"goal met (>= {goal}x)" if ratio >= goal else f"goal {goal}x NOT met"


def timed_pair(fn_a, fn_b, repeats: int, warmup: int = 1) -> tuple[float, float]:
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both
        t0 = time.perf_counter()
        fn_a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fn_b()
        tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavors", nargs="+", default=["20M", "124M"])
    ap.add_argument("--cases", nargs="+", default=["train", "decode", "cache"],
                    choices=["train", "decode", "cache", "engine", "mixed"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="training batch for models without a TRAIN_SHAPES entry")
    ap.add_argument("--seq", type=int, default=256, help="training sequence length, likewise")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--cache-tokens", type=int, default=256, help="new tokens of the cache vs no-cache case")
    ap.add_argument("--requests", type=int, default=48, help="requests of the mixed case")
    ap.add_argument("--min-len", type=int, default=8, help="mixed case: shortest prompt and output budget")
    ap.add_argument("--max-len", type=int, default=128, help="mixed case: longest prompt and output budget")
    ap.add_argument("--smoke", action="store_true", help="debug flavor, tiny shapes, one repeat")
    args = ap.parse_args()
    if args.smoke:
        args.flavors, args.repeats, args.batch, args.seq = ["debug", "mixtral:debug", "deepseek_v3:debug"], 1, 2, 32
        args.new_tokens, args.cache_tokens = 8, 8
        args.requests, args.min_len, args.max_len = 12, 2, 16
    torch.set_num_threads(args.threads)
    print(f"# CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, fp32, median of {args.repeats} interleaved runs\n")
    print("| model | params | case | workbench | reference | ratio |")
    print("|---|---|---|---|---|---|")
    verdicts = []
    bandwidth = memory_bandwidth() if "decode" in args.cases else None
    for i, name in enumerate(args.flavors):
        ours, theirs, section = pair(name)
        n = count_params(ours)
        vocab = section.config.vocab_size
        if "train" in args.cases:
            bsz, seq = (args.batch, args.seq) if args.smoke else TRAIN_SHAPES.get(name, (args.batch, args.seq))
            batch = torch.randint(0, vocab, (bsz, seq + 1), generator=torch.Generator().manual_seed(0))
            a, b = timed_pair(*train_steps(ours, theirs, batch), args.repeats)
            tokens = bsz * seq
            print(f"| {name} | {n / 1e6:.1f}M | train step {bsz}x{seq} (AdamW) | {a * 1e3:.0f} ms "
                  f"({tokens / a:,.0f} tok/s) | transformers {b * 1e3:.0f} ms ({tokens / b:,.0f} tok/s) | "
                  f"{a / b:.2f}x time |")
            verdicts.append(f"{name} train step: {a / b:.2f}x transformers' time: {verdict('train', a / b)}")
        prompt = torch.randint(0, vocab, (16,), generator=torch.Generator().manual_seed(1)).tolist()
        if "decode" in args.cases:
            a, b = timed_pair(*decode_fns(ours, theirs, prompt, args.new_tokens), args.repeats)
            # memory-bandwidth utilization: weight bytes read per second over what the machine can stream
            mbu = [weight_bytes_per_token(ours) * args.new_tokens / t / bandwidth for t in (a, b)]
            print(f"| {name} | {n / 1e6:.1f}M | greedy decode, batch 1, {args.new_tokens} new | "
                  f"{args.new_tokens / a:,.0f} tok/s ({mbu[0]:.0%} MBU) | transformers "
                  f"{args.new_tokens / b:,.0f} tok/s ({mbu[1]:.0%} MBU) | {b / a:.2f}x speed |")
            verdicts.append(f"{name} decode: {b / a:.2f}x transformers' tokens/s: {verdict('decode', b / a)}")
        if "cache" in args.cases and i == 0:
            a, b = timed_pair(*cache_fns(ours, prompt, args.cache_tokens), args.repeats)
            print(f"| {name} | {n / 1e6:.1f}M | greedy, batch 1, {args.cache_tokens} new: KV cache vs "
                  f"recomputing the prefix | {args.cache_tokens / a:,.0f} tok/s | no cache "
                  f"{args.cache_tokens / b:,.0f} tok/s | {b / a:.2f}x speed |")
            verdicts.append(f"{name} KV cache: {b / a:.2f}x the no-cache speed: {verdict('cache', b / a)}")
        if "engine" in args.cases:
            for batch in (1, 16):
                a, b = timed_pair(*engine_fns(ours.eval(), theirs.eval(), batch, 16, args.new_tokens, vocab),
                                  args.repeats)
                tok = batch * args.new_tokens
                print(f"| {name} | {n / 1e6:.1f}M | engine: greedy decode, batch {batch}, 16-token prompts, "
                      f"{args.new_tokens} new | {tok / a:,.1f} tok/s | transformers {tok / b:,.1f} tok/s | "
                      f"{b / a:.2f}x speed |")
        if "mixed" in args.cases:
            a, b, results, total = mixed_fns(ours.eval(), args.requests, args.min_len, args.max_len, vocab)
            ta, tb = timed_pair(a, b, args.repeats)
            same = results["continuous"] == results["static"]
            print(f"| {name} | {n / 1e6:.1f}M | {args.requests} mixed requests, prompts and outputs "
                  f"{args.min_len}-{args.max_len} tokens | continuous {total / ta:,.1f} tok/s ({ta:.1f} s) | static "
                  f"batches of 16 {total / tb:,.1f} tok/s ({tb:.1f} s) | {tb / ta:.2f}x speed"
                  f"{'' if same else ' (TOKENS DIFFER)'} |")
            verdicts.append(f"{name} continuous vs static batching: {tb / ta:.2f}x: "
                            + ("faster, goal met" if tb > ta else "NOT faster"))
        del ours, theirs
    if bandwidth:
        print(f"\nMBU: weight bytes per token x tokens/s over the measured bandwidth, {bandwidth / 1e9:.1f} GB/s "
              f"({args.threads} threads summing 512 MB). Prefill is included in the decode time.")
    print("\nTargets:")
    for v in verdicts:
        print(f"- {v}")


if __name__ == "__main__":
    main()
