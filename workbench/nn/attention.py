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
            instead of a dense mask whenever the spec is plain causal). A one-query step (decoding) under a
            mask with GQA folds each KV head's group of query heads into the query axis, (B, H, 1, D) ->
            (B, KV, H / KV, D), so the kernel needs no GQA support (CUDA's memory-efficient kernel takes a mask
            but not enable_gqa; the math fallback would copy K and V per query head).
    "math"  the explicit formula above: the reference the others are tested against, and the path for
            soft-capping, which SDPA cannot express.
    "flex"  FlexAttention (`torch.nn.attention.flex_attention`): the spec becomes a mask_mod plus a
            BlockMask of the tiles that can hold an allowed pair, so sliding-window and MoBA tiles that
            are empty are skipped. Eager flex (the default here) materialises the scores like "math";
            on CPU torch has no FlexAttention backward, so there it serves inference only;
            `AttentionCore(..., flex_compile=True)` or a compiled model runs the fused kernel.
    "block" pure-PyTorch block-sparse paths for the two patterns: a banded window and MoBA's block
            gather (`workbench.nn.moba`); a spec with neither pattern runs on "sdpa", and one the paths
            cannot express (prefix_len or causal=False together with a pattern) is an error naming it.
    Both patterns (sliding window, MoBA), their math and their cost are described in `workbench.nn.moba`.
    A MoBA mask depends on q and k, so `MaskSpec.dense` refuses it; "math" and "sdpa" build it with
    `workbench.nn.moba.moba_mask` (the dense reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workbench.nn.moba import (
    MobaSpec,
    attention_moba_block,
    attention_window_block,
    check_moba_spec,
    moba_mask,
    moba_select,
)

BACKENDS = ("sdpa", "math", "flex", "block")


@dataclass
class MaskSpec:
    """Which key slots each query slot may attend to, described rather than materialised.

    causal:         key slot j is visible from query slot i only if j <= i.
    sliding_window: additionally only if i - j < sliding_window.
    document_ids:   (B, Tk) int; attend only within the same document (packed sequences).
    key_padding:    (B, Tk) bool, True for real tokens; False slots are never attended to.
    prefix_len:     (B,) int; slots < prefix_len attend to each other bidirectionally (prefix-LM).
    soft_cap:       cap * tanh(scores / cap) before masking (Gemma 2).
    moba:           MobaSpec(block_size, topk): additionally only inside the top-k key blocks the query's
                    gate chose, its own block always among them (`workbench.nn.moba`; needs causal).
    """

    causal: bool = True
    sliding_window: int | None = None
    document_ids: torch.Tensor | None = None
    key_padding: torch.Tensor | None = None
    prefix_len: torch.Tensor | None = None
    soft_cap: float | None = None
    moba: MobaSpec | None = None

    @property
    def is_plain_causal(self) -> bool:
        return (
            self.causal
            and self.sliding_window is None
            and self.document_ids is None
            and self.key_padding is None
            and self.prefix_len is None
            and self.moba is None
        )

    @property
    def is_full(self) -> bool:
        """Every query sees every key (bidirectional, nothing masked): SDPA then needs no mask at all."""
        return (
            not self.causal
            and self.sliding_window is None
            and self.document_ids is None
            and self.key_padding is None
            and self.prefix_len is None
            and self.moba is None
        )

    def dense(self, q_len: int, k_len: int, q_offset: int = 0, device=None) -> torch.Tensor:
        """The boolean mask (B or 1, 1, Tq, Tk), True where attention is allowed."""
        if self.moba is not None:
            raise ValueError("a MoBA mask depends on q and k: build it with workbench.nn.moba.moba_mask(q, k, spec)")
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

    def __init__(self, scale: float, backend: Literal["sdpa", "math", "flex", "block"] = "sdpa",
                 flex_compile: bool = False):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r} (expected one of {', '.join(BACKENDS)})")
        self.scale = scale
        self.backend = backend
        self.flex_compile = flex_compile

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec, q_offset: int = 0
    ) -> torch.Tensor:
        if self.backend == "math":
            return attention_math(q, k, v, mask, q_offset, self.scale)
        if self.backend == "flex":
            fn = compiled_flex_attention() if self.flex_compile else None
            return attention_flex(q, k, v, mask, q_offset, self.scale, flex_fn=fn)
        if self.backend == "block":
            return attention_block(q, k, v, mask, q_offset, self.scale)
        if self.backend != "sdpa":
            raise ValueError(f"unknown attention backend {self.backend!r} (expected one of {', '.join(BACKENDS)})")
        if mask.soft_cap is not None:
            return attention_math(q, k, v, mask, q_offset, self.scale)
        return attention_sdpa(q, k, v, mask, q_offset, self.scale)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, scale={self.scale:.4g}"


