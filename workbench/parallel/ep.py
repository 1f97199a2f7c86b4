"""Expert parallelism: each rank of the ep group holds E / ep experts, and tokens travel to their experts.

What it is
    A mixture of experts has E expert FFNs per layer but each token uses only k of them. Expert parallelism
    (GShard, Switch) splits the experts of every MoE layer over the ep ranks instead of copying them to
    every rank: rank p holds the contiguous slice of experts [p L, (p + 1) L), L = E / ep, of the stacked
    parameters gate_up_proj (E, 2F, D) and down_proj (E, D, F). The router, attention and everything else
    stay data parallel; only the (token, slot) pairs move, with two all-to-alls per MoE layer per direction.

The math of dispatch and combine (one MoE layer on ep rank r; P = ep ranks, L = E / P local experts)
    route     the rank's N tokens pick k experts each: N k (token, slot) pairs, sorted by expert
              (stable, so token order inside each expert), c_e = pairs for expert e       (Experts.route)
    splits    send_p = sum_{e in experts of p} c_e                  rows for rank p            (P,)
              recv[q, l] = c^{(q)}_{p L + l}   (an all-to-all of the counts c viewed (P, L)) (P, L)
    dispatch  X_recv = all_to_all(x[token], in = send, out = recv.sum(1))                    (R, D)
              rows arrive grouped by source rank q, then by local expert l inside each q
    permute   pi = stable argsort of the local expert of each received row: X_recv[pi] is grouped by
              local expert, with recv.sum(0) rows for each                                  (R, D)
    compute   O[pi] = Expert_l(X_recv[pi])   (the grouped GEMM or the loop of Experts.ffn on the slice)
    combine   O_back = all_to_all(O, in = recv.sum(1), out = send)  back in this rank's sorted order
              y_t = sum over t's slots s of w_s O_back_s                                     (N, D)
    Backward is the same path reversed: the all-to-all's gradient is the all-to-all with the splits
    swapped (`_AllToAll`), the permutation's is its inverse, and index/index_add give x and w theirs.

The intuition
    Dispatch is a distributed sort by expert: a rank's sorted pairs are already contiguous per destination
    (experts of a rank are contiguous), so one all-to-all with uneven splits delivers every row to its
    expert's rank. The count exchange first tells each rank how many rows it will receive from whom and
    for which local expert, which is exactly the layout the second permutation needs. Each expert then
    runs one dense GEMM over every token routed to it from the whole ep group, as on one process.

Gradients (how the fsdp2 engine reduces them: workbench/parallel/data_parallel.py)
    After backward, rank r's grad of its expert slice already sums the contributions of every token of
    the ep group (the combine/dispatch all-to-alls carried them to r). What remains is the sum over ranks
    that hold the *same* slice with different data: dp_replicate x dp_shard x cp / ep ranks. FSDP2 shards
    the expert parameters over exactly those ranks (a mesh of their own, `ParallelDims.expert_mesh`), and
    their reduce-scatter divides by the whole data-parallel size (`set_gradient_divide_factor`) instead of
    its own size, because the loss was scaled by the whole data-parallel size (its 1/N is global): the
    expert grads end as sum over every token / N, as on one process. They are never averaged with their
    ep peers, which hold other experts.

Design choices
    Generic: applied to every module of type `workbench.models.moe.Experts` under the plan's `expert`
        pattern (Mixtral, DeepSeek-V3), never to a family by name; the model file stays single-device.
    The expert parameters become DTensors sharded Shard(0) over the ep mesh: the consolidated checkpoint,
        gradient norms and DCP optimizer shards then see whole (E, ...) tensors without special cases,
        and FSDP2 adds its own shard dimension on top (2-D: dp_shard_mod_ep x ep).
    Dropless by default. `capacity_factor` is applied where the tokens are, before dispatch, with the
        rank's own token count: each rank keeps ceil(c N_r k / E) pairs per expert, which is what every
        data-parallel layout without ep does (each rank's Experts cuts its own tokens), so a run gives the
        same numbers with ep = 1 or ep > 1 on the same data ranks.
    The exchange is torch.distributed.all_to_all_single with uneven split sizes, which gloo supports on CPU
        (checked on torch 2.13) as nccl does on GPU; its autograd wrapper is the small Function below
        (torch.distributed.nn.functional.all_to_all_single does the same but is deprecated).
    A rank that receives no rows still touches its expert weights (times zero), so every rank of the
        expert FSDP group produces a gradient and the reduce-scatter stays collective.
    Not here: token drop/pad to static shapes for CUDA graphs, overlapping the all-to-all with shared
        experts, DeepSeek's node-limited routing groups mapped onto ep ranks, ep with tp.

Sources
    Lepikhin et al., "GShard", arXiv 2006.16668 (all-to-all dispatch); Fedus et al., "Switch Transformers",
    arXiv 2101.03961; Gale et al., "MegaBlocks", arXiv 2211.15841 (dropless grouped GEMM); torchtitan's
    expert_parallel.py and parallel_dims.py (the separate expert FSDP mesh and gradient divide factor;
    read, not copied).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from workbench.errors import ConfigError
from workbench.models.moe import Experts
from workbench.parallel.plans import Plan

# ------------------------------------------------------------------------------------------ pure pieces


def send_splits(counts: torch.Tensor, ep: int) -> torch.Tensor:
    """Rows this rank sends to each ep rank: counts (E,) per expert -> (ep,), experts split contiguously."""
    return counts.view(ep, -1).sum(1)  # (ep, E/ep) -> (ep,)


def local_permutation(recv_counts: torch.Tensor) -> torch.Tensor:
    """recv_counts (P, L): rows from source rank q for local expert l, in the received order (q-major).

    Returns pi (R,) such that received[pi] is grouped by local expert (source-rank order inside each).
    """
    P, L = recv_counts.shape
    expert_of_row = torch.arange(L, device=recv_counts.device).repeat(P)  # (P*L,) local expert of each block
    expert_of_row = expert_of_row.repeat_interleave(recv_counts.reshape(-1))  # (R,)
    return expert_of_row.argsort(stable=True)  # (R,)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[i]] = i, so a[perm][inv] == a."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def expert_modules(model: nn.Module, plan: Plan) -> list[tuple[str, Experts]]:
    """Every `Experts` module whose path matches the plan's `expert` pattern (`*` = one path component)."""
    if plan.expert is None:
        return []
    pattern = re.compile("^" + re.escape(plan.expert).replace(r"\*", r"[^.]+") + "$")
    return [(name, m) for name, m in model.named_modules() if pattern.match(name) and isinstance(m, Experts)]


