"""`workbench serve` under load: the openai client against a live server, one request at a time and all at once.

    python benchmarks/serve_http.py --ckpt runs/llama3-demo               # 16 requests of 64 tokens, 3 repeats
    python benchmarks/serve_http.py --ckpt runs/llama3-demo --requests 8 --max-tokens 32 --repeats 1

Cases (one server, one model, fp32 on the CPU; greedy, so every case must give the texts `Engine.generate`
gives the same requests one by one in-process: checked)
    sequential  the requests over HTTP, one after another (one client thread)
    concurrent  the same requests over HTTP, one client thread each, all sent at once: the engine batches them
The cases alternate within each repeat (after one warm-up pass). Reported: wall seconds (median of the repeats),
generated tokens per second (usage.completion_tokens), and the median round trip of 20 one-token requests (what
HTTP, JSON and the loop thread add to each request).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time

import torch

from workbench.checkpoint.load import load_for_inference
from workbench.inference.engine import Engine
from workbench.inference.generator import SamplingParams
from workbench.inference.server import OpenAIServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="runs/llama3-demo")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    import openai

    torch.set_num_threads(args.threads)
    model, tokenizer, section = load_for_inference(args.ckpt)
    prompts = [f"def function_{i}(" if i % 2 else f"class Thing{i}:\n    " for i in range(args.requests)]
    engine = Engine(model, tokenizer, max_batch=args.max_batch)
    server = OpenAIServer(engine, tokenizer, "bench").start()
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=600)

    def ask(p):
        out = client.completions.create(model="bench", prompt=p, max_tokens=args.max_tokens, temperature=0)
        return out.choices[0].text, out.usage.completion_tokens

    alone = Engine(model, tokenizer, max_batch=args.max_batch)  # its own: the server's belongs to its loop thread

    def direct():
        params = SamplingParams(max_new_tokens=args.max_tokens)
        outs = [alone.generate([tokenizer.encode(p)], params)[0] for p in prompts]
        return [(c.text, len(c.tokens)) for c in outs]

    def sequential():
        return [ask(p) for p in prompts]

    def concurrent():
        results = [None] * len(prompts)

        def worker(i):
            results[i] = ask(prompts[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    cases = {"sequential": sequential, "concurrent": concurrent}
    times: dict[str, list[float]] = {name: [] for name in cases}
    reference = direct()  # the texts every case must give (and a warm-up)
    tokens = sum(n for _, n in reference)
    for _ in range(args.repeats):  # the cases alternate, so a busy spell on a shared machine hits all of them
        for name, fn in cases.items():
            t0 = time.perf_counter()
            results = fn()
            times[name].append(time.perf_counter() - t0)
            assert results == reference, f"{name}: the texts differ from the engine's"
    # one-token requests one after another: what HTTP, JSON and the loop thread add to a request
    t_req = []
    for _ in range(20):
        t0 = time.perf_counter()
        client.completions.create(model="bench", prompt="x", max_tokens=1, temperature=0)
        t_req.append(time.perf_counter() - t0)
    server.close()
    rows = [(name, statistics.median(t), tokens / statistics.median(t)) for name, t in times.items()]
    print(f"{section.family}:{section.flavor} from {args.ckpt}; {args.requests} greedy requests of up to "
          f"{args.max_tokens} tokens ({tokens} generated), max_batch {args.max_batch}, {args.threads} torch threads, "
          f"{platform.processor() or platform.machine()}; median of {args.repeats}")
    print("| case | wall s | tokens/s |\n|---|---:|---:|")
    for name, wall, tps in rows:
        print(f"| {name} | {wall:.2f} | {tps:.0f} |")
    print(f"\none-token request round trip: median {1000 * statistics.median(t_req):.1f} ms of 20")


if __name__ == "__main__":
    main()
