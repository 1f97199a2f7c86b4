"""The shared MoE pieces (workbench.models.moe): dispatch paths, capacity, routing variants, bias balancing,
and the reducibility of the aux sums that the balance loss is built from."""

import dataclasses
import math

import pytest
import torch

from workbench.models.moe import Experts, MoE, Router, balance_loss, sum_aux, switch_balance_loss, z_loss

D, F, E = 16, 32, 8


def _experts(capacity_factor=None, use_grouped_mm=True, seed=0):
    torch.manual_seed(seed)
    ex = Experts(D, F, E, capacity_factor=capacity_factor, use_grouped_mm=use_grouped_mm)
    ex.init_weights(0.2, 0.2)
    return ex


def _reference(ex, x, idx, w):
    """Token by token: y_t = sum_j w_tj * down_e (SiLU(gate_e x) * up_e x)."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            g, u = (ex.gate_up_proj[e] @ x[t]).chunk(2)
            y[t] += w[t, j] * (ex.down_proj[e] @ (torch.nn.functional.silu(g) * u))
    return y


def _routing(n=24, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=g)
    return x, idx, w


def test_grouped_mm_path_equals_loop_path_and_the_reference():
    x, idx, w = _routing()
    idx[:, 0] = 0  # an overloaded expert
    idx[idx == 5] = 6  # and an expert with no tokens
    grouped, loop = _experts(use_grouped_mm=True), _experts(use_grouped_mm=False)
    with torch.no_grad():
        y_loop, d = loop(x, idx, w)
        y_grouped, _ = grouped(x, idx, w)
        ref = _reference(loop, x, idx, w)
    assert d.item() == 0
    torch.testing.assert_close(y_loop, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_grouped, y_loop, atol=1e-5, rtol=1e-5)
    if hasattr(torch, "_grouped_mm"):  # the kernel itself, not a silent fallback, on the sorted slots
        order = idx.reshape(-1).argsort(stable=True)
        xs, counts = x[order // 2], torch.bincount(idx.reshape(-1), minlength=E)
        with torch.no_grad():
            torch.testing.assert_close(grouped._grouped(xs, counts), loop._loop(xs, counts), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch build has no torch._grouped_mm")
def test_under_autocast_the_grouped_product_runs_in_the_autocast_dtype(monkeypatch):
    """Autocast does not cover torch._grouped_mm: the experts cast its inputs themselves (on CUDA the fp32 product
    has no kernel), so under bf16 autocast the grouped path runs in bf16 instead of falling back to the loop, the
    output keeps the input's dtype, and the fp32 weights get fp32 gradients."""
    ex = _experts()
    x, idx, w = _routing()
    ref = ex(x, idx, w)[0].detach()
    dtypes = []
    real = torch._grouped_mm

    def spy(a, b, **kw):
        dtypes.append((a.dtype, b.dtype))
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    monkeypatch.setattr(Experts, "_loop", lambda *a, **k: pytest.fail("the loop ran instead of the grouped product"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = ex(x, idx, w)
    assert dtypes == [(torch.bfloat16, torch.bfloat16)] * 2 and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=5e-2, rtol=5e-2)  # bf16 products
    y.square().sum().backward()
    assert ex.gate_up_proj.grad.dtype == torch.float32 and ex.gate_up_proj.grad.abs().sum() > 0


def test_grouped_path_falls_back_when_strides_are_unaligned():
    ex = Experts(6, 10, 3)  # 6 * 4 bytes rows: not 16-byte aligned, so the loop runs
    ex.init_weights(0.2, 0.2)
    x, idx, w = torch.randn(5, 6), torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1], [0, 1]]), torch.rand(5, 2)
    with torch.no_grad():
        y, _ = ex(x, idx, w)
        ref = _reference(ex, x, idx, w)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_capacity_factor_drops_overflow_slots_and_counts_them():
    n, k = 16, 2
    x, idx, w = _routing(n, k)
    idx[:, 0] = 3  # every token wants expert 3 in its first slot
    idx[:, 1] = torch.arange(n) % 2  # and expert 0 or 1 in its second
    cf = 1.0
    cap = math.ceil(cf * n * k / E)  # 4
    ex = _experts(capacity_factor=cf)
    with torch.no_grad():
        y, dropped = ex(x, idx, w)
    # expert 3 keeps its first `cap` tokens, experts 0 and 1 keep `cap` of their 8 each
    assert dropped.item() == (n - cap) + 2 * (n // 2 - cap)
    keep = torch.zeros(n, k, dtype=torch.bool)
    keep[:cap, 0] = True
    for e in (0, 1):
        rows = (idx[:, 1] == e).nonzero().flatten()[:cap]
        keep[rows, 1] = True
    with torch.no_grad():
        ref = _reference(ex, x, idx, w * keep)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # a generous capacity drops nothing and equals dropless
    with torch.no_grad():
        y_big, d_big = _experts(capacity_factor=float(E))(x, idx, w)
        y_free, _ = _experts()(x, idx, w)
    assert d_big.item() == 0
    torch.testing.assert_close(y_big, y_free)


def test_softmax_topk_renormalise_equals_softmax_over_the_topk_logits():
    torch.manual_seed(0)
    r = Router(D, E, 2)
    r.init_weights(0.5)
    x = torch.randn(32, D)
    with torch.no_grad():
        logits, scores, w, idx = r(x)
    torch.testing.assert_close(scores, logits.softmax(-1))
    top = logits.gather(1, idx)  # (N, k)
    torch.testing.assert_close(w, top.softmax(-1), atol=1e-6, rtol=1e-6)
    assert torch.equal(idx, logits.topk(2).indices)
    # without renormalisation the weights are the raw full-softmax probabilities (Qwen2-MoE style)
    r.norm_topk_prob = False
    with torch.no_grad():
        _, scores2, w2, idx2 = r(x)
    torch.testing.assert_close(w2, scores2.gather(1, idx2))
    assert (w2.sum(-1) < 1).all()


def test_sigmoid_routing_bias_changes_selection_but_not_weights():
    torch.manual_seed(0)
    r = Router(D, E, 2, scoring="sigmoid", norm_topk_prob=False, bias_balancing=True, routed_scaling=2.5)
    r.init_weights(0.5)
    assert "bias" in dict(r.named_buffers()) and "bias" in r.state_dict()
    assert not any(n == "bias" for n, _ in r.named_parameters())
    x = torch.randn(64, D)
    with torch.no_grad():
        _, scores, w0, idx0 = r(x)
        torch.testing.assert_close(scores, torch.sigmoid(r.gate(x)))
        torch.testing.assert_close(w0, 2.5 * scores.gather(1, idx0))
        r.bias[5] = 10.0  # expert 5 now wins every selection ...
        _, scores_b, w1, idx1 = r(x)
    assert (idx1 == 5).any(-1).all() and not torch.equal(idx0, idx1)
    torch.testing.assert_close(scores_b, scores)  # ... but the scores are untouched
    torch.testing.assert_close(w1, 2.5 * scores.gather(1, idx1))  # and weights use them, not the bias


def test_update_bias_moves_toward_balance():
    torch.manual_seed(0)
    r = Router(D, E, 2, scoring="sigmoid", bias_balancing=True)
    r.init_weights(0.5)
    with torch.no_grad():
        r.gate.weight[2] += 0.5 * r.gate.weight.abs().max()  # make expert 2 popular: a skewed start
    x = torch.randn(512, D)

    def counts():
        with torch.no_grad():
            idx = r(x)[3]
        return torch.bincount(idx.flatten(), minlength=E).float()

    c0 = counts()
    r.update_bias(c0, 0.01)
    over, under = c0 > c0.mean(), c0 < c0.mean()
    assert (r.bias[over] == -0.01).all() and (r.bias[under] == 0.01).all()
    for _ in range(300):
        r.update_bias(counts(), 0.01)
    c1 = counts()
    assert c1.std() < 0.5 * c0.std()  # the load evened out
    with pytest.raises(RuntimeError, match="no balancing bias"):
        Router(D, E, 2).update_bias(c0, 0.1)


def test_group_limited_routing_stays_inside_the_chosen_groups():
    torch.manual_seed(0)
    G, TG = 4, 2
    r = Router(D, E, 3, scoring="sigmoid", n_groups=G, topk_groups=TG, bias_balancing=True)
    r.init_weights(1.0)
    with torch.no_grad():
        r.bias.normal_(0, 0.1)
    x = torch.randn(200, D)
    with torch.no_grad():
        _, scores, w, idx = r(x)
        choice = (scores + r.bias).view(200, G, E // G)
        groups = choice.topk(2, dim=-1).values.sum(-1).topk(TG, dim=-1).indices  # (N, TG)
    chosen_groups = idx // (E // G)  # (N, k)
    assert (chosen_groups[..., None] == groups[:, None, :]).any(-1).all()
    # and the result differs from unrestricted routing for some tokens (the restriction is real)
    free = (scores + r.bias).topk(3, dim=-1).indices
    assert not torch.equal(free.sort(-1).values, idx.sort(-1).values)


def test_aux_sums_over_two_half_batches_equal_the_full_batch():
    torch.manual_seed(0)
    moe = MoE(D, F, E, 2, n_shared=1)
    moe.init_weights(0.3, 0.3)
    x = torch.randn(4, 10, D)
    with torch.no_grad():
        y, full = moe(x)
        y1, a1 = moe(x[:2])
        y2, a2 = moe(x[2:])
    torch.testing.assert_close(torch.cat([y1, y2]), y)
    halves = sum_aux([a1, a2])
    for key in ("router_prob_sum", "expert_counts", "tokens", "dropped", "z_sum"):
        torch.testing.assert_close(halves[key], full[key], msg=key)
    assert full["tokens"].item() == 40 and full["expert_counts"].sum().item() == 80
    # the loss from the summed halves is the loss of the full batch (a mean of the halves' losses is not)
    torch.testing.assert_close(switch_balance_loss(halves, E, 2), switch_balance_loss(full, E, 2))
    torch.testing.assert_close(z_loss(halves), z_loss(full))
    # uneven halves: the same holds, because nothing is averaged before the reduction
    with torch.no_grad():
        _, b1 = moe(x.reshape(1, 40, D)[:, :7])
        _, b2 = moe(x.reshape(1, 40, D)[:, 7:])
    torch.testing.assert_close(switch_balance_loss(sum_aux([b1, b2]), E, 2), switch_balance_loss(full, E, 2))


def test_balance_loss_is_top_k_at_perfect_balance_and_has_router_gradients():
    aux = {"expert_counts": torch.full((E,), 2 * 10 / E), "router_prob_sum": torch.full((E,), 10 / E),
           "tokens": torch.tensor(10.0)}
    assert switch_balance_loss(aux, E, 2).item() == pytest.approx(2.0)
    torch.manual_seed(0)
    moe = MoE(D, F, E, 2)
    moe.init_weights(0.3, 0.3)
    _, a = moe(torch.randn(2, 5, D))
    (switch_balance_loss(a, E, 2) + 1e-3 * z_loss(a)).backward()
    assert moe.router.gate.weight.grad is not None and moe.router.gate.weight.grad.abs().sum() > 0


def test_token_mask_leaves_padding_out_of_the_sums():
    torch.manual_seed(0)
    moe = MoE(D, F, E, 2)
    moe.init_weights(0.3, 0.3)
    x = torch.randn(1, 10, D)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, :6] = True
    with torch.no_grad():
        _, masked = moe(x, mask)
        _, real = moe(x[:, :6])
    for key in ("router_prob_sum", "expert_counts", "tokens", "z_sum"):
        torch.testing.assert_close(masked[key], real[key], msg=key)


def test_mixtral_builds_on_meta_and_counts_active_flops():
    from workbench.models.base import ModelSection, build_model
    from workbench.models.mixtral import FLAVORS, Mixtral

    with torch.device("meta"):
        big = Mixtral(FLAVORS["8x22B"])
    total = sum(p.numel() for p in big.parameters())
    active_matmul = (big.flops_per_token(0)) / 6
    assert 140e9 < total < 142e9 and 38e9 < active_matmul < 40e9  # 141B total, 39B active (published)
    model = build_model(ModelSection.of("mixtral", "debug"))
    out = model({"input_ids": torch.randint(0, 512, (2, 6))})
    assert out.hidden.shape == (2, 6, 64) and out.aux["tokens"].item() == 2 * 2 * 6
    assert out.aux["expert_counts_per_layer"].shape == (2, 4) and "router_logits" not in out.aux


def test_expert_parallel_is_refused_by_name_and_the_mixtral_plan_declares_experts():
    from workbench.errors import ConfigError
    from workbench.models.mixtral import FLAVORS, Mixtral
    from workbench.parallel.dims import ParallelDims
    from workbench.parallel.plans import plan_for

    plan = plan_for("mixtral")
    model = Mixtral(FLAVORS["debug"])
    assert plan.expert == "layers.*.moe.experts"
    assert isinstance(model.get_submodule(plan.expert.replace("*", "0")), type(model.layers[0].moe.experts))
    for path in plan.tensor:  # every tensor-parallel path exists, and none is inside the MoE
        assert "moe" not in path
        model.get_submodule(path.replace("*", "1"))
    for backend in ("zero3",):  # fsdp2 takes ep (workbench/parallel/ep.py, tests/unit/test_ep.py)
        with pytest.raises(ConfigError, match=r"'parallel.ep'.*expert parallelism, which is not built yet"):
            ParallelDims(backend, 1, 4, 1, 1, 2, 4).validate(FLAVORS["debug"])
    ParallelDims("fsdp2", 1, 4, 1, 1, 1, 4).validate(FLAVORS["debug"])  # ep = 1 is fine


def test_per_rank_balance_shares_sum_to_the_whole_batch_loss_and_gradient():
    """Two 'ranks' with uneven token counts: each forms its share with the reduced counts; the shares and
    their gradients add up to the single-process loss over both halves, which a mean of per-rank losses misses."""
    torch.manual_seed(0)
    moe = MoE(D, F, E, 2)
    moe.init_weights(0.3, 0.3)
    x = torch.randn(1, 30, D)
    _, full = moe(x)
    want = switch_balance_loss(full, E, 2)
    (g_want,) = torch.autograd.grad(want, moe.router.gate.weight)

    _, a1 = moe(x[:, :9])
    _, a2 = moe(x[:, 9:])
    with torch.no_grad():
        reduced = {k: a1[k] + a2[k] for k in ("expert_counts", "tokens")}
    reduce = lambda t: reduced["expert_counts"].clone() if t.shape == reduced["expert_counts"].shape \
        else reduced["tokens"].clone()  # noqa: E731  (an all-reduce over the two ranks)
    (s1, counts), (s2, _) = balance_loss(a1, reduce, E), balance_loss(a2, reduce, E)
    torch.testing.assert_close(s1 + s2, want)
    torch.testing.assert_close(counts, full["expert_counts"])
    (g_shares,) = torch.autograd.grad(s1 + s2, moe.router.gate.weight)
    torch.testing.assert_close(g_shares, g_want)
    per_rank_mean = (switch_balance_loss(a1, E, 2) + switch_balance_loss(a2, E, 2)) / 2
    assert abs(float(per_rank_mean.detach()) - float(want.detach())) > 1e-4


def test_sequence_balance_shares_of_cp_slices_sum_to_the_whole_sequences_loss_and_gradient():
    """Context parallel: two 'cp ranks' each hold a zig-zag slice of every sequence (padding masked unevenly).
    With the per-sequence counts and tokens summed over the cp group and each sequence counted once, the two
    shares and their gradients add up to the sequence-wise loss of the whole sequences; summing only the
    number of sequences (the data-parallel rule) misses it."""
    from workbench.models.moe import sequence_balance_loss
    from workbench.parallel.cp import shard_sequence

    torch.manual_seed(0)
    moe = MoE(D, F, E, 2, sequence_stats=True, scoring="sigmoid", bias_balancing=True)
    moe.init_weights(0.3, 0.3)
    B, T, P = 3, 16, 2
    x = torch.randn(B, T, D)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -5:] = False  # padding: the per-sequence token counts T_b differ

    def stats(aux):  # one MoE layer, stacked as DeepSeek-V3 does (L, B, E)
        return {k: aux[k][None] for k in ("seq_counts", "seq_prob_sum", "seq_tokens")}

    whole = sequence_balance_loss(stats(moe(x, mask)[1]), lambda t: t, E, 2)
    (g_whole,) = torch.autograd.grad(whole, moe.router.gate.weight)
    ranks = [stats(moe(shard_sequence(x, P, r), shard_sequence(mask, P, r))[1]) for r in range(P)]
    assert ranks[0]["seq_tokens"].sum() != ranks[1]["seq_tokens"].sum()  # uneven slices

    def reduce_seq(t):  # an all-reduce over the cp group, found by shape (counts (L, B, E), tokens (L, B))
        key = "seq_counts" if t.dim() == 3 else "seq_tokens"
        return sum(r[key].detach() for r in ranks)

    reduce = lambda t: t * P  # noqa: E731  (the world is the cp group here: both ranks hold the same B)
    shares = [sequence_balance_loss(r, reduce, E, 2, reduce_seq, seq_split=P) for r in ranks]
    torch.testing.assert_close(sum(shares), whole)
    (g_shares,) = torch.autograd.grad(sum(shares), moe.router.gate.weight)
    torch.testing.assert_close(g_shares, g_whole)
    data_parallel_rule = sum(sequence_balance_loss(r, reduce, E, 2) for r in ranks)  # slices taken as sequences
    assert abs(float(data_parallel_rule.detach()) - float(whole.detach())) > 1e-3


