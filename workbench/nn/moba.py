"""MoBA (Mixture of Block Attention) and sliding-window attention: block-sparse patterns as mask specs.

What it is
    Two ways to make causal attention cost less than O(T^2) per layer, both expressed as fields of
    `MaskSpec` (`sliding_window`, `moba`) so that every backend of `AttentionCore` reads the same
    description:

    sliding window  query slot i sees key slots j with i - W < j <= i (Mistral, Gemma 2 local layers).
    MoBA            (Moonshot, Lu et al. 2025) keys are cut into blocks of B slots; each query picks the
                    top-k blocks by a parameter-free gate and attends causally inside the union of them.

The MoBA math (per batch row, per query head h; GQA K/V are repeat_interleaved to the query heads first)
    k̄_b       = mean_{j in block b} k_j                          mean-pooled key of block b (fp32)
    g_{i,b}   = q_i · k̄_b                                         the gate, fp32, no gradient
    g_{i,b}   = -inf if b > own(i) = slot(i) // B                 never a future block
    g_{i,b}   = +inf if b = own(i)                                the current block is always chosen ...
    S_i       = top-k_b g_{i,b}, finite or +inf entries only      ... and counts toward the k
    allowed   = [j // B in S_i] AND causal AND (document, padding of the spec)
    out_i     = softmax_j(q_i · k_j / sqrt(D) | allowed) v        ordinary attention on what is left
    So a query sees exactly min(k, own(i) + 1) blocks, and with k >= the number of blocks MoBA is plain
    causal attention. Only *complete* past blocks are ever scored by the gate, so no future key leaks
    into a block mean, and a KV-cache decode scores exactly the blocks a full forward scores.

The intuition
    The block mean is a cheap summary of what a block is about; a query that aligns with it probably
    wants something in it. The forced own block keeps local context (the part a gate would most often
    get wrong), and top-k over history gives each query a few long-range reads, chosen per token and per
    head. A window instead gives every query the same fixed local neighbourhood and nothing beyond it.

Cost per layer and head (T tokens, head width D, window W, block B, top-k k; forward, multiply-adds)
    | pattern | scores + weighted sum   | gate              | score memory (training) |
    |---------|-------------------------|-------------------|-------------------------|
    | dense   | T^2 D (T^2/2 causal)    | -                 | O(T^2)                  |
    | window  | T W D                   | -                 | O(T W)                  |
    | MoBA    | T k B D                 | T (T/B) D         | O(T (k B + T/B))        |
    The MoBA gate is still quadratic in T but divided by B (one dot product per block, not per key);
    with B = 512, k = 3 at T = 128K the attention part is about 1/43 of dense causal and the gate 1/256.

Paths (all compared against the dense reference in tests/unit/test_attention_patterns.py)
    reference   `moba_mask` -> a dense boolean (B, H, Tq, Tk) mask -> the "math" or "sdpa" formula.
    block       `attention_moba_block`: the pairs (query, chosen block) are grouped by key block; each
                group is one small GEMM of its queries against its B keys, giving a partial output and
                its log-sum-exp; the k partials of a query are merged by log-sum-exp:
                    lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) out_s
                (the paper's kernel splits the own block off as causal flash attention; here the own
                block is just one more pair, with the causal mask applied inside it.)
                `attention_window_block`: queries in chunks of C; chunk c reads the contiguous band of
                C + W - 1 key slots ending at its last query (an `unfold` view, no gather), so scores are
                (T/C) x C x (C + W - 1) instead of T x T.
    flex        `workbench.nn.attention.attention_flex`: FlexAttention with a mask_mod evaluating the
                spec per (query, key) and a BlockMask listing, per 128-query tile, the key blocks any of
                its queries chose (MoBA) or that intersect its band (window).

Design choices
    Blocks sit on the cache-slot grid of the row (slot j is in block j // B), as the mask spec's slots do.
    In packed rows (document_ids) and padded rows (key_padding) a block is a candidate for query i only if
    it holds at least one key the rest of the spec lets i see; otherwise top-k could spend a pick on a
    block that is then masked out entirely. MoBA needs a causal spec and refuses sliding_window and
    prefix_len in the same spec (an error names the combination).

Differences from the paper / reference implementation
    moba_attn_varlen_naive restarts the block grid at each sequence of a varlen batch; with packed
    documents here the grid is the row's and a block straddling two documents is averaged over both (its
    keys from the other document are still masked). Soft-capping (not in MoBA) is applied to the scores
    when the spec asks for it; the gate is left uncapped.

Sources
    Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", arXiv 2502.13189, and the
    MoonshotAI/MoBA repository (moba_naive.py; read, not copied). Beltagy et al., "Longformer" (2020) and
    Jiang et al., "Mistral 7B" (2023) for the sliding window.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from workbench.nn.attention import MaskSpec


@dataclass(frozen=True)
class MobaSpec:
    """MoBA's two numbers: keys per block and blocks per query (the own block included)."""

    block_size: int
    topk: int

    def __post_init__(self):
        if self.block_size <= 0 or self.topk <= 0:
            raise ValueError(f"MobaSpec needs block_size > 0 and topk > 0, got {self.block_size}, {self.topk}")