def allowed_mask(q, k, mask: MaskSpec, q_offset: int) -> torch.Tensor:
    """The dense boolean reference mask, (B|1, H|1, Tq, Tk): the spec's, or MoBA's when the spec has one."""
    if mask.moba is not None:
        return moba_mask(q, k, mask, q_offset)
    return mask.dense(q.shape[2], k.shape[2], q_offset, q.device)


def attention_sdpa(q, k, v, mask: MaskSpec, q_offset: int, scale: float) -> torch.Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask.is_plain_causal and q_offset == 0 and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if mask.is_full:  # no mask tensor: keeps the fused kernels available (diffusion UNets, vision towers)
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if mask.is_plain_causal and Tq == 1 and q_offset == Tk - 1:
        # one new token after a plain causal cache: it sees every cached slot
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    attn_mask = allowed_mask(q, k, mask, q_offset)
    if gqa and Tq == 1 and attn_mask.shape[1] == 1:
        # one query per row (decoding) under a mask, grouped-query heads: fold each KV head's group of query heads
        # into the query axis, (B, H, 1, D) -> (B, KV, H / KV, D), so the heads match and no kernel needs GQA
        # support (on CUDA, SDPA's memory-efficient kernel takes a mask but not enable_gqa, and the math fallback
        # would copy K and V per query head); the one mask row (B|1, 1, 1, Tk) broadcasts over the group
        B, H, _, D = q.shape
        KV = k.shape[1]
        out = F.scaled_dot_product_attention(q.reshape(B, KV, H // KV, D), k, v, attn_mask=attn_mask, scale=scale)
        return out.reshape(B, H, 1, out.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)


def attention_math(q, k, v, mask: MaskSpec, q_offset: int, scale: float) -> torch.Tensor:
    allowed = allowed_mask(q, k, mask, q_offset)  # before repeat_kv: MoBA gates on the un-repeated k
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, Tk, D)
    # scores = q k^T * scale
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, H, Tq, Tk)
    if mask.soft_cap is not None:
        # cap * tanh(scores / cap)
        scores = mask.soft_cap * torch.tanh(scores / mask.soft_cap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)  # (B, H, Tq, Dv)


def attention_block(q, k, v, mask: MaskSpec, q_offset: int, scale: float) -> torch.Tensor:
    """The "block" backend: MoBA by block gather, a window on its band, anything else on SDPA."""
    if mask.moba is not None:
        check_moba_spec(mask)
        return attention_moba_block(q, k, v, mask, q_offset, scale)
    if mask.sliding_window is not None:
        if not mask.causal or mask.prefix_len is not None:
            raise ValueError("attention backend 'block' cannot run a sliding window with causal=False or "
                             "prefix_len (use 'math', 'sdpa' or 'flex')")
        return attention_window_block(q, k, v, mask, q_offset, scale)
    if mask.soft_cap is not None:
        return attention_math(q, k, v, mask, q_offset, scale)
    return attention_sdpa(q, k, v, mask, q_offset, scale)


# ------------------------------------------------------------------------------------------------ flex

FLEX_Q_BLOCK = 128  # queries per BlockMask tile (FlexAttention's default)
_COMPILED_FLEX = None


