"""PaliGemma 2: a SigLIP image encoder, a linear projector and a Gemma 2 decoder read as one prefix-LM.

What it is
    Google's vision-language model (Steiner et al., 2024). An image becomes N = (S / P)^2 SigLIP patch
    features; a linear layer maps them to the decoder width; they take the first N slots of the token
    sequence, followed by `<bos> prefix \\n` (the task / question) and then the suffix (the answer), which
    the Gemma 2 decoder generates. PaliGemma 2 3B / 10B / 28B pair SigLIP-So400m/14 with Gemma 2 2B / 9B /
    27B at 224, 448 or 896 px.

The math (x = inputs_embeds (B, T, d); one Gemma 2 block)
    inputs     e_t = E[token_t] * sqrt(d)      for text slots (the scale cast to the weight dtype)
               e_t = W_proj SigLIP(pixels)_t + b_proj   for the N image slots (no scale: see below)
    attention  h = x + RMSNorm_post_attn(Wo Attn(RoPE(Wq n), RoPE(Wk n), Wv n)),  n = RMSNorm_attn(x)
               scores = c_a tanh((q k^T / sqrt(query_pre_attn_scalar)) / c_a)      (soft-cap, c_a = attn_softcap)
    feed-fwd   out = h + RMSNorm_post_ffn(W2 (GELU_tanh(W1 m) * W3 m)),  m = RMSNorm_ffn(h)
    RMSNorm    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * (1 + w)     (in fp32; w starts at 0)
    logits     z = c_f tanh((RMSNorm(x_L) E^T) / c_f)               (tied embeddings, c_f = final_softcap)
    layers alternate a sliding window (W = sliding_window; even layer indices in transformers' `layer_types`)
    and global attention; RoPE positions are 1-indexed (slot + 1).

    The prefix-LM mask (PaliGemma): with p = prefix_len = the slot where the suffix starts
    (image + bos + prefix + "\\n"), query slot i may read key slot j when
        (j <= i  and  i - j < W on sliding layers)   or   (i < p and j < p)
    so image and prefix see each other bidirectionally, the suffix is causal and sees the whole prefix,
    and the prefix never sees the suffix. For p = 3, suffix of 2 (1 = allowed):

                    key:  img  bos  "\\n"  s1  s2
        query img          1    1    1     0   0
        query bos          1    1    1     0   0
        query "\\n"        1    1    1     0   0
        query s1           1    1    1     1   0
        query s2           1    1    1     1   1

    At inference the whole prompt is the prefix: one bidirectional prefill, then causal decoding.

The intuition
    The image is context, not something to predict, so nothing stops image patches and question tokens
    from reading each other in both directions; only the answer must stay causal to be generated.
    Gemma 2's soft-caps bound attention scores and logits smoothly (tanh), its post-norms keep each
    sub-layer's write to the residual stream normalised, and the local/global alternation halves the
    attention cost of long contexts while every other layer keeps the full view.

Design choices
    Module paths (public API: parallel plans, `workbench.checkpoint.hf.paligemma2`):
        vision_tower            the SigLIP model (`workbench.models.siglip`), blocks at `vision_tower.layers`
        multi_modal_projector   one Linear (vision dim -> d, with bias)
        language_model          the Gemma 2 decoder: `embed_tokens`, `layers.{i}` (attention_norm,
                                attention.{wq,wk,wv,wo,core}, post_attention_norm, ffn_norm,
                                feed_forward.{w1,w3,w2}, post_ffn_norm), `norm`
    The decoder's names follow llama3.py so the same plan styles apply; what differs is marked `# NEW:`.
    The mask is a `MaskSpec` (prefix_len, key_padding) and each layer adds its own soft-cap and, on
    sliding layers, its window (`Gemma2.layer_masks`); the attention core does the rest. With a soft-cap
    the "sdpa" backend runs the explicit "math" path (SDPA cannot put tanh on scores); "flex" applies it as
    a score_mod. Parity with transformers' eager attention is exact on "math" in every dtype
    (docs/paligemma2.md has the measured table).
    `embed()` builds `inputs_embeds` (image features scattered into the `image_token_id` placeholders), so
    a training objective can build them once and pass `inputs_embeds`. Soft-caps and the window use 0 for
    "off" so configs round-trip through TOML (which has no null).
    `__init__` is meta-device safe; `init_weights()` is the only initializer (and rebuilds RoPE).

Differences from the reference
    None in the forward math: parity with transformers 5.25's `PaliGemmaForConditionalGeneration`
    (Gemma 2 text config) is tested at atol 1e-5 in fp32 (tests/parity/test_paligemma2_hf.py).
    Image features: older transformers divided them by sqrt(d) and then multiplied every embedding by
    sqrt(d) (so bf16 rounding touched them); 5.25 scales only the text embeddings and leaves the
    projector output as it is. This file follows 5.25.
    Initialization is GPT-2 / ViT style (only used when training from scratch).

Sources
    Steiner et al., "PaliGemma 2: A Family of Versatile VLMs for Transfer", arXiv 2412.03555; Beyer et al.,
    "PaliGemma", arXiv 2407.07726; Gemma Team, "Gemma 2", arXiv 2408.00118; HF transformers
    modeling_paligemma.py, modeling_gemma2.py, masking_utils.py (read, not copied).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import fail, field_
from workbench.models import siglip
from workbench.models.base import DecoderOutput, select_positions
from workbench.nn.attention import AttentionCore, MaskSpec
from workbench.nn.kv_cache import KVCache, StaticKVCache
from workbench.nn.linear import Linear, linear
from workbench.nn.rope import RopeConfig, RotaryEmbedding, apply_rope_tables, rope_tables

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class Config:
    # the Gemma 2 decoder
    dim: int = field_(2304, gt=0, doc="decoder width (hidden_size)")
    n_layers: int = field_(26, gt=0)
    n_heads: int = field_(8, gt=0)
    n_kv_heads: int = field_(4, gt=0, doc="key/value heads (GQA); must divide n_heads")
    head_dim: int = field_(256, gt=0)
    ffn_dim: int = field_(9216, gt=0, doc="GeGLU hidden width (intermediate_size)")
    vocab_size: int = field_(257216, gt=0)
    norm_eps: float = field_(1e-6, gt=0)
    rope: RopeConfig = field(default_factory=lambda: RopeConfig(theta=10000.0))
    max_seq_len: int = field_(8192, gt=0, doc="longest context the model is meant for (not enforced)")
    query_pre_attn_scalar: float = field_(256.0, gt=0, doc="attention scale = query_pre_attn_scalar^-1/2")
    sliding_window: int = field_(4096, ge=0, doc="window of the sliding layers in tokens; 0 = every layer global")
    layer_types: list[str] = field_([], doc="per layer 'sliding_attention' or 'full_attention'; [] = alternate, "
                                            "sliding on even layer indices (transformers' default)")
    attn_softcap: float = field_(50.0, ge=0, doc="c in c*tanh(scores/c) on attention scores; 0 = off")
    final_softcap: float = field_(30.0, ge=0, doc="c in c*tanh(logits/c) on the output logits; 0 = off")
    init_std: float = field_(0.02, gt=0)
    attn_backend: Literal["sdpa", "math", "flex"] = "sdpa"
    # the image side
    vision: siglip.Config = field(default_factory=siglip.Config)
    image_token_id: int = field_(257152, ge=0, doc="the <image> placeholder id in input_ids")

    def validate(self) -> None:
        if self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.head_dim % 2:
            fail("head_dim", f"must be even for RoPE, got {self.head_dim}")
        if self.layer_types and len(self.layer_types) != self.n_layers:
            fail("layer_types", f"needs one entry per layer ({self.n_layers}), got {len(self.layer_types)}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                fail(f"layer_types[{i}]", f"expected one of {', '.join(LAYER_TYPES)}, got {t!r}")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window."""
        if not self.sliding_window:
            return False
        if self.layer_types:
            return self.layer_types[layer] == "sliding_attention"
        return layer % 2 == 0


