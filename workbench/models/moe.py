"""Mixture-of-experts pieces shared by the MoE families (Mixtral, DeepSeek-V3): router, experts, block, losses.

What it is
    A sparse feed-forward layer: a router scores each token against E experts, the token is sent to the
    k best, and the output is the weighted sum of those k expert FFNs (plus, optionally, always-on shared
    experts). Parameters grow with E, compute per token only with k.

The math (one token x of width D; E experts, top-k, expert width F)
    s      = softmax(W_g x)          (Mixtral)   or   sigmoid(W_g x)   (DeepSeek-V3)       (E,)
    idx    = topk(s + b, k)          b: a non-trainable bias, used for *selection* only     (k,)
    w      = s[idx] / sum(s[idx])    when norm_topk_prob, else s[idx]; then w *= routed_scaling
    y      = sum_j w_j * Expert_{idx_j}(x)  +  Shared(x)
    Expert_e(x) = down_e (SiLU(gate_e x) * up_e x),   gate_up_e = [gate_e; up_e] stacked (2F, D)

The intuition and the design choices
    Softmax over all experts, then top-k, then renormalise (Mixtral): the renormalised weights equal a
        softmax over the k selected logits (exp(l_i) / sum_j exp(l_j) restricted to the top k), so the
        output does not shrink when the router is unsure; the *unrenormalised* full softmax is what the
        balance loss sees, so every expert's probability still gets a gradient.
    Sigmoid scores + bias balancing (DeepSeek-V3): each expert is scored independently (no competition in
        the normaliser), and balance comes from a per-expert bias b added to the scores for the top-k
        *choice only* — the weights w use the raw scores, so b never distorts the output. After each
        optimizer step `update_bias` moves b_e by rate * sign(mean count - count_e): overloaded experts
        become less attractive. No auxiliary loss gradient fights the LM loss ("auxiliary-loss-free").
    Group-limited routing (DeepSeek-V3): experts are split into n_groups groups (one per device group in
        the paper); each group is scored by the sum of its two best scores, only the topk_groups best
        groups stay eligible, and top-k is taken inside them. That bounds how many devices a token's
        all-to-all touches.
    Shared experts (DeepSeek-V2/V3): n_shared always-on experts, here one SwiGLU of width n_shared * F,
        capture common knowledge so the routed experts can specialise.
    Dropless vs capacity: by default every (token, slot) is computed (dropless, MegaBlocks-style): slots
        are sorted by expert and each expert multiplies one contiguous block (`torch._grouped_mm` where it
        runs, else a loop over experts; under autocast its inputs take the autocast dtype first, since autocast
        does not cover the op and CUDA has no fp32 kernel for it). With `capacity_factor` c, expert e keeps at most
        ceil(c * N * k / E) slots (the first ones in token order), the rest are dropped (contribute 0) and
        counted in aux["dropped"] — the Switch/GShard regime with static shapes.
    Aux terms are sums and counts, not means: router_prob_sum (E,), expert_counts (E,), tokens, dropped
        and z_sum. Data parallelism, gradient accumulation and context parallelism add these across ranks
        and micro-batches, which gives exactly the single-process sums; a mean of per-rank means would
        not (ranks hold different token counts, and f * P is not linear). The loss is formed once, from
        the reduced sums: `switch_balance_loss`, `z_loss`; in training, `balance_loss` gives each rank its
        share of the whole batch's loss (counts reduced, this rank's probability sums kept for the gradient).

Switch balance loss, as transformers computes it (load_balancing_loss_func)
    f_e = counts_e / tokens     (summed over the k slots, so sum_e f_e = k),  P_e = prob_sum_e / tokens
    L   = E * sum_e f_e * P_e   (= k at perfect balance, not 1)
    Over several layers the sums are added across layers *before* dividing (tokens = L * N): the
    reference concatenates every layer's router logits along the token axis.

DeepSeek's sequence-wise balance loss (a small complement to the bias, alpha ~ 1e-4)
    per sequence b and layer: f_e = E / (K T_b) * count_{b,e},  P_e = mean_t s'_{t,e},  s' = s / sum_e s
    L = sum_layers mean_b sum_e f_e P_e  (= 1 per layer at perfect balance). With `sequence_stats` the MoE
    returns the per-sequence counts and probability sums. A sequence never spans data-parallel ranks, but
    under context parallelism its tokens are spread over the cp ranks: `sequence_balance_loss` then sums
    c_{b,e} and T_b over the cp group only (other data-parallel ranks hold other sequences), counts each
    sequence once in the number of sequences, and keeps this rank's probability sums for the gradient. The
    loss is linear in them once f and T_b are fixed, so the cp ranks' shares add up to the loss of the whole
    sequences and so do their gradients: no differentiable all-reduce is needed.

Sources
    Fedus et al., "Switch Transformers", arXiv 2101.03961 (eqs. 4-6, z-loss from ST-MoE arXiv 2202.08906);
    Jiang et al., "Mixtral of Experts", arXiv 2401.04088; DeepSeek-AI, "DeepSeek-V3 Technical Report",
    arXiv 2412.19437 (sigmoid routing, bias balancing, group-limited routing); Gale et al., "MegaBlocks",
    arXiv 2211.15841 (dropless); HF transformers modeling_mixtral.py (read, not copied).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workbench.nn.linear import Linear
from workbench.nn.swiglu import SwiGLU


class Router(nn.Module):
    """Scores, selects and weights experts. Returns (logits, scores, weights, idx) for x (N, D):

    logits (N, E) in x's dtype, scores (N, E) float32 (softmax or sigmoid), weights (N, k) float32,
    idx (N, k) long.
    """

    def __init__(self, dim: int, n_experts: int, top_k: int, scoring: Literal["softmax", "sigmoid"] = "softmax",
                 norm_topk_prob: bool = True, n_groups: int = 1, topk_groups: int = 1,
                 routed_scaling: float = 1.0, bias_balancing: bool = False):
        super().__init__()
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
        if not 0 < top_k <= n_experts:
            raise ValueError(f"top_k must be in 1..{n_experts}, got {top_k}")
        if n_experts % n_groups or not 0 < topk_groups <= n_groups:
            raise ValueError(f"n_groups ({n_groups}) must divide n_experts ({n_experts}) and topk_groups "
                             f"({topk_groups}) must be in 1..n_groups")
        if top_k > topk_groups * (n_experts // n_groups):
            raise ValueError(f"top_k ({top_k}) exceeds the experts in the topk_groups eligible groups")
        self.n_experts, self.top_k, self.scoring = n_experts, top_k, scoring
        self.norm_topk_prob, self.routed_scaling = norm_topk_prob, routed_scaling
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.gate = Linear(dim, n_experts, bias=False)
        # selection-only bias (DeepSeek-V3); a persistent buffer so it is checkpointed, never trained
        if bias_balancing:
            self.register_buffer("bias", torch.zeros(n_experts, dtype=torch.float32))
        else:
            self.bias = None

    def init_weights(self, std: float) -> None:
        nn.init.trunc_normal_(self.gate.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        if self.bias is not None:
            self.bias.zero_()

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, rate: float) -> None:
        """The post-step hook of auxiliary-loss-free balancing: b_e += rate * sign(mean(counts) - counts_e).

        counts (E,) are this layer's (token, slot) assignments over the step, reduced over ranks.
        """
        if self.bias is None:
            raise RuntimeError("this router has no balancing bias (build it with bias_balancing=True)")
        counts = counts.to(self.bias.device, torch.float32)
        # b <- b + u * sign(c_mean - c_e)
        self.bias.add_(rate * torch.sign(counts.mean() - counts))

    def forward(self, x: torch.Tensor):
        logits = self.gate(x)  # (N, E)
        # s = softmax(l) or sigmoid(l), in float32
        scores = logits.float().softmax(-1) if self.scoring == "softmax" else logits.float().sigmoid()  # (N, E)
        choice = scores if self.bias is None else scores + self.bias  # (N, E), selection only
        if self.n_groups > 1:
            N, G = choice.shape[0], self.n_groups
            grouped = choice.view(N, G, -1)  # (N, G, E/G)
            # group score = sum of its two best scores (DeepSeek-V3); the best score if a group has one expert
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_groups, dim=-1).indices, True)  # (N, G)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, -1)  # (N, E)
        idx = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, idx)  # (N, k): raw scores, never the bias
        if self.norm_topk_prob:
            # w = s[idx] / sum s[idx]  (the tiny floor only matters for sigmoid scores)
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.routed_scaling != 1.0:
            weights = weights * self.routed_scaling
        return logits, scores, weights, idx


def _grouped_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    # _grouped_mm wants 16-byte aligned row strides; it is the fast path on sm90 GPUs (bf16). Eagerly a dtype
    # without a kernel raises and `ffn` takes the loop; under torch.compile the op's meta function accepts bf16
    # only (the error would stop the compile, not fall back), so a compiled non-bf16 step takes the loop
    return (hasattr(torch, "_grouped_mm") and all((t.shape[-1] * t.element_size()) % 16 == 0 for t in (x, w))
            and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()))


class Experts(nn.Module):
    """E SwiGLU experts as stacked parameters (the transformers 5 layout, loaded without reshaping):

    gate_up_proj (E, 2F, D) = [gate; up] per expert, down_proj (E, D, F).
    forward(x (N, D), idx (N, k), weights (N, k)) -> (y (N, D), dropped slots as a 0-d tensor).
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, capacity_factor: float | None = None,
                 use_grouped_mm: bool = True):
        super().__init__()
        self.n_experts, self.hidden_dim, self.capacity_factor = n_experts, hidden_dim, capacity_factor
        self.use_grouped_mm = use_grouped_mm
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.gate_up_proj, mean=0.0, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.down_proj, mean=0.0, std=out_std, a=-3 * out_std, b=3 * out_std)

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor | None = None,
                 down: torch.Tensor | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj if gate_up is None else gate_up  # (E', 2F, D): all experts, or an ep slice
        down = self.down_proj if down is None else down  # (E', D, F)
        offs = counts.cumsum(0).to(torch.int32)  # (E',) end of each expert's block
        gu = torch._grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs)  # (S, 2F)
        g, u = gu.chunk(2, dim=-1)
        # down_e (SiLU(gate_e x) * up_e x)
        return torch._grouped_mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)  # (S, D)

    def _loop(self, xs: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor | None = None,
              down: torch.Tensor | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj if gate_up is None else gate_up
        down = self.down_proj if down is None else down
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            g, u = F.linear(xs[start:start + n], gate_up[e]).chunk(2, dim=-1)  # (n, F) each
            outs.append(F.linear(F.silu(g) * u, down[e]))  # (n, D)
            start += n
        return torch.cat(outs) if outs else xs.new_zeros(0, down.shape[1])

    def route(self, idx: torch.Tensor, weights: torch.Tensor):
        """The (token, slot) pairs sorted by expert: (token (S,), w (S,), counts (E,), dropped ()).

        token[s] is the token of sorted slot s, w[s] its routing weight, counts[e] how many sorted slots
        expert e takes (after the capacity cut, when there is one). Shared with expert parallelism
        (workbench/parallel/ep.py), which sends these sorted rows to the ranks holding their experts.
        """
        N, k = idx.shape
        E = self.n_experts
        flat = idx.reshape(-1)  # (N*k,) expert of each (token, slot)
        order = flat.argsort(stable=True)  # slots grouped by expert, token order inside each group
        # (E,) slots per expert; a scatter-add, not bincount, whose data-dependent output size breaks a compiled graph
        counts = torch.zeros(E, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
        token = order // k  # (S,) token of each sorted slot
        w = weights.reshape(-1)[order]  # (S,)
        dropped = weights.new_zeros((), dtype=torch.float32)
        if self.capacity_factor is not None:
            cap = math.ceil(self.capacity_factor * N * k / E)
            start = counts.cumsum(0) - counts  # (E,) first sorted slot of each expert
            rank = torch.arange(order.numel(), device=idx.device) - start[flat[order]]  # (S,) rank in its expert
            keep = rank < cap
            dropped = (~keep).sum().float()
            token, w = token[keep], w[keep]
            counts = counts.clamp(max=cap)
        return token, w, counts, dropped

    def ffn(self, xs: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor | None = None,
            down: torch.Tensor | None = None) -> torch.Tensor:
        """Expert_e(x) for rows xs (S, D) sorted by expert, counts (E',) rows per expert -> (S, D).

        gate_up / down default to this module's stacked parameters; expert parallelism passes its local slice.
        """
        gate_up = self.gate_up_proj if gate_up is None else gate_up
        down = self.down_proj if down is None else down
        if torch.is_autocast_enabled(xs.device.type):
            # autocast does not cover torch._grouped_mm: cast as it casts a matmul's inputs (on CUDA the fp32
            # grouped product has no kernel, and the fallback loop syncs with the host per expert)
            dt = torch.get_autocast_dtype(xs.device.type)
            xs, gate_up, down = xs.to(dt), gate_up.to(dt), down.to(dt)
        ref = down
        if self.use_grouped_mm and _grouped_ok(xs, ref):
            try:
                return self._grouped(xs, counts, gate_up, down)
            except (RuntimeError, NotImplementedError):  # dtype/device without a kernel: take the loop
                pass
        return self._loop(xs, counts, gate_up, down)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor):
        token, w, counts, dropped = self.route(idx, weights)
        xs = x[token]  # (S, D) sorted by expert
        out = self.ffn(xs, counts)  # (S, D)
        # y_t = sum over t's slots of w * Expert(x_t)
        y = torch.zeros_like(x).index_add_(0, token, (out * w[:, None]).to(x.dtype))  # (N, D)
        return y, dropped


class MoE(nn.Module):
    """Router + experts (+ shared experts). forward(x (B, T, D), token_mask (B, T) bool | None) -> (y, aux).

    aux (all sums and counts over the real tokens of this call, float32):
        router_prob_sum (E,)  sum of the full router scores      expert_counts (E,)  (token, slot) assignments
        tokens          ()    tokens routed                      dropped       ()    slots over capacity
        z_sum           ()    sum of logsumexp(logits)^2
    With `return_logits`, aux also holds "router_logits" (B*T, E) (not reducible; for tests and analysis).
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int, n_shared: int = 0,
                 capacity_factor: float | None = None, sequence_stats: bool = False, **router_kwargs):
        super().__init__()
        self.sequence_stats = sequence_stats
        self.router = Router(dim, n_experts, top_k, **router_kwargs)
        self.experts = Experts(dim, hidden_dim, n_experts, capacity_factor)
        self.shared_experts = SwiGLU(dim, n_shared * hidden_dim) if n_shared else None

    def init_weights(self, std: float, out_std: float) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, return_logits: bool = False):
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # (N, D), N = B*T
        logits, scores, weights, idx = self.router(flat)
        y, dropped = self.experts(flat, idx, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        m = None if token_mask is None else token_mask.reshape(-1, 1).to(torch.float32)  # (N, 1)
        E = scores.shape[-1]
        with torch.no_grad():
            slot_w = torch.ones_like(idx, dtype=torch.float32) if m is None else m.expand_as(idx)
            counts = torch.zeros(E, dtype=torch.float32, device=x.device).scatter_add_(
                0, idx.reshape(-1), slot_w.reshape(-1))  # (E,)
        lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # (N, 1)
        aux = {
            "router_prob_sum": (scores if m is None else scores * m).sum(0),  # (E,), keeps its gradient
            "expert_counts": counts,
            "tokens": torch.tensor(float(B * T), device=x.device) if m is None else m.sum(),
            "dropped": dropped,
            "z_sum": (lse.square() if m is None else lse.square() * m).sum(),
        }
        if self.sequence_stats:  # DeepSeek's sequence-wise balance loss needs per-sequence sums
            seq = torch.arange(B, device=x.device).repeat_interleave(T)[:, None].expand_as(idx)  # (N, k)
            with torch.no_grad():
                aux["seq_counts"] = torch.zeros(B * E, dtype=torch.float32, device=x.device).scatter_add_(
                    0, (seq * E + idx).reshape(-1), slot_w.reshape(-1)).view(B, E)  # (B, E)
            # s' = s / sum_e s  (scores renormalised over all experts), summed over each sequence's tokens
            norm = scores / scores.sum(-1, keepdim=True)
            aux["seq_prob_sum"] = (norm if m is None else norm * m).view(B, T, E).sum(1)  # (B, E)
            aux["seq_tokens"] = (torch.full((B,), float(T), device=x.device) if m is None
                                 else m.view(B, T).sum(1))  # (B,)
        if return_logits:
            aux["router_logits"] = logits
        return y.view(B, T, D), aux


REDUCIBLE = ("router_prob_sum", "expert_counts", "tokens", "dropped", "z_sum")


def sum_aux(auxes) -> dict[str, torch.Tensor]:
    """Add the reducible entries of several aux dicts (layers, micro-batches, ranks)."""
    out: dict[str, torch.Tensor] = {}
    for aux in auxes:
        for key in REDUCIBLE:
            if key in aux:
                out[key] = aux[key] if key not in out else out[key] + aux[key]
    return out


def switch_balance_loss(aux: dict[str, torch.Tensor], n_experts: int, top_k: int | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e from summed aux; equals transformers' load_balancing_loss_func on the same tokens.

    f_e = expert_counts_e / tokens is summed over the k slots (not divided by k), so the minimum, at
    perfect balance, is top_k; `top_k` is accepted for that reading and not needed for the value.
    """
    f = aux["expert_counts"] / aux["tokens"]  # (E,)
    p = aux["router_prob_sum"] / aux["tokens"]  # (E,)
    return n_experts * (f * p).sum()


def balance_loss(aux: dict[str, torch.Tensor], reduce, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's share of the Switch balance loss over every rank's tokens, the reduced expert counts).

        share_r = E * sum_e (C_e / N) * (S_e^r / N),   C, N: counts and tokens summed over ranks by `reduce`
                                                        S^r:  this rank's probability sums (the gradient path)

    Summed over ranks, the shares are `switch_balance_loss` of the whole batch, and so are their gradients,
    because the loss is linear in S once C and N are fixed (they carry no gradient: top-k is not
    differentiable). A loss formed per rank and averaged would be neither (a product of means is not the
    mean of products). `reduce` sums a tensor over the ranks holding different data (the engine's
    `all_reduce`; the identity in one process), so this file stays single-device.
    """
    counts = reduce(aux["expert_counts"].detach().clone())
    tokens = reduce(aux["tokens"].detach().clone())
    return n_experts * (counts / tokens * aux["router_prob_sum"] / tokens).sum(), counts


def sequence_balance_loss(aux: dict[str, torch.Tensor], reduce, n_experts: int, top_k: int, reduce_seq=None,
                          seq_split: int = 1) -> torch.Tensor:
    """This rank's share of DeepSeek-V3's sequence-wise balance loss (before its coefficient alpha):

        per sequence b and MoE layer l:  f_e = E / (K T_b) * c_{b,e},   P_e = (1 / T_b) sum_t s'_{t,e}
        L = sum_l  mean_b  sum_e f_e P_e          (= number of MoE layers at perfect balance)

    Needs aux["seq_counts"] and aux["seq_prob_sum"] of shape (L, B, E) and aux["seq_tokens"] (L, B) or (B,)
    (an MoE built with sequence_stats=True, stacked over layers). `reduce` sums over the ranks holding
    different data (dp x cp); `reduce_seq` sums over the ranks holding slices of the same sequences (the cp
    group; the identity without context parallelism) and `seq_split` is their number. The counts c_{b,e}
    and tokens T_b are summed by `reduce_seq` (whole sequences); the probability sums stay this rank's slice:

        share_r = sum_l sum_b sum_e f_e (S^r_{b,e} / T_b) / n_seq,   n_seq = reduce(B / seq_split)

    Summed over the ranks the shares are L over the whole batch, and so are their gradients (linear in S^r;
    f and T_b carry no gradient).
    """
    reduce_seq = (lambda t: t) if reduce_seq is None else reduce_seq
    counts = reduce_seq(aux["seq_counts"].detach().clone())  # (L, B, E): whole sequences
    tokens = reduce_seq(aux["seq_tokens"].detach().clone()).clamp_min(1.0)[..., None]  # (L, B, 1) or (B, 1)
    # f_{b,e} = E / (K T_b) * c_{b,e}
    f = n_experts / (top_k * tokens) * counts
    # this rank's part of P_{b,e} = (1 / T_b) sum_t s'_{t,e}
    p = aux["seq_prob_sum"] / tokens
    # every sequence counted once, although seq_split ranks each hold a slice of it
    n_seq = reduce(torch.tensor(counts.shape[1] / seq_split, device=counts.device))
    return (f * p).sum() / n_seq


def z_loss(aux: dict[str, torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss, mean over tokens of logsumexp(logits)^2 (coefficient ~1e-3; Mixtral has none)."""
    return aux["z_sum"] / aux["tokens"]
