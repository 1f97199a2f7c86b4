"""Mixtral 8x7B / 8x22B: the Llama 3 decoder with a sparse mixture-of-experts feed-forward in every layer.

What it is
    Mistral AI's sparse MoE decoder (2023-24): Mistral attention (GQA, RoPE theta 1e6, optionally a
    sliding window) and, in place of the dense FFN, E SwiGLU experts of which each token uses top_k = 2.
    8x7B holds ~47B parameters but runs ~13B per token.

The math (one block, x of shape (B, T, dim))
    h   = x + Wo · Attn(RoPE(Wq n), RoPE(Wk n), Wv n),        n = RMSNorm(x)        (as Llama 3)
    p   = softmax(W_g m),  idx = topk(p, k),  w = p[idx] / sum p[idx],              m = RMSNorm(h)
    out = h + sum_j w_j · W2_{idx_j} (SiLU(W1_{idx_j} m) * W3_{idx_j} m)  [+ W2_s (SiLU(W1_s m) * W3_s m)]
    logits = RMSNorm(x_L) · W_out^T
    Balance loss (Switch, as transformers): E · sum_e f_e · P_e over all layers' tokens jointly
    (`workbench.models.moe.switch_balance_loss` on the summed aux).

The intuition
    Routing picks two experts per token, so compute follows k while capacity follows E. Softmax over all
    experts then renormalising over the top two keeps the output scale independent of router confidence;
    the balance loss (coefficient `router_aux_loss_coef`) keeps the load spread.

Design choices
    Attention is Llama 3's class, imported unchanged; the block differs only in its FFN (`# NEW:` marks
    it). The MoE lives in `workbench.models.moe` (shared with DeepSeek-V3): stacked expert weights in the
    transformers 5 layout (`experts.gate_up_proj` (E, 2F, D), `experts.down_proj` (E, D, F)), dropless
    sorted dispatch. `aux` holds the per-layer router sums and counts added over layers (reducible; the
    loss is formed by the objective after reduction), plus `expert_counts_per_layer` (L, E) for the
    bias-balancing hook and, when the batch asks `output_router_logits`, each layer's router logits.
    The sliding window is a mask-spec field, so the attention core needs no Mixtral code.
    flops_per_token counts active parameters: top_k experts per layer, not all E.
    Shared experts (`n_shared_experts`, 0 by default; the bracketed term above): an always-on SwiGLU of
    width n_shared_experts * ffn_dim beside the routed experts, DeepSeek's design (`moe.MoE`'s
    `shared_experts`), for comparing "E experts, top-k plus shared" against a dense model of equal active
    size. Every token runs it, so flops_per_token counts it in full. Not part of Mixtral as published.

Differences from the reference
    None in the forward math: parity with `MixtralForCausalLM` (fp32, eager) is tested at atol 1e-5,
    including the chosen experts and the aux loss. Router jitter noise (training only, off on the hub
    configs) is not implemented. Initialization is GPT-2 style, as in llama3.py. Shared experts
    (n_shared_experts > 0) are this workbench's extension: transformers' Mixtral has none, so the Hugging
    Face adapter refuses such a model.
    In training, the balance loss is computed per micro-batch over the tokens of every data-parallel rank
    (`aux_loss`, which the LM objective adds with `router_aux_loss_coef`, averaged over the step's
    micro-batches), so any data-parallel layout gives the single-process value for the same micro-batches.
    Expert parallelism is declared in the plan but not built (ep > 1 is refused).

Sources
    Jiang et al., "Mixtral of Experts", arXiv 2401.04088; mistralai/Mixtral-8x7B-v0.1 and 8x22B configs;
    HF transformers modeling_mixtral.py (read, not copied).
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
from workbench.models.llama3 import Attention
from workbench.models.moe import MoE, balance_loss, sum_aux
from workbench.nn.attention import MaskSpec
from workbench.nn.kv_cache import KVCache, StaticKVCache
from workbench.nn.linear import Linear, linear
from workbench.nn.norm import RMSNorm
from workbench.nn.rope import RopeConfig, RotaryEmbedding, rope_tables


@dataclass
class Config:
    dim: int = field_(4096, gt=0, doc="model width (hidden_size)")
    n_layers: int = field_(32, gt=0)
    n_heads: int = field_(32, gt=0)
    n_kv_heads: int = field_(8, gt=0, doc="key/value heads (GQA); must divide n_heads")
    head_dim: int = field_(0, ge=0, doc="0 = dim // n_heads")
    ffn_dim: int = field_(14336, gt=0, doc="width of each expert's SwiGLU (intermediate_size)")
    n_experts: int = field_(8, gt=0, doc="routed experts per layer (num_local_experts)")
    top_k: int = field_(2, gt=0, doc="experts per token (num_experts_per_tok)")
    n_shared_experts: int = field_(
        0, ge=0, doc="always-on shared experts per layer, one SwiGLU of width n_shared_experts * ffn_dim added to "
                     "the routed output (DeepSeek style); 0 = Mixtral as published. Hugging Face's Mixtral has "
                     "none, so a model with shared experts cannot be exported to or imported from it")
    capacity_factor: float | None = field_(None, doc="None = dropless; else each expert keeps ceil(c N k / E) slots")
    vocab_size: int = field_(32000, gt=0)
    norm_eps: float = field_(1e-5, gt=0)
    rope: RopeConfig = field(default_factory=lambda: RopeConfig(theta=1000000.0))
    max_seq_len: int = field_(32768, gt=0, doc="longest context the model is meant for (not enforced)")
    tie_embeddings: bool = False
    init_std: float = field_(0.02, gt=0)
    attn_backend: Literal["sdpa", "math"] = "sdpa"
    router_aux_loss_coef: float = field_(0.02, ge=0, doc="weight of the Switch balance loss in training (aux_loss)")
    sliding_window: int | None = field_(None, doc="None = full causal attention; else the window in tokens")

    def validate(self) -> None:
        if self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if not self.head_dim and self.dim % self.n_heads:
            fail("n_heads", f"must divide dim ({self.dim}) when head_dim is not set, got {self.n_heads}")
        if self.hd % 2:
            fail("head_dim", f"must be even for RoPE, got {self.hd}")
        if self.top_k > self.n_experts:
            fail("top_k", f"must be <= n_experts ({self.n_experts}), got {self.top_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            fail("capacity_factor", f"must be > 0 or unset (dropless), got {self.capacity_factor}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            fail("sliding_window", f"must be > 0 or unset, got {self.sliding_window}")

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads


FLAVORS: dict[str, Config] = {
    # tests and smoke runs (vocab 512: the debug dataset's tokenizer)
    "debug": Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, n_experts=4, top_k=2,
                    vocab_size=512, rope=RopeConfig(theta=10000.0), max_seq_len=512),
    # the published shapes
    "8x7B": Config(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, n_experts=8, top_k=2,
                   vocab_size=32000, max_seq_len=32768),
    "8x22B": Config(dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, ffn_dim=16384, n_experts=8, top_k=2,
                    vocab_size=32768, max_seq_len=65536),
}


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # NEW: a routed mixture of SwiGLU experts instead of one SwiGLU (plus optional always-on shared experts)
        self.moe = MoE(cfg.dim, cfg.ffn_dim, cfg.n_experts, cfg.top_k, n_shared=cfg.n_shared_experts,
                       capacity_factor=cfg.capacity_factor)

    def forward(self, x, cos, sin, mask, kv_cache, layer_idx, token_mask=None, return_logits=False):
        # h = x + Attn(RMSNorm(x))
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, kv_cache, layer_idx)
        # NEW: out = h + MoE(RMSNorm(h)) (+ Shared(RMSNorm(h)) inside the MoE), plus the router's sums and counts
        y, aux = self.moe(self.ffn_norm(h), token_mask, return_logits)
        return h + y, aux


class Mixtral(nn.Module):
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
        """The only initializer (GPT-2 style, as llama3.py), safe to call again after `to_empty()`:

        | parameter                                   | init                                 |
        |---------------------------------------------|--------------------------------------|
        | tok_embeddings                              | N(0, init_std)                       |
        | wq, wk, wv, router.gate, experts.gate_up,   | truncated N(0, init_std), +-3 std    |
        |   shared_experts.w1 / w3                    |                                      |
        | wo, experts.down_proj, shared_experts.w2    | truncated N(0, init_std / sqrt(2 L)) |
        |   (residual writers)                        |                                      |
        | output (untied)                             | truncated N(0, init_std)             |
        | norms                                       | ones                                 |
        | rope.inv_freq (buffer)                      | recomputed from the config           |
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        self.rope.init_weights()
        for block in self.layers:
            block.attention_norm.init_weights()
            block.ffn_norm.init_weights()
            block.attention.init_weights(std, out_std)
            block.moe.init_weights(std, out_std)
        self.norm.init_weights()
        if self.output is not None:
            nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6 N_active + 12 L H Q T, where N_active counts the matmul weights a
        token runs through: attention, router, the shared experts (every token), top_k of the E routed experts
        per layer, and the head."""
        cfg = self.cfg
        # every 2-D weight: attention, router, shared experts' w1 / w3 / w2 (3 D n_shared F a layer), head
        n_matmul = sum(p.numel() for name, p in self.named_parameters() if p.ndim == 2 and "tok_embeddings" not in name)
        n_matmul += cfg.vocab_size * cfg.dim if self.output is None else 0
        per_expert = 3 * cfg.dim * cfg.ffn_dim  # gate, up, down
        n_matmul += cfg.n_layers * cfg.top_k * per_expert  # NEW: active routed experts only (3-D stacked weights)
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
        B, T = x.shape[:2]
        offset = kv_cache.seen if kv_cache is not None else 0
        positions = batch.get("positions")
        if positions is None:
            positions = torch.arange(offset, offset + T, device=x.device).expand(B, T)
        mask = batch.get("mask") or MaskSpec()
        if self.cfg.sliding_window is not None and mask.sliding_window is None:
            mask = dataclasses.replace(mask, sliding_window=self.cfg.sliding_window)  # NEW: Mistral's window
        # NEW: padding slots (key_padding False) are left out of the router sums and counts
        token_mask = None
        if mask.key_padding is not None and mask.key_padding.shape[-1] >= offset + T:
            token_mask = mask.key_padding[:, offset:offset + T]  # (B, T)
        want_logits = bool(batch.get("output_router_logits"))
        cos, sin = rope_tables(*self.rope(positions, x.dtype))  # (B, T, 1, D) each
        hidden_states = [x] if batch.get("output_hidden_states") else None
        layer_aux = []
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, cos, sin, mask, kv_cache, i, token_mask, want_logits)
            layer_aux.append(aux)
            if hidden_states is not None:
                hidden_states.append(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        aux = sum_aux(layer_aux)  # sums and counts over layers (tokens counts L * N, as the reference)
        aux["expert_counts_per_layer"] = torch.stack([a["expert_counts"] for a in layer_aux])  # (L, E)
        if want_logits:
            aux["router_logits"] = tuple(a["router_logits"] for a in layer_aux)  # L x (B*T, E)
        return DecoderOutput(hidden=self.norm(x), aux=aux,
                             hidden_states=tuple(hidden_states) if hidden_states is not None else None)

    def aux_loss(self, aux: dict, reduce=lambda t: t, reduce_seq=None,
                 seq_split: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
        """router_aux_loss_coef * this rank's share of the batch's balance loss (`moe.balance_loss`; `reduce`
        sums over the ranks holding different data, context-parallel ranks included), and for the log: the
        whole batch's balance loss and its expert load (max / mean tokens per expert, summed over layers;
        1 = perfectly even). The Switch loss is formed from token sums, so `reduce_seq` and `seq_split` (the
        per-sequence reduction DeepSeek-V3's sequence-wise loss needs under context parallelism) are unused."""
        share, counts = balance_loss(aux, reduce, self.cfg.n_experts)
        total = reduce(share.detach().clone())
        return self.cfg.router_aux_loss_coef * share, {"balance_loss": float(total),
                                                       "expert_load": float(counts.max() / counts.mean())}

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits for `hidden` (B, T, dim), or only at `positions` along T (see llama3.py)."""
        hidden = select_positions(hidden, positions)  # (B, T|K, dim)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return linear(hidden, weight)


Model = Mixtral