def check_moba_spec(spec: MaskSpec) -> None:
    """MoBA is defined for causal attention only; refuse the combinations that would change its meaning."""
    if not spec.causal:
        raise ValueError("MaskSpec.moba needs causal=True (MoBA never selects a future block)")
    if spec.sliding_window is not None:
        raise ValueError("MaskSpec.moba and MaskSpec.sliding_window cannot be combined: pick one per layer")
    if spec.prefix_len is not None:
        raise ValueError("MaskSpec.moba and MaskSpec.prefix_len cannot be combined (prefix-LM is bidirectional)")


def block_means(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """k (B, KV, Tk, D) -> the fp32 mean key of each block (B, KV, NB, D); the last block may be partial."""
    B, KV, Tk, D = k.shape
    nb = math.ceil(Tk / block_size)
    kp = F.pad(k.float(), (0, 0, 0, nb * block_size - Tk))  # (B, KV, NB * bs, D), zeros past Tk
    sums = kp.view(B, KV, nb, block_size, D).sum(3)  # (B, KV, NB, D)
    counts = (Tk - torch.arange(nb, device=k.device) * block_size).clamp(max=block_size)  # keys per block
    # k̄_b = mean_{j in b} k_j
    return sums / counts[:, None].float()


def _key_side(spec: MaskSpec, Tk: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    docs = None if spec.document_ids is None else spec.document_ids.to(device)[:, :Tk]  # (B, Tk)
    real = None if spec.key_padding is None else spec.key_padding.to(device)[:, :Tk].bool()  # (B, Tk)
    return docs, real


def block_candidates(spec: MaskSpec, q_slots: torch.Tensor, Tk: int, block_size: int,
                     chunk: int = 512) -> torch.Tensor | None:
    """(B, Tq, NB) bool: block b holds a key the document / padding parts of the spec let query i see.

    None when the spec has neither (every block is a candidate). Computed in query chunks, so the
    (chunk, Tk) comparison is the largest temporary.
    """
    docs, real = _key_side(spec, Tk, q_slots.device)
    if docs is None and real is None:
        return None
    nb = math.ceil(Tk / block_size)
    pad = nb * block_size - Tk
    Bsz = (docs if docs is not None else real).shape[0]
    if real is None:
        real = torch.ones(Bsz, Tk, dtype=torch.bool, device=q_slots.device)
    real_b = F.pad(real, (0, pad), value=False).view(Bsz, 1, nb, block_size)  # (B, 1, NB, bs)
    if docs is None:
        return real_b.any(-1).expand(Bsz, q_slots.numel(), nb)  # (B, Tq, NB)
    docs_b = F.pad(docs, (0, pad)).view(Bsz, 1, nb, block_size)  # (B, 1, NB, bs)
    out = []
    for s in range(0, q_slots.numel(), chunk):
        dq = spec.document_ids.to(q_slots.device)[:, q_slots[s : s + chunk]]  # (B, C)
        out.append(((dq[:, :, None, None] == docs_b) & real_b).any(-1))  # (B, C, NB)
    return torch.cat(out, dim=1)


@torch.no_grad()
def moba_select(q: torch.Tensor, k: torch.Tensor, spec: MaskSpec, q_offset: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks each query attends to: indices (B, H, Tq, k') and valid (B, H, Tq, k'), k' = min(k, NB).

    q (B, H, Tq, D), k (B, KV, Tk, D). Query t sits in slot q_offset + t. An index is valid when its gate
    is finite or +inf (a candidate block, not in the future); the own block is always index 0.
    """
    moba = spec.moba
    check_moba_spec(spec)
    B, H, Tq, _ = q.shape
    KV, Tk = k.shape[1], k.shape[2]
    bs = moba.block_size
    nb = math.ceil(Tk / bs)
    kbar = block_means(k, bs).repeat_interleave(H // KV, dim=1)  # (B, H, NB, D): GQA before gating
    # g_{i,b} = q_i · k̄_b in fp32
    gate = torch.matmul(q.float(), kbar.transpose(2, 3))  # (B, H, Tq, NB)
    q_slots = torch.arange(q_offset, q_offset + Tq, device=q.device)  # (Tq,)
    own = q_slots // bs  # (Tq,)
    blocks = torch.arange(nb, device=q.device)  # (NB,)
    # future blocks: -inf
    gate = gate.masked_fill(blocks[None, :] > own[:, None], float("-inf"))
    cand = block_candidates(spec, q_slots, Tk, bs)  # (B, Tq, NB) or None
    if cand is not None:
        gate = gate.masked_fill(~cand[:, None], float("-inf"))
    # the own block: +inf, always chosen, one of the k
    gate = gate.masked_fill(blocks[None, :] == own[:, None], float("inf"))
    vals, idx = gate.topk(min(moba.topk, nb), dim=-1)  # (B, H, Tq, k')
    return idx, vals > float("-inf")


def moba_mask(q: torch.Tensor, k: torch.Tensor, spec: MaskSpec, q_offset: int = 0) -> torch.Tensor:
    """The dense reference: (B, H, Tq, Tk) bool, True where query t may attend to key slot j."""
    idx, valid = moba_select(q, k, spec, q_offset)
    B, H, Tq, _ = q.shape
    Tk, bs = k.shape[2], spec.moba.block_size
    nb = math.ceil(Tk / bs)
    chosen = torch.zeros(B, H, Tq, nb, dtype=torch.bool, device=q.device).scatter_(-1, idx, valid)
    key_block = torch.arange(Tk, device=q.device) // bs  # (Tk,)
    base = dataclasses.replace(spec, moba=None).dense(Tq, Tk, q_offset, q.device)  # (B|1, 1, Tq, Tk)
    # allowed = [j // B in S_i] AND causal AND documents / padding
    return chosen[..., key_block] & base


def attention_moba_block(q, k, v, spec: MaskSpec, q_offset: int, scale: float) -> torch.Tensor:
    """MoBA by block gather: only the chosen (query, key block) pairs are ever scored.

    q (B, H, Tq, D), k / v (B, KV, Tk, D|Dv) -> (B, H, Tq, Dv). Work and saved activations are
    O(Tq * k * bs) scores per head, plus the gate's O(Tq * NB).
    """
    idx, valid = moba_select(q, k, spec, q_offset)  # (B, H, Tq, K)
    B, H, Tq, D = q.shape
    KV, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    rep, bs, K = H // KV, spec.moba.block_size, idx.shape[-1]
    nb = math.ceil(Tk / bs)
    dev = q.device
    kb = F.pad(k, (0, 0, 0, nb * bs - Tk)).view(B, KV, nb, bs, D)  # (B, KV, NB, bs, D)
    vb = F.pad(v, (0, 0, 0, nb * bs - Tk)).view(B, KV, nb, bs, Dv)  # (B, KV, NB, bs, Dv)
    docs, real = _key_side(spec, Tk, dev)
    # each valid pair p = (b, h, t, s) belongs to the key block (b * H + h) * NB + idx; own-block pairs form
    # groups of their own (group id * 2 + 1): only they need the causal mask
    bh = torch.arange(B * H, device=dev).view(B, H, 1, 1)
    own = ((torch.arange(Tq, device=dev) + q_offset) // bs).view(1, 1, Tq, 1)  # (1, 1, Tq, 1)
    group = torch.where(valid, (bh * nb + idx) * 2 + (idx == own), -1).flatten()  # (B*H*Tq*K,)
    order = torch.argsort(group, stable=True)
    order = order[group[order] >= 0]  # the valid pairs, sorted by key block
    groups, counts = torch.unique_consecutive(group[order], return_counts=True)
    qflat = q.reshape(B * H * Tq, D) * scale  # row r = (b * H + h) * Tq + t; the scale folded into q
    outs, lses = [], []
    start = 0
    for g2, n in zip(groups.tolist(), counts.tolist()):
        pairs = order[start : start + n]
        start += n
        g, is_own = g2 // 2, g2 % 2
        b, h, blk = g // (H * nb), (g // nb) % H, g % nb
        rows = pairs // K  # (n,) query rows
        qslot = rows % Tq + q_offset  # (n,)
        kslot = blk * bs + torch.arange(bs, device=dev)  # (bs,); past Tk only in the own block
        ok = None
        if is_own:  # causal inside the own block (also hides the slots past Tk of a partial last block)
            ok = kslot[None, :] <= qslot[:, None]  # (n, bs)
        ks = kslot.clamp(max=Tk - 1)
        if docs is not None:
            same = docs[b, qslot][:, None] == docs[b, ks][None, :]
            ok = same if ok is None else ok & same
        if real is not None:
            ok = real[b, ks][None, :] if ok is None else ok & real[b, ks][None, :]
            ok = ok | (kslot[None, :] == qslot[:, None])
        # scores = q k^T * scale on the n queries x bs keys of this block
        s = torch.matmul(qflat[rows], kb[b, h // rep, blk].transpose(0, 1))  # (n, bs)
        if spec.soft_cap is not None:
            s = spec.soft_cap * torch.tanh(s / spec.soft_cap)
        s = s.float()
        if ok is not None:
            s = s.masked_fill(~ok, float("-inf"))
        # softmax and its log-sum-exp from one exp: lse = m + log sum exp(s - m), m a constant shift
        m = s.detach().amax(-1, keepdim=True)  # (n, 1)
        e = (s - m).exp_()
        z = e.sum(-1, keepdim=True)
        outs.append(torch.matmul((e / z).to(v.dtype), vb[b, h // rep, blk]))  # (n, Dv)
        lses.append((m + z.log()).squeeze(-1))  # (n,)
    n_pairs = B * H * Tq * K
    out_p = torch.zeros(n_pairs, Dv, dtype=v.dtype, device=dev).index_copy(0, order, torch.cat(outs))
    lse_p = torch.full((n_pairs,), float("-inf"), device=dev).index_copy(0, order, torch.cat(lses))
    out_p, lse_p = out_p.view(B, H, Tq, K, Dv), lse_p.view(B, H, Tq, K)
    # lse = log sum_s exp(lse_s); out = sum_s exp(lse_s - lse) out_s  (invalid pairs: weight 0)
    lse = torch.logsumexp(lse_p, dim=-1, keepdim=True)  # (B, H, Tq, 1)
    w = torch.exp(lse_p - lse).to(v.dtype)  # (B, H, Tq, K)
    return (w[..., None] * out_p).sum(-2)  # (B, H, Tq, Dv)


def window_chunk(window: int, Tq: int) -> int:
    """Queries per chunk of the banded path: about W/2 (keys read per query: C + W - 1 ~ 1.5 W)."""
    return max(1, min(Tq, max(16, window // 2)))


def attention_window_block(q, k, v, spec: MaskSpec, q_offset: int, scale: float) -> torch.Tensor:
    """Sliding-window attention on a band: chunk c of C queries scores only its C + W - 1 key slots.

    q (B, H, Tq, D), k / v (B, KV, Tk, D|Dv) -> (B, H, Tq, Dv); scores (B, H, Tq/C, C, C + W - 1).
    """
    if not spec.causal or spec.prefix_len is not None:
        raise ValueError("attention backend 'block' runs a sliding window only with causal=True and no prefix_len")
    W = spec.sliding_window
    B, H, Tq, D = q.shape
    KV, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    rep, dev = H // KV, q.device
    C = window_chunk(W, Tq)
    nq = math.ceil(Tq / C)
    L = C + W - 1  # key slots read per chunk
    # padded key coordinate u holds slot u - (W - 1); chunk c starts at u = q_offset + c C
    right = max(0, q_offset + nq * C - Tk)

    def band(x, value=0):  # (..., Tk) or (..., Tk, D) along dim `time` -> (..., nq, L[, D])
        if x.dim() == 4:  # (B, KV, Tk, D)
            xp = F.pad(x, (0, 0, W - 1, right))[:, :, q_offset:]
            return xp.unfold(2, L, C)[:, :, :nq].transpose(-1, -2)  # (B, KV, nq, L, D)
        xp = F.pad(x, (W - 1, right), value=value)[:, q_offset:]  # (B, Tk')
        return xp.unfold(1, L, C)[:, :nq]  # (B, nq, L)

    qp = F.pad(q, (0, 0, 0, nq * C - Tq)).view(B, KV, rep, nq, C, D)  # (B, KV, rep, nq, C, D)
    kw, vw = band(k)[:, :, None], band(v)[:, :, None]  # (B, KV, 1, nq, L, D)
    qslot = q_offset + torch.arange(nq * C, device=dev).view(nq, C)  # (nq, C)
    kslot = q_offset - (W - 1) + torch.arange(nq, device=dev)[:, None] * C + torch.arange(L, device=dev)  # (nq, L)
    # causal AND i - j < W, on real key slots
    ok = ((kslot[:, None, :] <= qslot[:, :, None]) & (qslot[:, :, None] - kslot[:, None, :] < W)
          & (kslot >= 0)[:, None, :] & (kslot < Tk)[:, None, :])[None]  # (1, nq, C, L)
    docs, real = _key_side(spec, Tk, dev)
    if docs is not None:
        dq = F.pad(spec.document_ids.to(dev)[:, q_offset : q_offset + Tq], (0, nq * C - Tq), value=-1)
        ok = ok & (dq.view(B, nq, C, 1) == band(docs, value=-1)[:, :, None, :])  # (B, nq, C, L)
    if real is not None:
        ok = (ok & band(real, value=False)[:, :, None, :]) | (kslot[:, None, :] == qslot[:, :, None])[None]
    # scores = q k^T * scale
    s = torch.matmul(qp, kw.transpose(-1, -2)) * scale  # (B, KV, rep, nq, C, L)
    if spec.soft_cap is not None:
        s = spec.soft_cap * torch.tanh(s / spec.soft_cap)
    # padding queries past Tq may see nothing: a finite fill keeps their (discarded) rows NaN-free
    s = s.float().masked_fill(~ok[:, None, None], torch.finfo(torch.float32).min)
    p = torch.softmax(s, dim=-1).to(v.dtype)
    out = torch.matmul(p, vw)  # (B, KV, rep, nq, C, Dv)
    return out.reshape(B, H, nq * C, Dv)[:, :, :Tq]
