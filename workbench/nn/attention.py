"""The attention core and the mask spec.

Every model routes its attention math through one `AttentionCore` at a fixed module path per layer
(`layers.{i}.attention.core` in the decoders). Projections, RoPE and the KV cache stay in the model; the
core only sees q, k, v and a *mask spec*. That split is what lets context parallelism swap the core for
ring attention or Ulysses later without touching model code, and lets packing, sliding windows,
Gemma 2's soft-cap, PaliGemma's prefix-LM and MoBA all be expressed as data rather than as new code paths.

The math
    scores = (q k^T) * scale            (B, H, Tq, Tk), scale = D^-1/2 unless the model says otherwise
    scores = cap * tanh(scores / cap)   only with a soft-cap (Gemma 2)
    scores[not allowed] = -inf
    out    = softmax(scores) v          softmax in float32, cast back to the input dtype

Grouped-query attention (GQA): k and v have KV <= H heads; query head h reads KV head h // (H / KV),
so each KV head serves a contiguous group of query heads. That is `repeat_interleave` on the head axis
(K1 K1 K2 K2), not `repeat` (K1 K2 K1 K2); Hugging Face's `repeat_kv` (expand + reshape) is the same
thing.

Slots, not positions
    The mask is defined on cache *slots*: key slot j holds the j-th token written to this row, and the
    queries of a forward occupy slots q_offset .. q_offset + Tq - 1 (q_offset = tokens already cached).
    RoPE positions are separate (left-padded rows start their positions at 0 after the padding), so a
    padded batch needs `key_padding` to hide the pad slots, and nothing else changes.

Backends
    "sdpa"  torch.nn.functional.scaled_dot_product_attention (fused kernels on GPU; uses `is_causal`
            instead of a dense mask whenever the spec is plain causal).
    "math"  the explicit formula above: the reference the others are tested against, and the path for
            soft-capping, which SDPA cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MaskSpec:
    """Which key slots each query slot may attend to, described rather than materialised.

    causal:         key slot j is visible from query slot i only if j <= i.
    sliding_window: additionally only if i - j < sliding_window.
    document_ids:   (B, Tk) int; attend only within the same document (packed sequences).
    key_padding:    (B, Tk) bool, True for real tokens; False slots are never attended to.
    prefix_len:     (B,) int; slots < prefix_len attend to each other bidirectionally (prefix-LM).
    soft_cap:       cap * tanh(scores / cap) before masking (Gemma 2).
    """

    causal: bool = True
    sliding_window: int | None = None
    document_ids: torch.Tensor | None = None
    key_padding: torch.Tensor | None = None
    prefix_len: torch.Tensor | None = None
    soft_cap: float | None = None

    @property
    def is_plain_causal(self) -> bool:
        return (
            self.causal
            and self.sliding_window is None
            and self.document_ids is None
            and self.key_padding is None
            and self.prefix_len is None
        )

    def dense(self, q_len: int, k_len: int, q_offset: int = 0, device=None) -> torch.Tensor:
        """The boolean mask (B or 1, 1, Tq, Tk), True where attention is allowed."""
        q = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]  # (Tq, 1) query slots
        k = torch.arange(k_len, device=device)[None, :]  # (1, Tk) key slots
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)[None]  # (1, Tq, Tk)
        if self.causal:
            allowed = allowed & (k <= q)
        if self.sliding_window is not None:
            allowed = allowed & (q - k < self.sliding_window)
        if self.prefix_len is not None:
            p = self.prefix_len.to(device)[:, None, None]  # (B, 1, 1)
            allowed = allowed | ((q < p) & (k < p))
        if self.document_ids is not None:
            doc = self.document_ids.to(device)[:, :k_len]  # (B, Tk)
            same = doc[:, q_offset : q_offset + q_len, None] == doc[:, None, :]  # (B, Tq, Tk)
            allowed = allowed & same
        if self.key_padding is not None:
            allowed = allowed & self.key_padding.to(device)[:, None, :k_len].bool()
            # A pad query would see no key at all (softmax of all -inf is NaN). Let every query see
            # its own slot: real queries already do, and pad outputs are never used.
            allowed = allowed | (k == q)
        return allowed[:, None]  # (B|1, 1, Tq, Tk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, T, D) -> (B, KV * n_rep, T, D), each KV head repeated for its group of query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class AttentionCore(nn.Module):
    """softmax(mask(q k^T * scale)) v for q (B, H, Tq, D), k/v (B, KV, Tk, D) -> (B, H, Tq, Dv)."""

    def __init__(self, scale: float, backend: Literal["sdpa", "math"] = "sdpa"):
        super().__init__()
        self.scale = scale
        self.backend = backend

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec, q_offset: int = 0
    ) -> torch.Tensor:
        if self.backend == "math" or mask.soft_cap is not None:
            return attention_math(q, k, v, mask, q_offset, self.scale)
        if self.backend != "sdpa":
            raise ValueError(f"unknown attention backend {self.backend!r} (expected 'sdpa' or 'math')")
        return attention_sdpa(q, k, v, mask, q_offset, self.scale)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, scale={self.scale:.4g}"


def attention_sdpa(q, k, v, mask: MaskSpec, q_offset: int, scale: float) -> torch.Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask.is_plain_causal and q_offset == 0 and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if mask.is_plain_causal and Tq == 1 and q_offset == Tk - 1:
        # one new token after a plain causal cache: it sees every cached slot
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    attn_mask = mask.dense(Tq, Tk, q_offset, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)


def attention_math(q, k, v, mask: MaskSpec, q_offset: int, scale: float) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, Tk, D)
    # scores = q k^T * scale
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, H, Tq, Tk)
    if mask.soft_cap is not None:
        # cap * tanh(scores / cap)
        scores = mask.soft_cap * torch.tanh(scores / mask.soft_cap)
    allowed = mask.dense(q.shape[2], k.shape[2], q_offset, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)  # (B, H, Tq, Dv)
