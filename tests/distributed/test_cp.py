"""Context parallelism (workbench/parallel/cp.py) on 2 gloo ranks, one torchrun launch (cp_worker.py).

Attention: ring and Ulysses cores on zig-zag slices equal the plain AttentionCore on the whole sequence, in the
output and the gradients of q, k and v (fp32, rtol 1e-5), for causal, packed documents crossing the chunk edges,
sliding windows, GQA (one KV head too: Ulysses replicates it), MLA's smaller value head, bidirectional documents
and a soft-cap; and the zig-zag split gives both ranks the same causal work (2P + 1 sub-blocks each).
Training: llama3 debug under fsdp2 (ring and Ulysses) and ddp (ring) with cp = 2 gives the per-step losses,
gradient norms and validation loss of one process on the same global batch. Mixtures of experts too: Mixtral
debug (fsdp2 ring, ddp ring) and Kimi K2 debug (DeepSeek-V3 without MTP; fsdp2 ring, Ulysses, and ring with
ep = 2 borrowing the cp ranks), whose logged aux loss, balance loss (Kimi: the sequence-wise one, per-sequence
counts summed over the cp ranks) and expert load, and Kimi's router biases after three bias updates, equal the
single-process run's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from listeners import LOOPBACK, run_watching_listeners

from workbench.config import load_config
from workbench.job import JobConfig
from workbench.train.trainer import Trainer

WORKER = Path(__file__).with_name("cp_worker.py")
DEBUG_TOML = Path(__file__).resolve().parents[2] / "configs" / "llama3" / "debug.toml"
# both cp ranks read the same samples: each takes the whole global batch of 8
RUN = ["--train.steps", "3", "--train.eval_every", "0", "--train.ckpt_every", "0", "--train.log_every", "1",
       "--train.micro_batch_size", "4", "--train.grad_accum", "2", "--train.eval_tokens", "256"]
CP = ["--parallel.cp", "2"]
TRAIN_CASES = {
    "fsdp2-cp2-ring": [*RUN, *CP, "--parallel.backend", "fsdp2", "--parallel.cp_method", "ring"],
    "fsdp2-cp2-ulysses": [*RUN, *CP, "--parallel.backend", "fsdp2", "--parallel.cp_method", "ulysses"],
    "ddp-cp2-ring": [*RUN, *CP, "--parallel.backend", "ddp", "--parallel.cp_method", "ring"],
}
MIXTRAL = ["--model.family", "mixtral", "--model.flavor", "debug"]
# both Kimi K2 balancing terms, strong enough to show: the sequence-wise loss and the router bias update
KIMI = ["--model.family", "deepseek_v3", "--model.flavor", "kimi-k2-debug", "--model.seq_aux_loss_coef", "0.01",
        "--model.bias_update_rate", "0.01"]
MOE_CASES = {
    "mixtral-fsdp2-cp2-ring": (MIXTRAL, [*RUN, *CP, "--parallel.backend", "fsdp2", "--parallel.cp_method", "ring"]),
    "mixtral-ddp-cp2-ring": (MIXTRAL, [*RUN, *CP, "--parallel.backend", "ddp", "--parallel.cp_method", "ring"]),
    "kimi-fsdp2-cp2-ring": (KIMI, [*RUN, *CP, "--parallel.backend", "fsdp2", "--parallel.cp_method", "ring"]),
    "kimi-fsdp2-cp2-ulysses": (KIMI, [*RUN, *CP, "--parallel.backend", "fsdp2", "--parallel.cp_method", "ulysses"]),
    "kimi-fsdp2-cp2-ep2-ring": (KIMI, [*RUN, *CP, "--parallel.backend", "fsdp2", "--parallel.cp_method", "ring",
                                       "--parallel.ep", "2"]),
}
TRAIN_CASES.update({name: [*model, *args] for name, (model, args) in MOE_CASES.items()})
ATTENTION = ["causal", "causal-docs", "sliding-window", "sliding-window-docs", "gqa-docs", "gqa-one-kv-head",
             "mla-value-dim", "bidirectional-docs", "soft-cap"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, debug_data):
    out = tmp_path_factory.mktemp("cp")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "workbench.parallel.rendezvous", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(out), str(debug_data), json.dumps(TRAIN_CASES)]
    proc, listened = run_watching_listeners(cmd, timeout=600, env=env)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert listened and all(ip in LOOPBACK for ip, _ in listened), listened
    return (json.loads((out / "cp-results.json").read_text()), json.loads((out / "train-results.json").read_text()))


def train_single(out: Path, data: Path, *model: str):
    """One process on the same global batch: (history, validation loss, router biases or None)."""
    job = load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out), "--run.name", "single", "--data.dir",
                                              str(data), "--train.sample_tokens", "0", *RUN, *model])
    trainer = Trainer(job, log=lambda *a, **k: None)
    history = trainer.fit()
    model = trainer.engine.unwrap()
    biases = [b.moe.router.bias.tolist() for b in model.moe_blocks()] if hasattr(model, "moe_blocks") else None
    return history, trainer.evaluate()["val_loss"], biases


@pytest.fixture(scope="module")
def single(tmp_path_factory, debug_data):
    return train_single(tmp_path_factory.mktemp("cp-single"), debug_data)[:2]


@pytest.fixture(scope="module")
def single_moe(tmp_path_factory, debug_data):
    """The single-process runs of the MoE models, trained once each when first asked for."""
    runs = {}

    def get(model: tuple[str, ...]):
        if model not in runs:
            runs[model] = train_single(tmp_path_factory.mktemp("cp-single-moe"), debug_data, *model)
        return runs[model]

    return get


@pytest.mark.parametrize("method", ["ring", "ulysses"])
@pytest.mark.parametrize("case", ATTENTION)
def test_context_parallel_attention_equals_full_attention(method, case, launched):
    got = launched[0][f"{method}-{case}"]
    assert got["ok"], got  # output and dq, dk, dv all close (rtol 1e-5, atol 1e-6)
    assert max(got[k] for k in ("out", "dq", "dk", "dv")) < 1e-5, got


def test_ulysses_runs_moba_exactly_and_the_ring_refuses_it_by_name(launched):
    got = launched[0]["ulysses-moba-docs"]
    assert got["ok"] and max(got[k] for k in ("out", "dq", "dk", "dv")) < 1e-5, got
    assert "does not support the mask feature(s) moba" in launched[0]["ring-moba-refused"]


def test_zigzag_balances_causal_work_and_skips_masked_blocks(launched):
    results = launched[0]
    # P = 2: 4 chunks, 10 of the 16 (query, key) chunk pairs are causal; each rank computes 2P + 1 = 5 of them
    assert results["ring-causal"]["blocks"] == results["ring-causal"]["expected_blocks"] == [5, 5]
    # with packed documents exactly the sub-blocks holding an allowed pair are computed, fewer than causal's
    docs = results["ring-causal-docs"]
    assert docs["blocks"] == docs["expected_blocks"] and sum(docs["blocks"]) < 10
    for case in ("ring-sliding-window-docs", "ring-gqa-docs", "ring-bidirectional-docs"):
        assert results[case]["blocks"] == results[case]["expected_blocks"], case


@pytest.mark.parametrize("case", sorted(set(TRAIN_CASES) - set(MOE_CASES)))
def test_training_under_context_parallel_matches_single_process(case, launched, single):
    history, val_loss = single
    got = launched[1][case]
    assert len(got["losses"]) == len(history) == 3
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor([r["loss"] for r in history]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor([r["grad_norm"] for r in history]),
                               rtol=1e-5, atol=0)
    assert got["val_loss"] == pytest.approx(val_loss, rel=1e-5)  # the validation slices, summed over cp ranks
    assert isinstance(got["sample"], str) and got["sample"]  # generation runs with the cp cores set aside


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_mixture_of_experts_under_context_parallel_matches_single_process(case, launched, single_moe):
    history, val_loss, biases = single_moe(tuple(MOE_CASES[case][0]))
    got = launched[1][case]
    keys = {"losses": "loss", "grad_norms": "grad_norm", "aux_loss": "aux_loss", "balance_loss": "balance_loss",
            "expert_load": "expert_load"}
    assert all(k in got for k in keys) and all(k in history[0] for k in keys.values()), sorted(got)
    assert all(r["aux_loss"] > 0 and r["balance_loss"] > 0 for r in history)  # the balance term is trained
    for key, ref_key in keys.items():
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor([r[ref_key] for r in history]),
                                   rtol=1e-5, atol=0, msg=key)
    assert got["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    if case.startswith("kimi"):  # three bias updates from the step's expert counts, summed over dp x cp
        assert biases is not None and max(abs(b) for layer in biases for b in layer) > 0
        torch.testing.assert_close(torch.tensor(got["router_biases"]), torch.tensor(biases), rtol=0, atol=0)
    else:
        assert got["router_biases"] is None and biases is None

