"""Objective vlm on gloo ranks (torchrun) against the single-process run of the same global batch.

A tiny paligemma2 (both towers: SigLIP blocks and Gemma 2 blocks are FSDP2 units, plans/paligemma2.py) trains on
a tiny vision folder under fsdp2 (dp_shard 2), under fsdp2 in the warm-up setting (the language model frozen:
`objective.train_parts = "vision"`, frozen parameters sharded but without gradients), and under ddp. Per-step
losses and gradient norms must equal the single process's at rtol 1e-5 (fp32): the (image, question) rows are
split by the global cursor, each micro-batch's answer NLL is divided by the step's global target count, and the
gradients are averaged over the ranks once. One launch trains every case (train_worker.py); the singles train here.
"""

from __future__ import annotations

import pytest
from test_parallel import STEPS, torchrun, train_single

# global batch 8 (x ~3 questions an image): 4 x 2 in one process, 2 x 2 on each of 2 ranks
VLM = ["--model.family", "paligemma2", "--model.flavor", "debug", "--model.image_token_id", "11",
       "--model.sliding_window", "0", "--model.vision.image_size", "32", "--model.vision.patch_size", "8",
       "--data.vocab_size", "300", "--data.seq_len", "256", "--objective.name", "vlm", "--objective.val_questions",
       "8", "--objective.answer_tokens", "4", "--train.sample_prompt", "What colour is the circle?"]
PER_RANK = [*STEPS, "--train.micro_batch_size", "2", "--train.grad_accum", "2", "--parallel.dp_shard", "2",
            "--parallel.timeout_s", "60"]
WARMUP = ["--objective.train_parts", "vision"]
CASES = {"fsdp2": ["--parallel.backend", "fsdp2"],
         "fsdp2-warmup": ["--parallel.backend", "fsdp2", *WARMUP],
         "ddp": ["--parallel.backend", "ddp", "--parallel.dp_shard", "1", "--parallel.dp_replicate", "2"]}


@pytest.fixture(scope="module")
def vision_data(tmp_path_factory):
    from workbench.data.vision import build_vision_dataset

    out = tmp_path_factory.mktemp("vision") / "diagrams"
    build_vision_dataset(out, n_train=24, n_val=4, n_test=4, size=64, seed=0, log=lambda *a: None)
    return out


def test_vlm_layouts_match_one_process(tmp_path, vision_data):
    singles = {name: train_single(tmp_path, f"single-{name}", vision_data, *VLM, *([] if "warmup" not in name
                                                                                   else WARMUP))
               for name in ("full", "warmup")}
    got = torchrun(tmp_path, vision_data, {name: [*VLM, *PER_RANK, *args] for name, args in CASES.items()})
    for name, res in got.items():
        single = singles["warmup" if "warmup" in name else "full"]
        assert res["world_size"] == 2
        assert res["losses"] == pytest.approx([r["loss"] for r in single], rel=1e-5), name
        assert res["grad_norms"] == pytest.approx([r["grad_norm"] for r in single], rel=1e-5), name
        assert res["sample"].startswith(" -> ")  # the closing sample: an answer about a held-out image
    # the two settings really differ (the warm-up's frozen language model gets no update)
    assert [r["loss"] for r in singles["full"]][1:] != pytest.approx([r["loss"] for r in singles["warmup"]][1:])