def _paligemma2(vision_size: int, **text) -> Config:
    return Config(vision=siglip.FLAVORS[f"So400m-{vision_size}"], **text)


_GEMMA2_2B = dict(dim=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256, ffn_dim=9216,
                  query_pre_attn_scalar=256.0)
_GEMMA2_9B = dict(dim=3584, n_layers=42, n_heads=16, n_kv_heads=8, head_dim=256, ffn_dim=14336,
                  query_pre_attn_scalar=256.0)
_GEMMA2_27B = dict(dim=4608, n_layers=46, n_heads=32, n_kv_heads=16, head_dim=128, ffn_dim=36864,
                   query_pre_attn_scalar=144.0)

FLAVORS: dict[str, Config] = {
    # The CPU sizes use id 11 for <image>: its id in every tokenizer this project trains
    # (workbench.data.tokenizer.SPECIAL_TOKENS). Tests: models.md's tiny config (4 image tokens) with a 4-token
    # window so sliding layers bite
    "debug": Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=300,
                    query_pre_attn_scalar=16.0, sliding_window=4, max_seq_len=512,
                    vision=siglip.FLAVORS["debug"], image_token_id=11),
    # a CPU size: 64 px images (64 image tokens), a 4-layer decoder
    "small": Config(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=512, vocab_size=4096,
                    query_pre_attn_scalar=32.0, sliding_window=64, max_seq_len=1024,
                    vision=siglip.FLAVORS["small"], image_token_id=11),
    # the published shapes at 224 px (256 image tokens); the So400m-448 / -896 towers are siglip flavors
    "3B": _paligemma2(224, **_GEMMA2_2B),
    "10B": _paligemma2(224, **_GEMMA2_9B),
    "28B": _paligemma2(224, **_GEMMA2_27B),
}


