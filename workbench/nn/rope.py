"""Rotary position embedding (RoPE; Su et al., 2021, "RoFormer") and its frequency scalings.

The math
    Split a head vector x in R^D into D/2 pairs. Pair i at position p is rotated by the angle p * w_i,

        w_i = theta^(-2i/D),  i = 0 .. D/2-1,

    i.e. [x_a, x_b] -> [x_a cos(p w_i) - x_b sin(p w_i),  x_b cos(p w_i) + x_a sin(p w_i)].
    Rotations compose, so <R(p) q, R(s) k> = <q, R(s - p) k>: attention scores depend on positions only
    through their difference, and no position vector is ever added to the residual stream.

The intuition
    Each pair is a clock hand turning at its own speed: fast hands (small i) resolve nearby tokens, slow
    hands (large i, wavelength 2 pi / w_i up to theta * 2 pi) tell far-apart tokens apart.

Layout: half-split vs interleaved
    Which coordinates form "pair i" is a convention. Meta's reference code pairs adjacent coordinates
    (2i, 2i+1) (`view_as_complex` on the last dim reshaped to (D/2, 2)). Hugging Face and this project pair
    coordinate i with i + D/2 ("rotate_half": x -> [-x2, x1] with x = [x1, x2]), which needs no complex
    numbers and no reshape. The two are the same rotation after permuting the coordinates of every
    head; since q and k are linear maps of the hidden state, the permutation is absorbed into the rows of
    wq and wk. That is exactly what HF's Meta-to-HF conversion does (per head, rows (2i, 2i+1) become rows
    (i, i + D/2)), so weights from HF load here unchanged, while weights from Meta's `consolidated.pth`
    must be permuted first (`permute_meta_to_half_split`). Nothing fails loudly if you forget: the model
    just becomes worse.

Scalings (how w_i is changed to reach longer contexts)
    default  w_i unchanged.
    linear   (position interpolation, Chen et al. 2023) w_i / factor: positions are squeezed into the
             trained range, every pair alike.
    llama3   (Llama 3.1) with wavelength lambda_i = 2 pi / w_i, L = original context,
             lambda_high = L / high_freq_factor, lambda_low = L / low_freq_factor:
               lambda_i < lambda_high  -> w_i               (high frequencies: local order, keep)
               lambda_i > lambda_low   -> w_i / factor      (low frequencies: interpolate positions)
               otherwise               -> (1 - g) w_i / factor + g w_i,
                                          g = (L / lambda_i - low_freq_factor) / (high - low)
             Cos and sin are not rescaled (attention factor 1).
    ntk      (NTK-aware, static) theta' = theta * s^(D / (D - 2)): the lowest frequency is interpolated by s
             while the highest stays nearly unchanged (a change of base spreads the stretch over the pairs).
             Not a transformers rope type (their `dynamic` equals it at S = L (2s - 1) / s); set in our configs.
    dynamic  (dynamic NTK) the base grows with the longest sequence seen, L = original context, S = that length:
               theta' = theta * (s S / L - (s - 1))^(D / (D - 2))   when S > L (else theta)
             `RotaryEmbedding` keeps transformers' state: the frequencies follow the largest S seen, and go
             back to the original ones when a sequence shorter than L comes after a longer one. Keys already
             in a KV cache keep the rotation they were stored with, in transformers as here.
    longrope (Phi-3) per-pair rescale factors found by search: w_i / short_factor_i for sequences up to L,
             w_i / long_factor_i beyond (chosen per forward from the longest position), and cos, sin times
             sqrt(1 + ln(s) / ln(L)) unless `attention_factor` is set.
    yarn     (Peng et al., 2023; DeepSeek-V3) with d = D the rotary width, s = factor, L = original context:
               d(r) = d ln(L / (2 pi r)) / (2 ln theta)       the pair index that turns r times over L
               lo, hi = floor(d(beta_fast)), ceil(d(beta_slow)), clamped to [0, d - 1]
               ramp_i = clamp((i - lo) / (hi - lo), 0, 1)     0: fast pairs (extrapolate), 1: slow pairs
               w_i' = w_i (1 - ramp_i) + (w_i / s) ramp_i
             and cos, sin are multiplied by the attention factor
               m(s, a) = 0.1 a ln(s) + 1 (s > 1, else 1);  factor = m(s, mscale) / m(s, mscale_all_dim)
               when both are set (DeepSeek: 1.0 / 1.0 -> factor 1), else m(s, 1), unless set explicitly.
             DeepSeek-V3 moves m(s, mscale_all_dim)^2 into the softmax scale instead (deepseek_v3.py).

Precision: angles and their cos/sin are computed in float32 (bf16 positions above 256 are not even
exact integers) and cast to the activation dtype at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from workbench.config import fail, field_


@dataclass
class RopeConfig:
    theta: float = field_(10000.0, gt=0, doc="base of the frequencies w_i = theta^(-2i/D)")
    scaling: Literal["default", "linear", "ntk", "dynamic", "llama3", "yarn", "longrope"] = "default"
    factor: float = field_(1.0, ge=1.0, doc="context extension factor (every scaling but default)")
    low_freq_factor: float = field_(1.0, gt=0)
    high_freq_factor: float = field_(4.0, gt=0)
    original_max_seq_len: int = field_(8192, gt=0, doc="context the model was pretrained on (every scaling but "
                                                     "default, linear and ntk)")
    beta_fast: float = field_(32.0, gt=0, doc="yarn: pairs turning more than this often over the original "
                                             "context keep their frequency")
    beta_slow: float = field_(1.0, gt=0, doc="yarn: pairs turning less than this often are fully interpolated")
    mscale: float = field_(0.0, ge=0, doc="yarn: numerator coefficient of the attention factor (0 = unset)")
    mscale_all_dim: float = field_(0.0, ge=0, doc="yarn: denominator coefficient of the attention factor "
                                                 "(0 = unset); DeepSeek-V3 squares it into the softmax scale")
    attention_factor: float | None = field_(None, doc="yarn, longrope: cos/sin multiplier; None = from factor")
    short_factor: list[float] | None = field_(None, doc="longrope: per-pair divisors up to the original context")
    long_factor: list[float] | None = field_(None, doc="longrope: per-pair divisors beyond it")

    def validate(self) -> None:
        if self.attention_factor is not None and self.attention_factor <= 0:
            fail("attention_factor", f"must be > 0 or unset, got {self.attention_factor}")
        if self.scaling == "longrope" and (not self.short_factor or not self.long_factor
                                           or len(self.short_factor) != len(self.long_factor)):
            fail("short_factor", "longrope needs short_factor and long_factor, one value per rotary pair each")
        if self.scaling == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            fail("high_freq_factor", f"must be > low_freq_factor ({self.low_freq_factor}) for llama3 scaling")


def rope_frequencies(head_dim: int, cfg: RopeConfig, device=None, seq_len: int | None = None) -> torch.Tensor:
    """The D/2 angular frequencies w_i (float32), after the configured scaling; `seq_len` (the longest
    sequence of the forward) matters to dynamic and longrope only."""
    theta = cfg.theta
    if cfg.scaling == "ntk":  # theta' = theta * s^(D / (D - 2))
        theta = theta * cfg.factor ** (head_dim / (head_dim - 2))
    if cfg.scaling == "dynamic":
        L, S = cfg.original_max_seq_len, max(seq_len or 0, cfg.original_max_seq_len)
        # theta' = theta * (s S / L - (s - 1))^(D / (D - 2))
        theta = theta * ((cfg.factor * S / L) - (cfg.factor - 1)) ** (head_dim / (head_dim - 2))
    # w_i = theta^(-2i/D)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if cfg.scaling in ("default", "ntk", "dynamic"):
        return inv_freq
    if cfg.scaling == "longrope":
        long = seq_len is not None and seq_len > cfg.original_max_seq_len
        ext = torch.tensor(cfg.long_factor if long else cfg.short_factor, dtype=torch.float32, device=device)
        return inv_freq / ext  # w_i / f_i
    if cfg.scaling == "linear":
        return inv_freq / cfg.factor  # w_i / s
    if cfg.scaling == "llama3":
        return _llama3_scaling(inv_freq, cfg)
    if cfg.scaling == "yarn":
        return _yarn_scaling(inv_freq, head_dim, cfg)
    raise ValueError(f"unknown rope scaling {cfg.scaling!r}")


def yarn_mscale(factor: float, coefficient: float = 1.0) -> float:
    """YaRN's m(s, a) = 0.1 a ln(s) + 1 for s > 1, else 1."""
    return 0.1 * coefficient * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_attention_factor(cfg: RopeConfig) -> float:
    """The multiplier applied to cos and sin (1 except under yarn)."""
    if cfg.scaling not in ("yarn", "longrope"):
        return 1.0
    if cfg.attention_factor is not None:
        return cfg.attention_factor
    if cfg.scaling == "longrope":  # sqrt(1 + ln s / ln L)
        return math.sqrt(1 + math.log(cfg.factor) / math.log(cfg.original_max_seq_len)) if cfg.factor > 1 else 1.0
    if cfg.mscale and cfg.mscale_all_dim:
        return yarn_mscale(cfg.factor, cfg.mscale) / yarn_mscale(cfg.factor, cfg.mscale_all_dim)
    return yarn_mscale(cfg.factor)


