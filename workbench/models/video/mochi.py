"""Mochi 1's asymmetric diffusion transformer (AsymmDiT): a video denoiser over latent patches and text tokens.

What it is
    Genmo's Mochi 1 (2024) is a rectified-flow video model: a causal video VAE (workbench.models.video.vae)
    compresses a clip 8x8 in space and 6x in time, and this transformer predicts the flow velocity of the
    noisy latents given T5 text features. Its blocks are "asymmetric": the visual stream is twice as wide as
    the text stream (3072 vs 1536 in the 10B model), each stream has its own norms, modulation, QKV and MLP,
    and the two meet only inside one joint attention.

The math (one block; x (B, N, D) visual tokens, y (B, L, Dy) text tokens, c (B, D) conditioning)
    scale, gate, scale', gate' = Linear(silu(c))             per stream (scale-only: no shift, unlike DiT)
    x_n = RMSNorm(x) * (1 + scale)                           the same for y with its own Linear
    q_x, k_x, v_x = split(W_qkv_x x_n)      (D -> 3 H Dh)    q_y, k_y, v_y = split(W_qkv_y y_n)  (Dy -> 3 H Dh)
    q, k <- RMSNorm_headdim(q), RMSNorm_headdim(k)           separate weights per stream
    q_x, k_x <- RoPE3D(q_x), RoPE3D(k_x)                     visual only
    [o_x; o_y] = softmax([q_x; q_y] [k_x; k_y]^T / sqrt(Dh)) [v_x; v_y]   ONE softmax over visual + valid text
    x = x + tanh(gate) * RMSNorm(W_proj_x o_x)               sandwich norm, tanh-gated residual
    x = x + tanh(gate') * RMSNorm(SwiGLU_x(RMSNorm(x) * (1 + scale')))
    (y likewise with W_proj_y: H Dh -> Dy and SwiGLU_y; the last block does not update y)

    conditioning   c = MLP(sinusoid(1000 * (1 - sigma))) + AttnPool(text, text_mask)
    text stream    y_0 = Linear(text)                        (T5 4096 -> Dy)
    output         v = Linear(LayerNorm(x) * (1 + scale) + shift),  (scale, shift) = Linear(silu(c))
                   then the p x p patches are put back: (B, C, T, H, W)

3D RoPE (learned, "mixed")
    Every visual token has a position (t, h, w): t the latent frame index, h and w the centres of the token's
    bin on a grid rescaled so that h_patches * w_patches covers the target area 192 x 192 (so a 30 x 53 and a
    60 x 106 grid span the same range, only sampled more finely):
        scale = sqrt(36864 / (h_patches * w_patches));  h_i = centre of bin i of [-h s / 2, h s / 2]
    Each head h and frequency pair f has a learned direction-and-speed vector freqs[:, h, f] in R^3:
        theta[n, h, f] = t_n freqs[0, h, f] + h_n freqs[1, h, f] + w_n freqs[2, h, f]     (float32)
    and rotates the *interleaved* pair (q[2f], q[2f+1]) by theta (not the half-split layout of Llama).

Padded text
    The text mask excludes padded text tokens as keys (genmo packs the valid tokens with varlen attention;
    diffusers loops over the batch). Here it is the mask spec's key padding on `blocks.N.attn.core`.
    Outputs at padded text positions are never read by a valid token, so they do not matter.

The intuition
    Text tokens are few and their features already rich (T5-XXL), so the text stream can be narrower and
    cheaper while still taking part in every attention; a shared softmax lets video tokens read text and
    text tokens read video in one operation (no separate cross-attention). Scale-only modulation with
    tanh-gated, RMS-normalised residuals keeps every block's update bounded, which the authors found stable
    at 10B parameters in bf16.

Design choices
    - Fused `qkv_x` / `qkv_y` projections as in genmo (diffusers splits them into to_q/to_k/to_v and add_*_proj;
      the adapter workbench.checkpoint.hf.mochi concatenates). The SwiGLU MLPs use `workbench.nn.swiglu`
      (w1 gate, w3 up, w2 down); diffusers' fused `net.0.proj` is [up; gate].
    - The joint attention goes through `blocks.N.attn.core` (a `JointAttentionCore`) wrapping the shared
      `AttentionCore` with `MaskSpec(causal=False, key_padding=[visual ones; text_mask])`. Context
      parallelism swaps that core (workbench.parallel.cp.JointVideoAttention).
    - NEW: `forward(..., token_range=(start, stop))` computes only visual tokens start..stop-1 (their global
      RoPE positions) and returns their patch predictions (B, stop - start, p*p*C) instead of the video. It is
      the plain, single-device hook that context parallelism uses: each rank computes its slice, and the
      swapped core gathers the visual keys and values of the other slices. The text stream is computed whole.
    - The last block keeps its text Q/K/V projection and text-query norm (the checkpoints have them) but runs no
      attention for text queries (their outputs would be discarded): the fused projection's q part is dropped
      and `q_norm_y` gets no gradient. It has no proj_y / mlp_y; its text modulation is scale-only.
    - `__init__` allocates nothing on the meta device; `init_weights()` is the one initializer: xavier-uniform
      linears, the modulation and output layers at zero (adaLN-Zero: every residual gate tanh(0) = 0, so an
      untrained model is the identity on its stream and predicts 0), RoPE frequencies 1 / 10000^(f / F) along
      random unit directions per (head, pair).

Differences from the reference
    None in the forward math: parity with diffusers' `MochiTransformer3DModel` (fp32, padded text, odd T/H/W)
    is tested in tests/parity/test_mochi_hf.py. genmo's reference asserts bf16 and flash-attention varlen;
    this code runs any dtype on any device. The time input is sigma (1 = noise) and the model embeds
    1000 * (1 - sigma) itself; diffusers' pipeline passes that number as `timestep` (see flow.py).
    The MLP widths follow diffusers/genmo: hidden = (ratio * dim * 2) // 3, rounded up to `multiple_of`.

Sources
    Genmo, "Mochi 1" (2024), genmoai/mochi asymm_models_joint.py, rope_mixed.py; diffusers
    transformer_mochi.py, MochiAttnProcessor2_0, MochiAttentionPool (read, not copied); Heo et al.,
    "Rotary Position Embedding for Vision Transformer" (RoPE-Mixed), arXiv 2403.13298; Peebles & Xie,
    "Scalable Diffusion Models with Transformers" (adaLN-Zero), arXiv 2212.09748.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import fail, field_
from workbench.nn.attention import AttentionCore, MaskSpec
from workbench.nn.swiglu import SwiGLU


@dataclass
class Config:
    in_channels: int = field_(12, gt=0, doc="latent channels of the video VAE")
    patch_size: int = field_(2, gt=0, doc="p: each token is a p x p patch of one latent frame")
    dim: int = field_(3072, gt=0, doc="visual stream width D = n_heads * head_dim")
    text_width: int = field_(1536, gt=0, doc="text stream width Dy")
    n_layers: int = field_(48, gt=0)
    n_heads: int = field_(24, gt=0)
    head_dim: int = field_(128, gt=0)
    text_dim: int = field_(4096, gt=0, doc="width of the text features fed in (T5-XXL: 4096)")
    pool_heads: int = field_(8, gt=0, doc="heads of the attention pooling of the text features")
    time_embed_dim: int = field_(256, gt=0, doc="sinusoid width of the time embedding")
    mlp_ratio_x: float = field_(4.0, gt=0, doc="visual MLP: hidden = (ratio * dim * 2) // 3")
    mlp_ratio_y: float = field_(4.0, gt=0, doc="text MLP: hidden = (ratio * text_width * 2) // 3")
    multiple_of: int = field_(1, gt=0, doc="round the MLP hidden widths up to a multiple of this")
    target_area: int = field_(36864, gt=0, doc="RoPE: the h x w patch grid is rescaled to this area (192^2)")
    timestep_scale: float = field_(1000.0, gt=0, doc="the time embedding sees timestep_scale * (1 - sigma)")
    max_text_len: int = field_(256, gt=0, doc="longest text sequence (T5 tokens) the model is meant for")
    attn_backend: Literal["sdpa", "math"] = field_("sdpa", doc="AttentionCore backend (math: the explicit formula)")

    def __post_init__(self):
        if self.dim != self.n_heads * self.head_dim:
            fail("dim", f"expected n_heads * head_dim = {self.n_heads * self.head_dim}, got {self.dim}")
        if self.head_dim % 2:
            fail("head_dim", f"expected an even number (RoPE rotates pairs), got {self.head_dim}")
        if self.text_dim % self.pool_heads:
            fail("text_dim", f"expected a multiple of pool_heads = {self.pool_heads}, got {self.text_dim}")
        if self.time_embed_dim % 2:
            fail("time_embed_dim", f"expected an even number (cos and sin halves), got {self.time_embed_dim}")
        if self.attn_backend not in ("sdpa", "math"):
            fail("attn_backend", f"expected 'sdpa' or 'math', got {self.attn_backend!r}")

    @property
    def hidden_x(self) -> int:
        return _round_up(int(self.mlp_ratio_x * self.dim) * 2 // 3, self.multiple_of)

    @property
    def hidden_y(self) -> int:
        return _round_up(int(self.mlp_ratio_y * self.text_width) * 2 // 3, self.multiple_of)


def _round_up(n: int, m: int) -> int:
    return m * math.ceil(n / m)


FLAVORS: dict[str, Config] = {
    # tests: a few tens of thousands of parameters
    "debug": Config(in_channels=4, patch_size=2, dim=32, text_width=16, n_layers=2, n_heads=2, head_dim=16,
                    text_dim=16, pool_heads=2, time_embed_dim=16, max_text_len=16),
    # what the CPU video task trains (workbench.train.video): 4 latent channels of the "small" VAE
    "small": Config(in_channels=4, patch_size=2, dim=128, text_width=64, n_layers=4, n_heads=4, head_dim=32,
                    text_dim=64, pool_heads=4, time_embed_dim=64, max_text_len=16),
    # Mochi 1 preview: 48 layers, 24 x 128 heads, text 1536, T5-XXL features, 12 latent channels
    "10B": Config(multiple_of=256),
}


# ------------------------------------------------------------------------------------------------ pieces


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32 (no weight)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class HeadRMSNorm(nn.Module):
    """The per-head QK norm: RMSNorm over head_dim with a learned weight (eps 1e-5, as genmo)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_norm(x, self.eps) * self.weight).to(x.dtype)


