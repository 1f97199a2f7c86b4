"""Context parallelism over video tokens for the Mochi AsymmDiT (workbench/parallel/cp.py JointVideoAttention) on
2 gloo ranks, one torchrun launch (video_cp_worker.py): each rank computes a contiguous half of the visual
tokens, the joint attention all-gathers the visual K/V, the text stream (with padded tokens) is computed whole
on both. The gathered output, the loss (summed over ranks), every parameter gradient (summed over ranks) and the
weights after 3 SGD steps equal one process on the whole video (fp32, rtol 1e-5)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from listeners import LOOPBACK, run_watching_listeners

WORKER = Path(__file__).with_name("video_cp_worker.py")
RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("video-cp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "workbench.parallel.rendezvous", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(out)]
    proc, listened = run_watching_listeners(cmd, timeout=300, env=env)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert listened and all(ip in LOOPBACK for ip, _ in listened), listened
    return json.loads((out / "video-cp-results.json").read_text())


def test_video_cp_equals_one_process(results):
    r = results
    assert r["tokens"] == 24 and r["span"] == [0, 12]  # rank 0 held the first half of the visual tokens
    assert r["output"] <= RTOL, r["output"]
    assert r["output_cp_disabled"] <= RTOL, r["output_cp_disabled"]
    # the whole video on each rank with the cores active would gather every key twice: refused
    assert "24 visual tokens, 2 ranks x 24 != the video's 24" in r["whole_video_refused"], r["whole_video_refused"]
    assert r["loss"] <= RTOL and r["loss_value"] > 0.1, (r["loss"], r["loss_value"])
    # every parameter but the last block's text-query norm (whose outputs nothing reads) has a gradient
    assert r["unused"] == ["blocks.1.attn.q_norm_y.weight"]
    assert r["grads_nonzero"] == r["n_params"] - 1
    bad = {k: v for k, v in r["grads"].items() if v > RTOL}
    assert not bad, bad
    bad = {k: v for k, v in r["weights"].items() if v > RTOL}
    assert not bad, bad
    assert r["weights_moved"] > 0.05  # the three steps changed the weights
