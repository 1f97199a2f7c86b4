"""KV-cache bytes per token: multi-head (MHA), grouped-query (GQA) and multi-head latent attention (MLA), measured.

    python benchmarks/kv_bytes.py            # real widths: Llama-3-8B and DeepSeek-V3 layers, bf16
    python benchmarks/kv_bytes.py --smoke    # the same code path on tiny widths (CI)

For each row one attention layer is built at the real width, a KV cache is made by the model family's own
`make_kv_cache` (so the shapes are the ones generation uses), a prompt of `--tokens` tokens runs through the
layer into that cache, and the bytes per token are read off the cache's tensors: the bytes of every
tensor the layer stored, divided by the slots. The slots that the forward wrote are checked to be filled
(non-zero) and the rest empty, so the number is what the layer really writes. The whole-model figure is
that times the layer count (every layer of these models has the same attention), and the last column the
cache of one 128K-token sequence.

Rows
    Llama-3-8B  MHA   32 KV heads of 128 (the 8B shape with n_kv_heads = n_heads: what GQA saves against)
    Llama-3-8B  GQA    8 KV heads of 128 (the real model)
    DeepSeek-V3 MHA  128 heads, keys of 192 (128 nope + 64 rope) and values of 128: what the expanded MLA
                     path materialises per token, as a plain multi-head cache would store it. No layer of
                     the workbench caches this, so the row is the size of a StaticKVCache of those shapes,
                     not a measured forward
    DeepSeek-V3 MLA  the latent kv_norm(c_KV) (512) and the shared rotated RoPE key (64): what ours stores
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from workbench.models.base import ModelSection
from workbench.nn.attention import MaskSpec
from workbench.nn.kv_cache import StaticKVCache
from workbench.nn.rope import rope_tables

CONTEXT = 128 * 1024


def llama_layer(mha: bool, smoke: bool):
    from workbench.models import llama3

    base = ModelSection.of("llama3", "debug" if smoke else "8B").config
    cfg = dataclasses.replace(base, n_kv_heads=base.n_heads if mha else base.n_kv_heads)

    def build():
        layer = llama3.Attention(cfg)
        layer.init_weights(0.02, 0.02)
        rope = llama3.RotaryEmbedding(cfg.hd, cfg.rope)
        rope.init_weights()
        return layer, rope

    def cache(n_slots, dtype):  # the model's own make_kv_cache, one layer deep (the shell stays on meta)
        with torch.device("meta"):
            shell = llama3.Llama3(dataclasses.replace(cfg, n_layers=1))
        return shell.make_kv_cache(1, n_slots, dtype=dtype, device="cpu")

    return cfg, build, cache, cfg.n_layers


def mla_layer(smoke: bool):
    from workbench.models import deepseek_v3

    cfg = ModelSection.of("deepseek_v3", "debug" if smoke else "671B").config

    def build():
        layer = deepseek_v3.MLA(cfg)
        layer.init_weights(0.006, 0.006)
        rope = deepseek_v3.RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope)
        rope.init_weights()
        return layer, rope

    def cache(n_slots, dtype):
        with torch.device("meta"):
            shell = deepseek_v3.DeepSeekV3(dataclasses.replace(cfg, n_layers=1, n_dense_layers=1, mtp_layers=0))
        return shell.make_kv_cache(1, n_slots, dtype=dtype, device="cpu")

    return cfg, build, cache, cfg.n_layers


def measure(build, make_cache, tokens: int, dtype, dim: int) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes per token per layer of the cache one real forward fills, and the per-token shapes stored."""
    torch.manual_seed(0)
    layer, rope = build()
    layer.to(dtype)
    slots = tokens + 8
    cache = make_cache(slots, dtype)
    x = torch.randn(1, tokens, dim, dtype=dtype)
    positions = torch.arange(tokens)[None]
    cos, sin = rope_tables(*rope(positions, dtype))
    with torch.no_grad():
        out = layer(x, cos, sin, MaskSpec(), cache, 0)
    assert torch.isfinite(out).all()
    stored = cache.buffers[0]
    for buf in stored:  # the forward filled exactly the slots it was given
        assert buf[:, :tokens].abs().sum(-1).ne(0).all() and buf[:, tokens:].eq(0).all()
    per_token = sum(b.element_size() * b[0, 0].numel() for b in stored)
    total = sum(b.nbytes for b in stored)
    assert total == per_token * slots  # nothing stored beside the per-slot tensors
    return per_token, [tuple(b.shape[2:]) for b in stored]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32, help="prompt tokens run through each layer")
    ap.add_argument("--smoke", action="store_true", help="tiny widths, same code path")
    args = ap.parse_args()
    dtype = torch.bfloat16
    rows = []
    for name, kind, (cfg, build, cache, layers) in (
        ("Llama-3-8B", "MHA", llama_layer(True, args.smoke)),
        ("Llama-3-8B", "GQA", llama_layer(False, args.smoke)),
    ):
        per_layer, shapes = measure(build, cache, args.tokens, dtype, cfg.dim)
        rows.append((name, kind, f"k, v {shapes[0]} each", per_layer, layers))
    cfg, build, cache, layers = mla_layer(args.smoke)
    mla, shapes = measure(build, cache, args.tokens, dtype, cfg.dim)
    # the multi-head cache of the same layer: per head a key of d_n + d_r and a value of d_v
    H = cfg.n_heads
    mha = StaticKVCache(1, 1, 1, [(H, cfg.qk_head_dim), (H, cfg.v_head_dim)], dtype=dtype)
    rows.append(("DeepSeek-V3", "MHA", f"k {(H, cfg.qk_head_dim)}, v {(H, cfg.v_head_dim)}",
                 sum(b.nbytes for b in mha.buffers[0]), layers))
    rows.append(("DeepSeek-V3", "MLA", f"latent {shapes[0]}, rope key {shapes[1]}", mla, layers))

    print(f"KV cache per token, {str(dtype).removeprefix('torch.')}, measured on one layer"
          f"{' (smoke widths)' if args.smoke else ''}:\n")
    print("| model | attention | stored per token and layer | bytes / token / layer | layers | bytes / token "
          "| one 128K-token sequence |")
    print("|---|---|---|---|---|---|---|")
    for name, kind, what, per_layer, n in rows:
        print(f"| {name} | {kind} | {what} | {per_layer:,} | {n} | {human(per_layer * n)} | "
              f"{human(per_layer * n * CONTEXT)} |")
    ratio = rows[2][3] / rows[3][3]
    print(f"\nMLA stores {ratio:.1f}x less than multi-head attention over the same DeepSeek-V3 heads, and "
          f"{rows[1][3] * rows[1][4] / (rows[3][3] * rows[3][4]):.2f}x less per token than Llama-3-8B's GQA "
          f"for the whole model.")


if __name__ == "__main__":
    main()