# ------------------------------------------------------------------------------------------ communication


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient is the reverse exchange (splits swapped)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an expert parameter (a DTensor sharded over ep, possibly gathered by FSDP)."""
    return t.to_local() if hasattr(t, "to_local") else t


class ExpertParallelExperts(Experts):
    """`Experts` whose parameters hold this rank's E / ep experts; forward dispatches over the ep group.

    Same signature and result as Experts.forward: forward(x (N, D), idx (N, k), weights (N, k)) ->
    (y (N, D), dropped ()). Instances are made by `apply_expert_parallel` (class swap, state kept).
    """

    ep_group = None
    ep_size = 1

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor):
        P, group = self.ep_size, self.ep_group
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)  # (L, 2F, D), (L, D, F)
        L = gate_up.shape[0]
        token, w, counts, dropped = self.route(idx, weights)  # sorted by expert: (S,), (S,), (E,)
        send = send_splits(counts, P)  # (P,)
        # recv[q, l]: rows rank q sends for our local expert l (the count exchange)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts.contiguous(), group=group)  # (E,) = (P, L) q-major
        recv = recv.view(P, L)
        send_list, recv_list = send.tolist(), recv.sum(1).tolist()
        xs = all_to_all(x[token], recv_list, send_list, group)  # (R, D): by source rank, then local expert
        perm = local_permutation(recv)  # (R,)
        out = self.ffn(xs[perm], recv.sum(0), gate_up, down)  # (R, D) grouped by local expert
        if out.shape[0] == 0:  # no rows here: still a (zero) gradient for every local weight
            out = out + 0.0 * (gate_up.sum() + down.sum())
        out = out[inverse_permutation(perm)]  # (R, D) back in received order
        out = all_to_all(out, send_list, recv_list, group)  # (S, D) back in this rank's sorted order
        # y_t = sum over t's slots of w * Expert(x_t)
        y = torch.zeros_like(x).index_add_(0, token, (out * w[:, None]).to(x.dtype))  # (N, D)
        return y, dropped


def apply_expert_parallel(model: nn.Module, plan: Plan, ep_mesh) -> list[nn.Module]:
    """Shard every `Experts` of the plan over `ep_mesh` (1-D): Shard(0) DTensor parameters, ep dispatch.

    Returns the modules it converted (the engine FSDP-shards them over the expert data mesh). Refuses, naming
    the field, a plan without experts and an expert count that ep does not divide.
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    ep = ep_mesh.size()
    found = expert_modules(model, plan)
    if not found:
        raise ConfigError(f"config key 'parallel.ep': {ep} asks for expert parallelism, but the model has no "
                          f"`workbench.models.moe.Experts` module at the plan's expert path {plan.expert!r}; "
                          f"set parallel.ep = 1")
    for name, module in found:
        if module.n_experts % ep:
            raise ConfigError(f"config key 'parallel.ep': {ep} must divide the {module.n_experts} experts of "
                              f"{name} (each ep rank holds n_experts / ep whole experts)")
        for pname in ("gate_up_proj", "down_proj"):
            p = getattr(module, pname)
            # every rank built the same full tensor (same seed); keep this rank's contiguous experts
            setattr(module, pname, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)], src_data_rank=None),
                                                requires_grad=p.requires_grad))
        module.__class__ = ExpertParallelExperts
        module.ep_group, module.ep_size = ep_mesh.get_group(), ep
    return [m for _, m in found]
