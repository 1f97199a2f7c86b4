"""Context parallelism: the sequence split over the cp ranks, attention computed by ring or Ulysses.

What it is
    With parallel.cp = P, the P ranks of a cp group read the same samples and each keeps 1/P of every
    sequence: its slice of input_ids, labels, positions and document ids (`shard_batch`). Everything but
    attention is per token, so it runs on the slice unchanged; the attention core (the plan's `context`
    path, `layers.*.attention.core`) is swapped for one that sees the whole sequence:

    ring      each rank keeps its queries; the K/V shards (with their document ids) travel around the ring
              of cp ranks, P - 1 hops, and each rank folds every block it receives into its running output
              with the log-sum-exp merge (Liu et al., "Ring Attention with Blockwise Transformers", 2023).
    ulysses   an all-to-all turns sequence-sharded q, k, v (B, H, T/P, D) into head-sharded ones
              (B, H/P, T, D); each rank runs ordinary attention for its H/P heads over the whole sequence;
              a second all-to-all turns the output back (Jacobs et al., "DeepSpeed Ulysses", 2023).

The math (ring)
    For one query row and a block of keys, the partial result is
        lse_b = log sum_j exp(s_j)            s_j = q k_j * scale over the block's allowed keys
        o_b   = sum_j exp(s_j - lse_b) v_j    (softmax within the block)
    and two partials over disjoint key sets combine exactly into the softmax over their union:
        lse = log(e^lse1 + e^lse2)
        o   = e^(lse1 - lse) o1 + e^(lse2 - lse) o2
    A row with no allowed key in a block carries lse = NEG (a finite stand-in for -inf, so no inf - inf
    appears in the forward or the backward) and o = 0; it vanishes in the merge with any real block.

Load balancing (zig-zag)
    Under a causal mask a contiguous split is lopsided: rank 0's queries see one block, rank P-1's see P.
    Split T into 2P chunks instead; rank r holds chunks r and 2P-1-r (one early, one late):

        P = 2, chunks 0 1 2 3:   rank 0 holds [0, 3]   rank 1 holds [1, 2]

    Every rank then computes the same number of (query chunk, key chunk) pairs, 2P + 1 of the (2P)^2
    sub-blocks, because sub-blocks that are fully masked (key chunk after the query chunk; other documents;
    outside the sliding window) are skipped before any matmul. The mask of a sub-block comes from global
    slot indices (`zigzag_slots`), so causal, sliding-window and document masks are exact.

Communication per layer (forward), for a rank holding T/P tokens, KV heads of size D:
    ring      (P - 1) hops of its K and V shard: 2 (P - 1) / P * T * KV * D elements sent per rank
    ulysses   4 all-to-alls (q, k, v, out), each sends (P - 1) / P of the rank's T/P x heads x D: per-rank
              volume ~ T (H + 2 KV) D / P, constant when T and P grow together; needs H % P == 0
              (KV heads are replicated up to H when KV % P != 0)

Design choices
    - The backward is autograd's: the ring hop is a differentiable point-to-point shift (its backward sends
      the gradient one hop back), and the all-to-all is its own transpose. That is exact and simple; it keeps
      every received K/V block for the backward (O(T) activation memory per layer instead of O(T/P)), where a
      hand-written ring backward (dK, dV travelling with their blocks, as in flash-attention ring kernels)
      would recompute them. No overlap of the hop with compute yet.
    - The partial attention is the math formula in float32 (any device), not a fused kernel.
    - Ulysses calls the layer's original core on the whole (head-sharded) sequence, so it supports every mask
      the core does (the document ids and key padding are all-gathered into natural order), MoBA included
      (its per-query block choice sees every key; tested in tests/distributed/test_cp.py).
    - The ring core refuses by name what it does not implement: prefix-LM (`prefix_len`), key padding,
      and any extra mask field it does not know (MoBA's block selection needs the whole key set; a config
      with MoBA and cp_method = 'ring' is refused when the job is validated).
    - A mixture of experts routes each rank's tokens unchanged; its router statistics cross ranks as sums:
      token-level ones over dp x cp (the engine's `all_reduce`), DeepSeek-V3's per-sequence ones over the cp
      group (`all_reduce_cp`; workbench/models/moe.py). Multi-token prediction (DeepSeek-V3's `mtp_layers`) is
      refused by ParallelDims: it pairs token t with t + d, which sits on another rank's slice.
    - Generation with a KV cache is out of scope: `context_parallel_disabled(model)` turns every cp core back
      into the plain core (each rank then decodes the whole sequence, as every engine's generation does).

Sources: Liu, Zaharia, Abbeel, arXiv 2310.01889 (ring attention); Jacobs et al., arXiv 2309.14509 (Ulysses);
the zig-zag split as in zhuzilin/ring-flash-attention and torchtitan's context parallel (read, not copied).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import torch
import torch.distributed as dist
from torch import nn

from workbench.errors import ConfigError
from workbench.nn.attention import repeat_kv

NEG = -1e30  # a finite -inf: the log-sum-exp of a row with no allowed key
METHODS = ("ring", "ulysses")
_KNOWN_MASK_FIELDS = {"causal", "sliding_window", "document_ids", "key_padding", "prefix_len", "soft_cap"}


# ------------------------------------------------------------------------------------------------ sharding


def check_seq_len(seq_len: int, cp: int) -> None:
    if cp > 1 and seq_len % (2 * cp):
        raise ConfigError(f"config key 'data.seq_len': {seq_len} must be divisible by 2 x parallel.cp = {2 * cp} "
                          f"(context parallel splits each sequence into 2 x cp chunks, two per rank)")


def zigzag_slots(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """The global sequence slots rank `cp_rank` holds: chunks r and 2P-1-r of 2P, in that order (T/P,)."""
    check_seq_len(seq_len, cp_size)
    c = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def shard_sequence(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zig-zag slice of `x` along `dim`."""
    return x.index_select(dim, zigzag_slots(x.shape[dim], cp_size, cp_rank, x.device))