def modulated_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm(x) * scale in float32, cast back. scale (B, D) broadcasts over tokens."""
    return (rms_norm(x, eps) * scale.float()[:, None]).to(x.dtype)


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim): [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2)), i < dim/2 (cos first)."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * w[None]  # (B, dim/2)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class TimeEmbed(nn.Module):
    """c_t = W2 silu(W1 sinusoid(t))."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp_1 = nn.Linear(freq_dim, dim)
        self.mlp_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, dtype) -> torch.Tensor:
        return self.mlp_2(F.silu(self.mlp_1(timestep_sinusoid(t, self.freq_dim).to(dtype))))


class AttentionPool(nn.Module):
    """The text summary added to c: one query (the mean of the valid tokens) attends over [mean; tokens].

    pooled = mean_{valid} text;   q = W_q pooled;   k, v = split(W_kv [pooled; text])
    out = W_out softmax(q k^T / sqrt(d)) v   (padded tokens masked; heads = pool_heads)
    """

    def __init__(self, text_dim: int, out_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_kv = nn.Linear(text_dim, 2 * text_dim)
        self.to_q = nn.Linear(text_dim, text_dim)
        self.to_out = nn.Linear(text_dim, out_dim)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, Dt = text.shape
        w = mask[:, :, None].to(text.dtype)  # (B, L, 1)
        # mean over the valid tokens (0 when there are none)
        pooled = (text * (w / w.sum(1, keepdim=True).clamp(min=1))).sum(1, keepdim=True)  # (B, 1, Dt)
        seq = torch.cat([pooled, text], dim=1)  # (B, 1 + L, Dt)
        d = Dt // self.heads
        kv = self.to_kv(seq).view(B, 1 + L, 2, self.heads, d)  # (B, 1+L, 2, Hp, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, Hp, 1+L, d)
        q = self.to_q(pooled).view(B, 1, self.heads, d).transpose(1, 2)  # (B, Hp, 1, d)
        keep = F.pad(mask.bool(), (1, 0), value=True)[:, None, None, :]  # (B, 1, 1, 1+L): the mean always
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, Hp, 1, d)
        return self.to_out(out.reshape(B, Dt))


