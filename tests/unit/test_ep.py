"""Expert parallelism (workbench/parallel/ep.py): the pure pieces without a process group, the layout checks,
and one spawned 2-rank gloo run of dispatch/combine against the unsharded Experts (forward and backward).

The training layouts (Mixtral under fsdp2 with ep = 2 on 2 and 4 ranks equal to one process) are in
tests/distributed/test_parallel.py.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from workbench.errors import ConfigError
from workbench.models.moe import Experts
from workbench.parallel.dims import ParallelDims
from workbench.parallel.ep import expert_modules, inverse_permutation, local_permutation, send_splits

D, F, E, K = 8, 12, 4, 2


def test_send_splits_sum_the_counts_of_each_ranks_contiguous_experts():
    counts = torch.tensor([3, 0, 2, 5, 1, 1])
    assert send_splits(counts, 3).tolist() == [3, 7, 2]
    assert send_splits(counts, 1).tolist() == [12] and send_splits(counts, 6).tolist() == counts.tolist()


def test_local_permutation_groups_received_rows_by_local_expert_and_inverts():
    recv = torch.tensor([[1, 2], [3, 0]])  # from rank 0: 1 row for expert 0, 2 for expert 1; from rank 1: 3, 0
    perm = local_permutation(recv)
    rows = torch.tensor([0, 1, 1, 0, 0, 0])  # the local expert of each received row, in arrival order
    assert perm.tolist() == [0, 3, 4, 5, 1, 2] and rows[perm].tolist() == [0, 0, 0, 0, 1, 1]
    data = torch.randn(6, 3)
    assert torch.equal(data[perm][inverse_permutation(perm)], data)
    assert local_permutation(torch.zeros(2, 2, dtype=torch.long)).numel() == 0


def test_simulated_dispatch_over_two_ranks_equals_the_unsharded_experts():
    """The all-to-alls simulated by concatenation: sorting, splitting, the local permutation and the way
    back give every rank exactly Experts(x) on its own tokens."""
    torch.manual_seed(0)
    full = Experts(D, F, E)
    full.init_weights(0.3, 0.3)
    P, L = 2, E // 2
    xs_in = [torch.randn(n, D) for n in (5, 7)]
    idx_in = [torch.stack([torch.randperm(E)[:K] for _ in range(x.shape[0])]) for x in xs_in]
    w_in = [torch.rand(x.shape[0], K) for x in xs_in]
    routed = [full.route(i, w) for i, w in zip(idx_in, w_in)]  # (token, w, counts, dropped) per rank
    sends = [send_splits(c, P).tolist() for _, _, c, _ in routed]
    # what rank p receives from rank q: the q-th rank's block for p (its sorted rows are contiguous per p)
    blocks = [list(x[t].split(s)) for x, (t, _, _, _), s in zip(xs_in, routed, sends)]
    back_blocks = [[None] * P for _ in range(P)]
    for p in range(P):
        recv = torch.stack([c.view(P, L)[p] for _, _, c, _ in routed])  # (P, L)
        rows = torch.cat([blocks[q][p] for q in range(P)])
        perm = local_permutation(recv)
        out = full.ffn(rows[perm], recv.sum(0), full.gate_up_proj[p * L:(p + 1) * L],
                       full.down_proj[p * L:(p + 1) * L])[inverse_permutation(perm)]
        for q, piece in enumerate(out.split(recv.sum(1).tolist())):
            back_blocks[q][p] = piece
    for q in range(P):
        token, w, _, _ = routed[q]
        out = torch.cat(back_blocks[q])
        y = torch.zeros_like(xs_in[q]).index_add_(0, token, out * w[:, None])
        torch.testing.assert_close(y, full(xs_in[q], idx_in[q], w_in[q])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world, degrees, expected", [
    (2, {"backend": "ddp", "dp_replicate": 2}, "not built yet for backend 'ddp'"),
    (2, {"backend": "zero2", "dp_shard": 2}, "not built yet for backend 'zero2'"),
    (2, {"backend": "zero3", "dp_shard": 2}, "DeepSpeed-MoE"),
    (1, {"backend": "single"}, "not built yet for backend 'single'"),
    (4, {"backend": "fsdp2", "dp_shard": 2, "tp": 2, "ep": 4}, "must divide parallel.dp_shard x parallel.cp = 2"),
    (8, {"backend": "fsdp2", "dp_shard": 8, "ep": 8}, "must divide model.config.n_experts = 4"),
])
def test_expert_parallel_layouts_are_checked_naming_the_field(world, degrees, expected):
    from workbench.job import ParallelSection
    from workbench.models.mixtral import FLAVORS

    with pytest.raises(ConfigError, match="config key 'parallel.ep'") as e:
        ParallelDims.from_config(ParallelSection(**{"ep": 2, **degrees}), world, FLAVORS["debug"])
    assert expected in str(e.value)


def test_fsdp2_takes_ep_for_a_mixture_of_experts_only():
    from workbench.job import ParallelSection
    from workbench.models.llama3 import FLAVORS as LLAMA
    from workbench.models.mixtral import FLAVORS

    d = ParallelDims.from_config(ParallelSection(backend="fsdp2", dp_shard=4, ep=2), 4, FLAVORS["debug"])
    assert d.describe() == "fsdp2 on 4 ranks (dp_shard=4, ep=2)"
    with pytest.raises(ConfigError, match="'parallel.ep'.*no routed experts"):
        ParallelDims.from_config(ParallelSection(backend="fsdp2", dp_shard=2, ep=2), 2, LLAMA["debug"])


def test_the_plan_pattern_finds_every_experts_module_by_type():
    from workbench.models.mixtral import FLAVORS, Mixtral
    from workbench.parallel.plans import plan_for

    model = Mixtral(FLAVORS["debug"])
    found = expert_modules(model, plan_for("mixtral"))
    assert [name for name, _ in found] == [f"layers.{i}.moe.experts" for i in range(len(model.layers))]
    assert expert_modules(model, plan_for("llama3")) == []


# ------------------------------------------------------------------------------------------ 2 gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CAPACITIES = (None, 1.0)  # dropless, and a capacity that cuts rank 1's flood of expert 3


def _inputs(capacity):
    """The experts and both ranks' inputs, the same on every rank and in the reference (seeded)."""
    torch.manual_seed(0)
    full = Experts(D, F, E, capacity_factor=capacity)
    full.init_weights(0.3, 0.3)
    xs = [torch.randn(n, D) for n in (5, 9)]  # uneven token counts
    idx = [torch.stack([torch.randperm(E)[:K] for _ in range(x.shape[0])]) for x in xs]
    idx[1][:, 0] = 3  # uneven splits (and drops under a capacity)
    ws = [torch.rand(x.shape[0], K) for x in xs]
    return full, xs, idx, ws