class GemmaRMSNorm(nn.Module):
    """# NEW: RMSNorm(x) = x / sqrt(mean(x^2) + eps) * (1 + w), the multiply in fp32 (Gemma), w init 0."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # x * rsqrt(mean(x^2) + eps) * (1 + w), all in fp32, then back to x's dtype
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GeGLU(nn.Module):
    """# NEW: FFN(x) = W2 (GELU_tanh(W1 x) * W3 x) (SwiGLU with GELU; w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=s, a=-3 * s, b=3 * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W2 (GELU_tanh(W1 x) * W3 x)
        return self.w2(F.gelu(self.w1(x), approximate="tanh") * self.w3(x))


class Attention(nn.Module):
    """Grouped-query attention as in llama3.py, scaled by query_pre_attn_scalar^-1/2 (# NEW)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        # NEW: scale = query_pre_attn_scalar^-1/2 (not head_dim^-1/2: they differ for 27B)
        self.core = AttentionCore(scale=cfg.query_pre_attn_scalar**-0.5, backend=cfg.attn_backend)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin, s in ((self.wq, std), (self.wk, std), (self.wv, std), (self.wo, out_std)):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=s, a=-3 * s, b=3 * s)

    def forward(self, x, cos, sin, mask: MaskSpec, kv_cache: KVCache | None, layer_idx: int):
        B, T, _ = x.shape
        D = self.head_dim
        q = self.wq(x).view(B, T, -1, D)  # (B, T, H, D)
        k = self.wk(x).view(B, T, -1, D)  # (B, T, KV, D)
        v = self.wv(x).view(B, T, -1, D)  # (B, T, KV, D)
        # R(p) q, R(p) k (half-split layout)
        q, k = apply_rope_tables(q, cos, sin), apply_rope_tables(k, cos, sin)
        q_offset = 0
        if kv_cache is not None:
            q_offset = kv_cache.seen
            k, v = kv_cache.update(layer_idx, k, v)  # (B, Tk, KV, D)
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, q_offset)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.wo(out)


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attention_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)  # NEW: post-norms
        self.ffn_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = GeGLU(cfg.dim, cfg.ffn_dim)  # NEW: GELU gate instead of SiLU
        self.post_ffn_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache, layer_idx):
        # h = x + RMSNorm_post(Attn(RMSNorm(x)))
        h = x + self.post_attention_norm(self.attention(self.attention_norm(x), cos, sin, mask, kv_cache, layer_idx))
        # out = h + RMSNorm_post(FFN(RMSNorm(h)))
        return h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))


class Gemma2(nn.Module):
    """The Gemma 2 decoder (no head: the embeddings are tied; `logits` lives on the wrapper)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=std)
        self.rope.init_weights()
        for block in self.layers:
            for norm in (block.attention_norm, block.post_attention_norm, block.ffn_norm, block.post_ffn_norm):
                norm.init_weights()
            block.attention.init_weights(std, out_std)
            block.feed_forward.init_weights(std, out_std)
        self.norm.init_weights()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """E[ids] * sqrt(d) (B, T, d). The scale is rounded as transformers rounds it: to float32 (its buffer),
        then to the weight dtype (sqrt(2304) is 48 exactly, but the CPU sizes' sqrt(128) is not)."""
        w = self.embed_tokens.weight
        scale = torch.tensor(self.cfg.dim**0.5, dtype=torch.float32, device=w.device).to(w.dtype)
        # NEW: e = E[ids] * sqrt(d)
        return self.embed_tokens(input_ids) * scale

    def layer_masks(self, mask: MaskSpec) -> list[MaskSpec]:
        """# NEW: the batch's spec per layer, plus the soft-cap and, on sliding layers, the window (a caller's
        `mask.sliding_window` replaces the config's there). Global layers never slide, whatever the caller's
        spec says: they are what keeps the whole context in view."""
        cfg = self.cfg
        cap = cfg.attn_softcap or None
        full = dataclasses.replace(mask, soft_cap=cap, sliding_window=None)
        window = dataclasses.replace(mask, soft_cap=cap, sliding_window=mask.sliding_window or cfg.sliding_window)
        return [window if cfg.sliding(i) else full for i in range(cfg.n_layers)]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: MaskSpec, kv_cache: KVCache | None = None,
                output_hidden_states: bool = False) -> DecoderOutput:
        """x: inputs_embeds (B, T, d) (already scaled); positions (B, T) RoPE positions."""
        masks = self.layer_masks(mask)
        cos, sin = rope_tables(*self.rope(positions, x.dtype))  # (B, T, 1, D) each: cos, signed sin
        hidden_states = [x] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, masks[i], kv_cache, i)
            if hidden_states is not None:
                hidden_states.append(x)
        if kv_cache is not None:
            kv_cache.advance(x.shape[1])
        return DecoderOutput(hidden=self.norm(x), aux={},
                             hidden_states=tuple(hidden_states) if hidden_states is not None else None)


