"""Temporal attention for video diffusion: AnimateDiff motion modules, a UNet with them, VideoLDM blending.

What it is
    Three ways of turning a text-to-image diffusion model into a video model by adding layers that mix
    information *across frames* while the image layers keep working on each frame alone:
    1. `MotionModule`, AnimateDiff's temporal transformer (Guo et al. 2023; diffusers'
       `AnimateDiffTransformer3D`): every pixel position of every video becomes a sequence of T frame
       tokens, and a small transformer attends along that sequence.
    2. `VideoUNet`, AnimateDiff's inflated UNet (diffusers' `UNetMotionModel`): the image UNet of unet.py
       with a motion module after every spatial ResBlock (+ transformer) pair of the down and up blocks and,
       optionally, in the mid block. The image layers see the frames folded into the batch.
    3. `AlphaBlender`, `SpatioTemporalTransformer` and `SpatioTemporalResBlock`, VideoLDM's learned mixing
       (Blattmann et al. 2023; diffusers' `AlphaBlender`, `TransformerSpatioTemporalModel` and
       `SpatioTemporalResBlock`, used by Stable Video Diffusion): a temporal branch runs beside the spatial
       one and the two are blended by a learned scalar.

The math
    Motion module, x of shape (B T, C, H, W) (frames folded into the batch, video-major):
        u = GN_1e-6(x) with the statistics of each group over (T, H, W) of one video
        u: (B T, C, H, W) -> (B H W, T, C)             one sequence of T frame tokens per pixel
        u = proj_in(u)
        per block, P = sinusoidal positions over frames (max_seq_length of them):
            u = u + SelfAttn(LN(u) + P);  u = u + SelfAttn(LN(u) + P);  u = u + W_o (a * GELU(g)), [a, g] = W_i LN(u)
        out = x + proj_out(u)  reshaped back to (B T, C, H, W)
        P[t, 2i] = sin(t w_i),  P[t, 2i + 1] = cos(t w_i),  w_i = 10000^(-2i / C)
    VideoLDM blend of a spatial output z_s and a temporal output z_t (alpha per video frame):
        alpha = m                    ("fixed": m is a constant buffer, used as alpha as it is)
        alpha = sigmoid(m)           ("learned")
        alpha = 1 if the frame is an image-only frame else sigmoid(m)     ("learned_with_images")
        alpha <- 1 - alpha           (switch_spatial_to_temporal_mix, SVD's temporal VAE decoder)
        z = alpha z_s + (1 - alpha) z_t
    Spatio-temporal transformer (x (B T, C, H, W), context c (B T, L, Dc)), per layer:
        h = SpatialBlock(h, c)                    (unet.BasicTransformerBlock on the H W tokens of a frame)
        m = h + E(frame index)                    E = Linear-SiLU-Linear of the sinusoidal frame embedding
        m = TemporalBlock(m, c_first)             along T for every pixel; c_first = each video's frame-0 context
        h = Blend(h, m)
        out = x + proj_out(h)
    Temporal block (sequence (B H W, T, C)):  h = h + GEGLU_in(LN(h)); h = h + SelfAttn(LN(h));
        h = h + CrossAttn(LN(h), c_first); h = h + GEGLU(LN(h)).
    Spatio-temporal ResBlock: z_s = ResBlock2D(x, temb) per frame; z_t = ResBlock with (3, 1, 1) convolutions
        over (B, C, T, H, W) (each pixel reads itself in the neighbouring frames); out = Blend(z_s, z_t).

The intuition
    A pretrained image model already knows what a frame should look like; what it lacks is agreement
    between frames. A motion module reads, for each pixel position, that position's features in every
    frame and writes back a correction, so frames can agree on where an object is and how it moves. Its
    `proj_out` starts at zero, so the inflated network computes exactly the image model on every frame:
    training starts from a working image generator and only has to learn motion. The sinusoidal frame
    positions let attention (otherwise permutation-invariant) know the order of frames. VideoLDM gets the
    same "start as the image model" property differently: the blend alpha can be pushed towards the
    spatial branch, and image-only batches (T = 1 "videos") force alpha = 1 so the temporal layers are
    trained on videos only while images keep training the spatial ones.

Design choices
    Everything reuses unet.py's pieces: `Attention` (through `workbench.nn.attention.AttentionCore` with the
    full mask spec: temporal attention sees every frame, like AnimateDiff's; a causal spec would be a
    one-line change), `GEGLUFeedForward`, `BasicTransformerBlock`, `timestep_embedding`, and the UNet itself:
    `VideoUNet` subclasses `unet.UNet` and adds a `motion_modules` list to each of its blocks, so module
    names follow diffusers' `UNetMotionModel` (`down_blocks.i.motion_modules.j.transformer_blocks.k.attn1.
    to_q`, ...) and a diffusers checkpoint maps through `diffusers_sd.rename_from_diffusers` unchanged (the
    three renames of the SD adapter; the spatio-temporal transformer's `ff_in` adds two patterns there).
    The frame positions `pos_embed.pe` are a persistent buffer, as in diffusers, so state dicts match key
    for key; `init_weights()` recomputes them.
    Frames fold into the batch video-major (index b T + t), as diffusers does, so the image layers of a
    `VideoUNet` run on a (B T, ...) batch exactly as the image UNet would on the same stack of frames.
    `Config` here is the motion adapter's configuration (what diffusers' `MotionAdapter` holds); the image
    part is a `unet.Config`. There is one motion module per spatial layer (diffusers requires the adapter's
    `motion_layers_per_block` to equal the UNet's `layers_per_block`), so that number is not a field.
    A text context may be given per video (B, L, D) and is then repeated over the frames, or per frame
    (B T, L, D), which is what diffusers' `UNetMotionModel` expects (its pipeline repeats it).

Differences from the reference
    None in the forward math (parity with diffusers' `AnimateDiffTransformer3D`, `UNetMotionModel`,
    `AlphaBlender` and `TransformerSpatioTemporalModel` at atol 1e-5 fp32, tests/parity/test_temporal_hf.py).
    Initialization: `proj_out` of every motion module is zeroed, as AnimateDiff's `zero_module` does;
    diffusers leaves PyTorch's default there, so a freshly built diffusers `MotionAdapter` changes the image
    model's output before any training. The frame positions are cast to the activations' dtype (diffusers
    adds the fp32 table, which promotes half-precision activations). Not implemented: the PIA conv_in
    adapter, SDXL addition embeddings, FreeU, motion LoRA, `temporal_double_self_attention=False`, per-block
    lists of temporal transformer layers (one count for all blocks here), the whole SVD UNet (its blocks are
    here), a mid block without cross-attention in a `VideoUNet` that has mid-block motion modules (diffusers
    has no such block either). Initialization of the VideoLDM blocks: their `proj_out` (transformer) and the
    temporal ResBlock's `conv2` are zeroed so a new block is the spatial layer alone; diffusers uses
    PyTorch's defaults there.

Sources
    Guo et al., "AnimateDiff: Animate Your Personalized Text-to-Image Diffusion Models without Specific
    Tuning", arXiv 2307.04725; Blattmann et al., "Align your Latents: High-Resolution Video Synthesis with
    Latent Diffusion Models" (VideoLDM), arXiv 2304.08818; Blattmann et al., "Stable Video Diffusion",
    arXiv 2311.15127; diffusers unet_motion_model.py, attention.py (BasicTransformerBlock,
    TemporalBasicTransformerBlock), embeddings.py (SinusoidalPositionalEmbedding), resnet.py (AlphaBlender),
    transformer_temporal.py (read, not copied).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import fail, field_
from workbench.models.diffusion import unet as unet_mod
from workbench.models.diffusion.unet import Attention, BasicTransformerBlock, GEGLUFeedForward

timestep_embedding = unet_mod.timestep_embedding

MERGE_STRATEGIES = ("fixed", "learned", "learned_with_images")


@dataclass
class Config:
    """The motion adapter: what is added to an image UNet (diffusers' `MotionAdapter` fields)."""

    motion_num_attention_heads: list[int] = field_([8], doc="heads per block (down order); one entry = all blocks")
    motion_transformer_layers_per_block: int = field_(1, gt=0, doc="transformer blocks in each motion module")
    motion_transformer_layers_per_mid_block: int = field_(1, gt=0)
    motion_max_seq_length: int = field_(32, gt=0, doc="frames the sinusoidal positions cover (the most frames)")
    use_motion_mid_block: bool = True

    def heads(self, n_blocks: int) -> list[int]:
        h = self.motion_num_attention_heads
        return list(h) * n_blocks if len(h) == 1 else list(h)

    def validate(self, image: unet_mod.Config | None = None) -> None:
        if not self.motion_num_attention_heads or any(h <= 0 for h in self.motion_num_attention_heads):
            fail("motion_num_attention_heads", f"expected one or more head counts > 0, got {self.motion_num_attention_heads}")
        if image is None:
            return
        n = len(image.block_out_channels)
        if len(self.motion_num_attention_heads) not in (1, n):
            fail("motion_num_attention_heads", f"expected 1 entry or one per block ({n}), got {self.motion_num_attention_heads}")
        for c, h in zip(image.block_out_channels, self.heads(n)):
            if c % h or c % 2:
                fail("motion_num_attention_heads", f"{h} heads must divide the block's channels ({c}), an even number")
        if self.use_motion_mid_block and image.mid_block_type != "UNetMidBlock2DCrossAttn":
            fail("use_motion_mid_block", f"needs the image UNet's mid block to be UNetMidBlock2DCrossAttn, "
                                         f"got {image.mid_block_type!r} (set use_motion_mid_block = false)")


FLAVORS: dict[str, Config] = {
    # tests and CPU runs, on top of unet.FLAVORS["debug"] (channels 32, 64): heads of width 16 and 32
    "debug": Config(motion_num_attention_heads=[2]),
    # diffusers' MotionAdapter() defaults (8 heads, 32 frame positions, a mid-block module), for unet "sd15"
    "sd15": Config(),
}


# ------------------------------------------------------------------------------------------------ pieces


def sinusoidal_table(length: int, dim: int, device=None) -> torch.Tensor:
    """P (1, length, dim): P[t, 2i] = sin(t w_i), P[t, 2i+1] = cos(t w_i), w_i = 10000^(-2i/dim)."""
    pos = torch.arange(length, device=device)[:, None]  # (length, 1)
    # w_i = exp(-ln(10000) 2i / dim)
    w = torch.exp(torch.arange(0, dim, 2, device=device) * (-math.log(10000.0) / dim))  # (dim / 2,)
    pe = torch.zeros(1, length, dim, device=device)
    pe[0, :, 0::2] = torch.sin(pos * w)
    pe[0, :, 1::2] = torch.cos(pos * w)
    return pe


class FramePositions(nn.Module):
    """Adds the sinusoidal position of each frame to a (N, T, dim) sequence (diffusers' `pos_embed.pe`)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the frame positions need an even width, got {dim}")
        self.dim, self.max_len = dim, max_len
        self.register_buffer("pe", sinusoidal_table(max_len, dim))  # persistent: diffusers saves it

    @torch.no_grad()
    def reset(self) -> None:
        self.pe.copy_(sinusoidal_table(self.max_len, self.dim, self.pe.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"{T} frames, but the motion module's positions cover motion_max_seq_length = {self.max_len}")
        return x + self.pe[:, :T].to(x.dtype)


class MotionTransformerBlock(nn.Module):
    """Two temporal self-attentions and a GEGLU feed-forward, frame positions added before each attention
    (diffusers' BasicTransformerBlock with double_self_attention=True, positional_embeddings="sinusoidal")."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.pos_embed = FramePositions(dim, max_len)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # u (B H W, T, dim): attention runs along T only
        u = u + self.attn1(self.pos_embed(self.norm1(u)))  # u += SelfAttn(LN(u) + P)
        u = u + self.attn2(self.pos_embed(self.norm2(u)))  # u += SelfAttn(LN(u) + P)
        return u + self.ff(self.norm3(u))


class MotionModule(nn.Module):
    """AnimateDiff's temporal transformer on x (B T, C, H, W); the identity while proj_out is zero."""

    def __init__(self, channels: int, heads: int, layers: int, groups: int, max_len: int = 32):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{heads} motion heads must divide the channels ({channels})")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(MotionTransformerBlock(channels, heads, max_len) for _ in range(layers))
        self.proj_out = nn.Linear(channels, channels)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's defaults for the linears and norms, the frame table recomputed, and proj_out = 0 (the
        zero-initialised output: a new module adds exactly nothing)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.GroupNorm, nn.LayerNorm)):
                m.reset_parameters()
            if isinstance(m, FramePositions):
                m.reset()
        nn.init.zeros_(self.proj_out.weight), nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        BT, C, H, W = x.shape
        T = num_frames
        if BT % T:
            raise ValueError(f"a batch of {BT} frames does not split into videos of num_frames = {T}")
        B = BT // T
        u = x.view(B, T, C, H, W).permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)
        u = self.norm(u)  # group statistics over (T, H, W) of each video
        u = u.permute(0, 3, 4, 2, 1).reshape(B * H * W, T, C)  # (B H W, T, C): one frame sequence per pixel
        u = self.proj_in(u)
        for block in self.transformer_blocks:
            u = block(u)
        u = self.proj_out(u)  # (B H W, T, C)
        u = u.reshape(B, H, W, T, C).permute(0, 3, 4, 1, 2).reshape(BT, C, H, W)  # (B T, C, H, W)
        # out = x + proj_out(u)
        return x + u


