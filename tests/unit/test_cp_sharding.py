"""Context parallelism without a process group: the zig-zag split, its inverse, the log-sum-exp merge and the
swap of the plan's attention cores (the distributed equality tests are tests/distributed/test_cp.py)."""

import pytest
import torch

from workbench.errors import ConfigError
from workbench.nn.attention import AttentionCore, MaskSpec
from workbench.parallel.cp import (
    NEG,
    RingAttention,
    UlyssesAttention,
    apply_context_parallel,
    block_attention,
    context_parallel_disabled,
    merge,
    shard_batch,
    shard_sequence,
    unshard_sequence,
    zigzag_slots,
)


def test_zigzag_gives_rank_r_chunks_r_and_2p_minus_1_minus_r():
    # T = 16, P = 2: chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert zigzag_slots(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_slots(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    for P in (1, 2, 3, 4):  # every slot exactly once over the ranks
        slots = torch.cat([zigzag_slots(24, P, r) for r in range(P)])
        assert sorted(slots.tolist()) == list(range(24))


@pytest.mark.parametrize("P", [1, 2, 4])
def test_unshard_inverts_shard(P):
    x = torch.randn(3, 16, 5)
    parts = [shard_sequence(x, P, r) for r in range(P)]
    assert all(p.shape == (3, 16 // P, 5) for p in parts)
    assert torch.equal(unshard_sequence(parts), x)
    y = torch.randn(2, 4, 16, 8)  # (B, H, T, D): along dim 2
    assert torch.equal(unshard_sequence([shard_sequence(y, P, r, dim=2) for r in range(P)], dim=2), y)


def test_shard_batch_cuts_every_sequence_tensor_and_checks_the_length():
    batch = {"input_ids": torch.arange(16).reshape(1, 16), "labels": torch.arange(16).reshape(1, 16) + 1,
             "positions": torch.arange(16).reshape(1, 16), "document_ids": torch.zeros(1, 16, dtype=torch.long),
             "weights": torch.ones(1)}
    got = shard_batch(batch, 2, 1)
    assert got["input_ids"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert got["labels"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]  # each slot keeps its own (shifted) target
    assert got["weights"] is batch["weights"] and shard_batch(batch, 1, 0) is batch
    with pytest.raises(ConfigError, match=r"'data.seq_len': 16 must be divisible by 2 x parallel.cp = 6"):
        shard_batch(batch, 3, 0)


def test_log_sum_exp_merge_of_two_key_blocks_is_the_softmax_over_both():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 6)
    full = AttentionCore(0.5, "math")(q, k, v, MaskSpec(causal=False))
    ok = torch.ones(1, 1, 5, 4, dtype=torch.bool)
    o1, l1 = block_attention(q, k[:, :, :4], v[:, :, :4], ok, 0.5, None)
    o2, l2 = block_attention(q, k[:, :, 4:], v[:, :, 4:], ok, 0.5, None)
    torch.testing.assert_close(merge(o1, l1, o2, l2)[0], full)
    # a block where a row sees no key: lse = NEG, o = 0, and it vanishes in the merge
    none = torch.zeros_like(ok)
    o3, l3 = block_attention(q, k[:, :, :4], v[:, :, :4], none, 0.5, None)
    assert torch.all(l3 <= NEG / 2) and torch.all(o3 == 0)
    torch.testing.assert_close(merge(o1, l1, o3, l3)[0], o1)


def test_the_plan_context_cores_are_swapped_and_set_aside_for_generation():
    from workbench.models.llama3 import FLAVORS, Llama3
    from workbench.parallel.plans import plan_for

    model = Llama3(FLAVORS["debug"])
    scale = model.layers[0].attention.core.scale
    keys = set(model.state_dict())
    cores = apply_context_parallel(model, plan_for("llama3"), group=None, method="ring")
    assert len(cores) == 2 and all(isinstance(m.attention.core, RingAttention) for m in model.layers)
    assert cores[0].scale == scale and set(model.state_dict()) == keys  # no parameters: checkpoints unchanged
    assert apply_context_parallel(model, plan_for("llama3"), None, "ring") == []  # applied once only
    with context_parallel_disabled(model):  # plain cores: a whole-sequence forward in one process works
        assert not any(c.active for c in cores)
        out = model({"input_ids": torch.randint(0, 512, (1, 8))})
        assert out.hidden.shape == (1, 8, 64)
    assert all(c.active for c in cores)
    with pytest.raises(ConfigError, match=r"'parallel.cp_method': 'stripes'"):
        apply_context_parallel(model, plan_for("llama3"), None, "stripes")
    assert UlyssesAttention.method == "ulysses"


def test_a_moba_model_under_ring_attention_is_refused_when_the_job_is_validated():
    from workbench.config import load_config
    from workbench.job import JobConfig

    args = ["--model.moba_block_size", "16", "--parallel.backend", "fsdp2", "--parallel.cp", "2",
            "--data.seq_len", "64"]
    with pytest.raises(ConfigError, match="parallel.cp_method.*ring attention does not run MoBA.*ulysses"):
        load_config(JobConfig, None, args)
    job = load_config(JobConfig, None, [*args, "--parallel.cp_method", "ulysses"])
    assert job.parallel.cp_method == "ulysses"
