"""The Stable Diffusion UNet: a noise predictor eps_theta(x_t, t, c) over images or VAE latents.

What it is
    The conditional UNet of latent diffusion (Rombach et al. 2022), the network inside Stable Diffusion
    1.x/2.x, equivalent to diffusers' `UNet2DConditionModel` for the block types SD uses. It maps a noisy
    sample x_t (B, C, H, W), the timestep t (B,) and a context c (B, L, cross_attention_dim) (CLIP text
    states, or a small class/caption context) to a tensor of the same shape as x_t: the noise eps, the
    velocity v or the clean sample x0, whichever the schedule's `prediction_type` says (schedulers.py).

The math
    Timestep embedding (sinusoidal, `half = C0 / 2` frequencies, s = freq_shift):
        f_i  = exp(-ln(10000) * i / (half - s)),  i = 0 .. half-1
        e(t) = [cos(t f), sin(t f)]  (flip_sin_to_cos; else [sin, cos])
        temb = W2 SiLU(W1 e(t))                                  (B, 4 C0)
    ResBlock (x of shape (B, Cin, H, W)):
        h = Conv3(SiLU(GN(x)));  h = h + Lin(SiLU(temb))[:, :, None, None]
        out = (Skip(x) + Conv3(Dropout(SiLU(GN(h))))) / output_scale     Skip = 1x1 conv when Cin != Cout
    Spatial transformer (x of shape (B, C, H, W), N = H W tokens of width C, heads H, head width C / H):
        u = proj_in(GN_1e-6(x))        (1x1 conv, or Linear after flattening: use_linear_projection)
        u = u + SelfAttn(LN(u));  u = u + CrossAttn(LN(u), c);  u = u + W_o (a * GELU(g)), [a, g] = W_i LN(u)
        out = x + proj_out(u)
    Attention: softmax(q k^T / sqrt(D)) v through `workbench.nn.attention.AttentionCore` with a full
    (non-causal) mask spec: keys are the N pixels (self) or the L context tokens (cross).
    Shape of the net: conv_in; down blocks ([ResBlock (+ transformer)] x layers_per_block, then a stride-2
    conv except in the last block), each output kept as a skip; a mid block (ResBlock, transformer,
    ResBlock); up blocks (layers_per_block + 1 ResBlocks, each taking one skip concatenated on channels,
    then nearest 2x upsampling + conv except in the last block); GN, SiLU, conv_out.

The intuition
    Convolutions carry local detail at every scale; the transformers at the lower resolutions let every
    pixel read every other one (self-attention) and the prompt (cross-attention); the skips hand the fine
    detail from the way down straight to the way up, so the bottleneck only has to carry global structure.
    The timestep enters every ResBlock as a per-channel bias: the same weights denoise every noise level.

Design choices
    Module names follow diffusers' (`down_blocks.i.resnets.j.conv1`, `attentions.j.transformer_blocks.k.
    attn2.to_q`, ...) so the checkpoint adapter (`workbench.checkpoint.hf.diffusers_sd`) only renames
    three things: diffusers' `to_out.0` is `to_out` here, `ff.net.0.proj` is `ff.proj` and `ff.net.2` is
    `ff.out` (diffusers keeps dropouts in those lists).
    `Config.attention_heads` is diffusers' `attention_head_dim`, which in `UNet2DConditionModel` is the
    number of heads per block (SD 1.x: 8 everywhere; SD 2.x: 5, 10, 20, 20); the head width is the block's
    channels divided by it. diffusers' `UNetMidBlock2D` inside this UNet is a single ResBlock (no
    attention), and so it is here.
    Block types are the ones SD uses: "DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D",
    "CrossAttnUpBlock2D"; mid "UNetMidBlock2DCrossAttn", "UNetMidBlock2D" or "none". A UNet without any
    cross-attention block needs no context (pixel-space DDPM); `ClassContext` turns class labels into a
    one-token context (with a learned null class for classifier-free guidance), the small conditioning
    part D's training uses.
    `__init__` allocates nothing under `torch.device("meta")`; `init_weights()` is the only initializer.

    Published API (used by the diffusion training, part D):
        cfg = Config(...) or FLAVORS["debug"];  unet = UNet(cfg)
        out = unet(x_t, t, context)      x_t (B, in_channels, H, W), t (B,) or scalar, context (B, L, Dc)|None
        ClassContext(num_classes, dim)(labels) -> (B, 1, dim) context; label == num_classes is "no class"

Differences from the reference
    None in the forward math for the supported block types (parity with diffusers' `UNet2DConditionModel`
    at atol 1e-5 fp32, tests/parity/test_diffusion_hf.py). Not implemented: class/addition embeddings
    (SDXL's text_time), GLIGEN, dual cross-attention, `resnet_time_scale_shift="scale_shift"`,
    `only_cross_attention`, `time_cond_proj_dim` (LCM). Initialization is LDM's (zeroed output convs),
    not PyTorch's default that diffusers leaves in place.

Sources
    Ho et al., "Denoising Diffusion Probabilistic Models", arXiv 2006.11239; Rombach et al., "High-Resolution
    Image Synthesis with Latent Diffusion Models", arXiv 2112.10752; diffusers unet_2d_condition.py,
    unet_2d_blocks.py, resnet.py, attention.py, embeddings.py, transformer_2d.py (read, not copied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import fail, field_
from workbench.nn.attention import AttentionCore, MaskSpec

DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", "none")
FULL = MaskSpec(causal=False)  # every query sees every key


@dataclass
class Config:
    in_channels: int = field_(4, gt=0, doc="channels of x_t (4 for SD latents, 3 for pixels)")
    out_channels: int = field_(4, gt=0)
    sample_size: int = field_(64, gt=0, doc="the trained height/width of x_t (latent pixels for SD)")
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    down_block_types: list[str] = field(default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    layers_per_block: int = field_(2, gt=0)
    transformer_layers_per_block: int = field_(1, gt=0)
    attention_heads: list[int] = field_([8, 8, 8, 8], doc="heads per block (diffusers' attention_head_dim)")
    cross_attention_dim: int = field_(768, ge=0, doc="context width; 0 = no cross-attention blocks")
    use_linear_projection: bool = False
    norm_num_groups: int = field_(32, gt=0)
    norm_eps: float = field_(1e-5, gt=0)
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = field_(1, ge=0)
    mid_block_scale_factor: float = field_(1.0, gt=0)
    dropout: float = field_(0.0, ge=0, lt=1)

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            fail("block_out_channels", "must list at least one block")
        for key in ("down_block_types", "up_block_types", "attention_heads"):
            if len(getattr(self, key)) != n:
                fail(key, f"must have one entry per block_out_channels ({n}), got {getattr(self, key)}")
        for key, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
            for name in getattr(self, key):
                if name not in allowed:
                    fail(key, f"unknown block {name!r} (expected one of {', '.join(allowed)})")
        if self.mid_block_type not in MID_TYPES:
            fail("mid_block_type", f"unknown block {self.mid_block_type!r} (expected one of {', '.join(MID_TYPES)})")
        uses_cross = any("CrossAttn" in b for b in self.down_block_types + self.up_block_types + [self.mid_block_type])
        if uses_cross and self.cross_attention_dim <= 0:
            fail("cross_attention_dim", "must be > 0 when a CrossAttn block is used")
        for c, h in zip(self.block_out_channels, self.attention_heads):
            if c % self.norm_num_groups:
                fail("block_out_channels", f"{c} is not a multiple of norm_num_groups ({self.norm_num_groups})")
            if h <= 0 or c % h:
                fail("attention_heads", f"{h} heads must divide the block's channels ({c})")

    @property
    def uses_context(self) -> bool:
        return any("CrossAttn" in b for b in self.down_block_types + self.up_block_types + [self.mid_block_type])


FLAVORS: dict[str, Config] = {
    # tests and smoke runs: diffusers' tiny test UNet (models.md section 6), 1.4M parameters
    "debug": Config(sample_size=32, block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_heads=[2, 2],
                    cross_attention_dim=32),
    # Stable Diffusion 1.x: 859.5M parameters
    "sd15": Config(),
    # Stable Diffusion 2.x (768-v and base): heads 5/10/20/20 of width 64, linear projections, OpenCLIP-H context
    "sd2": Config(sample_size=96, attention_heads=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True),
}


# ------------------------------------------------------------------------------------------------ pieces


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim), float32."""
    half = dim // 2
    # f_i = exp(-ln(max_period) * i / (half - freq_shift))
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    angles = t[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb  # (B, dim)


class TimestepEmbedding(nn.Module):
    """temb = linear_2(SiLU(linear_1(e(t))))."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(e)))


class ResnetBlock2D(nn.Module):
    """Two GN-SiLU-conv layers with the timestep added in between; also the VAE's block (temb_dim=0)."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, eps: float, dropout: float = 0.0,
                 output_scale: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # h = Conv3(SiLU(GN(x)))
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            # h += Lin(SiLU(temb)), one bias per channel
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        # out = (Skip(x) + h) / output_scale
        return (skip + h) / self.output_scale


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv; padding 0 means asymmetric (0, 1, 0, 1) zero padding first (the VAE's)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to `size`, when the skip it meets is odd-sized), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention of x (B, N, dim) over itself or over a context (B, L, context_dim)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, bias: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)  # on the output, as diffusers' to_out.1
        self.core = AttentionCore(scale=head_dim**-0.5)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        ctx = x if context is None else context
        H, D = self.heads, self.head_dim
        q = self.to_q(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        k = self.to_k(ctx).view(B, ctx.shape[1], H, D).transpose(1, 2)  # (B, H, L, D)
        v = self.to_v(ctx).view(B, ctx.shape[1], H, D).transpose(1, 2)  # (B, H, L, D)
        out = self.core(q, k, v, FULL).transpose(1, 2).reshape(B, N, H * D)  # (B, N, H*D)
        return self.dropout(self.to_out(out))


class SpatialSelfAttention(nn.Module):
    """x + Attn(GN(x)) over the H W pixels of x (B, C, H, W): the VAE's and the plain mid block's attention."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float, output_scale: float = 1.0):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.attn = Attention(channels, heads, channels // heads, bias=True)
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = self.attn(h).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return (x + h) / self.output_scale


class GEGLUFeedForward(nn.Module):
    """W_o (a * GELU(g)) with [a, g] = W_i x: the transformer's feed-forward, inner width 4 dim."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.proj(x).chunk(2, dim=-1)  # (B, N, 4 dim) each
        return self.out(self.dropout(a * F.gelu(g)))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # self-attention over the pixels
        x = x + self.attn2(self.norm2(x), context)  # cross-attention to the context
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """The spatial transformer: GN, proj_in, transformer blocks on the H W tokens, proj_out, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, layers: int, groups: int, linear_proj: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear_proj else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, dropout) for _ in range(layers))
        self.proj_out = nn.Linear(channels, channels) if linear_proj else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear_proj:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, C)
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        else:
            h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous())  # (B, C, H, W)
        return x + h


# ------------------------------------------------------------------------------------------------ blocks


class DownBlock(nn.Module):
    """layers x (ResBlock [+ transformer]), then a stride-2 conv unless last; returns every output as a skip."""

    def __init__(self, cfg: Config, cin: int, cout: int, heads: int, cross: bool, last: bool, temb_dim: int):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if i == 0 else cout, cout, temb_dim, g, eps, cfg.dropout) for i in range(cfg.layers_per_block))
        self.attentions = nn.ModuleList(
            Transformer2DModel(cout, heads, cfg.cross_attention_dim, cfg.transformer_layers_per_block, g,
                               cfg.use_linear_projection, cfg.dropout) for _ in range(cfg.layers_per_block)
        ) if cross else None
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(cout, cfg.downsample_padding)])

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """(layers + 1) x (concat a skip, ResBlock [+ transformer]), then 2x upsampling unless last."""

    def __init__(self, cfg: Config, cin: int, cout: int, cprev: int, heads: int, cross: bool, last: bool,
                 temb_dim: int):
        super().__init__()
        g, eps, n = cfg.norm_num_groups, cfg.norm_eps, cfg.layers_per_block + 1
        # resnet i reads the running stream (cprev for the first, cout after) plus one skip: the skips come
        # back in reverse, the last one being the previous (shallower) block's output, cin channels
        self.resnets = nn.ModuleList(
            ResnetBlock2D((cprev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, temb_dim, g, eps,
                          cfg.dropout) for i in range(n))
        self.attentions = nn.ModuleList(
            Transformer2DModel(cout, heads, cfg.cross_attention_dim, cfg.transformer_layers_per_block, g,
                               cfg.use_linear_projection, cfg.dropout) for _ in range(n)
        ) if cross else None
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(cout)])

    def forward(self, x, skips: list[torch.Tensor], temb, context, up_size=None):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, up_size)
        return x


class MidBlock(nn.Module):
    """ResBlock, spatial transformer, ResBlock ("UNetMidBlock2DCrossAttn"); or one ResBlock ("UNetMidBlock2D",
    which diffusers' conditional UNet builds with no attention layer)."""

    def __init__(self, cfg: Config, temb_dim: int):
        super().__init__()
        c, g, eps, s = cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        cross = cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
        self.resnets = nn.ModuleList(ResnetBlock2D(c, c, temb_dim, g, eps, cfg.dropout, s) for _ in range(1 + cross))
        self.attentions = nn.ModuleList([Transformer2DModel(c, cfg.attention_heads[-1], cfg.cross_attention_dim,
                                                            cfg.transformer_layers_per_block, g,
                                                            cfg.use_linear_projection, cfg.dropout)] if cross else [])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class ClassContext(nn.Module):
    """Class labels (B,) -> a one-token context (B, 1, dim) for the cross-attention; label `num_classes` is the
    learned "no class" embedding that classifier-free guidance trains by dropping labels."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def init_weights(self) -> None:
        nn.init.normal_(self.embedding.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)[:, None, :]  # (B, 1, dim)


# ------------------------------------------------------------------------------------------------ model


class UNet(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        ch = cfg.block_out_channels
        temb_dim = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, ch[i]
            self.down_blocks.append(DownBlock(cfg, cin, cout, cfg.attention_heads[i], kind == "CrossAttnDownBlock2D",
                                              i == len(ch) - 1, temb_dim))
        self.mid_block = None if cfg.mid_block_type == "none" else MidBlock(cfg, temb_dim)
        self.up_blocks = nn.ModuleList()
        rch, rheads = ch[::-1], cfg.attention_heads[::-1]
        cout = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            cprev, cout = cout, rch[i]
            cin = rch[min(i + 1, len(ch) - 1)]
            self.up_blocks.append(UpBlock(cfg, cin, cout, cprev, rheads[i], kind == "CrossAttnUpBlock2D",
                                          i == len(ch) - 1, temb_dim))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The only initializer (LDM's), safe to call again after `to_empty()`:

        | parameter                                         | init                          |
        |---------------------------------------------------|-------------------------------|
        | every Conv2d / Linear                             | PyTorch's default (Kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))) |
        | ResBlock conv2, transformer proj_out, conv_out    | zeros                         |
        | GroupNorm / LayerNorm                             | ones, zeros                   |

        Zeroing the last layer of every residual branch makes each block the identity at step 0 and the
        network's output 0 (LDM's `zero_module`), which trains stably from scratch.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)):
                m.reset_parameters()
        for m in self.modules():
            if isinstance(m, ResnetBlock2D):
                nn.init.zeros_(m.conv2.weight), nn.init.zeros_(m.conv2.bias)
            if isinstance(m, Transformer2DModel):
                nn.init.zeros_(m.proj_out.weight), nn.init.zeros_(m.proj_out.bias)
        nn.init.zeros_(self.conv_out.weight), nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, H, W), t (B,) or a scalar, context (B, L, cross_attention_dim) -> (B, out_channels, H, W)."""
        cfg = self.cfg
        if cfg.uses_context and context is None:
            raise ValueError("this UNet has cross-attention blocks: pass a context (B, L, cross_attention_dim)")
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(1).expand(B) if t.ndim == 0 else t.expand(B)  # (B,)
        e = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype)
        temb = self.time_embedding(e)  # (B, 4 C0)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, out = block(h, temb, context)
            skips.extend(out)
        if self.mid_block is not None:
            h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            # an odd-sized level (H not a multiple of 2^downsamplers) upsamples to the next skip's size
            up_size = skips[-1].shape[2:] if skips and block.upsamplers is not None else None
            h = block(h, mine, temb, context, up_size)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


Model = UNet