def unshard_sequence(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The inverse of `shard_sequence`: every rank's slice (in rank order) back into the whole sequence."""
    P = len(shards)
    T = sum(s.shape[dim] for s in shards)
    order = torch.cat([zigzag_slots(T, P, r, shards[0].device) for r in range(P)])  # gathered i -> slot order[i]
    return torch.cat(shards, dim).index_select(dim, torch.argsort(order))


def shard_batch(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """Every (B, T, ...) tensor of a micro-batch (input_ids, labels, positions, document ids, loss masks) cut
    to this rank's slice along T; other entries pass through. Labels were shifted by the collator before,
    so each slot keeps its own target."""
    if cp_size == 1:
        return batch
    T = batch["input_ids"].shape[1]
    check_seq_len(T, cp_size)
    return {k: shard_sequence(v, cp_size, cp_rank) if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == T
            else v for k, v in batch.items()}


def cp_all_reduce(values: list[float], group) -> list[float]:
    """Sums of python numbers over the cp ranks (each held a slice of the same samples)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    return t.tolist()


# ------------------------------------------------------------------------------------------------ communication


def _shift(tensors: list[torch.Tensor], group, forward: bool) -> list[torch.Tensor]:
    """Send each tensor one hop along the ring (to rank + 1 when `forward`, else rank - 1); receive the
    neighbour's from the other side."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    to, frm = ((r + 1) % P, (r - 1) % P) if forward else ((r - 1) % P, (r + 1) % P)
    to, frm = dist.get_global_rank(group, to), dist.get_global_rank(group, frm)
    tensors = [t.contiguous() for t in tensors]  # (empty_like of a transposed view would keep its strides)
    out = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, o, frm, group) for o in out]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _RingHop(torch.autograd.Function):
    """k, v -> the previous rank's k, v; the backward sends their gradients back one hop."""

    @staticmethod
    def forward(ctx, group, k, v):
        ctx.group = group
        return tuple(_shift([k, v], group, forward=True))

    @staticmethod
    def backward(ctx, dk, dv):
        return (None, *_shift([dk, dv], ctx.group, forward=False))


