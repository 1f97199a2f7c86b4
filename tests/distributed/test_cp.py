"""Context parallelism (workbench/parallel/cp.py) on 2 gloo ranks, one torchrun launch (cp_worker.py).

Attention: ring and Ulysses cores on zig-zag slices equal the plain AttentionCore on the whole sequence, in the
output and the gradients of q, k and v (fp32, rtol 1e-5), for causal, packed documents crossing the chunk edges,
sliding windows, GQA (one KV head too: Ulysses replicates it), MLA's smaller value head, bidirectional documents
and a soft-cap; and the zig-zag split gives both ranks the same causal work (2P + 1 sub-blocks each).
Training: llama3 debug under fsdp2 (ring and Ulysses) and ddp (ring) with cp = 2 gives the per-step losses,
gradient norms and validation loss of one process on the same global batch.
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


@pytest.fixture(scope="module")
def single(tmp_path_factory, debug_data):
    out = tmp_path_factory.mktemp("cp-single")
    job = load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out), "--run.name", "single", "--data.dir",
                                              str(debug_data), "--train.sample_tokens", "0", *RUN])
    trainer = Trainer(job, log=lambda *a, **k: None)
    history = trainer.fit()
    return history, trainer.evaluate()["val_loss"]


@pytest.mark.parametrize("method", ["ring", "ulysses"])
@pytest.mark.parametrize("case", ATTENTION)
def test_context_parallel_attention_equals_full_attention(method, case, launched):
    got = launched[0][f"{method}-{case}"]
    assert got["ok"], got  # output and dq, dk, dv all close (rtol 1e-5, atol 1e-6)
    assert max(got[k] for k in ("out", "dq", "dk", "dv")) < 1e-5, got


def test_zigzag_balances_causal_work_and_skips_masked_blocks(launched):
    results = launched[0]
    # P = 2: 4 chunks, 10 of the 16 (query, key) chunk pairs are causal; each rank computes 2P + 1 = 5 of them
    assert results["ring-causal"]["blocks"] == [5, 5]
    assert sum(results["ring-causal-docs"]["blocks"]) < 10  # other documents' blocks are skipped too


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
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