def _probe(y: torch.Tensor) -> torch.Tensor:
    return (y * torch.arange(y.numel()).view_as(y).float().sin()).sum()  # a loss with distinct output weights


def _run(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from workbench.parallel.ep import ExpertParallelExperts, apply_expert_parallel
    from workbench.parallel.plans import Plan

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        for capacity in CAPACITIES:
            full, xs, idx, ws = _inputs(capacity)
            holder = torch.nn.Module()
            holder.experts = full
            (ep_experts,) = apply_expert_parallel(holder, Plan(blocks="", expert="experts"), mesh)
            assert isinstance(ep_experts, ExpertParallelExperts) and ep_experts.gate_up_proj.to_local().shape[0] == 2
            x, w = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
            y, dropped = ep_experts(x, idx[rank], w)
            _probe(y).backward()
            got = {"y": y, "dropped": dropped, "gx": x.grad, "gw": w.grad,
                   "g_gate_up": ep_experts.gate_up_proj.grad.to_local(), "g_down": ep_experts.down_proj.grad.to_local()}
            queue.put((rank, capacity, {k: v.detach().numpy().copy() for k, v in got.items()}))  # by value
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_dispatch_and_combine_equal_the_unsharded_experts():
    """Each rank's output and the gradients of its tokens, its routing weights and its expert slice equal what
    the unsharded Experts gives (expert gradients summed over both ranks' tokens), dropless and with a capacity
    (which cuts each rank's own tokens before dispatch, as the data-parallel layouts without ep do)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_run, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(2 * len(CAPACITIES)):
        rank, capacity, res = queue.get(timeout=120)
        got[rank, capacity] = {k: torch.from_numpy(v) for k, v in res.items()}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    L = E // 2
    for capacity in CAPACITIES:
        full, xs, idx, ws = _inputs(capacity)
        for rank in range(2):
            x, w = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
            y, dropped = full(x, idx[rank], w)
            _probe(y).backward()  # the expert gradients add up over both ranks' tokens
            ours = got[rank, capacity]
            torch.testing.assert_close(ours["y"], y.detach(), rtol=1e-5, atol=1e-6)
            assert float(ours["dropped"]) == float(dropped)
            torch.testing.assert_close(ours["gx"], x.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours["gw"], w.grad, rtol=1e-5, atol=1e-6)
        assert (float(got[1, capacity]["dropped"]) > 0) == (capacity is not None)
        for rank in range(2):  # each rank's expert slice got the gradient of both ranks' tokens
            rows = slice(rank * L, (rank + 1) * L)
            torch.testing.assert_close(got[rank, capacity]["g_gate_up"], full.gate_up_proj.grad[rows],
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[rank, capacity]["g_down"], full.down_proj.grad[rows], rtol=1e-5, atol=1e-6)