class _AllToAll(torch.autograd.Function):
    """(P, ...) -> (P, ...): entry p goes to rank p, entry p of the result came from rank p. Its own transpose."""

    @staticmethod
    def forward(ctx, group, x):
        ctx.group = group
        x = x.contiguous()  # (empty_like of a permuted view would keep its strides)
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return None, out


def _all_gather_seq(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's (B, T/P) slice of a non-differentiable tensor, in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


# ------------------------------------------------------------------------------------------------ block math


def _allowed(mask, q_slots, k_slots, q_docs, k_docs) -> torch.Tensor:
    """(B|1, 1, Tq, Tk) True where query slot i may see key slot j (global slots)."""
    q, k = q_slots[:, None], k_slots[None, :]  # (Tq, 1), (1, Tk)
    allowed = torch.ones(len(q_slots), len(k_slots), dtype=torch.bool, device=q_slots.device)[None]  # (1, Tq, Tk)
    if mask.causal:
        allowed = allowed & (k <= q)
    if mask.sliding_window is not None:
        allowed = allowed & (q - k < mask.sliding_window)
    if q_docs is not None:
        allowed = allowed & (q_docs[:, :, None] == k_docs[:, None, :])  # (B, Tq, Tk)
    return allowed[:, None]


def block_attention(q, k, v, allowed, scale: float, soft_cap: float | None):
    """Softmax attention of q (B, H, Tq, D) over one key block (k, v repeated to H heads), in float32.

    Returns o (B, H, Tq, Dv), normalized within the block, and lse (B, H, Tq)."""
    # s = q k^T * scale
    s = torch.matmul(q.float(), k.float().transpose(2, 3)) * scale  # (B, H, Tq, Tk)
    if soft_cap is not None:
        # cap * tanh(s / cap)
        s = soft_cap * torch.tanh(s / soft_cap)
    s = s.masked_fill(~allowed, NEG)
    # lse_b = log sum_j exp(s_j)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Tq)
    # o_b = sum_j exp(s_j - lse_b) v_j; a row with no allowed key contributes nothing
    o = torch.matmul(torch.exp(s - lse[..., None]), v.float())  # (B, H, Tq, Dv)
    o = o * allowed.any(-1, keepdim=True)
    return o, lse


def merge(o1, lse1, o2, lse2):
    """Two partial softmax results over disjoint key sets -> the result over their union."""
    # lse = log(e^lse1 + e^lse2)
    lse = torch.logaddexp(lse1, lse2)
    # o = e^(lse1 - lse) o1 + e^(lse2 - lse) o2
    o = torch.exp(lse1 - lse)[..., None] * o1 + torch.exp(lse2 - lse)[..., None] * o2
    return o, lse


# ------------------------------------------------------------------------------------------------ the cores


class _ContextParallelCore(nn.Module):
    """What both cores share: the original core (kept for generation), the cp group, the refusals."""

    method = ""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner  # the layer's AttentionCore: no parameters, so checkpoints are unchanged
        self.scale = inner.scale
        self.group = group
        self.active = True  # False: the plain core on whole sequences (generation; see context_parallel_disabled)

    def _check(self, mask, q_offset: int, kv_fields_ok: bool) -> None:
        if q_offset != 0:
            raise NotImplementedError(f"context parallel ({self.method}) attention runs whole training sequences; "
                                      f"KV-cache decoding (q_offset {q_offset}) goes through "
                                      f"context_parallel_disabled (the engines' gather_for_generation)")
        # Ulysses runs the layer's own core on whole sequences, so MoBA's per-query block choice stays exact there
        known = _KNOWN_MASK_FIELDS | ({"moba"} if kv_fields_ok else set())
        extra = [f.name for f in dataclasses.fields(mask) if f.name not in known
                 and getattr(mask, f.name) is not None and getattr(mask, f.name) is not False]
        refused = extra + ([] if kv_fields_ok else [n for n in ("prefix_len", "key_padding")
                                                    if getattr(mask, n) is not None])
        if refused:
            raise NotImplementedError(f"parallel.cp_method = {self.method!r} does not support the mask "
                                      f"feature(s) {', '.join(refused)}; use parallel.cp = 1"
                                      + ("" if set(extra) - {"moba"} or self.method != "ring" else
                                         " or parallel.cp_method = 'ulysses'"))

    def extra_repr(self) -> str:
        return f"method={self.method}, cp={dist.get_world_size(self.group)}, scale={self.scale:.4g}"


class RingAttention(_ContextParallelCore):
    """Ring attention over the cp group for zig-zag sharded q (B, H, T/P, D), k/v (B, KV, T/P, D)."""

    method = "ring"

    def forward(self, q, k, v, mask, q_offset: int = 0):
        if not self.active:
            return self.inner(q, k, v, mask, q_offset)
        self._check(mask, q_offset, kv_fields_ok=False)
        P, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        Tl = q.shape[2]
        T, c = Tl * P, Tl // 2  # whole sequence, chunk length
        n_rep = q.shape[1] // k.shape[1]
        q_slots = zigzag_slots(T, P, r, q.device)
        docs = mask.document_ids
        if docs is not None and docs.shape[1] != Tl:
            raise ValueError(f"ring attention: document ids cover {docs.shape[1]} slots, the local sequence {Tl} "
                             f"(shard the batch with workbench.parallel.cp.shard_batch)")
        chunks = [slice(0, c), slice(c, Tl)]  # this rank's two zig-zag chunks
        outs = [None, None]  # per query chunk: (o, lse)
        k_docs = docs
        used = False  # whether the K/V block held now entered any sub-block
        self.blocks_computed = 0  # (query chunk, key chunk) sub-blocks this rank computed in this forward
        for step in range(P):
            src = (r - step) % P  # whose K/V this rank holds now
            k_slots = zigzag_slots(T, P, src, q.device)
            kr, vr = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, T/P, D)
            for i, qc in enumerate(chunks):
                for kc in chunks:
                    allowed = _allowed(mask, q_slots[qc], k_slots[kc], None if docs is None else docs[:, qc],
                                       None if k_docs is None else k_docs[:, kc])
                    if not bool(allowed.any()):  # fully masked sub-block: skipped (zig-zag balances these)
                        continue
                    used = True
                    self.blocks_computed += 1
                    o, lse = block_attention(q[:, :, qc], kr[:, :, kc], vr[:, :, kc], allowed, self.scale,
                                             mask.soft_cap)
                    outs[i] = (o, lse) if outs[i] is None else merge(*outs[i], o, lse)
            if step < P - 1:  # pass K/V (and their document ids) one hop along the ring
                k, v = _RingHop.apply(self.group, k, v)
                used = False
                if k_docs is not None:
                    (k_docs,) = _shift([k_docs], self.group, forward=True)
        # every query sees at least its own slot, so both chunks have a result
        out = torch.cat([outs[0][0], outs[1][0]], dim=2).to(q.dtype)  # (B, H, T/P, Dv)
        if not used and P > 1 and torch.is_grad_enabled():
            # the last hop's K/V met only masked sub-blocks here; keep that hop in the graph (a zero term) so its
            # backward, which the neighbours' backward waits for, runs on this rank too
            out = out + 0.0 * (k.sum() + v.sum()).to(out.dtype)
        return out


