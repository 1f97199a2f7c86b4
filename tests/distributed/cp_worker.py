"""Run by tests/distributed/test_cp.py under torchrun (2 ranks, gloo): context-parallel attention cases and
training cases in one launch.

    torchrun --nproc-per-node 2 tests/distributed/cp_worker.py OUT_DIR DATA_DIR TRAIN_CASES_JSON

Attention cases: the same random q, k, v on every rank; each rank runs the ring or Ulysses core on its zig-zag
slice, the slices of the output and of the gradients of q, k, v are gathered and compared with the plain
AttentionCore (math) on the whole tensors. Rank 0 writes OUT_DIR/cp-results.json:
{case: {"out", "dq", "dk", "dv": max |cp - full| / max |full|, "ok": all close (rtol 1e-5, atol 1e-6),
"blocks": sub-blocks each rank computed (ring), "expected_blocks": those with an allowed pair in the dense mask}}.
Training cases: as train_worker.py (llama3 debug overrides per case; mixture-of-experts cases override the model
family), {name: {"losses", "grad_norms", "val_loss", "sample", and per step each logged MoE metric present
("aux_loss", "balance_loss", "expert_load"), "router_biases": the final DeepSeek-V3 routing biases (or None)}}
in OUT_DIR/train-results.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from workbench.config import load_config
from workbench.job import JobConfig
from workbench.nn.attention import AttentionCore, MaskSpec
from workbench.nn.moba import MobaSpec
from workbench.parallel.cp import RingAttention, UlyssesAttention, shard_sequence, unshard_sequence
from workbench.train.trainer import Trainer

DEBUG_TOML = Path(__file__).resolve().parents[2] / "configs" / "llama3" / "debug.toml"


def packed_docs(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) document ids with boundaries at random slots (documents cross the zig-zag chunk edges)."""
    starts = torch.rand(B, T, generator=gen) < 0.15
    starts[:, 0] = True
    return starts.long().cumsum(1)


# name -> (H, KV, D, Dv, mask options, with document ids)
SPECS = {
    "causal": (4, 4, 8, 8, {}, False),
    "causal-docs": (4, 4, 8, 8, {}, True),
    "sliding-window": (4, 4, 8, 8, {"sliding_window": 5}, False),
    "sliding-window-docs": (4, 4, 8, 8, {"sliding_window": 7}, True),
    "gqa-docs": (4, 2, 8, 8, {}, True),
    "gqa-one-kv-head": (4, 1, 8, 8, {}, False),  # Ulysses replicates the KV head (1 % cp != 0)
    "mla-value-dim": (4, 4, 12, 6, {}, True),  # MLA: v's head dim differs from q/k's
    "bidirectional-docs": (4, 2, 8, 8, {"causal": False}, True),
    "soft-cap": (4, 4, 8, 8, {"soft_cap": 5.0}, False),
}
# Ulysses only: MoBA picks each query's blocks from the whole sequence (the ring core refuses it by name)
ULYSSES_SPECS = {"moba-docs": (4, 2, 8, 8, {"moba": MobaSpec(block_size=4, topk=2)}, True)}


MOE_METRICS = ("aux_loss", "balance_loss", "expert_load")


def router_biases(model) -> list[list[float]] | None:
    """DeepSeek-V3's selection biases after training (every MoE layer), or None for a model without them."""
    blocks = model.moe_blocks() if hasattr(model, "moe_blocks") else []
    return [b.moe.router.bias.tolist() for b in blocks] or None