# ------------------------------------------------------------------------------------------------ model


def _fold_context(context: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """A context per video (B, L, D) -> per frame (B T, L, D); a per-frame one is returned as it is."""
    if context is None or context.shape[0] == B * T:
        return context
    if context.shape[0] == B:
        return context.repeat_interleave(T, dim=0)  # (B T, L, D), video-major like the frames
    raise ValueError(f"context has batch {context.shape[0]}: expected {B} (one per video) or {B * T} (one per frame)")


class VideoUNet(unet_mod.UNet):
    """The image UNet with a motion module after each spatial layer: (B, C, T, H, W) in and out.

    Module names are diffusers' `UNetMotionModel`'s; `image_state` keys are exactly `unet.UNet`'s."""

    def __init__(self, cfg: unet_mod.Config, motion: Config):
        super().__init__(cfg)  # the image layers (initialized unless on the meta device)
        motion.validate(cfg)
        self.motion_cfg = motion
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        heads, layers, L = motion.heads(n), motion.motion_transformer_layers_per_block, motion.motion_max_seq_length
        # NEW: one motion module per ResBlock, in every down and up block (and the mid block)
        for i, block in enumerate(self.down_blocks):
            block.motion_modules = nn.ModuleList(MotionModule(ch[i], heads[i], layers, g, L) for _ in block.resnets)
        if motion.use_motion_mid_block:
            self.mid_block.motion_modules = nn.ModuleList(
                MotionModule(ch[-1], heads[-1], motion.motion_transformer_layers_per_mid_block, g, L)
                for _ in self.mid_block.attentions)
        for i, block in enumerate(self.up_blocks):
            block.motion_modules = nn.ModuleList(
                MotionModule(ch[::-1][i], heads[::-1][i], layers, g, L) for _ in block.resnets)

    @torch.no_grad()
    def init_weights(self) -> None:
        """unet.UNet's initializer for the image layers, then each motion module's (proj_out = 0)."""
        super().init_weights()
        for m in self.modules():
            if isinstance(m, MotionModule):
                m.init_weights()

    @classmethod
    def from_image_unet(cls, image: unet_mod.UNet, motion: Config) -> VideoUNet:
        """A video UNet holding a copy of `image`'s weights and new motion modules: before any training it
        computes exactly `image` on every frame."""
        p = next(image.parameters())
        with torch.device(p.device):
            video = cls(copy.deepcopy(image.cfg), motion).to(p.dtype)
        video._load_part(image.state_dict(), video.image_state_dict(), "the image UNet's weights", "its cfg")
        return video

    def _load_part(self, sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], what: str, needs: str) -> None:
        """Load `sd` into the part of this model whose tensors are `own` after checking names and shapes."""
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or extra:
            raise ValueError(f"{what} do not fit {needs}: missing {missing[:3]}, unexpected {extra[:3]}")
        for k, v in sd.items():
            if v.shape != own[k].shape:
                raise ValueError(f"{what}: tensor {k!r} has shape {tuple(v.shape)}, {needs} needs "
                                 f"{tuple(own[k].shape)}")
        self.load_state_dict(sd, strict=False)

    def motion_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters AnimateDiff trains (the motion modules'); everything else is the image model."""
        for name, p in self.named_parameters():
            if ".motion_modules." in name:
                yield p

    def freeze_image_layers(self) -> None:
        """requires_grad only on the motion modules (diffusers' `freeze_unet2d_params`)."""
        for name, p in self.named_parameters():
            p.requires_grad_(".motion_modules." in name)

    def motion_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the motion modules' tensors (what a diffusers MotionAdapter checkpoint holds, same names)."""
        return {k: v for k, v in self.state_dict().items() if ".motion_modules." in k}

    def image_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the image layers' tensors: loads into a `unet.UNet` of the same config."""
        return {k: v for k, v in self.state_dict().items() if ".motion_modules." not in k}

    def load_motion_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Loads exactly the motion modules' tensors (names as `motion_state_dict`'s); errors name a key."""
        self._load_part(sd, self.motion_state_dict(), "motion weights", "the config")

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, T, H, W), t (B,) or a scalar, context (B, L, D) or (B T, L, D) -> (B, out_channels, T, H, W)."""
        cfg = self.cfg
        if x.ndim != 5:
            raise ValueError(f"expected a video batch (B, C, T, H, W), got shape {tuple(x.shape)}")
        if cfg.uses_context and context is None:
            raise ValueError("this UNet has cross-attention blocks: pass a context (B, L, cross_attention_dim)")
        B, C, T, H, W = x.shape
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(1).expand(B) if t.ndim == 0 else t.expand(B)  # (B,)
        # each frame gets its video's t before the embedding MLP (diffusers repeats after it: the same values,
        # but this way the image layers see bit for bit what the image UNet computes on the folded frames)
        e = timestep_embedding(t.repeat_interleave(T), cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                               cfg.freq_shift).to(x.dtype)  # (B T, C0)
        temb = self.time_embedding(e)  # (B T, 4 C0)
        ctx = _fold_context(context, B, T)  # (B T, L, D) or None
        h = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)  # (B T, C, H, W): frames folded into the batch
        h = self.conv_in(h)
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(h, temb)
                if block.attentions is not None:
                    h = block.attentions[i](h, ctx)
                h = block.motion_modules[i](h, T)  # NEW: mix along the frames
                skips.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
                skips.append(h)
        if self.mid_block is not None:
            mid = self.mid_block
            mms = getattr(mid, "motion_modules", None)
            h = mid.resnets[0](h, temb)
            for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
                h = attn(h, ctx)
                if mms is not None:
                    h = mms[j](h, T)  # NEW: between the mid transformer and the second ResBlock
                h = resnet(h, temb)
        for block in self.up_blocks:
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            for i, resnet in enumerate(block.resnets):
                h = torch.cat([h, mine.pop()], dim=1)  # (B T, C + C_skip, H', W')
                h = resnet(h, temb)
                if block.attentions is not None:
                    h = block.attentions[i](h, ctx)
                h = block.motion_modules[i](h, T)  # NEW
            if block.upsamplers is not None:
                h = block.upsamplers[0](h, skips[-1].shape[2:] if skips else None)
        h = self.conv_out(F.silu(self.conv_norm_out(h)))  # (B T, C_out, H, W)
        return h.reshape(B, T, -1, H, W).permute(0, 2, 1, 3, 4)  # (B, C_out, T, H, W)