class UlyssesAttention(_ContextParallelCore):
    """DeepSpeed-Ulysses over the cp group: sequence-sharded -> head-sharded -> attention -> back."""

    method = "ulysses"

    def _to_heads(self, x):
        """(B, N, T/P, D) sharded by sequence -> (B, N/P, T, D) sharded by heads, T in gathered order."""
        P = dist.get_world_size(self.group)
        B, N, Tl, D = x.shape
        x = x.reshape(B, P, N // P, Tl, D).permute(1, 0, 2, 3, 4)  # (P, B, N/P, T/P, D): group p -> rank p
        x = _AllToAll.apply(self.group, x)  # (P, B, N/P, T/P, D): entry p = rank p's sequence slice
        return x.permute(1, 2, 0, 3, 4).reshape(B, N // P, P * Tl, D)  # (B, N/P, T, D)

    def _to_sequence(self, x):
        """(B, N/P, T, D) in gathered order -> (B, N, T/P, D): the inverse of `_to_heads`."""
        P = dist.get_world_size(self.group)
        B, n, T, D = x.shape
        x = x.reshape(B, n, P, T // P, D).permute(2, 0, 1, 3, 4)  # (P, B, N/P, T/P, D): slice p -> rank p
        x = _AllToAll.apply(self.group, x)  # (P, B, N/P, T/P, D): entry p = head group p
        return x.permute(1, 0, 2, 3, 4).reshape(B, P * n, T // P, D)  # (B, N, T/P, D)

    def forward(self, q, k, v, mask, q_offset: int = 0):
        if not self.active:
            return self.inner(q, k, v, mask, q_offset)
        self._check(mask, q_offset, kv_fields_ok=True)
        P = dist.get_world_size(self.group)
        H, KV, Tl = q.shape[1], k.shape[1], q.shape[2]
        if H % P:
            raise ConfigError(f"config key 'parallel.cp': Ulysses splits the {H} query heads "
                              f"(model.config.n_heads) over {P} ranks; use a cp that divides n_heads or "
                              f"parallel.cp_method = 'ring'")
        if KV % P:  # too few KV heads to split: replicate them to one per query head
            k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)
        T = Tl * P
        # gathered position i holds global slot order[i]; natural order = gathered[argsort(order)]
        order = torch.cat([zigzag_slots(T, P, p, q.device) for p in range(P)])
        inverse = torch.argsort(order)
        q, k, v = (self._to_heads(x).index_select(2, inverse) for x in (q, k, v))  # (B, n, T, D) natural order
        whole = {}
        for name in ("document_ids", "key_padding"):
            local = getattr(mask, name)
            if local is not None:
                whole[name] = torch.cat(_all_gather_seq(local, self.group), 1).index_select(1, inverse)  # (B, T)
        o = self.inner(q, k, v, dataclasses.replace(mask, **whole), 0)  # (B, H/P, T, Dv)
        return self._to_sequence(o.index_select(2, order))  # (B, H, T/P, Dv)


# ------------------------------------------------------------------------------------------------ video (Mochi)


class _AllGatherTokens(torch.autograd.Function):
    """(B, H, n, D) on each rank -> (B, H, P n, D), rank order along the token axis. The backward sums the
    gradient of the whole tensor over the ranks (every rank's queries read every rank's keys) and keeps this
    rank's slice: a reduce-scatter, written as all-reduce + slice because gloo has no reduce-scatter."""

    @staticmethod
    def forward(ctx, group, x):
        ctx.group, ctx.n = group, x.shape[2]
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        r = dist.get_rank(ctx.group)
        return None, grad[:, :, r * ctx.n:(r + 1) * ctx.n]


def video_token_range(n_tokens: int, cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The contiguous slice [start, stop) of the visual tokens that cp rank `cp_rank` of `cp_size` computes."""
    if n_tokens % cp_size:
        raise ConfigError(f"config key 'parallel.cp': the {n_tokens} visual tokens (T x H/p x W/p) must divide "
                          f"evenly over cp = {cp_size} ranks")
    n = n_tokens // cp_size
    return cp_rank * n, (cp_rank + 1) * n


def gather_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's (B, n, ...) token slice joined in rank order along axis 1 (no gradient): the whole video's
    patch predictions from the slices `video_token_range` gave out."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class JointVideoAttention(_ContextParallelCore):
    """Mochi's joint attention over the cp group (the core at `blocks.*.attn.core` of workbench.models.video.mochi).

    Each rank holds a contiguous slice of the visual tokens (`video_token_range`; their RoPE positions are the
    global ones: `AsymmDiT.forward(..., token_range=...)`) and the whole text stream. The visual keys and values
    are all-gathered (`_AllGatherTokens`); the softmax of [local visual queries; text queries] over [all visual
    keys; valid text keys] is then the single-process one row by row, so every output is exact.

    Why the gradients are exact. The loss of rank r covers its own visual tokens, summed and divided by the
    global element count, so L = sum_r L_r. Across the cp group the computation is the single-process graph
    with the text stream y (and the conditioning c) replicated: copy y_r, on rank r, has the single-process
    value (same parameters, same inputs) and feeds only rank r's visual slice (as text keys/values and through
    c) and its own next layer; the visual slices feed every copy through the all-gathered K/V, whose backward
    returns each gradient to the slice's owner. Backpropagation is linear, so the adjoint (gradient) of copy
    y_r^l is the part of dL/dy^l that flows through slice r's visual tokens, and sum_r dL/dy_r^l = dL/dy^l
    (by induction from the last layer down). Text-stream parameter gradients are linear in those adjoints at
    identical activations, and visual-stream ones are computed once, by the slice's owner; so the parameter
    gradients summed over the cp group (an all-reduce SUM, not a mean: a mean would divide by P) are the
    single-process gradients. tests/distributed/test_video_cp.py checks outputs, loss, gradients and weights.
    """

    method = "joint"

    def __init__(self, inner: nn.Module, group):
        if not hasattr(inner, "joint"):
            raise ConfigError(f"cp method 'joint' (an API-only core, not a parallel.cp_method of workbench train: "
                              f"apply_context_parallel(model, workbench.parallel.plans.mochi.PLAN, group, 'joint')) "
                              f"swaps the video transformer's workbench.models.video.mochi.JointAttentionCore, "
                              f"not {type(inner).__name__}")
        super().__init__(inner, group)

    def forward(self, q_x, k_x, v_x, q_y, k_y, v_y, text_mask, n_visual: int | None = None):
        if not self.active:
            return self.inner(q_x, k_x, v_x, q_y, k_y, v_y, text_mask)
        P = dist.get_world_size(self.group)
        # every rank must hold its own slice: the whole video on each rank would gather every key P times
        if n_visual is None or k_x.shape[2] * P != n_visual:
            raise ValueError(f"JointVideoAttention: this rank holds {k_x.shape[2]} visual tokens, {P} ranks x "
                             f"{k_x.shape[2]} != the video's {n_visual}: call the model with "
                             f"token_range=video_token_range(n_tokens, cp_size, cp_rank), or inside "
                             f"context_parallel_disabled(model) to run the whole video on each rank")
        k_all = _AllGatherTokens.apply(self.group, k_x)  # (B, H, N, Dh), rank order = token order
        v_all = _AllGatherTokens.apply(self.group, v_x)
        return self.inner.joint(q_x, k_all, v_all, q_y, k_y, v_y, text_mask)


CORES = {"ring": RingAttention, "ulysses": UlyssesAttention, "joint": JointVideoAttention}


# ------------------------------------------------------------------------------------------------ applying


def apply_context_parallel(model: nn.Module, plan, group, method: str) -> list[nn.Module]:
    """Swap every module at `plan.context` for the cp core of `method` over `group` (in place); returns them."""
    if method not in CORES:
        raise ConfigError(f"config key 'parallel.cp_method': {method!r} (expected one of {', '.join(METHODS)})")
    if plan.context is None:
        raise ConfigError("config key 'parallel.cp': this model family's plan names no attention core "
                          "(Plan.context); set parallel.cp = 1")
    pattern = re.compile(re.escape(plan.context).replace(r"\*", r"\d+") + "$")
    swapped, matched = [], 0
    for name, module in list(model.named_modules()):
        if pattern.match(name):
            matched += 1
            if isinstance(module, _ContextParallelCore):  # applied already
                continue
            parent, _, attr = name.rpartition(".")
            core = CORES[method](module, group)
            setattr(model.get_submodule(parent) if parent else model, attr, core)
            swapped.append(core)
    if not matched:
        raise ConfigError(f"config key 'parallel.cp': no module of the model matches the plan's context path "
                          f"{plan.context!r}")
    return swapped


@contextlib.contextmanager
def context_parallel_disabled(model: nn.Module):
    """Every cp core runs as the plain core inside (whole sequences on every rank: generation, KV caches)."""
    cores = [m for m in model.modules() if isinstance(m, _ContextParallelCore)]
    before = [m.active for m in cores]
    for m in cores:
        m.active = False
    try:
        yield model
    finally:
        for m, a in zip(cores, before, strict=True):
            m.active = a