def rope_positions(T: int, h: int, w: int, target_area: float, device=None) -> torch.Tensor:
    """(T*h*w, 3) float32 positions (t, h, w) in token order (t slowest): h, w are bin centres rescaled so
    that the h x w grid covers `target_area`."""
    s = math.sqrt(target_area / (h * w))

    def centres(n):
        # centres of n equal bins of [-n s / 2, n s / 2]
        edges = torch.linspace(-n * s / 2, n * s / 2, n + 1, device=device, dtype=torch.float32)
        return (edges[:-1] + edges[1:]) / 2

    t = torch.arange(T, device=device, dtype=torch.float32)
    grid = torch.meshgrid(t, centres(h), centres(w), indexing="ij")  # 3 x (T, h, w)
    return torch.stack(grid, dim=-1).reshape(-1, 3)  # (N, 3)


def rope_tables(freqs: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """theta[n, h, f] = sum_a pos[n, a] freqs[a, h, f] (float32) -> cos, sin (N, H, Dh/2)."""
    theta = torch.einsum("na,ahf->nhf", pos.float(), freqs.float())
    return torch.cos(theta), torch.sin(theta)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2f], x[2f+1]) of x (B, N, H, Dh) by theta (cos, sin (N, H, Dh/2)), in float32."""
    xe, xo = x[..., 0::2].float(), x[..., 1::2].float()  # (B, N, H, Dh/2)
    # (x_e, x_o) -> (x_e cos - x_o sin, x_e sin + x_o cos)
    out = torch.stack([xe * cos - xo * sin, xe * sin + xo * cos], dim=-1)  # (B, N, H, Dh/2, 2)
    return out.flatten(-2).to(x.dtype)  # (B, N, H, Dh)


# ------------------------------------------------------------------------------------------------ attention


class JointAttentionCore(nn.Module):
    """softmax over [visual; valid text] keys for visual queries and (optionally) text queries.

    q_x, k_x, v_x (B, H, N, Dh); q_y (B, H, L, Dh) or None; k_y, v_y (B, H, L, Dh); text_mask (B, L) bool.
    Returns o_x (B, H, N, Dh) and o_y (B, H, L, Dh) or None. This is the module context parallelism swaps
    (`blocks.N.attn.core`); the math goes through the shared `AttentionCore` with a key-padding mask spec.
    """

    def __init__(self, scale: float, backend: str = "sdpa"):
        super().__init__()
        self.scale = scale
        self.inner = AttentionCore(scale, backend)

    def joint(self, q_x, k_x, v_x, q_y, k_y, v_y, text_mask):
        """The joint softmax given all visual keys k_x (B, H, N, Dh) and any slice of visual queries q_x."""
        N = k_x.shape[2]
        k = torch.cat([k_x, k_y], dim=2)  # (B, H, N + L, Dh)
        v = torch.cat([v_x, v_y], dim=2)
        real = torch.ones(text_mask.shape[0], N, dtype=torch.bool, device=text_mask.device)
        spec = MaskSpec(causal=False, key_padding=torch.cat([real, text_mask.bool()], dim=1))  # (B, N + L)
        # visual queries: every visual key is real, so only the text padding masks anything
        o_x = self.inner(q_x, k, v, spec, 0)  # (B, H, Nq, Dh)
        # text queries sit at key slots N.. (a padded text query sees only itself: its output is never read)
        o_y = None if q_y is None else self.inner(q_y, k, v, spec, N)  # (B, H, L, Dh)
        return o_x, o_y

    def forward(self, q_x, k_x, v_x, q_y, k_y, v_y, text_mask, n_visual: int | None = None):
        """`n_visual`: the whole video's visual token count (the model passes it; only a context-parallel
        core, which sees a slice, reads it)."""
        return self.joint(q_x, k_x, v_x, q_y, k_y, v_y, text_mask)


class JointAttention(nn.Module):
    def __init__(self, cfg: Config, update_y: bool):
        super().__init__()
        D, H, Dh = cfg.dim, cfg.n_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.update_y = H, Dh, update_y
        # NEW: non-square text QKV (Dy -> 3 H Dh): text tokens are projected into the visual head space
        self.qkv_x = nn.Linear(D, 3 * H * Dh, bias=False)
        self.qkv_y = nn.Linear(cfg.text_width, 3 * H * Dh, bias=False)
        self.q_norm_x, self.k_norm_x = HeadRMSNorm(Dh), HeadRMSNorm(Dh)
        self.q_norm_y, self.k_norm_y = HeadRMSNorm(Dh), HeadRMSNorm(Dh)
        self.core = JointAttentionCore(Dh ** -0.5, cfg.attn_backend)
        self.proj_x = nn.Linear(H * Dh, D)
        self.proj_y = nn.Linear(H * Dh, cfg.text_width) if update_y else None

    def forward(self, x, y, cos, sin, text_mask, n_visual: int | None = None):
        B, N, _ = x.shape
        L = y.shape[1]
        H, Dh = self.n_heads, self.head_dim
        q_x, k_x, v_x = self.qkv_x(x).view(B, N, 3, H, Dh).unbind(2)  # 3 x (B, N, H, Dh)
        q_y, k_y, v_y = self.qkv_y(y).view(B, L, 3, H, Dh).unbind(2)  # 3 x (B, L, H, Dh)
        q_x, k_x = self.q_norm_x(q_x), self.k_norm_x(k_x)
        k_y = self.k_norm_y(k_y)
        q_y = self.q_norm_y(q_y) if self.update_y else None  # the last block's text queries are dropped
        # 3D RoPE on the visual stream only
        q_x, k_x = apply_rope_interleaved(q_x, cos, sin), apply_rope_interleaved(k_x, cos, sin)
        o_x, o_y = self.core(q_x.transpose(1, 2), k_x.transpose(1, 2), v_x.transpose(1, 2),
                             None if q_y is None else q_y.transpose(1, 2), k_y.transpose(1, 2),
                             v_y.transpose(1, 2), text_mask, n_visual)  # (B, H, N, Dh), (B, H, L, Dh) | None
        o_x = self.proj_x(o_x.transpose(1, 2).reshape(B, N, H * Dh))  # (B, N, D)
        o_y = self.proj_y(o_y.transpose(1, 2).reshape(B, L, H * Dh)) if self.update_y else None  # (B, L, Dy)
        return o_x, o_y


# ------------------------------------------------------------------------------------------------ blocks


class AsymmBlock(nn.Module):
    def __init__(self, cfg: Config, update_y: bool):
        super().__init__()
        self.update_y = update_y
        D, Dy = cfg.dim, cfg.text_width
        # NEW: scale-only modulation (no shift) from silu(c); the text stream of the last block gets a scale only
        self.mod_x = nn.Linear(D, 4 * D)
        self.mod_y = nn.Linear(D, 4 * Dy if update_y else Dy)
        self.attn = JointAttention(cfg, update_y)
        self.mlp_x = SwiGLU(D, cfg.hidden_x)
        self.mlp_y = SwiGLU(Dy, cfg.hidden_y) if update_y else None

    def forward(self, x, y, c, cos, sin, text_mask, n_visual: int | None = None):
        c = F.silu(c)
        scale_x, gate_x, scale_mlp_x, gate_mlp_x = self.mod_x(c).chunk(4, dim=1)  # 4 x (B, D)
        # x_n = RMSNorm(x) (1 + scale)
        x_n = modulated_rms_norm(x, 1 + scale_x.float())
        if self.update_y:
            scale_y, gate_y, scale_mlp_y, gate_mlp_y = self.mod_y(c).chunk(4, dim=1)  # 4 x (B, Dy)
        else:
            scale_y = self.mod_y(c)  # (B, Dy)
        y_n = modulated_rms_norm(y, 1 + scale_y.float())
        o_x, o_y = self.attn(x_n, y_n, cos, sin, text_mask, n_visual)
        # x = x + tanh(gate) RMSNorm(branch)   (sandwich norm, tanh-gated residual)
        x = x + modulated_rms_norm(o_x, torch.tanh(gate_x))
        x = x + modulated_rms_norm(self.mlp_x(modulated_rms_norm(x, 1 + scale_mlp_x.float())), torch.tanh(gate_mlp_x))
        if self.update_y:
            y = y + modulated_rms_norm(o_y, torch.tanh(gate_y))
            y = y + modulated_rms_norm(self.mlp_y(modulated_rms_norm(y, 1 + scale_mlp_y.float())),
                                       torch.tanh(gate_mlp_y))
        return x, y


class FinalLayer(nn.Module):
    """v = Linear(LayerNorm(x) (1 + scale) + shift), (scale, shift) = Linear(silu(c)) (LayerNorm without affine)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.mod = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x, c):
        scale, shift = self.mod(F.silu(c)).chunk(2, dim=1)  # 2 x (B, D)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return self.proj(x)