def attention_case(method: str, spec: tuple, group, P: int, r: int) -> dict:
    H, KV, D, Dv, opts, docs = spec
    B, T = 2, 32
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, T, D, generator=gen), torch.randn(B, KV, T, D, generator=gen)
    v, w = torch.randn(B, KV, T, Dv, generator=gen), torch.randn(B, H, T, Dv, generator=gen)
    doc_ids = packed_docs(B, T, gen) if docs else None
    scale = D**-0.5
    # the reference: plain attention on the whole tensors
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = AttentionCore(scale, "math")(*full, MaskSpec(document_ids=doc_ids, **opts))
    (ref * w).sum().backward()
    # context parallel: this rank's zig-zag slices
    local = [shard_sequence(x, P, r, dim=2).requires_grad_() for x in (q, k, v)]
    core = {"ring": RingAttention, "ulysses": UlyssesAttention}[method](AttentionCore(scale, "math"), group)
    mask = MaskSpec(document_ids=None if doc_ids is None else shard_sequence(doc_ids, P, r), **opts)
    out = core(*local, mask)
    (out * shard_sequence(w, P, r, dim=2)).sum().backward()

    def gathered(x):
        parts = [torch.empty_like(x) for _ in range(P)]
        dist.all_gather(parts, x.detach().contiguous(), group=group)
        return unshard_sequence(parts, dim=2)

    result, ok = {}, True
    for name, got, want in (("out", out, ref), *((f"d{n}", x.grad, f.grad) for n, x, f in zip("qkv", local, full))):
        got, want = gathered(got), want.detach()
        result[name] = float((got - want).abs().max() / want.abs().max())
        ok = ok and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    blocks = torch.tensor([getattr(core, "blocks_computed", -1)])
    parts = [torch.empty_like(blocks) for _ in range(P)]
    dist.all_gather(parts, blocks, group=group)
    return {**result, "ok": ok, "blocks": [int(b) for b in parts],
            "expected_blocks": [nonempty_sub_blocks(MaskSpec(document_ids=doc_ids, **opts), T, P, rank)
                                for rank in range(P)] if method == "ring" else None}


def nonempty_sub_blocks(mask: MaskSpec, T: int, P: int, rank: int) -> int:
    """(query chunk, key chunk) pairs of `rank` over the P ring steps that hold at least one allowed pair, counted
    on the whole sequence's dense mask: rank r holds chunks r and 2P-1-r of 2P and meets every rank's K/V once."""
    allowed = mask.dense(T, T)  # (B|1, 1, T, T)
    c = T // (2 * P)
    n = 0
    for src in range(P):
        for qc in (rank, 2 * P - 1 - rank):
            for kc in (src, 2 * P - 1 - src):
                n += bool(allowed[..., qc * c:(qc + 1) * c, kc * c:(kc + 1) * c].any())
    return n


def main() -> None:
    out, data, cases = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    dist.init_process_group("gloo")
    P, r = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(P)))
    results = {f"{method}-{name}": attention_case(method, spec, group, P, r)
               for method in ("ring", "ulysses") for name, spec in SPECS.items()}
    results.update({f"ulysses-{name}": attention_case("ulysses", spec, group, P, r)
                    for name, spec in ULYSSES_SPECS.items()})
    try:
        attention_case("ring", ULYSSES_SPECS["moba-docs"], group, P, r)
        results["ring-moba-refused"] = ""
    except NotImplementedError as e:
        results["ring-moba-refused"] = str(e)
    if r == 0:
        (out / "cp-results.json").write_text(json.dumps(results))
    train, trainer = {}, None
    for name, args in cases.items():
        job = load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out), "--run.name", name, "--data.dir", data,
                                                  "--train.sample_tokens", "0", *args])
        trainer = Trainer(job, log=lambda *a, **k: None)
        history = trainer.fit()
        train[name] = {"losses": [r["loss"] for r in history], "grad_norms": [r["grad_norm"] for r in history],
                       "val_loss": trainer.evaluate()["val_loss"], "sample": trainer.sample("def", 8),
                       **{k: [r[k] for r in history] for k in MOE_METRICS if k in history[0]},
                       "router_biases": router_biases(trainer.engine.unwrap())}
    if r == 0:
        (out / "train-results.json").write_text(json.dumps(train))
    if trainer is not None:
        trainer.close()
    elif dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
