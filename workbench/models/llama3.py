"""Llama 3 / 3.1 / 3.2: a decoder-only transformer with grouped-query attention and RoPE.

What it is
    The dense Llama 3 family (Meta, 2024): a stack of pre-norm blocks over token embeddings, a final
    RMSNorm and a vocabulary projection. 3.1 adds the "llama3" RoPE scaling for 128K context; 3.2 adds
    small sizes (1B, 3B) with tied input/output embeddings.

The math (one block, x of shape (B, T, dim))
    h   = x + Wo · Attn(RoPE(Wq n), RoPE(Wk n), Wv n),   n = RMSNorm(x)
    out = h + W2 (SiLU(W1 m) * W3 m),                    m = RMSNorm(h)
    Attn uses H query heads and KV <= H key/value heads (GQA): query head j reads KV head j // (H / KV).
    logits = RMSNorm(x_L) · W_out^T  (W_out = the embedding matrix when tied)

The intuition
    Pre-norm keeps the residual stream an identity path, so gradients reach early layers unchanged.
    GQA shares each key/value head among H / KV query heads: the KV cache shrinks by that factor
    (8x for 8B) at almost no quality cost, which is what makes long-context decoding affordable.
    RoPE rotates q and k by position-dependent angles so scores depend only on relative offsets.

Design choices
    Attribute names follow Meta's checkpoints (tok_embeddings, layers.i.attention.wq, feed_forward.w1,
    output) because they are public API: the parallel plans address modules by these paths, and
    `workbench.checkpoint.hf.llama3` maps them to Hugging Face's names.
    RoPE uses the half-split layout (see `workbench.nn.rope` for how that relates to Meta's interleaved
    one); HF weights load unchanged.
    The attention math goes through `attention.core` with a mask spec; no loss is computed here; logits
    come from `logits()` so objectives materialize only the rows they need.
    RoPE's cos and signed-sin tables are built once per forward (`rope_tables`) and shared by every
    layer. q, k, v stay three matmuls: stacking the weights into one matmul was measured on CPU and lost
    (same matmul time, plus a weight copy per forward and strided elementwise ops on the split outputs).
    `__init__` allocates nothing when built under `torch.device("meta")`; `init_weights()` is the only
    initializer and also rebuilds the RoPE buffer, so a model can be materialized after sharding.
    Attention patterns are config, not code: `sliding_window` or MoBA (`moba_block_size`, `moba_topk`,
    `moba_full_last_layers` for the hybrid that keeps the last layers full) are added to each layer's mask
    spec in `layer_masks`; `attn_backend = "block"` or `"flex"` runs them block-sparse (workbench.nn.moba).
    Tied embeddings have no `output` module at all: `logits()` reads `tok_embeddings.weight`, so the tie
    survives `to_empty()`, sharding and state-dict round trips.

Differences from the reference
    None in the forward math: parity with transformers' `LlamaForCausalLM` is tested at atol 1e-5 (fp32).
    Initialization is GPT-2 style (see `init_weights`), not what Meta used (unpublished).

Sources
    Grattafiori et al., "The Llama 3 Herd of Models", arXiv 2407.21783; meta-llama/llama3 model.py;
    HF transformers modeling_llama.py and modeling_rope_utils.py (read, not copied).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from workbench.config import fail, field_
from workbench.models.base import DecoderOutput, select_positions
from workbench.nn.attention import AttentionCore, MaskSpec
from workbench.nn.kv_cache import KVCache, StaticKVCache
from workbench.nn.linear import Linear, linear
from workbench.nn.moba import MobaSpec
from workbench.nn.norm import RMSNorm
from workbench.nn.qk_clip import record_max_logits
from workbench.nn.rope import RopeConfig, RotaryEmbedding, apply_rope_tables, rope_tables
from workbench.nn.swiglu import SwiGLU


@dataclass
class Config:
    dim: int = field_(4096, gt=0, doc="model width (hidden_size)")
    n_layers: int = field_(32, gt=0)
    n_heads: int = field_(32, gt=0)
    n_kv_heads: int = field_(8, gt=0, doc="key/value heads (GQA); must divide n_heads")
    head_dim: int = field_(0, ge=0, doc="0 = dim // n_heads")
    ffn_dim: int = field_(14336, gt=0, doc="SwiGLU hidden width (intermediate_size)")
    vocab_size: int = field_(128256, gt=0)
    norm_eps: float = field_(1e-5, gt=0)
    rope: RopeConfig = field(default_factory=lambda: RopeConfig(theta=500000.0))
    max_seq_len: int = field_(8192, gt=0, doc="longest context the model is meant for (not enforced)")
    tie_embeddings: bool = False
    init_std: float = field_(0.02, gt=0)
    attn_backend: Literal["sdpa", "math", "flex", "block"] = "sdpa"
    # NEW: block-sparse attention patterns (workbench.nn.moba; docs/attention-patterns.md)
    sliding_window: int | None = field_(None, doc="None = full causal attention; else each layer's window in tokens")
    moba_block_size: int | None = field_(None, doc="MoBA: keys per block; None = MoBA off")
    moba_topk: int = field_(3, gt=0, doc="MoBA: key blocks per query, the query's own block included")
    moba_full_last_layers: int = field_(0, ge=0, doc="MoBA hybrid: the last N layers keep full attention")

    def validate(self) -> None:
        if self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            fail("sliding_window", f"must be > 0 or unset, got {self.sliding_window}")
        if self.moba_block_size is not None and self.moba_block_size <= 0:
            fail("moba_block_size", f"must be > 0 or unset, got {self.moba_block_size}")
        if self.moba_block_size is not None and self.sliding_window is not None:
            fail("moba_block_size", f"cannot be combined with sliding_window ({self.sliding_window}): "
                                    f"set one of them, got {self.moba_block_size}")
        if self.moba_full_last_layers > self.n_layers:
            fail("moba_full_last_layers", f"must be <= n_layers ({self.n_layers}), got {self.moba_full_last_layers}")
        if not self.head_dim and self.dim % self.n_heads:
            fail("n_heads", f"must divide dim ({self.dim}) when head_dim is not set, got {self.n_heads}")
        if self.hd % 2:
            fail("head_dim", f"must be even for RoPE, got {self.hd}")

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads


def _rope31(factor: float) -> RopeConfig:
    return RopeConfig(theta=500000.0, scaling="llama3", factor=factor, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_seq_len=8192)


FLAVORS: dict[str, Config] = {
    # tests and smoke runs: a few hundred thousand parameters
    "debug": Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=512,
                    rope=RopeConfig(theta=10000.0), max_seq_len=512),
    # CPU sizes (the main job trains "2M"; issue benchmarks use "20M")
    "2M": Config(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=4096,
                 rope=RopeConfig(theta=10000.0), max_seq_len=1024),
    "20M": Config(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_dim=1152, vocab_size=8192,
                  rope=RopeConfig(theta=10000.0), max_seq_len=1024),
    # the published shapes (Llama 3.2 1B/3B, Llama 3.1 8B/70B/405B)
    "1B": Config(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
                 rope=_rope31(32.0), max_seq_len=131072, tie_embeddings=True),
    "3B": Config(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, ffn_dim=8192,
                 rope=_rope31(32.0), max_seq_len=131072, tie_embeddings=True),
    "8B": Config(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                 rope=_rope31(8.0), max_seq_len=131072),
    "70B": Config(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                  rope=_rope31(8.0), max_seq_len=131072),
    "405B": Config(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248,
                   rope=_rope31(8.0), max_seq_len=131072),
}


class Attention(nn.Module):
    """Grouped-query attention. QK-Clip (workbench.train.optim.muon): with `qk_clip_record` set, a training
    forward records each query head's largest logit (workbench.nn.qk_clip); `qk_clip_rows` is the clipping
    rule: MHA scales head h's rows of wq and wk by sqrt(gamma_h); under GQA a key head is shared by its
    group, so, as K2 does with MLA's shared rotary key, the key stays and head h's wq rows take all of gamma_h
    (every head's logits scale by exactly its own gamma; a head below tau is untouched)."""

    qk_clip_record = False  # set on the instance by enable_qk_clip
    qk_max_logit: torch.Tensor | None = None  # (H,) running max since the last post-step hook

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.wq = Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.core = AttentionCore(scale=self.head_dim**-0.5, backend=cfg.attn_backend)

    def init_weights(self, std: float, out_std: float) -> None:
        """wq, wk, wv: truncated N(0, std); wo (writes to the residual): truncated N(0, out_std); +-3 std."""
        for lin, s in ((self.wq, std), (self.wk, std), (self.wv, std), (self.wo, out_std)):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=s, a=-3 * s, b=3 * s)

    def forward(self, x, cos, sin, mask: MaskSpec, kv_cache: KVCache | None, layer_idx: int):
        B, T, _ = x.shape
        D = self.head_dim
        # heads from the projection widths: H and KV here, H/tp and KV/tp on a tensor-parallel rank
        q = self.wq(x).view(B, T, -1, D)  # (B, T, H, D)
        k = self.wk(x).view(B, T, -1, D)  # (B, T, KV, D)
        v = self.wv(x).view(B, T, -1, D)  # (B, T, KV, D)
        # R(p) q, R(p) k with the (B, T, 1, D) cos / signed-sin tables of `rope_tables`
        q, k = apply_rope_tables(q, cos, sin), apply_rope_tables(k, cos, sin)
        q_offset = 0
        if kv_cache is not None:
            q_offset = kv_cache.seen
            k, v = kv_cache.update(layer_idx, k, v)  # (B, Tk, KV, D), earlier tokens included
        if self.qk_clip_record and self.training:  # S_max^h = max_{b,i,j allowed} q_i^h . k_j^h * scale
            record_max_logits(self, q, k, mask, q_offset, self.core.scale)
        # (B, H, T, D) layout for the core
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, q_offset)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.wo(out)

    def qk_clip_rows(self, gamma: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(weight, per-row factor) pairs that scale head h's logits by gamma_h (H,), gamma <= 1."""
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        if KV == H:  # MHA: W_q^h, W_k^h *= sqrt(gamma_h)
            rows = gamma.sqrt().repeat_interleave(D)  # (H * D,)
            return [(self.wq.weight, rows), (self.wk.weight, rows)]
        # GQA: W_q^h *= gamma_h, the shared W_k^g untouched
        return [(self.wq.weight, gamma.repeat_interleave(D))]


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask, kv_cache, layer_idx):
        # h = x + Attn(RMSNorm(x))
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, kv_cache, layer_idx)
        # out = h + FFN(RMSNorm(h))
        return h + self.feed_forward(self.ffn_norm(h))