def _yarn_scaling(inv_freq: torch.Tensor, head_dim: int, cfg: RopeConfig) -> torch.Tensor:
    L, base = cfg.original_max_seq_len, cfg.theta

    def pair_turning(rotations: float) -> float:  # d(r) = d ln(L / (2 pi r)) / (2 ln theta)
        return head_dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(pair_turning(cfg.beta_fast)), 0)
    hi = min(math.ceil(pair_turning(cfg.beta_slow)), head_dim - 1)
    if lo == hi:
        hi += 0.001  # a one-pair ramp would divide by zero
    i = torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device)
    ramp = ((i - lo) / (hi - lo)).clamp(0, 1)  # 0 for fast pairs (kept), 1 for slow pairs (interpolated)
    # w' = w (1 - ramp) + (w / s) ramp
    return inv_freq * (1 - ramp) + inv_freq / cfg.factor * ramp


def _llama3_scaling(inv_freq: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    L = cfg.original_max_seq_len
    low_wavelen = L / cfg.low_freq_factor  # longer than this: fully interpolated
    high_wavelen = L / cfg.high_freq_factor  # shorter than this: unchanged
    wavelen = 2 * math.pi / inv_freq
    # lambda > lambda_low -> w / factor, else w
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
    # in between: (1 - g) w / s + g w, with g = (L / lambda - low) / (high - low)
    g = (L / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - g) * scaled / cfg.factor + g * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the frequencies; `forward(positions)` gives cos/sin of shape (B, T, D) for `apply_rope`.

    cos/sin are computed per forward from the integer positions rather than read from a table, so any
    position works (generation past the configured length included) and left-padded rows can use their
    own positions. The buffer is non-persistent and rebuilt by `init_weights()` (meta-device safe).
    """

    def __init__(self, head_dim: int, cfg: RopeConfig):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.cfg = head_dim, cfg
        self.attention_factor = rope_attention_factor(cfg)
        self.seen_len = cfg.original_max_seq_len  # dynamic: the length the frequencies were made for
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)

    def init_weights(self) -> None:
        self.inv_freq = rope_frequencies(self.head_dim, self.cfg, device=self.inv_freq.device)
        self.seen_len = self.cfg.original_max_seq_len  # dynamic: the length the frequencies were made for

    def _follow_length(self, positions: torch.Tensor) -> None:
        """dynamic / longrope: frequencies for this forward's longest sequence (transformers' rules)."""
        seq_len, L = int(positions.max()) + 1, self.cfg.original_max_seq_len
        if self.cfg.scaling == "longrope":
            self.inv_freq = rope_frequencies(self.head_dim, self.cfg, self.inv_freq.device, seq_len)
        elif seq_len > self.seen_len:  # dynamic, growing
            self.inv_freq = rope_frequencies(self.head_dim, self.cfg, self.inv_freq.device, seq_len)
            self.seen_len = seq_len
        elif seq_len < L < self.seen_len:  # dynamic, back within the original context: the original ones
            self.inv_freq = rope_frequencies(self.head_dim, self.cfg, self.inv_freq.device)
            self.seen_len = L

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.scaling in ("dynamic", "longrope"):
            self._follow_length(positions)
        if torch.is_autocast_enabled(positions.device.type):
            with torch.autocast(device_type=positions.device.type, enabled=False):
                return self._cos_sin(positions, dtype)
        return self._cos_sin(positions, dtype)  # no autocast context to leave (a cost paid every decode step)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # angles[b, t, i] = p[b, t] * w_i, in float32
        angles = positions.float()[..., None] * self.inv_freq.float()  # (B, T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, D): pair i with i + D/2
        if self.attention_factor != 1.0:  # yarn: cos and sin carry the attention factor
            return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (the half-split pairing)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by the angles whose cos/sin are (B, T, D) (the reference form)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D): same angle for every head
    # R(p) x = x cos + rotate_half(x) sin
    return x * cos + rotate_half(x) * sin


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, T, D) -> the (B, T, 1, D) tables of `apply_rope_tables`: cos and the signed sin.

    Built once per forward and shared by every layer, so each layer's rotation is four elementwise ops
    (one swap of halves, two multiplies, one add) instead of the chunk, negate and concatenate of
    `rotate_half` plus the broadcasting views, per tensor.
    """
    half = sin.shape[-1] // 2
    # sin_signed = [-sin_1, sin_2]: rotate_half(x) sin = [x2, x1] * [-sin_1, sin_2]
    sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos[:, :, None, :], sin_signed[:, :, None, :]  # (B, T, 1, D): same angle for every head


def apply_rope_tables(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`apply_rope` on the tables of `rope_tables`; x (B, T, H, D). Bit-identical to `apply_rope`."""
    # R(p) x = x cos + [x2, x1] * [-sin, sin]; roll by D/2 swaps the halves: [x1, x2] -> [x2, x1]
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def permute_meta_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Meta-layout wq/wk (interleaved pairs) reordered for the half-split layout used here."""
    out_dim, in_dim = w.shape
    d = out_dim // n_heads
    # (H, D/2, 2, in) -> (H, 2, D/2, in): row 2i -> i, row 2i+1 -> i + D/2 within each head
    return w.view(n_heads, d // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
