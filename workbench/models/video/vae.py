"""A causal video VAE: videos (B, 3, T, H, W) <-> latents (B, C_z, T_lat, H / s, W / s), Mochi's AsymmVAE.

What it is
    The autoencoder Mochi 1 diffuses in (genmo's "AsymmVAE"; diffusers' `AutoencoderKLMochi`). Its real
    size compresses 8x along each spatial side and 6x in time into 12 channels: a 163-frame 480 x 848 clip
    becomes 28 x 60 x 106 x 12, 93x fewer numbers than its pixel values. "Asymmetric": the decoder is
    twice as wide as the encoder (base 128 against 64): decoding is where the detail has to be invented.

The math
    Causal 3D convolution (kernel (k_t, k, k), stride (s_t, s, s)): pad k_t - 1 copies of the first frame
    in front of the clip (nothing after it) and (k - 1) / 2 replicated pixels on each spatial side, then
    convolve without padding. Output frame t then reads input frames <= t s_t only.
    Downsampling schedule (encoder level i): a causal conv with kernel = stride = (t_i, s_i, s_i).
        T_{i+1} = (T_i + t_i - 1 - t_i) / t_i + 1 = (T_i - 1) / t_i + 1
    so after all levels, with tf = prod t_i (6 = 1 * 2 * 3) and s = prod s_i (8 = 2 * 2 * 2):
        T_lat = (T - 1) / tf + 1     (needs (T - 1) % tf == 0);   h, w = H / s, W / s
    Latent frame 0 sees input frame 0 only (a single image encodes alone, T = 1 -> T_lat = 1); latent frame
    j >= 1 sees input frames <= j tf.
    Decoder level: a per-position Linear to C' t s s channels, then depth-to-space
        (B, C' t s s, T, H, W) -> (B, C', T t, H s, W s);
    the top level emits tf T_lat frames, and the first tf - 1 are dropped: T = tf (T_lat - 1) + 1.
    Decoded frame i reads latent frames <= ceil(i / tf).
    Temporal self-attention (encoder levels >= 1 in Mochi): at each pixel, a causal softmax over frames
        q, k <- q / |q|, k / |k| per head;  out = softmax(q k^T / sqrt(d) + causal mask) v
    Fourier input features: x -> [x, sin(2 pi 2^f x), cos(2 pi 2^f x)] for f in [start, stop) (15 = 3 + 12
    channels for Mochi's f = 6, 7): very high frequencies of the pixel value, so the first linear layer
    sees small intensity differences.
    Posterior and KL (per sample, summed over channels, frames and pixels):
        moments = Enc(x) = [mu, log sigma^2];  log sigma^2 <- clamp(log sigma^2, -30, 20)
        z = mu + sigma eps;   KL(q || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)
    Diffusion-space latents use per-channel statistics of the encoded training set:
        normalize(z) = (z - mean_c) / std_c;   denormalize(z) = z std_c + mean_c

The intuition
    Causality in time makes the first frame an image and every later group of tf frames a "delta" that
    depends only on the past: the same VAE serves images and videos, and a long video can be encoded and
    decoded in chunks with a cache of the past (`chunk_frames=k`), the way a language model decodes with a
    KV cache. Group norms are per frame and the attention is causal, so no layer can leak the future.
    Mochi's first level downsamples space only (t = 1): time is compressed at the lower resolutions.

Design choices
    Module structure follows diffusers' `AutoencoderKLMochi` block for block (encoder: Fourier features,
    proj_in, block_in, down blocks (causal strided conv + ResBlocks + attention), block_out, norm, proj_out;
    decoder: 1x1x1 conv_in, block_in, up blocks (ResBlocks + Linear depth-to-space), block_out, proj_out),
    so a diffusers checkpoint loads by renaming (`workbench.checkpoint.hf.mochi_vae`). Names differ where
    ours are simpler: a per-frame GroupNorm is an `nn.GroupNorm` subclass (`norm1.weight`, not
    `norm1.norm_layer.weight`); an attention layer owns its norm (`attentions.i.norm`) and its output
    projection is `to_out`, not `to_out.0`. The attention math goes through `workbench.nn.AttentionCore`
    with a causal MaskSpec. `encode` returns a `DiagonalGaussian`; `forward` returns (recon, posterior).
    `latents_mean` / `latents_std` are persistent buffers (saved with the weights): `init_weights` resets
    them to 0 / 1, and the training task sets them from the encoded training set.

Flavors
    "mochi": the real sizes: a 97.2M-parameter encoder and a 362.5M decoder (459.7M in all, counted on the
             meta device in the tests; the "362M" usually quoted for AsymmVAE is the decoder).
    "small": for the CPU: 4x spatial, 2x temporal, 4 latent channels, widths 16-24-32 (encoder) and
             24-32-32 (decoder), one ResBlock per stage, causal attention after the first stage as in Mochi;
             a 9 x 32 x 32 clip -> 5 x 8 x 8 x 4.
    "debug": a tiny "small" for tests.

Differences from the reference
    None in the math against diffusers' `AutoencoderKLMochi` with its defaults (one-shot encode/decode:
    parity at atol 1e-5 fp32 on tiny random configs, tests/parity/test_video_vae_parity.py; at the real
    sizes in benchmarks/video_vae.py). Not implemented: tiling, gradient checkpointing, diffusers' chunked
    GroupNorm (a memory saving, same math). Added: chunked encoding and decoding (`encode(x, chunk_frames=k)`,
    `decode(z, chunk_frames=k)`): each causal conv carries its unconsumed frames and each attention its past
    keys and values across chunks, so the result equals the one-shot one (diffusers' private framewise
    decoding instead switches the convs to zero spatial padding, and in diffusers 0.42 fails with a
    kernel-size error on a model built with replicate padding; it refuses framewise encoding).
    diffusers' KL sums over dims (1, 2, 3) only, which for 5-D latents leaves a (B, W) tensor; ours sums
    every non-batch dim.
    Against genmo's original (src/genmo/mochi_preview/vae/models.py): it fuses q, k, v into one `qkv`
    Linear (the same weights, concatenated) and normalizes q, k with eps 1e-12 (diffusers and we: 1e-5);
    its decoder drops t_i - 1 frames after every upsampling level where diffusers and we drop tf - 1 once at
    the end, which gives the same frame count but lets the middle levels see extra leading frames, so the
    first decoded frames can differ from genmo's on the same weights. We follow diffusers.

Sources
    genmo, "Mochi 1" (github.com/genmoai/mochi, src/genmo/mochi_preview/vae/models.py); diffusers
    autoencoder_kl_mochi.py, autoencoder_kl_cogvideox.py (CogVideoXCausalConv3d),
    attention_processor.py (MochiVaeAttnProcessor2_0); all read, none copied; Kingma & Welling, "Auto-Encoding
    Variational Bayes" (1312.6114).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import fail, field_
from workbench.models.diffusion.schedulers import randn
from workbench.nn.attention import AttentionCore, MaskSpec


@dataclass
class Config:
    in_channels: int = field_(3, gt=0)
    out_channels: int = field_(3, gt=0)
    latent_channels: int = field_(12, gt=0)
    encoder_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 384])
    decoder_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 768])
    # ResBlocks per stage: [block_in, level 1, ..., level L, block_out]; the decoder reads it reversed
    layers_per_block: list[int] = field(default_factory=lambda: [3, 3, 4, 6, 3])
    temporal_expansions: list[int] = field(default_factory=lambda: [1, 2, 3])
    spatial_expansions: list[int] = field(default_factory=lambda: [2, 2, 2])
    # causal temporal attention after each encoder ResBlock of a stage (same indexing as layers_per_block)
    encoder_attention: list[bool] = field(default_factory=lambda: [False, True, True, True, True])
    norm_num_groups: int = field_(32, gt=0)
    attention_head_dim: int = field_(32, gt=0)
    fourier_start: int = field_(6, doc="Fourier input features 2^f for f in [fourier_start, fourier_stop)")
    fourier_stop: int = field_(8, doc="equal to fourier_start: no Fourier features")

    def validate(self) -> None:
        levels = len(self.temporal_expansions)
        if levels < 1:
            fail("temporal_expansions", "must list at least one level")
        if len(self.spatial_expansions) != levels:
            fail("spatial_expansions", f"must have one entry per level ({levels}), got {len(self.spatial_expansions)}")
        for key in ("encoder_channels", "decoder_channels"):
            chans = getattr(self, key)
            if len(chans) != levels + 1:
                fail(key, f"must have levels + 1 = {levels + 1} entries, got {len(chans)}")
            for c in chans:
                if c <= 0 or c % self.norm_num_groups:
                    fail(key, f"{c} is not a positive multiple of norm_num_groups ({self.norm_num_groups})")
        for key in ("layers_per_block", "encoder_attention"):
            if len(getattr(self, key)) != levels + 2:
                fail(key, f"must have levels + 2 = {levels + 2} entries, got {len(getattr(self, key))}")
        if any(n < 1 for n in self.layers_per_block):
            fail("layers_per_block", f"every stage needs at least one ResBlock, got {self.layers_per_block}")
        for key in ("temporal_expansions", "spatial_expansions"):
            if any(f < 1 for f in getattr(self, key)):
                fail(key, f"factors must be >= 1, got {getattr(self, key)}")
        for i, on in enumerate(self.encoder_attention):
            c = self.encoder_channels[min(i, levels)]
            if on and c % self.attention_head_dim:
                fail("encoder_attention", f"stage {i} has {c} channels, not a multiple of attention_head_dim "
                                          f"({self.attention_head_dim})")
        if self.fourier_stop < self.fourier_start:
            fail("fourier_stop", f"must be >= fourier_start ({self.fourier_start}), got {self.fourier_stop}")

    @property
    def spatial_factor(self) -> int:
        return math.prod(self.spatial_expansions)

    @property
    def temporal_factor(self) -> int:
        return math.prod(self.temporal_expansions)


FLAVORS: dict[str, Config] = {
    # tests: about 30k parameters, 4x spatial, 2x temporal
    "debug": Config(latent_channels=4, encoder_channels=[8, 8, 8], decoder_channels=[8, 8, 8],
                    layers_per_block=[1, 1, 1, 1], temporal_expansions=[1, 2], spatial_expansions=[2, 2],
                    encoder_attention=[False, False, True, True], norm_num_groups=4, attention_head_dim=8),
    # CPU training on 9 x 32 x 32 moving shapes: 4x spatial, 2x temporal, 4 latent channels
    "small": Config(latent_channels=4, encoder_channels=[16, 24, 32], decoder_channels=[24, 32, 32],
                    layers_per_block=[1, 1, 1, 1], temporal_expansions=[1, 2], spatial_expansions=[2, 2],
                    encoder_attention=[False, True, True, True], norm_num_groups=8, attention_head_dim=8),
    # Mochi 1's AsymmVAE (diffusers AutoencoderKLMochi defaults): 8x spatial, 6x temporal, 12 channels
    "mochi": Config(),
}


class CausalConv3d(nn.Module):
    """A Conv3d that pads only the past in time (replicating the first frame) and replicates spatially."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        kt, kh, kw = kernel
        # (w_left, w_right, h_top, h_bottom, t_past, t_future): the future side is never padded
        self.padding = ((kw - 1) // 2, (kw - 1) // 2, (kh - 1) // 2, (kh - 1) // 2, kt - 1, 0)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride)
        # NEW: chunked encode / decode (`streaming`) sets this to a list holding the padded input frames of the
        # previous chunk that no output has consumed yet; None = one-shot
        self.stream: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.stream:
            # (B, C, T, H, W) -> (B, C, T + kt - 1, H + kh - 1, W + kw - 1): frame 0 repeated kt - 1 times in front
            x = F.pad(x, self.padding, mode="replicate")
        else:  # a later chunk: the previous chunk's unconsumed frames stand in for the past
            x = torch.cat([self.stream[0], F.pad(x, self.padding[:4] + (0, 0), mode="replicate")], dim=2)
        out = self.conv(x)
        if self.stream is not None:
            # the next output's window starts at frame T_out * stride: the last kt - 1 frames for stride 1,
            # nothing for kernel = stride when the chunk is aligned (a copy: a view would keep the chunk alive)
            self.stream[:] = [x[:, :, out.shape[2] * self.conv.stride[0]:].clone()]
        return out


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (C, H, W) of each frame separately, so statistics never mix frames (causal)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        h = x.transpose(1, 2).flatten(0, 1)  # (B, C, T, H, W) -> (B T, C, H, W)
        h = super().forward(h)
        return h.unflatten(0, (B, -1)).transpose(1, 2)  # (B, C, T, H, W)


class ResBlock3d(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))) with causal 3x3x3 convs; channels unchanged."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, c)
        self.conv1 = CausalConv3d(c, c, (3, 3, 3))
        self.norm2 = FrameGroupNorm(groups, c)
        self.conv2 = CausalConv3d(c, c, (3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class TemporalAttention(nn.Module):
    """x + to_out(causal attention over frames at each pixel), q and k L2-normalized per head."""

    def __init__(self, c: int, groups: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = c // head_dim, head_dim
        self.norm = FrameGroupNorm(groups, c)
        self.to_q = nn.Linear(c, c, bias=False)
        self.to_k = nn.Linear(c, c, bias=False)
        self.to_v = nn.Linear(c, c, bias=False)
        self.to_out = nn.Linear(c, c)
        self.core = AttentionCore(scale=head_dim**-0.5)
        # NEW: chunked encoding (`streaming`) sets this to a list holding the past frames' (k, v); None = one-shot
        self.stream: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        h = self.norm(x).permute(0, 3, 4, 2, 1).reshape(B * H * W, T, C)  # (B H W, T, C): one sequence per pixel
        if T == 1 and self.stream is None:
            # one frame attends only to itself: softmax = 1, out = v (the reference skips q and k too)
            out = self.to_out(self.to_v(h))  # (BHW, 1, C)
            return x + out.view(B, H, W, T, C).permute(0, 4, 3, 1, 2)
        q, k, v = (proj(h).view(B * H * W, T, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))  # (BHW, heads, T, D)
        # q, k <- q / |q|, k / |k| (per head; eps 1e-5 as the reference)
        q, k = F.normalize(q, dim=-1, eps=1e-5), F.normalize(k, dim=-1, eps=1e-5)
        past = 0
        if self.stream:  # a later chunk: the earlier frames' keys and values, like a decoder's KV cache
            k, v = torch.cat([self.stream[0][0], k], dim=2), torch.cat([self.stream[0][1], v], dim=2)  # (BHW, heads, P + T, D)
            past = k.shape[2] - T
        if self.stream is not None:
            self.stream[:] = [(k, v)]
        # out = softmax(q k^T / sqrt(D) + causal) v, the queries at slots past .. past + T - 1
        out = self.core(q, k, v, MaskSpec(causal=True), q_offset=past)  # (BHW, heads, T, D)
        out = self.to_out(out.transpose(1, 2).reshape(B * H * W, T, C))  # (BHW, T, C)
        return x + out.view(B, H, W, T, C).permute(0, 4, 3, 1, 2)  # (B, C, T, H, W)


def channels_last_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear over the channel axis of (B, C, T, H, W)."""
    return linear(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class Stage(nn.Module):
    """`layers` ResBlocks at one resolution, each optionally followed by causal temporal attention."""

    def __init__(self, c: int, layers: int, attention: bool, groups: int, head_dim: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock3d(c, groups) for _ in range(layers))
        self.attentions = nn.ModuleList(TemporalAttention(c, groups, head_dim) for _ in range(layers)) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        return x


class DownBlock(Stage):
    """A causal strided conv (kernel = stride = (t, s, s)) to the next width, then a Stage."""

    def __init__(self, cin: int, cout: int, layers: int, t: int, s: int, attention: bool, groups: int, head_dim: int):
        super().__init__(cout, layers, attention, groups, head_dim)
        self.conv_in = CausalConv3d(cin, cout, (t, s, s), stride=(t, s, s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, cin, T, H, W) -> (B, cout, (T - 1) / t + 1, H / s, W / s)
        return super().forward(self.conv_in(x))


class UpBlock(nn.Module):
    """ResBlocks, then a per-position Linear to cout t s s channels and depth-to-space."""

    def __init__(self, cin: int, cout: int, layers: int, t: int, s: int, groups: int):
        super().__init__()
        self.t, self.s = t, s
        self.resnets = nn.ModuleList(ResBlock3d(cin, groups) for _ in range(layers))
        self.proj = nn.Linear(cin, cout * t * s * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        x = channels_last_linear(self.proj, x)  # (B, cout t s s, T, H, W)
        B, _, T, H, W = x.shape
        t, s = self.t, self.s
        x = x.view(B, -1, t, s, s, T, H, W)  # channel index = ((c t + i) s + j) s + k
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, cout, T, t, H, s, W, s)
        return x.reshape(B, -1, T * t, H * s, W * s)  # (B, cout, T t, H s, W s)


def fourier_features(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[x, sin(2 pi 2^f x), cos(2 pi 2^f x)] over f in [start, stop), channel order (c, f); in float32."""
    if stop == start:
        return x
    dtype = x.dtype
    x = x.float()
    n = stop - start
    w = 2.0 ** torch.arange(start, stop, device=x.device, dtype=torch.float32) * (2 * math.pi)  # (n,)
    # h[:, c n + f] = x[:, c] * w[f]
    h = x.repeat_interleave(n, dim=1) * w.repeat(x.shape[1])[None, :, None, None, None]  # (B, C n, T, H, W)
    return torch.cat([x, torch.sin(h), torch.cos(h)], dim=1).to(dtype)  # (B, C (1 + 2 n), T, H, W)


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        ch, layers, attn, g, hd = (cfg.encoder_channels, cfg.layers_per_block, cfg.encoder_attention,
                                   cfg.norm_num_groups, cfg.attention_head_dim)
        self.fourier = (cfg.fourier_start, cfg.fourier_stop)
        cin = cfg.in_channels * (1 + 2 * (cfg.fourier_stop - cfg.fourier_start))
        self.proj_in = nn.Linear(cin, ch[0])
        self.block_in = Stage(ch[0], layers[0], attn[0], g, hd)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[i], ch[i + 1], layers[i + 1], cfg.temporal_expansions[i], cfg.spatial_expansions[i],
                      attn[i + 1], g, hd) for i in range(len(ch) - 1))
        self.block_out = Stage(ch[-1], layers[-1], attn[-1], g, hd)
        self.norm_out = FrameGroupNorm(g, ch[-1])
        self.proj_out = nn.Linear(ch[-1], 2 * cfg.latent_channels, bias=False)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = channels_last_linear(self.proj_in, fourier_features(x, *self.fourier))  # (B, ch0, T, H, W)
        h = self.block_in(h)
        for block in self.down_blocks:
            h = block(h)
        h = self.block_out(h)  # (B, ch[-1], T_lat, h, w)
        return channels_last_linear(self.proj_out, F.silu(self.norm_out(h)))  # (B, 2 C_z, T_lat, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        ch, layers, g, n = cfg.decoder_channels, cfg.layers_per_block, cfg.norm_num_groups, len(cfg.decoder_channels)
        self.conv_in = nn.Conv3d(cfg.latent_channels, ch[-1], 1)
        self.block_in = Stage(ch[-1], layers[-1], False, g, cfg.attention_head_dim)
        # up block i: ch[-i-1] -> ch[-i-2] with the factors of encoder level L - 1 - i
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[-i - 1], ch[-i - 2], layers[-i - 2], cfg.temporal_expansions[-i - 1],
                    cfg.spatial_expansions[-i - 1], g) for i in range(n - 1))
        self.block_out = Stage(ch[0], layers[0], False, g, cfg.attention_head_dim)
        self.proj_out = nn.Linear(ch[0], cfg.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.block_in(self.conv_in(z))  # (B, ch[-1], T_lat, h, w)
        for block in self.up_blocks:
            h = block(h)
        h = self.block_out(h)  # (B, ch0, T_lat tf, H, W)
        return channels_last_linear(self.proj_out, F.silu(h))  # no norm before the output (as the reference)


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))) from the encoder's moments (B, 2 C_z, T_lat, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C_z, T_lat, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # z = mean + std * eps
        return self.mean + self.std * randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over every non-batch dim: (B,)."""
        # KL = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class CausalVideoVAE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.spatial_factor = cfg.spatial_factor
        self.temporal_factor = cfg.temporal_factor
        self.latent_channels = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("latents_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latents_std", torch.ones(cfg.latent_channels))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The only initializer: PyTorch's defaults for every conv and linear (what diffusers uses), norms at
        ones / zeros, latent statistics at mean 0 / std 1. Safe after `to_empty()`."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear, nn.GroupNorm)):
                m.reset_parameters()
        self.latents_mean.zero_()
        self.latents_std.fill_(1.0)

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        """(T_lat, h, w) for a (T, H, W) clip; ValueError naming what is expected for a bad size."""
        tf, s = self.temporal_factor, self.spatial_factor
        if T < 1 or (T - 1) % tf:
            raise ValueError(f"video frames T={T}: expected T = {tf} k + 1 (k >= 0) for temporal factor {tf}, "
                             f"e.g. {tf * max((T - 1) // tf, 0) + 1} or {tf * (max((T - 1) // tf, 0) + 1) + 1}")
        for name, n in (("height H", H), ("width W", W)):
            if n < 1 or n % s:
                raise ValueError(f"video {name}={n}: expected a positive multiple of the spatial factor {s}")
        # T_lat = (T - 1) / tf + 1
        return (T - 1) // tf + 1, H // s, W // s

    def _check_video(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"video: expected (B, {self.cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        self.latent_shape(*x.shape[2:])

    @contextlib.contextmanager
    def streaming(self, module: nn.Module):
        """Within the block, every causal conv and attention of `module` carries its past from one call to the
        next (calls = consecutive chunks of one clip); the caches are dropped on exit, also after an error."""
        layers = [m for m in module.modules() if isinstance(m, (CausalConv3d, TemporalAttention))]
        for m in layers:
            m.stream = []
        try:
            yield
        finally:
            for m in layers:
                m.stream = None

    def encode(self, x: torch.Tensor, chunk_frames: int | None = None) -> DiagonalGaussian:
        """Videos (B, 3, T, H, W) in [-1, 1] -> the posterior over raw latents (B, C_z, T_lat, H/s, W/s).

        chunk_frames: encode that many latent frames at a time (input frames 0 .. tf (k - 1), then tf k
        frames per chunk), convs carrying their unconsumed frames and attention its past keys and values
        across chunks: equal to the one-shot encode, with activations for one chunk at a time."""
        self._check_video(x)
        T = x.shape[2]
        if chunk_frames is None or (T - 1) // self.temporal_factor + 1 <= chunk_frames:
            return DiagonalGaussian(self.encoder(x))
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames: expected a positive number of latent frames, got {chunk_frames}")
        tf = self.temporal_factor
        starts = [0, *range(1 + tf * (chunk_frames - 1), T, tf * chunk_frames)]
        with self.streaming(self.encoder):
            moments = [self.encoder(x[:, :, a:b]) for a, b in zip(starts, [*starts[1:], T])]  # (B, 2 C_z, k, h, w)
        return DiagonalGaussian(torch.cat(moments, dim=2))

    def decode(self, z: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Raw latents (B, C_z, T_lat, h, w) -> videos (B, 3, tf (T_lat - 1) + 1, h s, w s) in about [-1, 1].

        chunk_frames: decode that many latent frames at a time, each causal conv carrying its last kt - 1 input
        frames from one chunk to the next. The decoder has no attention and no temporal stride, so the result
        equals the one-shot decode while activations exist for one chunk only (how a long real-size clip fits in
        memory)."""
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latents: expected (B, {self.latent_channels}, T_lat, h, w), got {tuple(z.shape)}")
        if chunk_frames is None or chunk_frames >= z.shape[2]:
            x = self.decoder(z)  # (B, 3, T_lat tf, H, W)
        else:
            if chunk_frames < 1:
                raise ValueError(f"chunk_frames: expected a positive number of latent frames, got {chunk_frames}")
            with self.streaming(self.decoder):
                x = torch.cat([self.decoder(z[:, :, i:i + chunk_frames])  # (B, 3, chunk tf, H, W) each
                               for i in range(0, z.shape[2], chunk_frames)], dim=2)
        return x[:, :, self.temporal_factor - 1:]  # drop the tf - 1 frames before frame 0

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction through a posterior sample (or its mean), and the posterior (for a KL term)."""
        post = self.encode(x)
        z = post.sample(generator) if sample_posterior else post.mode()
        return self.decode(z), post

    def _stat(self, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return v.to(z.dtype).view(1, -1, 1, 1, 1)  # (1, C_z, 1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        # z' = (z - mean_c) / std_c
        return (z - self._stat(self.latents_mean, z)) / self._stat(self.latents_std, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        # z = z' std_c + mean_c
        return z * self._stat(self.latents_std, z) + self._stat(self.latents_mean, z)


Model = CausalVideoVAE