Model = VideoUNet


# ------------------------------------------------------------------------------------------------ VideoLDM


class AlphaBlender(nn.Module):
    """z = alpha z_spatial + (1 - alpha) z_temporal with a fixed or learned alpha (see the module docstring)."""

    def __init__(self, alpha: float, merge_strategy: str = "learned_with_images",
                 switch_spatial_to_temporal_mix: bool = False):
        super().__init__()
        if merge_strategy not in MERGE_STRATEGIES:
            raise ValueError(f"merge_strategy {merge_strategy!r}: expected one of {', '.join(MERGE_STRATEGIES)}")
        self.merge_strategy = merge_strategy
        self.switch_spatial_to_temporal_mix = switch_spatial_to_temporal_mix
        self.alpha0 = float(alpha)
        m = torch.full((1,), self.alpha0)
        if merge_strategy == "fixed":
            self.register_buffer("mix_factor", m)
        else:
            self.mix_factor = nn.Parameter(m)

    @torch.no_grad()
    def init_weights(self) -> None:
        self.mix_factor.fill_(self.alpha0)

    def get_alpha(self, image_only_indicator: torch.Tensor | None, ndim: int) -> torch.Tensor:
        """alpha broadcastable to a (B, C, T, H, W) (ndim 5) or (B T, N, C) (ndim 3) tensor."""
        if self.merge_strategy == "fixed":
            return self.mix_factor  # alpha = m, as it is
        if self.merge_strategy == "learned":
            return torch.sigmoid(self.mix_factor)  # alpha = sigmoid(m)
        if image_only_indicator is None:
            raise ValueError("merge_strategy 'learned_with_images' needs image_only_indicator (B, T), 1 = image frame")
        # alpha = 1 on image-only frames, sigmoid(m) on video frames
        alpha = torch.where(image_only_indicator.bool(), torch.ones((), device=self.mix_factor.device),
                            torch.sigmoid(self.mix_factor))  # (B, T)
        if ndim == 5:
            return alpha[:, None, :, None, None]  # (B, 1, T, 1, 1)
        if ndim == 3:
            return alpha.reshape(-1)[:, None, None]  # (B T, 1, 1)
        raise ValueError(f"AlphaBlender blends tensors of 3 or 5 dimensions, got {ndim}")

    def forward(self, x_spatial: torch.Tensor, x_temporal: torch.Tensor,
                image_only_indicator: torch.Tensor | None = None) -> torch.Tensor:
        alpha = self.get_alpha(image_only_indicator, x_spatial.ndim).to(x_spatial.dtype)
        if self.switch_spatial_to_temporal_mix:
            alpha = 1.0 - alpha
        # z = alpha z_s + (1 - alpha) z_t
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class TemporalTransformerBlock(nn.Module):
    """VideoLDM / SVD's temporal block (diffusers' TemporalBasicTransformerBlock with time_mix_inner_dim = dim):
    a GEGLU in-projection, self-attention along the frames, cross-attention to the context, GEGLU."""

    def __init__(self, dim: int, heads: int, context_dim: int | None):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = GEGLUFeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim) if context_dim else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, h: torch.Tensor, num_frames: int, context: torch.Tensor | None = None) -> torch.Tensor:
        BT, N, C = h.shape
        T = num_frames
        B = BT // T
        h = h.reshape(B, T, N, C).permute(0, 2, 1, 3).reshape(B * N, T, C)  # (B N, T, C): a frame sequence per token
        h = h + self.ff_in(self.norm_in(h))
        h = h + self.attn1(self.norm1(h))  # along T
        if self.attn2 is not None:
            h = h + self.attn2(self.norm2(h), context)  # context (B N, L, Dc)
        h = h + self.ff(self.norm3(h))
        return h.reshape(B, N, T, C).permute(0, 2, 1, 3).reshape(BT, N, C)  # (B T, N, C)


