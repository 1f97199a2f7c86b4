"""DeepSeek-V3 (671B total / 37B active): multi-head latent attention, a sigmoid-routed MoE, multi-token prediction.

What it is
    DeepSeek-AI's 2024 decoder: 61 pre-norm blocks whose attention is MLA (keys and values rebuilt from one
    small shared latent per token), the first 3 with a dense SwiGLU and the other 58 with a mixture of 256
    routed experts (top 8, sigmoid scores, group-limited, bias-balanced) plus one shared expert, and a
    multi-token-prediction (MTP) module trained to predict the token after next.

The math (per token h of width D; H heads; ranks r_q = q_lora_rank, r = kv_lora_rank; widths d_n = nope,
d_r = rope, d_v = v)
    c_Q = RMSNorm(W_DQ h)                         (r_q)        W_DQ: wq_a, the norm: q_norm
    [q_i^n ; q_i^r] = W_UQ_i c_Q                  (d_n + d_r)  per head; q_i^r rotated by RoPE
    [c_KV ; k^R] = W_DKV h                        (r + d_r)    k^R: ONE RoPE key shared by every head
    c_KV <- RMSNorm(c_KV)                         (kv_norm; not applied to k^R)
    [k_i^n ; v_i] = W_UKV_i c_KV                  (d_n + d_v)  wkv_b, rows interleaved per head [nope | v]
    score_ij = (q_i^n . k_j^n + q_i^r . k_j^R) * scale,   scale = (d_n + d_r)^-1/2 * m(s, mscale_all_dim)^2
    o = W_O concat_i ( sum_j softmax_j(score_ij) v_j )
    MoE (layers >= n_dense_layers): y = Shared(m) + sum_k w_k Expert_idx_k(m), routed as in moe.py
        (sigmoid scores, bias for selection only, top-2-sum group scores, topk_groups groups, w normalised
        over the chosen and times routed_scaling)
    MTP (depth 1): h'_i = W_eh [RMSNorm(Emb(t_{i+1})) ; RMSNorm(h_i)];  h'' = Block(h');
                   logits_i = Head(RMSNorm(h''_i)) predicts t_{i+2};  L = L_main + lambda * CE_mtp

The intuition
    MLA caches what the keys and values are made from, not the keys and values: 512 latent numbers plus
    a 64-wide RoPE key per token and layer, against 2 * 128 heads * 128 = 32768 for plain multi-head
    attention at the same width. RoPE cannot pass through the up-projection (a rotation that depends on the
    position would sit between W_UQ and W_UK and stop them merging), hence the separate "decoupled" RoPE
    key. At decode time the up-projections are absorbed: q~_i = W_UK_i^T q_i^n turns the nope score into
    q~_i . c_KV, and the output is W_UV_i (sum_j p_ij c_KV_j), so attention runs directly over the latent
    cache as multi-query attention with a 576-wide key and a 512-wide value. MTP densifies the training
    signal (each position also learns about the token after next) and its module can serve as a draft
    model for speculative decoding.

Design choices
    One module layout for both paths: the weights are the HF/official low-rank matrices (wq_a, q_norm,
    wq_b, wkv_a, kv_norm, wkv_b, wo), and `mla_decode` picks how a *cached* forward uses them: "absorb"
    (default; attention over the latent, `W_UK` and `W_UV` taken as views of wkv_b) or "expand" (rebuild
    every cached token's keys and values, as HF does). Uncached forwards (training, scoring) always expand:
    for a full sequence that is the cheaper order of matmuls. The cache holds only kv_norm(c_KV) and the
    rotated k^R, whichever path reads it.
    RoPE: the checkpoints store the rope rows in the official interleaved layout (pairs (2i, 2i+1));
    with `rope_interleave` (HF's default, True) the rope slices are de-interleaved to the half-split
    layout before the rotation, the same thing HF does, so weights load unpermuted. YaRN lives in
    `workbench.nn.rope`; as in HF, its cos/sin factor is m(s, mscale)/m(s, mscale_all_dim) (1 for V3)
    and m(s, mscale_all_dim)^2 multiplies the softmax scale.
    Module paths follow the Llama 3 file where the role is the same (tok_embeddings, layers.i.attention,
    attention_norm, ffn_norm, feed_forward.w1/w2/w3 for the dense layers, output), and moe.py's for the
    MoE (layers.i.moe.router/experts/shared_experts), so the parallel plans and the HF adapter read
    like the other families'.
    Balancing: the routers (the MTP modules' included) carry the selection bias; `aux_loss` adds the
    sequence-wise balance loss (coefficient `seq_aux_loss_coef`, DeepSeek's alpha = 1e-4) and accumulates
    the step's expert counts, reduced over data-parallel ranks, and `post_step()` (called by the trainer
    after each applied optimizer step) moves each layer's bias by `bias_update_rate` * sign(mean - load_e).
    MTP: `mtp_layers` modules; a forward whose batch sets `mtp` (the LM objective does when training) runs
    them and returns their final hidden states in `out.mtp_hidden`; the objective owns the loss, as for the
    main head: lambda / D * sum_d CE(logits(h_d), labels shifted d more) / (the step's LM target count),
    which is the paper's 1/T normalisation. The first MTP block reads the main model's final hidden state
    *after* the final norm (its hnorm normalises again), as vLLM and SGLang feed it; depth d + 1 reads
    depth d's block output before its shared_head norm (h^d in the paper). In packed batches the objective
    also ignores the targets of rows whose token i and token i + d sit in different documents.

Differences from the reference
    None in the main forward math: parity with `DeepseekV3ForCausalLM` (fp32, eager) is tested at atol 1e-5
    on logits, hidden states and chosen experts, with a random selection bias, YaRN and without. HF's
    router computes in float32 from a float32 gate; here the gate has the model's dtype and its logits are
    upcast (equal in fp32). The MTP module is not in HF's class (it drops `model.layers.61.*`); ours loads and
    saves it under the official names when present.
    Training-time node-limited routing is the group limit here (one group per device group in the paper).
    Initialization is GPT-2 style, as in llama3.py.

Kimi K2 (flavors "kimi-k2" and "kimi-k2-debug"; Moonshot AI, 2025)
    The same architecture with other numbers (DESIGN.md rule 1: a flavor, not a file); K2's checkpoints load
    with transformers' DeepseekV3 classes (config.json says model_type "kimi_k2"). Against V3: 384 routed
    experts instead of 256 (sparsity 48, still 8 per token plus 1 shared), 64 attention heads instead of 128
    (fewer heads: cheaper long-context inference at a small quality cost, the K2 report's ablation), one
    leading dense layer instead of 3, no group-limited routing (n_group = topk_group = 1), routed scaling
    2.827 instead of 2.5, a 163840-token vocabulary, no MTP module, RoPE theta 5e4 and YaRN factor 32 over
    4096 positions with beta_fast = beta_slow = 1 (131072 positions), rms_norm_eps 1e-5 (unverified: config
    copies disagree, 1e-5 and 1e-6), init 0.02. MLA ranks and head widths, the dense and expert widths,
    sigmoid routing and the bias balancing are V3's. The code differences are QK-Clip's hooks only (`# NEW:`):
    K2 trains with MuonClip (workbench/train/optim/muon.py), whose QK-Clip rescales, after an optimizer step,
    the heads whose largest logit S_max^h exceeded tau: gamma_h = tau / S_max^h; head h's nope query rows of
    wq_b and key rows of wkv_b times sqrt(gamma_h), its rope query rows times gamma_h (its logit
    q^n.k^n + q^r.k^R then scales by gamma_h), the shared rotary key k^R (wkv_a) untouched since every head
    reads it. Sources: Kimi Team, "Kimi K2: Open Agentic Intelligence", arXiv 2507.20534;
    moonshotai/Kimi-K2-Instruct config.json.

Sources
    DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv 2412.19437 (MLA from DeepSeek-V2, arXiv 2405.04434;
    MTP section 2.2; auxiliary-loss-free balancing section 2.1.2); deepseek-ai/DeepSeek-V3 inference/model.py
    (attn_impl "absorb"); HF transformers modeling_deepseek_v3.py (read, not copied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from workbench.config import fail, field_
from workbench.models.base import DecoderOutput, select_positions
from workbench.models.moe import MoE, sequence_balance_loss, sum_aux
from workbench.nn.attention import AttentionCore, MaskSpec
from workbench.nn.kv_cache import KVCache, StaticKVCache
from workbench.nn.linear import Linear, linear
from workbench.nn.lora import effective_weight
from workbench.nn.norm import RMSNorm
from workbench.nn.qk_clip import record_max_logits
from workbench.nn.rope import RopeConfig, RotaryEmbedding, apply_rope_tables, rope_tables, yarn_mscale
from workbench.nn.swiglu import SwiGLU


def _yarn_v3(factor: float = 40.0, original: int = 4096) -> RopeConfig:
    return RopeConfig(theta=10000.0, scaling="yarn", factor=factor, original_max_seq_len=original, beta_fast=32.0,
                      beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


def _yarn_k2(factor: float = 32.0, original: int = 4096, theta: float = 50000.0) -> RopeConfig:
    # NEW: Kimi K2's YaRN: theta 5e4 and beta_fast = beta_slow = 1 (a hard cut between the interpolated and the
    # extrapolated frequency pairs instead of V3's ramp over beta 32..1)
    return RopeConfig(theta=theta, scaling="yarn", factor=factor, original_max_seq_len=original, beta_fast=1.0,
                      beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


@dataclass
class Config:
    dim: int = field_(7168, gt=0, doc="model width (hidden_size)")
    n_layers: int = field_(61, gt=0, doc="decoder blocks, MTP modules not included")
    n_dense_layers: int = field_(3, ge=0, doc="leading blocks with a dense SwiGLU (first_k_dense_replace)")
    ffn_dim: int = field_(18432, gt=0, doc="dense SwiGLU width (intermediate_size)")
    moe_ffn_dim: int = field_(2048, gt=0, doc="width of each expert (moe_intermediate_size)")
    n_experts: int = field_(256, gt=0, doc="routed experts per MoE layer (n_routed_experts)")
    n_shared_experts: int = field_(1, ge=0)
    top_k: int = field_(8, gt=0, doc="experts per token (num_experts_per_tok)")
    n_groups: int = field_(8, gt=0, doc="expert groups for group-limited routing (n_group)")
    topk_groups: int = field_(4, gt=0, doc="groups a token may use (topk_group)")
    routed_scaling: float = field_(2.5, gt=0, doc="multiplier of the routed weights (routed_scaling_factor)")
    norm_topk_prob: bool = True
    capacity_factor: float | None = field_(None, doc="None = dropless; else each expert keeps ceil(c N k / E) slots")
    n_heads: int = field_(128, gt=0)
    q_lora_rank: int = field_(1536, ge=0, doc="query latent width; 0 = a plain query projection (V2-Lite)")
    kv_lora_rank: int = field_(512, gt=0, doc="key/value latent width: what the cache stores")
    qk_nope_head_dim: int = field_(128, gt=0)
    qk_rope_head_dim: int = field_(64, gt=0, doc="width of the rotated part (the shared RoPE key)")
    v_head_dim: int = field_(128, gt=0)
    vocab_size: int = field_(129280, gt=0)
    norm_eps: float = field_(1e-6, gt=0)
    rope: RopeConfig = field(default_factory=_yarn_v3)
    rope_interleave: bool = field_(True, doc="rope rows stored as interleaved pairs (the official layout)")
    max_seq_len: int = field_(163840, gt=0, doc="longest context the model is meant for (not enforced)")
    tie_embeddings: bool = False
    init_std: float = field_(0.006, gt=0)
    attn_backend: Literal["sdpa", "math"] = "sdpa"
    mla_decode: Literal["absorb", "expand"] = field_("absorb", doc="how a cached forward reads the latent cache")
    mtp_layers: int = field_(1, ge=0, doc="multi-token-prediction modules (num_nextn_predict_layers)")
    mtp_loss_weight: float = field_(0.3, ge=0, doc="lambda: the MTP loss weight (0.3, later 0.1, in V3)")
    seq_aux_loss_coef: float = field_(1e-4, ge=0, doc="alpha of the sequence-wise balance loss")
    bias_update_rate: float = field_(1e-3, ge=0, doc="gamma of auxiliary-loss-free balancing (0 = off)")

    def validate(self) -> None:
        if self.n_dense_layers > self.n_layers:
            fail("n_dense_layers", f"must be <= n_layers ({self.n_layers}), got {self.n_dense_layers}")
        if self.top_k > self.n_experts:
            fail("top_k", f"must be <= n_experts ({self.n_experts}), got {self.top_k}")
        if self.n_experts % self.n_groups:
            fail("n_groups", f"must divide n_experts ({self.n_experts}), got {self.n_groups}")
        if self.topk_groups > self.n_groups:
            fail("topk_groups", f"must be <= n_groups ({self.n_groups}), got {self.topk_groups}")
        if self.top_k > self.topk_groups * (self.n_experts // self.n_groups):
            fail("top_k", f"{self.top_k} exceeds the {self.topk_groups * (self.n_experts // self.n_groups)} "
                          f"experts of the topk_groups eligible groups")
        if self.n_groups > 1 and self.n_experts // self.n_groups < 2:
            fail("n_groups", f"each group needs at least 2 experts (its score is the sum of its best two), "
                             f"got {self.n_experts // self.n_groups}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            fail("capacity_factor", f"must be > 0 or unset (dropless), got {self.capacity_factor}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """(d_n + d_r)^-1/2, times m(s, mscale_all_dim)^2 under YaRN (HF's split of the mscale)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope.scaling == "yarn" and self.rope.mscale_all_dim:
            scale *= yarn_mscale(self.rope.factor, self.rope.mscale_all_dim) ** 2
        return scale

    def moe_layer(self, i: int) -> bool:
        return i >= self.n_dense_layers


def _small(**over) -> Config:
    base = dict(dim=64, n_layers=3, n_dense_layers=1, ffn_dim=128, moe_ffn_dim=32, n_experts=8, n_shared_experts=1,
                top_k=2, n_groups=4, topk_groups=2, n_heads=4, q_lora_rank=32, kv_lora_rank=16,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=512,
                rope=RopeConfig(theta=10000.0), max_seq_len=512, init_std=0.02)
    return Config(**{**base, **over})


FLAVORS: dict[str, Config] = {
    # tests and smoke runs (vocab 512: the debug dataset's tokenizer); 8 experts in 4 groups, top-2 + 1 shared
    "debug": _small(),
    # the balancing demo: 16 experts (top-2 in 2 of 4 groups), trained on the embedded corpus on CPU
    "small": _small(dim=128, n_layers=4, ffn_dim=384, moe_ffn_dim=64, n_experts=16, n_groups=4, topk_groups=2,
                    q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                    vocab_size=4096, max_seq_len=1024),
    # the published shape (inference/configs/config_671B.json)
    "671B": Config(),
    # NEW: Kimi K2 (moonshotai/Kimi-K2-Instruct config.json; 1.04T total, 32B active): the V3 shape with 384
    # experts, 64 heads, one dense layer, no group-limited routing, no MTP and its own vocabulary and YaRN
    "kimi-k2": Config(n_dense_layers=1, n_experts=384, n_groups=1, topk_groups=1, routed_scaling=2.827, n_heads=64,
                      vocab_size=163840, norm_eps=1e-5, rope=_yarn_k2(), max_seq_len=131072, mtp_layers=0,
                      init_std=0.02),
    # the same structure at CPU-test size (K2's groups, scaling, YaRN with beta 1/1 over a 64-token window)
    "kimi-k2-debug": _small(n_experts=12, top_k=2, n_groups=1, topk_groups=1, routed_scaling=2.827, norm_eps=1e-5,
                            rope=_yarn_k2(factor=4.0, original=64), max_seq_len=256, mtp_layers=0),
}


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Pairs (2i, 2i+1) -> (i, i + d/2) on the last dim: the official rope layout to the half-split one."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class MLA(nn.Module):
    """Multi-head latent attention. The cache (if any) stores (kv_norm(c_KV), rotated k^R) per token.

    QK-Clip (workbench.train.optim.muon): with `qk_clip_record` set, a training forward records each head's
    largest logit; `qk_clip_rows` gives K2's MLA rule (see the module notes)."""

    qk_clip_record = False  # NEW (Kimi K2's QK-Clip): set on the instance by enable_qk_clip
    qk_max_logit: torch.Tensor | None = None  # (H,) running max since the last post-step hook

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        H, dn, dr, dv, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim, self.rank = dn, dr, dv, r
        if cfg.q_lora_rank:
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.wq_b = Linear(cfg.q_lora_rank, H * (dn + dr), bias=False)
        else:
            self.wq = Linear(cfg.dim, H * (dn + dr), bias=False)
        self.wkv_a = Linear(cfg.dim, r + dr, bias=False)
        self.kv_norm = RMSNorm(r, 1e-6)
        self.wkv_b = Linear(r, H * (dn + dv), bias=False)
        self.wo = Linear(H * dv, cfg.dim, bias=False)
        self.core = AttentionCore(scale=cfg.softmax_scale, backend=cfg.attn_backend)

    def init_weights(self, std: float, out_std: float) -> None:
        lins = [self.wkv_a, self.wkv_b] + ([self.wq_a, self.wq_b] if self.cfg.q_lora_rank else [self.wq])
        for lin, s in [(lin, std) for lin in lins] + [(self.wo, out_std)]:
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=s, a=-3 * s, b=3 * s)
        self.kv_norm.init_weights()
        if self.cfg.q_lora_rank:
            self.q_norm.init_weights()

    def _rope(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        return apply_rope_tables(_deinterleave(x) if self.cfg.rope_interleave else x, cos, sin)

    def forward(self, x, cos, sin, mask: MaskSpec, kv_cache: KVCache | None, layer_idx: int):
        B, T, _ = x.shape
        dn, dr = self.nope, self.rope_dim
        # q_i = W_UQ RMSNorm(W_DQ h)   (or W_Q h without a query latent)
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.cfg.q_lora_rank else self.wq(x)
        q = q.view(B, T, -1, dn + dr)  # (B, T, H, dn + dr); H/tp heads on a tensor-parallel rank
        q_nope, q_rope = q.split([dn, dr], dim=-1)
        q_rope = self._rope(q_rope, cos, sin)  # (B, T, H, dr)
        # [c_KV ; k^R] = W_DKV h;  c_KV normalised, k^R rotated (one key for every head)
        latent, k_rope = self.wkv_a(x).split([self.rank, dr], dim=-1)
        latent = self.kv_norm(latent)  # (B, T, r)
        k_rope = self._rope(k_rope[:, :, None, :], cos, sin)[:, :, 0]  # (B, T, dr)
        q_offset = 0
        if kv_cache is not None:
            q_offset = kv_cache.seen
            latent, k_rope = kv_cache.update(layer_idx, latent, k_rope)  # (B, Tk, r), (B, Tk, dr)
            if self.cfg.mla_decode == "absorb":
                return self._absorbed(q_nope, q_rope, latent, k_rope, mask, q_offset)
        return self._expanded(q_nope, q_rope, latent, k_rope, mask, q_offset)

    def _expanded(self, q_nope, q_rope, latent, k_rope, mask, q_offset):
        """Rebuild per-head keys and values from the latent: [k_i^n ; v_i] = W_UKV_i c_KV."""
        B, T, H, _ = q_nope.shape
        Tk = latent.shape[1]
        kv = self.wkv_b(latent).view(B, Tk, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, Tk, H, dn), (B, Tk, H, dv)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(-1, -1, H, -1)], dim=-1)  # (B, Tk, H, dn + dr)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, dn + dr)
        if self.qk_clip_record and self.training:  # NEW: S_max^h = max_{b,i,j allowed} score_ij^h
            record_max_logits(self, q, k, mask, q_offset, self.core.scale)
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, q_offset)  # (B, H, T, dv)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def qk_clip_rows(self, gamma: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """NEW (K2's MLA rule): (weight, per-row factor) pairs that scale head h's logits by gamma_h (H,):
        head h's nope query rows and its key rows of wkv_b by sqrt(gamma_h), its rope query rows by gamma_h;
        the values (wkv_b's v rows) and the shared rotary key k^R (wkv_a's last d_r rows) stay as they are."""
        dn, dr, dv = self.nope, self.rope_dim, self.v_dim
        root = gamma.sqrt()[:, None]  # (H, 1)
        q_rows = torch.cat([root.expand(-1, dn), gamma[:, None].expand(-1, dr)], dim=1).reshape(-1)  # (H (dn+dr),)
        kv_rows = torch.cat([root.expand(-1, dn), torch.ones_like(root).expand(-1, dv)], dim=1).reshape(-1)
        wq = self.wq_b if self.cfg.q_lora_rank else self.wq
        return [(wq.weight, q_rows), (self.wkv_b.weight, kv_rows)]

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask, q_offset):
        """Attention over the latent cache itself: one 'KV head' of width r + dr, values of width r."""
        B, T, H, _ = q_nope.shape
        w = effective_weight(self.wkv_b).view(H, self.nope + self.v_dim, self.rank)  # (H, dn + dv, r)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]  # (H, dn, r), (H, dv, r)
        # q~_i = W_UK_i^T q_i^n, so q~_i . c_KV = q_i^n . k_i^n
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        q = torch.cat([q_lat, q_rope.transpose(1, 2)], dim=-1)  # (B, H, T, r + dr)
        k = torch.cat([latent, k_rope], dim=-1)[:, None]  # (B, 1, Tk, r + dr)
        # sum_j p_ij c_KV_j, then o_i = W_UV_i (that sum); the scale stays (dn + dr)^-1/2 (not (r + dr)^-1/2)
        lat_out = self.core(q, k, latent[:, None], mask, q_offset)  # (B, H, T, r)
        out = torch.einsum("bhtr,hvr->bthv", lat_out, w_uv)  # (B, T, H, dv)
        return self.wo(out.reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.moe_layer(layer_idx):
            self.moe = MoE(cfg.dim, cfg.moe_ffn_dim, cfg.n_experts, cfg.top_k, n_shared=cfg.n_shared_experts,
                           capacity_factor=cfg.capacity_factor, sequence_stats=True, scoring="sigmoid",
                           norm_topk_prob=cfg.norm_topk_prob, n_groups=cfg.n_groups, topk_groups=cfg.topk_groups,
                           routed_scaling=cfg.routed_scaling, bias_balancing=True)
        else:
            self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_dim)

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(std, out_std)
        (self.moe if hasattr(self, "moe") else self.feed_forward).init_weights(std, out_std)

    def forward(self, x, cos, sin, mask, kv_cache, layer_idx, token_mask=None, return_logits=False):
        # h = x + MLA(RMSNorm(x))
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, kv_cache, layer_idx)
        if not hasattr(self, "moe"):
            return h + self.feed_forward(self.ffn_norm(h)), None
        # out = h + MoE(RMSNorm(h)), plus the router's sums and counts
        y, aux = self.moe(self.ffn_norm(h), token_mask, return_logits)
        return h + y, aux


class MTPModule(nn.Module):
    """One multi-token-prediction depth: official names enorm, hnorm, eh_proj, the block, shared_head.norm."""

    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # shared_head.norm

    def init_weights(self, std: float, out_std: float) -> None:
        for n in (self.enorm, self.hnorm, self.norm):
            n.init_weights()
        nn.init.trunc_normal_(self.eh_proj.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        self.block.init_weights(std, out_std)


class DeepSeekV3(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + d) for d in range(cfg.mtp_layers))
        self._step_counts: torch.Tensor | None = None  # (L_moe, E) counts since the last post_step
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The only initializer (GPT-2 style, as llama3.py), safe to call again after `to_empty()`:

        | parameter                                          | init                                 |
        |----------------------------------------------------|--------------------------------------|
        | tok_embeddings                                     | N(0, init_std)                       |
        | wq_a, wq_b (wq), wkv_a, wkv_b, w1, w3, router gate,| truncated N(0, init_std), +-3 std    |
        | experts.gate_up_proj, eh_proj                      |                                      |
        | wo, w2, experts.down_proj (residual writers)       | truncated N(0, init_std / sqrt(2 L)) |
        | output (untied)                                    | truncated N(0, init_std)             |
        | norms                                              | ones                                 |
        | router bias (buffer), rope.inv_freq (buffer)       | zeros, recomputed from the config    |
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        self.rope.init_weights()
        for block in self.layers:
            block.init_weights(std, out_std)
        for module in self.mtp:
            module.init_weights(std, out_std)
        self.norm.init_weights()
        if self.output is not None:
            nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        self._step_counts = None

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6 N_active + 12 L H (d_qk + d_v)/2 T: N_active counts the matmul weights a
        token runs through (attention, dense FFNs, router, shared and top_k routed experts, the head; the
        MTP modules left out, as in the paper's 37B); attention scores use d_qk = 192 and values d_v = 128."""
        cfg = self.cfg
        n_matmul = sum(p.numel() for name, p in self.named_parameters()
                       if p.ndim == 2 and "tok_embeddings" not in name and not name.startswith("mtp."))
        n_matmul += cfg.vocab_size * cfg.dim if self.output is None else 0
        n_moe = cfg.n_layers - cfg.n_dense_layers
        n_matmul += n_moe * cfg.top_k * 3 * cfg.dim * cfg.moe_ffn_dim  # active routed experts only
        attn = 6 * cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
        return 6 * n_matmul + attn

    def kv_entry_shapes(self) -> list[tuple[int, ...]]:
        """What one token leaves in each layer's cache (MLA): the normalised latent (r,) and the rotated RoPE
        key (d_r,), shared by every head; the paged engine's pool holds the same."""
        return [(self.cfg.kv_lora_rank,), (self.cfg.qk_rope_head_dim,)]

    def make_kv_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> StaticKVCache:
        """MLA's cache: the normalised latent (B, max_len, r) and the rotated RoPE key (B, max_len, d_r) per layer."""
        w = self.tok_embeddings.weight
        return StaticKVCache(self.cfg.n_layers, batch_size, max_len, self.kv_entry_shapes(),
                             dtype=dtype or w.dtype, device=device or w.device)

    def _run_blocks(self, blocks, x, positions, mask, kv_cache, token_mask, want_logits, hidden_states, first):
        cos, sin = rope_tables(*self.rope(positions, x.dtype))  # (B, T, 1, d_r) each
        layer_aux = []
        for i, layer in enumerate(blocks):
            x, aux = layer(x, cos, sin, mask, kv_cache, first + i, token_mask, want_logits)
            if aux is not None:
                layer_aux.append(aux)
            if hidden_states is not None:
                hidden_states.append(x)
        return x, layer_aux

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
        token_mask = None  # padding slots are left out of the router sums and counts
        if mask.key_padding is not None and mask.key_padding.shape[-1] >= offset + T:
            token_mask = mask.key_padding[:, offset:offset + T]  # (B, T)
        want_logits = bool(batch.get("output_router_logits"))
        hidden_states = [x] if batch.get("output_hidden_states") else None
        x, layer_aux = self._run_blocks(self.layers, x, positions, mask, kv_cache, token_mask, want_logits,
                                        hidden_states, 0)
        if kv_cache is not None:
            kv_cache.advance(T)
        hidden = self.norm(x)
        mtp_hidden = None
        if len(self.mtp) and batch.get("mtp") and kv_cache is None and batch.get("input_ids") is not None:
            # the MTP blocks are MoE layers too: their router statistics join the main layers' (balance
            # loss, expert load, bias update)
            mtp_hidden, mtp_aux = self._mtp(hidden, batch["input_ids"], positions, mask, token_mask, want_logits)
            layer_aux += mtp_aux
        return DecoderOutput(hidden=hidden, aux=self._collect(layer_aux, want_logits), mtp_hidden=mtp_hidden,
                             hidden_states=tuple(hidden_states) if hidden_states is not None else None)

    def moe_blocks(self) -> list[Block]:
        """The blocks with routed experts, in the order of `aux["expert_counts_per_layer"]`: the MoE layers,
        then the MTP modules' blocks (their rows are there when the forward ran them)."""
        return [b for b in self.layers if hasattr(b, "moe")] + [m.block for m in self.mtp if hasattr(m.block, "moe")]

    @staticmethod
    def _collect(layer_aux: list[dict], want_logits: bool) -> dict:
        if not layer_aux:
            return {}
        aux = sum_aux(layer_aux)  # sums and counts over the MoE layers
        aux["expert_counts_per_layer"] = torch.stack([a["expert_counts"] for a in layer_aux])  # (L_moe, E)
        for key in ("seq_counts", "seq_prob_sum"):
            aux[key] = torch.stack([a[key] for a in layer_aux])  # (L_moe, B, E)
        aux["seq_tokens"] = torch.stack([a["seq_tokens"] for a in layer_aux])  # (L_moe, B): MTP rows are shorter
        if want_logits:
            aux["router_logits"] = tuple(a["router_logits"] for a in layer_aux)
        return aux

    def _mtp(self, hidden, input_ids, positions, mask, token_mask, want_logits=False):
        """Depth d reads h^{d-1}_i and the embedding of t_{i+d}; its output at row i predicts t_{i+d+1}.

        Returns (each depth's hidden states after shared_head.norm, ready for the head; the router aux of
        each depth's block). The next depth reads the block output *before* that norm (h^d in the paper).
        """
        out, auxes, h, T = [], [], hidden, hidden.shape[1]
        for d, module in enumerate(self.mtp, start=1):
            if T - d <= 0:
                break
            emb = self.tok_embeddings(input_ids[:, d:])  # (B, T-d, dim): t_{i+d}
            # h'_i = W_eh [RMSNorm(Emb(t_{i+d})) ; RMSNorm(h_i)]   (embedding first, as the checkpoints)
            x = module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(h[:, : T - d])], dim=-1))
            sub = MaskSpec(document_ids=None if mask.document_ids is None else mask.document_ids[:, d:],
                           key_padding=None if mask.key_padding is None else mask.key_padding[:, d:])
            tm = None if token_mask is None else token_mask[:, d:]
            h, aux = self._run_blocks([module.block], x, positions[:, d:], sub, None, tm, want_logits, None, 0)
            auxes += aux
            out.append(module.norm(h))  # (B, T-d, dim): shared_head.norm; the head itself is the main model's
        return tuple(out), auxes

    def aux_loss(self, aux: dict, reduce=lambda t: t, reduce_seq=None,
                 seq_split: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
        """seq_aux_loss_coef * this rank's share of the sequence-wise balance loss (`reduce` sums over the
        ranks holding different data; `reduce_seq` over the `seq_split` context-parallel ranks holding slices
        of the same sequences: see `moe.sequence_balance_loss`) and, for the log, the balance loss and the
        expert load: max / mean tokens per expert of each MoE layer, averaged over layers (`expert_load`) and
        the worst layer (`expert_load_max`). Also accumulates the step's reduced per-layer counts for
        `post_step`. (The MTP loss is the objective's: `out.mtp_hidden`.)
        """
        cfg, metrics = self.cfg, {}
        total = torch.zeros((), device=self.tok_embeddings.weight.device)
        if "seq_counts" in aux:
            # under context parallel the per-sequence counts are summed over the cp ranks
            share = sequence_balance_loss(aux, reduce, cfg.n_experts, cfg.top_k, reduce_seq, seq_split)
            total = total + cfg.seq_aux_loss_coef * share
            counts = reduce(aux["expert_counts_per_layer"].detach().clone())  # (L_moe, E)
            self._step_counts = counts if self._step_counts is None else self._step_counts + counts
            load = counts.max(-1).values / counts.mean(-1).clamp_min(1e-9)  # (L_moe,)
            metrics.update(balance_loss=float(reduce(share.detach().clone())), expert_load=float(load.mean()),
                           expert_load_max=float(load.max()))
        return total, metrics

    @torch.no_grad()
    def post_step(self, applied: bool = True) -> dict[str, float]:
        """After an optimizer step: b_e += gamma * sign(mean load - load_e) in every MoE layer, from the
        step's counts summed over micro-batches and ranks (identical on every rank, so the replicated
        biases stay equal). Skipped steps (non-finite loss) leave the biases alone."""
        counts, self._step_counts = self._step_counts, None
        if counts is None or not applied or self.cfg.bias_update_rate == 0:
            return {}
        moe_blocks = self.moe_blocks()
        for block, c in zip(moe_blocks, counts):  # the MTP blocks' rows only if their forward ran
            block.moe.router.update_bias(c, self.cfg.bias_update_rate)
        return {"router_bias_absmax": max(float(b.moe.router.bias.abs().max()) for b in moe_blocks)}

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits for `hidden` (B, T, dim), or only at `positions` along T (see llama3.py)."""
        hidden = select_positions(hidden, positions)  # (B, T|K, dim)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return linear(hidden, weight)


Model = DeepSeekV3
