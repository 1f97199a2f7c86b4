"""The KL autoencoder of latent diffusion: images <-> a small latent grid that the UNet diffuses in.

What it is
    Stable Diffusion's VAE (Rombach et al. 2022; diffusers' `AutoencoderKL`): a convolutional encoder that
    maps an image x (B, 3, H, W) in [-1, 1] to a diagonal Gaussian over latents (B, 4, H/f, W/f), f =
    2^(blocks - 1) (8 for SD), and a decoder back. Diffusion runs on scaled latents, which is what makes
    512 px generation affordable: the UNet sees 64 x 64 x 4 instead of 512 x 512 x 3.

The math
    moments = quant_conv(Enc(x)) = [mu, log sigma^2]          (B, 2 C_lat, h, w)
    log sigma^2 <- clamp(log sigma^2, -30, 20);  sigma = exp(log sigma^2 / 2)
    z ~ mu + sigma eps  (eps ~ N(0, I));   KL(q || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)
    diffusion latent  z' = (z - shift) * scale           (SD 1.x: scale 0.18215, shift 0;
                                                          SDXL 0.13025; SD3 1.5305 and shift 0.0609)
    decode            x  = Dec(post_quant_conv(z' / scale + shift))
    Enc: conv_in, per block [ResBlock x layers, stride-2 conv (zero-padded right/bottom) but the last],
         mid (ResBlock, single-head self-attention over all pixels, ResBlock), GN, SiLU, conv_out.
    Dec: conv_in, mid, per block (reversed widths) [ResBlock x (layers + 1), nearest 2x + conv but the
         last], GN, SiLU, conv_out.

The intuition
    The KL term is weighted so lightly in training that the latent is nearly deterministic (sigma is tiny)
    but not arbitrarily scaled; `scale` then brings the latent's standard deviation near 1 so that the
    diffusion schedule's unit-variance noise means the same thing as in pixel space.

Design choices
    Blocks come from `unet.py` (ResnetBlock2D without a time embedding, Downsample2D with padding 0,
    Upsample2D, SpatialSelfAttention with one head), the same modules diffusers shares. Names follow
    diffusers' except the mid-block attention's projections, nested in `.attn`, which the checkpoint
    adapter maps (`workbench.checkpoint.hf.diffusers_sd`, also from pre-0.14 `query/key/value/proj_attn`).
    `encode` returns the posterior (mean, std, sample(generator), mode, kl); `latents_from_images` /
    `images_from_latents` apply the scale and shift once each, so no caller can apply them twice.

Differences from the reference
    None in the math for the SD configurations (parity with diffusers' `AutoencoderKL` at atol 1e-5 fp32:
    posterior mean/std and decode). Not implemented: tiling and slicing for large images, the
    spatial-norm (MoVQ) decoder, `latents_mean` / `latents_std` per-channel normalization.

Sources
    Kingma & Welling, "Auto-Encoding Variational Bayes" (1312.6114); Rombach et al. (2112.10752); diffusers
    autoencoder_kl.py, vae.py (read, not copied).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import fail, field_
from workbench.models.diffusion.schedulers import randn
from workbench.models.diffusion.unet import Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D

EPS = 1e-6  # every norm of the VAE


@dataclass
class Config:
    in_channels: int = field_(3, gt=0)
    out_channels: int = field_(3, gt=0)
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = field_(2, gt=0)
    latent_channels: int = field_(4, gt=0)
    norm_num_groups: int = field_(32, gt=0)
    sample_size: int = field_(512, gt=0, doc="the trained image size (pixels)")
    scaling_factor: float = field_(0.18215, gt=0, doc="diffusion latent = (z - shift_factor) * scaling_factor")
    shift_factor: float = field_(0.0, doc="0 for SD 1.x/2.x/XL; 0.0609 for SD3")
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def validate(self) -> None:
        if not self.block_out_channels:
            fail("block_out_channels", "must list at least one block")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                fail("block_out_channels", f"{c} is not a multiple of norm_num_groups ({self.norm_num_groups})")

    @property
    def downscale(self) -> int:
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


FLAVORS: dict[str, Config] = {
    # tests: diffusers' tiny test VAE (models.md section 6), f = 2
    "debug": Config(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, sample_size=32),
    # Stable Diffusion 1.x / 2.x (about 84M parameters), f = 8
    "sd15": Config(),
}


class MidBlock(nn.Module):
    """ResBlock, single-head self-attention (optional), ResBlock; no time embedding."""

    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c, c, 0, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialSelfAttention(c, 1, groups, EPS)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, last: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, 0, groups, EPS) for i in range(layers))
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(cout, padding=0)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, last: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, 0, groups, EPS) for i in range(layers))
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i == n - 1) for i in range(n))
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        rch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rch[0], 3, padding=1)
        self.mid_block = MidBlock(rch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(rch[max(i - 1, 0)], rch[i], cfg.layers_per_block + 1, g, i == n - 1) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(g, rch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(std^2)) from the encoder's moments (B, 2 C, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # z = mean + std * eps
        return self.mean + self.std * randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, (B,)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        c = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The only initializer: PyTorch's defaults for every conv and linear (what diffusers uses), norms at
        ones/zeros. Safe after `to_empty()`."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm)):
                m.reset_parameters()

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, 3, H, W) in [-1, 1] -> the posterior over raw latents (B, C, H/f, W/f)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latents -> images in about [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def latents_from_images(self, x: torch.Tensor, generator: torch.Generator | None = None,
                            sample: bool = True) -> torch.Tensor:
        """Diffusion latents: z' = (z - shift) * scale, z drawn from the posterior (or its mean)."""
        post = self.encode(x)
        z = post.sample(generator) if sample else post.mode()
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def images_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse: decode(z' / scale + shift)."""
        return self.decode(latents / self.cfg.scaling_factor + self.cfg.shift_factor)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction through a posterior sample, and the posterior (for a KL term)."""
        post = self.encode(x)
        return self.decode(post.sample(generator)), post


Model = AutoencoderKL