class FrameIndexEmbedding(nn.Module):
    """E(f) = linear_2(SiLU(linear_1(e(f)))) of the sinusoidal embedding e(f) of a frame index, width C -> 4C -> C
    (unet.TimestepEmbedding's shape, with the output narrowed back to C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, 4 * dim)
        self.linear_2 = nn.Linear(4 * dim, dim)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(e)))


class SpatioTemporalTransformer(nn.Module):
    """A spatial transformer and a temporal one blended by AlphaBlender (diffusers'
    TransformerSpatioTemporalModel, Stable Video Diffusion's attention block). x (B T, C, H, W) -> same."""

    def __init__(self, channels: int, heads: int, context_dim: int, layers: int = 1, groups: int = 32,
                 merge_factor: float = 0.5, merge_strategy: str = "learned_with_images"):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{heads} heads must divide the channels ({channels})")
        self.channels = channels
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(layers))
        self.temporal_transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(channels, heads, context_dim) for _ in range(layers))
        self.time_pos_embed = FrameIndexEmbedding(channels)
        self.time_mixer = AlphaBlender(merge_factor, merge_strategy)
        self.proj_out = nn.Linear(channels, channels)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's defaults, the blend factor back to merge_factor, and proj_out = 0 (a new block adds nothing)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.GroupNorm, nn.LayerNorm)):
                m.reset_parameters()
        self.time_mixer.init_weights()
        nn.init.zeros_(self.proj_out.weight), nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, image_only_indicator: torch.Tensor) -> torch.Tensor:
        """x (B T, C, H, W), context (B T, L, Dc), image_only_indicator (B, T) (1 = an image, not a video frame)."""
        BT, C, H, W = x.shape
        T = image_only_indicator.shape[-1]
        B = BT // T
        # the temporal cross-attention reads each video's frame-0 context, once per pixel
        c0 = context.reshape(B, T, *context.shape[1:])[:, 0]  # (B, L, Dc)
        c_time = c0[:, None].expand(B, H * W, *c0.shape[1:]).reshape(B * H * W, *c0.shape[1:])  # (B H W, L, Dc)
        h = self.norm(x).permute(0, 2, 3, 1).reshape(BT, H * W, C)  # (B T, H W, C)
        h = self.proj_in(h)
        frame = torch.arange(T, device=x.device).repeat(B)  # (B T,): each frame's index in its video
        e = timestep_embedding(frame, C, True, 0.0).to(h.dtype)  # (B T, C)
        emb = self.time_pos_embed(e)[:, None, :]  # (B T, 1, C)
        for spatial, temporal in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            h = spatial(h, context)
            m = temporal(h + emb, T, c_time)
            h = self.time_mixer(h, m, image_only_indicator)  # z = alpha z_s + (1 - alpha) z_t
        h = self.proj_out(h).reshape(BT, H, W, C).permute(0, 3, 1, 2)  # (B T, C, H, W)
        return x + h