class Llama3(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.hd, cfg.rope)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The only initializer (GPT-2 style), safe to call again after `to_empty()`:

        | parameter                       | init                                   |
        |---------------------------------|----------------------------------------|
        | tok_embeddings                  | N(0, init_std)                         |
        | wq, wk, wv, w1, w3              | truncated N(0, init_std), +-3 std      |
        | wo, w2 (write to the residual)  | truncated N(0, init_std / sqrt(2 L))   |
        | output (untied)                 | truncated N(0, init_std)               |
        | norms                           | ones                                   |
        | rope.inv_freq (buffer)          | recomputed from the config             |

        Scaling the residual writers by 1/sqrt(2L) keeps the residual stream's variance independent of
        depth at initialization (each block adds two terms).
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        self.rope.init_weights()
        for block in self.layers:
            block.attention_norm.init_weights()
            block.ffn_norm.init_weights()
            block.attention.init_weights(std, out_std)
            block.feed_forward.init_weights(std, out_std)
        self.norm.init_weights()
        if self.output is not None:
            nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, the MFU convention: 6 N + 12 L H Q T.

        N counts matmul weights (the output head included, the embedding lookup not); 12 L H Q T is the
        attention scores and weighted sum, forward and backward, over a causal window of T tokens.
        """
        cfg = self.cfg
        n_matmul = sum(p.numel() for name, p in self.named_parameters() if p.ndim == 2 and "tok_embeddings" not in name)
        n_matmul += cfg.vocab_size * cfg.dim if self.output is None else 0  # the tied head is a matmul too
        return 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.hd * seq_len

    def kv_entry_shapes(self) -> list[tuple[int, ...]]:
        """What one token leaves in each layer's cache: k and v, each (KV, D) (the paged engine's pool too)."""
        shape = (self.cfg.n_kv_heads, self.cfg.hd)
        return [shape, shape]

    def make_kv_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> StaticKVCache:
        """A cache for this model's attention type: k and v, each (B, max_len, KV, D), per layer."""
        w = self.tok_embeddings.weight
        return StaticKVCache(self.cfg.n_layers, batch_size, max_len, self.kv_entry_shapes(),
                             dtype=dtype or w.dtype, device=device or w.device)

    def forward(self, batch: dict) -> DecoderOutput:
        kv_cache: KVCache | None = batch.get("kv_cache")
        if batch.get("inputs_embeds") is not None:
            x = batch["inputs_embeds"]
        else:
            x = self.tok_embeddings(batch["input_ids"])  # (B, T, dim)
        # the batch's length (under sequence parallel x holds only this rank's slice of it)
        B, T = batch["input_ids"].shape if batch.get("inputs_embeds") is None else x.shape[:2]
        offset = kv_cache.seen if kv_cache is not None else 0
        positions = batch.get("positions")
        if positions is None:
            positions = torch.arange(offset, offset + T, device=x.device).expand(B, T)
        mask = batch.get("mask") or MaskSpec()
        masks = self.layer_masks(mask)  # NEW: per-layer patterns (sliding window, MoBA hybrid)
        cos, sin = rope_tables(*self.rope(positions, x.dtype))  # (B, T, 1, D) each: cos, signed sin
        hidden_states = [x] if batch.get("output_hidden_states") else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, masks[i], kv_cache, i)
            if hidden_states is not None:
                hidden_states.append(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        return DecoderOutput(hidden=self.norm(x), aux={},
                             hidden_states=tuple(hidden_states) if hidden_states is not None else None)

    def layer_masks(self, mask: MaskSpec) -> list[MaskSpec]:
        """The batch's spec with this config's pattern added, per layer (a window or MoBA set by the
        batch's spec wins). With MoBA the last `moba_full_last_layers` layers keep the plain spec."""
        cfg = self.cfg
        if cfg.sliding_window is not None and mask.sliding_window is None and mask.moba is None:
            return [dataclasses.replace(mask, sliding_window=cfg.sliding_window)] * cfg.n_layers
        if cfg.moba_block_size is not None and mask.moba is None and mask.sliding_window is None:
            moba = dataclasses.replace(mask, moba=MobaSpec(cfg.moba_block_size, cfg.moba_topk))
            n_moba = cfg.n_layers - cfg.moba_full_last_layers
            return [moba] * n_moba + [mask] * cfg.moba_full_last_layers
        return [mask] * cfg.n_layers

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits for `hidden` (B, T, dim), or only at `positions` along T.

        positions: None (all T), a 1-D index tensor (the same K positions in every row) or a (B, K)
        index tensor (per-row positions, e.g. the last real token of each prompt). Returns (B, T|K, V).
        """
        hidden = select_positions(hidden, positions)  # (B, T|K, dim)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return linear(hidden, weight)  # the CPU decode kernel for a few rows (workbench.nn.linear)


Model = Llama3