def test_tensor_parallel_with_experts_is_refused_by_name():
    from pathlib import Path

    from workbench.config import load_config
    from workbench.errors import ConfigError
    from workbench.job import JobConfig
    from workbench.train.trainer import build_engine

    debug = Path(__file__).resolve().parents[2] / "configs" / "llama3" / "debug.toml"
    job = load_config(JobConfig, debug, ["--model.family", "mixtral", "--parallel.backend", "fsdp2",
                                         "--parallel.tp", "2"])
    with pytest.raises(ConfigError, match="parallel.tp.*'mixtral'.*mixture of experts is not built yet"):
        build_engine(None, job, None, None)


def test_mixtral_shared_expert_is_added_to_the_routed_output_and_trains():
    """n_shared_experts = 1: every block's MoE holds one SwiGLU of width ffn_dim, initialised (finite, w2 at the
    residual std); its output is added to the routed part; with its w2 zeroed the model equals the plain Mixtral
    holding the same other weights (so the wiring changes nothing else); gradients reach it."""
    from workbench.models.base import ModelSection, build_model
    from workbench.nn.swiglu import SwiGLU

    torch.manual_seed(0)
    model = build_model(ModelSection.of("mixtral", "debug", n_shared_experts=1))
    cfg = model.cfg
    for block in model.layers:
        shared = block.moe.shared_experts
        assert isinstance(shared, SwiGLU) and shared.w1.weight.shape == (cfg.ffn_dim, cfg.dim)
        for w, std in ((shared.w1, cfg.init_std), (shared.w3, cfg.init_std),
                       (shared.w2, cfg.init_std / math.sqrt(2 * cfg.n_layers))):
            assert torch.isfinite(w.weight).all() and 0.7 * std < float(w.weight.detach().std()) < 1.1 * std
    # one MoE layer by hand: y = routed(m) + W2 (SiLU(W1 m) * W3 m)
    moe = model.layers[0].moe
    m = torch.randn(2, 5, cfg.dim)
    y, _ = moe(m)
    shared = moe.shared_experts
    moe.shared_experts = None
    routed, _ = moe(m)
    moe.shared_experts = shared
    by_hand = torch.nn.functional.silu(m @ shared.w1.weight.T) * (m @ shared.w3.weight.T) @ shared.w2.weight.T
    torch.testing.assert_close(y, routed + by_hand)
    assert by_hand.abs().max() > 1e-3  # the shared part is not negligible

    plain = build_model(ModelSection.of("mixtral", "debug"))
    state = {k: v for k, v in model.state_dict().items() if "shared_experts" not in k}
    plain.load_state_dict(state, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        for block in model.layers:
            block.moe.shared_experts.w2.weight.zero_()
        torch.testing.assert_close(model({"input_ids": ids}).hidden, plain({"input_ids": ids}).hidden)
        for block in model.layers:
            block.moe.shared_experts.init_weights(0.02, 0.02)
        assert (model({"input_ids": ids}).hidden - plain({"input_ids": ids}).hidden).abs().max() > 1e-4
    out = model({"input_ids": ids})
    model.logits(out.hidden).float().logsumexp(-1).sum().backward()
    for block in model.layers:
        for lin in (block.moe.shared_experts.w1, block.moe.shared_experts.w2, block.moe.shared_experts.w3):
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n_shared", [1, 2])
def test_mixtral_flops_count_the_shared_experts_once_per_layer(n_shared):
    from workbench.models.mixtral import FLAVORS, Mixtral

    for flavor in ("debug", "8x7B"):
        base = FLAVORS[flavor]
        with torch.device("meta"):
            plain, shared = Mixtral(base), Mixtral(dataclasses.replace(base, n_shared_experts=n_shared))
        extra = 6 * 3 * base.dim * base.ffn_dim * base.n_layers * n_shared
        for seq_len in (0, 128):
            assert shared.flops_per_token(seq_len) - plain.flops_per_token(seq_len) == extra
        added = sum(p.numel() for p in shared.parameters()) - sum(p.numel() for p in plain.parameters())
        assert added == 3 * base.dim * base.ffn_dim * base.n_layers * n_shared  # all of them active


def test_hugging_face_mixtral_refuses_shared_experts_by_name(tmp_path):
    from types import SimpleNamespace

    from workbench.checkpoint.hf import export_hf_dir
    from workbench.checkpoint.hf.mixtral import config_to_hf, state_dict_from_hf, state_dict_to_hf
    from workbench.errors import CheckpointError
    from workbench.models.base import ModelSection, build_model

    section = ModelSection.of("mixtral", "debug", n_shared_experts=1)
    model = build_model(section)
    with pytest.raises(CheckpointError, match=r"model\.config\.n_shared_experts = 1.*no shared experts"):
        config_to_hf(section.config)
    with pytest.raises(CheckpointError, match=r"shared_experts.*model\.config\.n_shared_experts"):
        state_dict_to_hf(model.state_dict())
    plain = build_model(ModelSection.of("mixtral", "debug"))
    hf_sd = state_dict_to_hf(plain.state_dict())
    with pytest.raises(CheckpointError, match=r"model\.config\.n_shared_experts"):
        state_dict_from_hf(hf_sd, section.config)
    tok = SimpleNamespace(eos_ids={2}, bos_id=1, pad_id=0)
    with pytest.raises(CheckpointError, match=r"model\.config\.n_shared_experts"):
        export_hf_dir(model, section, tok, tmp_path / "out")
    assert not any(tmp_path.iterdir())  # refused before any folder was made
    assert "num_local_experts" in config_to_hf(ModelSection.of("mixtral", "debug").config)  # 0 exports as before