class TemporalResBlock(nn.Module):
    """VideoLDM's temporal ResBlock on x (B, C, T, H, W): the ResBlock of unet.py with (3, 1, 1) convolutions,
    so each pixel mixes only with itself in the neighbouring frames; temb (B, T, D) per frame (diffusers'
    TemporalResnetBlock)."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv3d(cin, cout, (3, 1, 1), padding=(1, 0, 0))
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv3d(cout, cout, (3, 1, 1), padding=(1, 0, 0))
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # h = Conv_t(SiLU(GN(x)))
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, T, H, W)
        if self.time_emb_proj is not None and temb is not None:
            # h += Lin(SiLU(temb)), one bias per channel and frame
            h = h + self.time_emb_proj(F.silu(temb)).permute(0, 2, 1)[:, :, :, None, None]  # (B, Cout, T, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatioTemporalResBlock(nn.Module):
    """unet.ResnetBlock2D on each frame, then a TemporalResBlock across frames, blended by AlphaBlender
    (diffusers' SpatioTemporalResBlock, Stable Video Diffusion's ResBlock). x (B T, Cin, H, W) -> (B T, Cout, H, W)."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int = 32, eps: float = 1e-6,
                 temporal_eps: float | None = None, merge_factor: float = 0.5,
                 merge_strategy: str = "learned_with_images", switch_spatial_to_temporal_mix: bool = False):
        super().__init__()
        self.spatial_res_block = unet_mod.ResnetBlock2D(cin, cout, temb_dim, groups, eps)
        self.temporal_res_block = TemporalResBlock(cout, cout, temb_dim, groups, eps if temporal_eps is None else temporal_eps)
        self.time_mixer = AlphaBlender(merge_factor, merge_strategy, switch_spatial_to_temporal_mix)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's defaults, the blend factor back to merge_factor, and the temporal block's conv2 = 0: the
        temporal branch then returns its input, and the blend of z_s with itself is z_s, the spatial ResBlock."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear, nn.GroupNorm)):
                m.reset_parameters()
        self.time_mixer.init_weights()
        nn.init.zeros_(self.temporal_res_block.conv2.weight), nn.init.zeros_(self.temporal_res_block.conv2.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None, image_only_indicator: torch.Tensor) -> torch.Tensor:
        """x (B T, Cin, H, W), temb (B T, D) per frame, image_only_indicator (B, T) (1 = an image)."""
        T = image_only_indicator.shape[-1]
        h = self.spatial_res_block(x, temb)  # (B T, Cout, H, W)
        BT, C, H, W = h.shape
        B = BT // T
        z_s = h.reshape(B, T, C, H, W).permute(0, 2, 1, 3, 4)  # (B, Cout, T, H, W)
        z_t = self.temporal_res_block(z_s, None if temb is None else temb.reshape(B, T, -1))  # (B, Cout, T, H, W)
        z = self.time_mixer(z_s, z_t, image_only_indicator)  # z = alpha z_s + (1 - alpha) z_t
        return z.permute(0, 2, 1, 3, 4).reshape(BT, C, H, W)  # (B T, Cout, H, W)