def compiled_flex_attention():
    """`torch.compile(flex_attention)`, built once per process (the compile takes seconds)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_mask_mod(mask: MaskSpec, q_offset: int, chosen: torch.Tensor | None = None):
    """The spec as a FlexAttention mask_mod(b, h, q_idx, kv_idx) -> bool, in the order `MaskSpec.dense` uses.

    chosen: (B, H, Tq, NB) bool, MoBA's selected blocks per query (from `moba_select`).
    """
    W, bs = mask.sliding_window, None if mask.moba is None else mask.moba.block_size
    prefix = mask.prefix_len
    docs, real = mask.document_ids, None if mask.key_padding is None else mask.key_padding.bool()

    def mask_mod(b, h, q_idx, kv_idx):
        i = q_idx + q_offset  # the query's slot
        ok = kv_idx >= 0
        if mask.causal:
            ok = ok & (kv_idx <= i)
        if W is not None:
            ok = ok & (i - kv_idx < W)
        if prefix is not None:
            ok = ok | ((i < prefix[b]) & (kv_idx < prefix[b]))
        if docs is not None:
            ok = ok & (docs[b, i] == docs[b, kv_idx])
        if real is not None:
            ok = (ok & real[b, kv_idx]) | (kv_idx == i)
        if chosen is not None:
            ok = ok & chosen[b, h, q_idx, kv_idx // bs]
        return ok

    return mask_mod


def _block_mask_from_tiles(tiles: torch.Tensor, q_block: int, kv_block: int, Tq: int, Tk: int, mask_mod):
    """A BlockMask from (B|1, H|1, NQ, NK) bool tiles: every listed tile is partial (mask_mod applies)."""
    from torch.nn.attention.flex_attention import BlockMask

    num = tiles.sum(-1).to(torch.int32)  # (B, H, NQ)
    # the True tiles first, in increasing key order
    indices = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # (B, H, NQ, NK)
    return BlockMask.from_kv_blocks(num, indices, BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod,
                                    seq_lengths=(Tq, Tk))


def flex_block_mask(q, k, mask: MaskSpec, q_offset: int):
    """The BlockMask for a spec: tiles that can hold an allowed (query, key) pair, plus the exact mask_mod."""
    B, H, Tq, _ = q.shape
    Tk, dev = k.shape[2], q.device
    QB = FLEX_Q_BLOCK
    nq = math.ceil(Tq / QB)
    q_first = q_offset + torch.arange(nq, device=dev) * QB  # first / last query slot of each tile
    q_last = (q_first + QB - 1).clamp(max=q_offset + Tq - 1)
    if mask.moba is not None:
        check_moba_spec(mask)
        bs = mask.moba.block_size
        nb = math.ceil(Tk / bs)
        idx, valid = moba_select(q, k, mask, q_offset)
        chosen = torch.zeros(B, H, Tq, nb, dtype=torch.bool, device=dev).scatter_(-1, idx, valid)
        # a key block is a tile of the query tile if any of its queries chose it
        tiles = F.pad(chosen, (0, 0, 0, nq * QB - Tq)).view(B, H, nq, QB, nb).any(3)  # (B, H, NQ, NB)
        return _block_mask_from_tiles(tiles, QB, bs, Tq, Tk, flex_mask_mod(mask, q_offset, chosen))
    mod = flex_mask_mod(mask, q_offset)
    if mask.causal and mask.prefix_len is None:
        KB = QB
        nk = math.ceil(Tk / KB)
        k_first = torch.arange(nk, device=dev) * KB
        k_last = (k_first + KB - 1).clamp(max=Tk - 1)
        # causal: the tile's first key is not after its last query
        tiles = k_first[None, :] <= q_last[:, None]  # (NQ, NK)
        if mask.sliding_window is not None:
            # window: the tile's last key is within W of its first query
            tiles = tiles & (q_first[:, None] - k_last[None, :] < mask.sliding_window)
        return _block_mask_from_tiles(tiles[None, None], QB, KB, Tq, Tk, mod)
    from torch.nn.attention.flex_attention import create_block_mask

    Bm = None if mask.prefix_len is None and mask.document_ids is None and mask.key_padding is None else B
    return create_block_mask(mod, Bm, None, Tq, Tk, device=dev, BLOCK_SIZE=QB)


def attention_flex(q, k, v, mask: MaskSpec, q_offset: int, scale: float, flex_fn=None) -> torch.Tensor:
    """FlexAttention for any spec. flex_fn: `compiled_flex_attention()` for the fused kernel; default eager."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_fn or flex_attention
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("attention backend 'flex' has no backward pass on CPU (torch's FlexAttention); train "
                         "with 'block' (or 'math'/'sdpa') there, or run 'flex' under torch.no_grad()")
    block_mask = flex_block_mask(q, k, mask, q_offset)
    score_mod = None
    if mask.soft_cap is not None:
        cap = mask.soft_cap

        def score_mod(score, b, h, q_idx, kv_idx):
            # cap * tanh(score / cap)
            return cap * torch.tanh(score / cap)

    gqa = q.shape[1] != k.shape[1]
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)
