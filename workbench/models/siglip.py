"""SigLIP vision tower: a ViT that turns an image into a sequence of patch features (PaliGemma's encoder).

What it is
    The image encoder of SigLIP (Zhai et al., 2023), used without its pooling head by PaliGemma 1 and 2:
    cut the image into P x P patches, embed each with one linear map (a stride-P convolution), add a
    learned position embedding per patch, run a stack of pre-norm transformer encoder blocks with
    bidirectional attention, and finish with a LayerNorm. No CLS token: every output row is a patch.

The math (pixels x of shape (B, C, S, S), N = (S / P)^2 patches)
    e_n  = W_patch · patch_n(x) + b_patch + pos_n                 (B, N, dim)
    h    = e + Wo · Attn(Wq m + bq, Wk m + bk, Wv m + bv),       m = LayerNorm1(e)
    out  = h + fc2(GELU_tanh(fc1 n)),                            n = LayerNorm2(h)
    last = LayerNorm_post(x_L)
    Attn is plain multi-head attention over all N patches (no mask), scale head_dim^-1/2.

The intuition
    A patch is a "word" of the image; bidirectional attention lets every patch see the whole picture. The
    learned position table is the only thing that tells the model where a patch sits, so a tower trained
    at 224 px has exactly (224 / 14)^2 = 256 positions; 448 and 896 px are separately trained towers
    (1024 and 4096 positions), not interpolations.

Design choices
    Module paths (public API for parallel plans and `workbench.checkpoint.hf.paligemma2`):
        patch_embedding (Conv2d), position_embedding (Embedding N x dim),
        layers.{i}.norm1, layers.{i}.attention.{wq, wk, wv, wo, core}, layers.{i}.norm2,
        layers.{i}.mlp.{fc1, fc2}, post_norm.
    The blocks are `layers` directly (not `encoder.layers` as in transformers): the FSDP / checkpointing
    units of a plan are `vision_tower.layers.{i}`.
    Attention goes through `workbench.nn.attention.AttentionCore` with `MaskSpec(causal=False)`, so the
    backends (sdpa / math / flex) and context-parallel swaps apply here as in the decoders.
    The patch embedding stays a convolution (same op as the reference, so fp32 parity is exact to rounding).
    `__init__` allocates nothing under `torch.device("meta")`; `init_weights()` is the only initializer.

Differences from the reference
    None in the forward math (parity with transformers' `SiglipVisionModel`, last hidden state and every
    hidden state, is tested at atol 1e-5 in fp32). The attention-pooling head (`vision_use_head`) and
    position-embedding interpolation for other resolutions are not implemented: PaliGemma uses neither.
    Initialization is ViT-style truncated normal, not the reference's (it is only for training from scratch).

Sources
    Zhai et al., "Sigmoid Loss for Language Image Pre-Training", arXiv 2303.15343; Dosovitskiy et al.,
    "An Image is Worth 16x16 Words", arXiv 2010.11929; Alabdulmohsin et al., "Getting ViT in Shape"
    (So400m), arXiv 2305.13035; HF transformers modeling_siglip.py (read, not copied).
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
from workbench.nn.linear import Linear


@dataclass
class Config:
    image_size: int = field_(224, gt=0, doc="input side in pixels (square images)")
    patch_size: int = field_(14, gt=0, doc="patch side in pixels; must divide image_size")
    channels: int = field_(3, gt=0)
    dim: int = field_(1152, gt=0, doc="width (hidden_size)")
    n_layers: int = field_(27, gt=0)
    n_heads: int = field_(16, gt=0)
    mlp_dim: int = field_(4304, gt=0, doc="MLP hidden width (intermediate_size)")
    norm_eps: float = field_(1e-6, gt=0, doc="LayerNorm eps")
    init_std: float = field_(0.02, gt=0)
    attn_backend: Literal["sdpa", "math", "flex"] = "sdpa"

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            fail("patch_size", f"must divide image_size ({self.image_size}), got {self.patch_size}")
        if self.dim % self.n_heads:
            fail("n_heads", f"must divide dim ({self.dim}), got {self.n_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _so400m(image_size: int) -> Config:
    return Config(image_size=image_size, patch_size=14, dim=1152, n_layers=27, n_heads=16, mlp_dim=4304)


FLAVORS: dict[str, Config] = {
    # tests: 28 px, 14 px patches -> 4 patches (the models.md tiny config)
    "debug": Config(image_size=28, patch_size=14, dim=32, n_layers=2, n_heads=4, mlp_dim=37),
    # a CPU size: 64 px in 8 px patches -> 64 patches
    "small": Config(image_size=64, patch_size=8, dim=128, n_layers=4, n_heads=4, mlp_dim=512),
    # SigLIP-So400m/14 at PaliGemma 2's three resolutions: 256, 1024, 4096 patches
    "So400m-224": _so400m(224),
    "So400m-448": _so400m(448),
    "So400m-896": _so400m(896),
}


class Attention(nn.Module):
    """Multi-head attention with biases, bidirectional over all patches."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = Linear(cfg.dim, cfg.dim)
        self.wk = Linear(cfg.dim, cfg.dim)
        self.wv = Linear(cfg.dim, cfg.dim)
        self.wo = Linear(cfg.dim, cfg.dim)
        self.core = AttentionCore(scale=self.head_dim**-0.5, backend=cfg.attn_backend)

    def forward(self, x: torch.Tensor, mask: MaskSpec) -> torch.Tensor:
        B, N, _ = x.shape
        D = self.head_dim
        q = self.wq(x).view(B, N, -1, D).transpose(1, 2)  # (B, H, N, D)
        k = self.wk(x).view(B, N, -1, D).transpose(1, 2)  # (B, H, N, D)
        v = self.wv(x).view(B, N, -1, D).transpose(1, 2)  # (B, H, N, D)
        out = self.core(q, k, v, mask)  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, H*D)
        return self.wo(out)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc1 = Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fc2(GELU_tanh(fc1 x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: MaskSpec) -> torch.Tensor:
        # h = x + Attn(LN1(x))
        h = x + self.attention(self.norm1(x), mask)
        # out = h + MLP(LN2(h))
        return h + self.mlp(self.norm2(h))


class SigLIP(nn.Module):
    """pixel_values (B, C, S, S), normalised to [-1, 1] -> patch features (B, N, dim) after post_norm."""

    def __init__(self, cfg: Config, init: bool = True):
        """`init=False` leaves the weights uninitialised for an owner whose `init_weights()` calls this tower's
        (PaliGemma 2), so a model built on a real device is initialised once, not twice."""
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.post_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The only initializer, safe after `to_empty()`:

        | parameter                         | init                                  |
        |-----------------------------------|---------------------------------------|
        | patch_embedding, wq/wk/wv, fc1    | truncated N(0, init_std), +-3 std     |
        | wo, fc2 (write to the residual)   | truncated N(0, init_std / sqrt(2 L))  |
        | position_embedding                | N(0, init_std)                        |
        | biases                            | zeros                                 |
        | LayerNorms                        | weight ones, bias zeros               |
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)

        def trunc(w, s):
            nn.init.trunc_normal_(w, mean=0.0, std=s, a=-3 * s, b=3 * s)

        trunc(self.patch_embedding.weight, std)
        nn.init.zeros_(self.patch_embedding.bias)
        nn.init.normal_(self.position_embedding.weight, mean=0.0, std=std)
        for block in self.layers:
            a = block.attention
            for lin, s in ((a.wq, std), (a.wk, std), (a.wv, std), (a.wo, out_std),
                           (block.mlp.fc1, std), (block.mlp.fc2, out_std)):
                trunc(lin.weight, s)
                nn.init.zeros_(lin.bias)
            for norm in (block.norm1, block.norm2):
                norm.reset_parameters()
        self.post_norm.reset_parameters()

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings (B, N, dim)."""
        cfg = self.cfg
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values: expected (B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(pixel_values.shape)}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, dim, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, dim), patches in row-major order
        return x + self.position_embedding.weight[None]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        """(B, N, dim) after post_norm; with `output_hidden_states`, also the tuple of the embeddings and
        every block's output (before post_norm), as transformers' `hidden_states`: returns (last, states)."""
        x = self.embed(pixel_values)
        mask = MaskSpec(causal=False)
        states = [x] if output_hidden_states else None
        for block in self.layers:
            x = block(x, mask)
            if states is not None:
                states.append(x)
        x = self.post_norm(x)
        return (x, tuple(states)) if output_hidden_states else x

    def flops_per_image(self) -> float:
        """Training FLOPs of one image (forward + backward): 6 N_matmul P + 12 L H Q P^2, P = patches."""
        cfg = self.cfg
        n_matmul = sum(p.numel() for p in self.parameters() if p.ndim >= 2 and p is not self.position_embedding.weight)
        P = cfg.num_patches
        return 6 * n_matmul * P + 12 * cfg.n_layers * cfg.dim * P * P


Model = SigLIP