# ------------------------------------------------------------------------------------------------ the model


class AsymmDiT(nn.Module):
    """forward(x (B, C, T, H, W) noisy latents, sigma (B,), text (B, L, text_dim), text_mask (B, L) bool)
    -> (B, C, T, H, W) velocity (x0 - eps: see workbench.models.video.flow)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.dim, kernel_size=p, stride=p)
        self.t_embed = TimeEmbed(cfg.time_embed_dim, cfg.dim)
        self.text_pool = AttentionPool(cfg.text_dim, cfg.dim, cfg.pool_heads)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.text_width)
        # NEW: learned RoPE frequencies, one 3-vector per (axis, head, pair)
        self.pos_frequencies = nn.Parameter(torch.empty(3, cfg.n_heads, cfg.head_dim // 2))
        self.blocks = nn.ModuleList(AsymmBlock(cfg, update_y=i < cfg.n_layers - 1) for i in range(cfg.n_layers))
        self.final = FinalLayer(cfg.dim, p * p * cfg.in_channels)

    # -------------------------------------------------------------- init

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The only initializer: xavier-uniform linears with zero biases; modulation and output layers zero
        (adaLN-Zero); QK norm weights 1; time MLP N(0, 0.02); RoPE 1/10000^(f/F) along random unit directions."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight.view(m.weight.shape[0], -1)
                nn.init.xavier_uniform_(w)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, HeadRMSNorm):
                nn.init.ones_(m.weight)
        for lin in (self.t_embed.mlp_1, self.t_embed.mlp_2):
            nn.init.normal_(lin.weight, std=0.02)
        zero = [self.final.mod, self.final.proj]
        for blk in self.blocks:
            zero += [blk.mod_x, blk.mod_y]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        F_ = self.cfg.head_dim // 2
        speed = 10000.0 ** (-torch.arange(F_, dtype=torch.float32) / F_)  # (F,)
        direction = torch.randn(3, self.cfg.n_heads, F_, generator=generator)  # (3, H, F)
        direction = direction / direction.norm(dim=0, keepdim=True)
        self.pos_frequencies.copy_(direction * speed)

    # -------------------------------------------------------------- helpers

    def patch_grid(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"AsymmDiT: latent height {H} and width {W} must be divisible by patch_size {p}")
        return T, H // p, W // p

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, T*h*w, p*p*C): the target layout of the output tokens (t, h, w order;
        features p_row, p_col, C)."""
        B, C, T, H, W = x.shape
        p = self.cfg.patch_size
        _, h, w = self.patch_grid(T, H, W)
        x = x.reshape(B, C, T, h, p, w, p).permute(0, 2, 3, 5, 4, 6, 1)  # (B, T, h, w, p, p, C)
        return x.reshape(B, T * h * w, p * p * C)

    def unpatchify(self, tokens: torch.Tensor, T: int, H: int, W: int) -> torch.Tensor:
        """(B, T*h*w, p*p*C) -> (B, C, T, H, W): the inverse of `patchify`."""
        B = tokens.shape[0]
        p = self.cfg.patch_size
        _, h, w = self.patch_grid(T, H, W)
        x = tokens.reshape(B, T, h, w, p, p, -1).permute(0, 6, 1, 2, 4, 3, 5)  # (B, C, T, h, p, w, p)
        return x.reshape(B, -1, T, H, W)

    def conditioning(self, sigma, text, text_mask, dtype):
        """c (B, D) and the text stream's input y_0 (B, L, Dy)."""
        # c = t_embed(1000 (1 - sigma)) + AttnPool(text): the embedder sees the clean fraction, 0 at pure noise
        t = self.cfg.timestep_scale * (1 - sigma.float())
        c = self.t_embed(t, dtype) + self.text_pool(text, text_mask)
        return c, self.text_proj(text)

    # -------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                token_range: tuple[int, int] | None = None) -> torch.Tensor:
        B, C, T, H, W = x.shape
        if C != self.cfg.in_channels:
            raise ValueError(f"AsymmDiT: x has {C} channels, the config's in_channels is {self.cfg.in_channels}")
        if text.dim() != 3 or text.shape[-1] != self.cfg.text_dim or text.shape[0] != B:
            raise ValueError(f"AsymmDiT: text must be (B={B}, L, text_dim={self.cfg.text_dim}), "
                             f"got {tuple(text.shape)}")
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"AsymmDiT: text_mask must be (B, L) = {tuple(text.shape[:2])}, got "
                             f"{tuple(text_mask.shape)}")
        sigma = sigma.reshape(-1).expand(B) if sigma.numel() in (1, B) else sigma
        if sigma.shape != (B,):
            raise ValueError(f"AsymmDiT: sigma must be (B,) = ({B},), got {tuple(sigma.shape)}")
        text_mask = text_mask.bool()
        _, h, w = self.patch_grid(T, H, W)
        c, y = self.conditioning(sigma, text, text_mask, x.dtype)
        # patch embedding per frame: (B, C, T, H, W) -> (B*T, C, H, W) -> (B*T, D, h, w)
        z = self.patch_embed(x.transpose(1, 2).reshape(B * T, C, H, W))
        z = z.reshape(B, T, -1, h * w).transpose(2, 3).reshape(B, T * h * w, -1)  # (B, N, D), t slowest
        cos, sin = rope_tables(self.pos_frequencies, rope_positions(T, h, w, self.cfg.target_area, x.device))
        if token_range is not None:  # NEW: only visual tokens start..stop-1 (context parallelism)
            start, stop = token_range
            if not 0 <= start < stop <= z.shape[1]:
                raise ValueError(f"AsymmDiT: token_range {token_range} outside the {z.shape[1]} visual tokens")
            z, cos, sin = z[:, start:stop], cos[start:stop], sin[start:stop]
        n_visual = T * h * w  # the whole video's tokens, told to the cores (a cp core checks its slices sum to it)
        for block in self.blocks:
            z, y = block(z, y, c, cos, sin, text_mask, n_visual)
        out = self.final(z, c)  # (B, N | stop - start, p*p*C)
        if token_range is not None:
            return out
        return self.unpatchify(out, T, H, W)


Model = AsymmDiT  # the family convention (workbench.models.base)


def param_count(cfg: Config) -> int:
    """Parameters of a model of `cfg`, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = AsymmDiT(cfg)
    return sum(p.numel() for p in model.parameters())
