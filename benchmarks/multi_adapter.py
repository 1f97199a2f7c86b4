"""Multi-adapter serving: the memory of one base plus N adapters, and the decode cost of mixed batches, on CPU.

    python benchmarks/multi_adapter.py                  # memory table (1B, r=8 on attention) + decode timing on 20M
    python benchmarks/multi_adapter.py --smoke          # seconds: the same code on the debug flavor, one repeat

Memory (no weights are allocated: the models are built on the meta device)
    The llama3 `--memory-flavor` model (default 1B) with `--n-adapters` adapters of rank `--rank` on every
    attention projection: parameters of the base counted from the model, the adapter stacks counted from the
    MultiLoRALinear buffers themselves (slot 0 and the per-slot DoRA factor included), against N
    merged copies of the model. Bytes at 2 bytes a value (bf16 serving) and at 4 (fp32).

Decode timing (`--flavor`, default 20M; fp32; `--threads` threads, default 2)
    A batch of `--batch` rows (default 8) with a `--prompt`-token prompt each (default 32) is prefilled into a
    KV cache, then `--steps` greedy decode steps (default 32: one forward of (B, 1) plus the last-token logits)
    are timed; the figure is ms per decode step, median over `--repeats` runs (default 5) after one warm-up run
    per case, the cases interleaved within each repeat. Four adapters of rank `--rank` on every attention
    projection (LoRA, random non-zero B), saved with save_adapter and loaded with load_adapters.
    Cases
        plain     the base model, no adapter layers at all
        base-ids  the adapted model, every row on slot 0 (the layers' overhead when no row uses an adapter)
        one       every row on adapter 1 (the uniform path: plain matmuls at the adapter's rank)
        mixed     rows on adapters 1, 2, 3, 4, 1, 2, 3, 4 (the gathered batched-matmul path)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from workbench.inference.adapters import MultiLoRALinear, adapter_rows, load_adapters
from workbench.models.base import ModelSection, build_model
from workbench.nn.lora import LoraConfig, inject_lora, lora_modules, save_adapter


def memory_table(flavor: str, rank: int, n_adapters: list[int]) -> str:
    from workbench.models import llama3

    cfg = LoraConfig(r=rank)  # the default targets: every attention projection
    with torch.device("meta"):
        base = llama3.Model(llama3.FLAVORS[flavor])
    base_params = sum(p.numel() for p in base.parameters())  # tied embeddings counted once
    with torch.device("meta"):
        probe = llama3.Model(llama3.FLAVORS[flavor])
    paths = inject_lora(probe, cfg)
    per_adapter = sum(p.numel() for _, m in lora_modules(probe) for p in (m.lora_A, m.lora_B))
    lines = [f"llama3 {flavor}: {base_params:,} base parameters; LoRA r={rank} on {len(paths)} attention projections: "
             f"{per_adapter:,} parameters per adapter ({100 * per_adapter / base_params:.3f}% of the base)", "",
             "| adapters N | one base + N adapters (stacks as loaded) | N merged models | ratio |", "|---|---|---|---|"]
    for n in n_adapters:
        with torch.device("meta"):
            model = llama3.Model(llama3.FLAVORS[flavor])
        for path in paths:  # the stacks load_adapters builds: N + 1 slots of rank r on each targeted linear
            parent, _, attr = path.rpartition(".")
            layer = MultiLoRALinear(model.get_submodule(path))
            layer.grow(n + 1, rank)
            setattr(model.get_submodule(parent), attr, layer)
        stacks = sum(b.numel() for _, m in model.named_modules() if isinstance(m, MultiLoRALinear)
                     for b in (m.lora_A, m.lora_sB, m.dora_factor))
        served, merged = base_params + stacks, n * base_params
        lines.append(f"| {n} | {served:,} values = {gb(served, 2)} bf16 / {gb(served, 4)} fp32 "
                     f"| {merged:,} values = {gb(merged, 2)} bf16 / {gb(merged, 4)} fp32 | {merged / served:.1f}x |")
    return "\n".join(lines)


def gb(values: int, width: int) -> str:
    return f"{values * width / 1e9:.2f} GB"


@torch.no_grad()
def make_adapters(section: ModelSection, folder: Path, rank: int, n: int) -> dict[str, Path]:
    out = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        model = build_model(section)
        cfg = LoraConfig(r=rank)
        inject_lora(model, cfg)
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.02)
        out[f"adapter{i + 1}"] = save_adapter(model, folder / f"adapter{i + 1}", cfg, meta={"family": section.family})
    return out


@torch.inference_mode()
def decode_ms(model, ids: torch.Tensor | None, prompt: torch.Tensor, steps: int) -> float:
    """ms per greedy decode step of the batch `prompt` (B, L) after a prefill (not timed)."""
    B, L = prompt.shape
    cache = model.make_kv_cache(B, L + steps + 1)
    ctx = adapter_rows(model, ids) if ids is not None else _null()
    with ctx:
        out = model({"input_ids": prompt, "kv_cache": cache})
        tok = model.logits(out.hidden[:, -1:]).argmax(-1)  # (B, 1)
        t0 = time.perf_counter()
        for s in range(steps):
            pos = torch.full((B, 1), L + s, dtype=torch.long)
            out = model({"input_ids": tok, "positions": pos, "kv_cache": cache})
            tok = model.logits(out.hidden).argmax(-1)
        return 1e3 * (time.perf_counter() - t0) / steps


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", default="20M")
    ap.add_argument("--memory-flavor", default="1B")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--n-adapters", type=int, nargs="+", default=[1, 4, 16, 100])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="debug flavors, one repeat, a few steps")
    args = ap.parse_args()
    if args.smoke:
        args.flavor, args.memory_flavor, args.repeats, args.steps, args.prompt = "debug", "debug", 1, 4, 8
    torch.set_num_threads(args.threads)

    print(memory_table(args.memory_flavor, args.rank, args.n_adapters))
    print()

    section = ModelSection.of("llama3", args.flavor)
    torch.manual_seed(0)
    plain = build_model(section).eval()
    torch.manual_seed(0)
    served = build_model(section).eval()
    with tempfile.TemporaryDirectory() as tmp:
        reg = load_adapters(served, make_adapters(section, Path(tmp), args.rank, 4))
    B = args.batch
    mixed = torch.tensor([reg.id_of(reg.names[i % 4]) for i in range(B)])
    cases = {"plain": (plain, None), "base-ids": (served, torch.zeros(B, dtype=torch.long)),
             "one": (served, torch.full((B,), reg.id_of(reg.names[0]))), "mixed": (served, mixed)}
    prompt = torch.randint(0, section.config.vocab_size, (B, args.prompt), generator=torch.Generator().manual_seed(1))
    for model, ids in cases.values():  # warm-up, excluded
        decode_ms(model, ids, prompt, args.steps)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, (model, ids) in cases.items():
            times[name].append(decode_ms(model, ids, prompt, args.steps))
    params = sum(p.numel() for p in plain.parameters())
    print(f"llama3 {args.flavor} ({params / 1e6:.1f}M parameters), fp32, {args.threads} threads, batch {B}, "
          f"{args.prompt}-token prompts, {args.steps} decode steps, median of {args.repeats} (one warm-up excluded); "
          f"4 adapters LoRA r={args.rank} on every attention projection")
    print()
    print("| case | ms / decode step | tokens/s | vs plain |")
    print("|---|---|---|---|")
    ref = statistics.median(times["plain"])
    for name, ts in times.items():
        med = statistics.median(ts)
        spread = f" ({min(ts):.2f}-{max(ts):.2f})"
        print(f"| {name} | {med:.2f}{spread} | {B * 1e3 / med:.0f} | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
