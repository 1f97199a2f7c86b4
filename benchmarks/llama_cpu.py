"""Workbench Llama 3 vs transformers' LlamaForCausalLM on CPU, same config, weights, dtype and threads.

    python benchmarks/llama_cpu.py                 # 2M and 20M flavors, 5 interleaved repeats
    python benchmarks/llama_cpu.py --flavors 20M --repeats 7 --threads 2
    python benchmarks/llama_cpu.py --smoke         # seconds: every case once on the debug flavor

Cases (each timed for both implementations, alternating, median of the repeats):
    train   one AdamW step (forward, loss, backward, update) on a (batch, seq) batch of random tokens
    decode  greedy generation, batch 1, a 16-token prompt, `--new-tokens` new tokens through the KV cache
            (ours: KVCacheGenerator; theirs: generate(do_sample=False) with its dynamic cache)

A ratio < 1 means the workbench takes less time (train) / > 1 means it decodes faster (decode).
Results go to stdout as a markdown table; docs/benchmarks.md records them with the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

from workbench.checkpoint.hf.llama3 import config_to_hf, state_dict_to_hf
from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.models.base import ModelSection, build_model, count_params


def pair(flavor: str, seed: int = 0):
    """Our model and transformers' with the identical config and weights (fp32, eager attention off: SDPA)."""
    torch.manual_seed(seed)
    section = ModelSection.of("llama3", flavor)
    ours = build_model(section)
    hf_cfg = transformers.LlamaConfig(**config_to_hf(section.config), attn_implementation="sdpa")
    theirs = transformers.LlamaForCausalLM(hf_cfg)
    theirs.load_state_dict(state_dict_to_hf(ours.state_dict()), strict=not section.config.tie_embeddings)
    return ours, theirs, section


def train_steps(ours, theirs, batch: torch.Tensor):
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_t = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def step_ours():
        logits = ours.logits(ours({"input_ids": inputs}).hidden)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
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
    ap.add_argument("--flavors", nargs="+", default=["2M", "20M"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="debug flavor, tiny shapes, one repeat")
    args = ap.parse_args()
    if args.smoke:
        args.flavors, args.repeats, args.batch, args.seq, args.new_tokens = ["debug"], 1, 2, 32, 8
    torch.set_num_threads(args.threads)
    print(f"# CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, fp32, median of {args.repeats} interleaved runs\n")
    print("| flavor | params | case | workbench | transformers | ratio |")
    print("|---|---|---|---|---|---|")
    for flavor in args.flavors:
        ours, theirs, section = pair(flavor)
        n = count_params(ours)
        vocab = section.config.vocab_size
        batch = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
        a, b = timed_pair(*train_steps(ours, theirs, batch), args.repeats)
        tokens = args.batch * args.seq
        print(f"| {flavor} | {n / 1e6:.1f}M | train step {args.batch}x{args.seq} | {a * 1e3:.0f} ms "
              f"({tokens / a:,.0f} tok/s) | {b * 1e3:.0f} ms ({tokens / b:,.0f} tok/s) | {a / b:.2f}x time |")
        prompt = torch.randint(0, vocab, (16,), generator=torch.Generator().manual_seed(1)).tolist()
        a, b = timed_pair(*decode_fns(ours, theirs, prompt, args.new_tokens), args.repeats)
        print(f"| {flavor} | {n / 1e6:.1f}M | greedy decode, batch 1, {args.new_tokens} new | "
              f"{args.new_tokens / a:,.0f} tok/s | {args.new_tokens / b:,.0f} tok/s | {b / a:.2f}x speed |")


if __name__ == "__main__":
    main()