class PaliGemma2(nn.Module):
    """The decoder interface of `workbench.models.base`, extended for images.

    batch keys
        input_ids     (B, T) long: the first `cfg.num_image_tokens` slots after any left padding hold
                      `cfg.image_token_id`, then bos, prefix, "\\n", suffix
        pixel_values  (B, 3, S, S) float, normalised to [-1, 1] (`workbench.inference.vlm.preprocess`); absent
                      or None: a text-only forward (no placeholder is replaced)
        inputs_embeds (B, T, d) instead of input_ids (from `embed`)
        mask          MaskSpec: `prefix_len` (B,) = the slot where the suffix starts (image + bos + prefix +
                      "\\n"; the whole prompt at inference), `key_padding` (B, Tk) for padded rows.
                      Default: plain causal (what transformers does without token_type_ids)
        positions     (B, T) RoPE positions; default slot + 1 (PaliGemma is 1-indexed; the slot counts the
                      tokens already in `kv_cache`). Left-padded rows should pass their own (real-token count).
        kv_cache      from `make_kv_cache`; output_hidden_states: the embeddings and each block's output
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = siglip.SigLIP(cfg.vision, init=False)  # initialised once, by init_weights below
        # NEW: the projector, vision width -> decoder width
        self.multi_modal_projector = Linear(cfg.vision.dim, cfg.dim, bias=True)
        self.language_model = Gemma2(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The only initializer, safe after `to_empty()`: SigLIP's and Gemma 2's own (`init_weights` of each:
        truncated normals, residual writers scaled by 1/sqrt(2L), LayerNorms 1/0, Gemma norms w = 0 so
        1 + w = 1, RoPE rebuilt) and the projector truncated N(0, init_std) with a zero bias."""
        self.vision_tower.init_weights()
        s = self.cfg.init_std
        nn.init.trunc_normal_(self.multi_modal_projector.weight, mean=0.0, std=s, a=-3 * s, b=3 * s)
        nn.init.zeros_(self.multi_modal_projector.bias)
        self.language_model.init_weights()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, d): W_proj SigLIP(pixels) + b_proj."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds (B, T, d): text slots E[id] * sqrt(d), image slots the projected image features."""
        cfg = self.cfg
        image_slots = input_ids == cfg.image_token_id  # (B, T)
        ids = input_ids
        if cfg.image_token_id >= cfg.vocab_size:  # the placeholder has no embedding row: look up 0 instead
            ids = input_ids.masked_fill(image_slots, 0)
        x = self.language_model.embed(ids)  # (B, T, d)
        if pixel_values is None:
            return x
        feats = self.image_features(pixel_values).to(x.dtype)  # (B_img, N, d)
        n_slots, n_feats = int(image_slots.sum()), feats.shape[0] * feats.shape[1]
        if n_slots != n_feats:
            raise ValueError(f"input_ids hold {n_slots} image placeholders (id {cfg.image_token_id}) but "
                             f"pixel_values give {feats.shape[0]} images x {feats.shape[1]} tokens = {n_feats}")
        # the features, in order, into the placeholder slots (row by row)
        return x.masked_scatter(image_slots[..., None], feats)

    def forward(self, batch: dict) -> DecoderOutput:
        kv_cache: KVCache | None = batch.get("kv_cache")
        x = batch.get("inputs_embeds")
        if x is None:
            x = self.embed(batch["input_ids"], batch.get("pixel_values"))  # (B, T, d)
        B, T = x.shape[:2]
        positions = batch.get("positions")
        if positions is None:
            offset = kv_cache.seen if kv_cache is not None else 0
            # NEW: 1-indexed positions
            positions = torch.arange(offset + 1, offset + T + 1, device=x.device).expand(B, T)
        mask = batch.get("mask") or MaskSpec()
        return self.language_model(x, positions, mask, kv_cache, bool(batch.get("output_hidden_states")))

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits (B, T|K, V) for `hidden` (B, T, d) (or only at `positions`, see llama3), soft-capped."""
        hidden = select_positions(hidden, positions)  # (B, T|K, d)
        z = linear(hidden, self.language_model.embed_tokens.weight)
        cap = self.cfg.final_softcap
        if cap:
            # NEW: z = c tanh(z / c)
            z = torch.tanh(z / cap) * cap
        return z

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (MFU convention 6 N + 12 L H Q T for the decoder, the tied head included),
        plus one image's vision tower and projector spread over the `seq_len` tokens of its sequence."""
        cfg = self.cfg
        lm = self.language_model
        n_matmul = sum(p.numel() for name, p in lm.named_parameters() if p.ndim == 2 and "embed_tokens" not in name)
        n_matmul += cfg.vocab_size * cfg.dim  # the tied head
        text = 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
        image = self.vision_tower.flops_per_image() + 6 * self.multi_modal_projector.weight.numel() * cfg.num_image_tokens
        return text + image / seq_len

    def kv_entry_shapes(self) -> list[tuple[int, ...]]:
        shape = (self.cfg.n_kv_heads, self.cfg.head_dim)
        return [shape, shape]

    def make_kv_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> StaticKVCache:
        """k and v, each (B, max_len, KV, D), per decoder layer (sliding layers keep every slot; the mask's
        window hides the old ones)."""
        w = self.language_model.embed_tokens.weight
        return StaticKVCache(self.cfg.n_layers, batch_size, max_len, self.kv_entry_shapes(),
                             dtype=dtype or w.dtype, device=device or w.device)


Model = PaliGemma2
