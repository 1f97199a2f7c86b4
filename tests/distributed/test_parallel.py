"""Parallel engines on gloo ranks (torchrun) against the single-process run of the same global batch.

Layouts: ddp, fsdp2, DeepSpeed zero1, zero2, zero3 and tp=2 on 2 ranks, fsdp2 x tp on 4; Mixtral under ddp,
fsdp2 and zero1-3, and under fsdp2 with expert parallel (ep = 2 on 2 ranks, and on 4 ranks where FSDP2 also
shards the experts over the 2 ranks holding the same ones), its balance loss included; and fsdp2's
options (per-block compile with blocks kept gathered after forward, selective checkpointing with CPU offload). One torchrun launch per world size trains every
case (tests/distributed/train_worker.py); the single-process reference trains here. Every layout runs twice:
under AdamW (per-step losses and gradient norms equal to the single run, fp32, rtol 1e-5) and under SGD with
momentum (`-sgd`), whose update is linear in the gradient, so the final weights must agree to rounding too
(AdamW divides by sqrt(v), which magnifies reduction-order noise in coordinates with tiny gradients). Equal
numbers mean the engine computes the same update as one process: data split by the global cursor, loss
normalized by the global token count, gradients averaged over ranks exactly once per step.

The fault tests (R2 kill + restart, R7 hang, R8 NaN on one rank) and the resume tests (R1 same layout,
bit-identical, for DCP and DeepSpeed state; R5 across layouts through DCP) reuse the same machinery.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from listeners import LOOPBACK, run_watching_listeners

from workbench.checkpoint.run import latest_checkpoint, load_model_state
from workbench.train.trainer import Trainer

WORKER = Path(__file__).with_name("train_worker.py")
ROOT = Path(__file__).resolve().parents[2]
DEBUG_TOML = ROOT / "configs" / "llama3" / "debug.toml"
STEPS = ["--train.steps", "6", "--train.eval_every", "0", "--train.ckpt_every", "3", "--train.log_every", "1"]
# global batch 8 samples in every case: micro_batch_size x grad_accum x data-parallel ranks
SINGLE = [*STEPS, "--train.micro_batch_size", "4", "--train.grad_accum", "2"]
PER_RANK = [*STEPS, "--train.micro_batch_size", "2", "--train.grad_accum", "2", "--parallel.dp_shard", "2"]
SGD = ["--optim.name", "sgd", "--optim.momentum", "0.9", "--optim.lr", "1.0"]
LAYOUTS = {
    "ddp": [*PER_RANK, "--parallel.backend", "ddp", "--parallel.dp_shard", "1", "--parallel.dp_replicate", "2"],
    "fsdp2": [*PER_RANK, "--parallel.backend", "fsdp2"],
    "zero1": [*PER_RANK, "--parallel.backend", "zero1"],
    "zero2": [*PER_RANK, "--parallel.backend", "zero2"],
    "zero3": [*PER_RANK, "--parallel.backend", "zero3"],
    # tensor + sequence parallel alone: both ranks read the same data, so each takes the whole global batch
    "tp": [*SINGLE, "--parallel.backend", "fsdp2", "--parallel.tp", "2"],
}
# 4 ranks: fsdp2 over 2 data ranks x tp 2 (2-D), the loss on vocabulary-split logits; and 2 data ranks x cp 2
LAYOUTS_4 = {"fsdp2-tp": [*PER_RANK, "--parallel.backend", "fsdp2", "--parallel.tp", "2",
                          "--parallel.activation_checkpointing", "full", "--parallel.loss_parallel", "true"],
             # 2 data ranks x context parallel 2 (ring): the loss scale dp x cp, FSDP2 over dp_shard x cp
             "fsdp2-cp2": [*PER_RANK, "--parallel.backend", "fsdp2", "--parallel.cp", "2"]}


# options of a layout rather than layouts: AdamW only
OPTIONS = {
    # per-block torch.compile (before fully_shard), blocks kept gathered between forward and backward
    "fsdp2-compiled-keep-gathered": [*PER_RANK, "--parallel.backend", "fsdp2", "--parallel.compile", "true",
                                     "--parallel.reshard_after_forward", "false"],
    # selective checkpointing, with shards and optimizer state kept on the host (a no-op move on CPU: the path runs)
    "fsdp2-selective-ac-offload": [*PER_RANK, "--parallel.backend", "fsdp2", "--parallel.activation_checkpointing",
                                   "selective", "--parallel.cpu_offload", "true"],
}


# a mixture of experts (Mixtral): its balance loss is formed from router counts all-reduced over the ranks, so
# losses, gradient norms and the balance loss itself equal one process's (a per-rank loss would not)
MIXTRAL = ["--model.family", "mixtral", "--model.flavor", "debug"]
MOE_LAYOUTS = {"mixtral-ddp": [*LAYOUTS["ddp"], *MIXTRAL], "mixtral-fsdp2": [*LAYOUTS["fsdp2"], *MIXTRAL],
               **{f"mixtral-zero{n}": [*LAYOUTS[f"zero{n}"], *MIXTRAL] for n in (1, 2, 3)},
               # expert parallel: each rank holds 2 of the 4 experts, tokens travel by all-to-all
               "mixtral-fsdp2-ep2": [*LAYOUTS["fsdp2"], *MIXTRAL, "--parallel.ep", "2"]}
# DeepSeek-V3 (sigmoid routing with the bias update after every step, sequence-wise balance loss, MTP) under
# expert parallel: the step's expert counts are reduced over the ranks, so every rank moves its biases alike
DEEPSEEK = ["--model.family", "deepseek_v3", "--model.flavor", "debug", "--model.bias_update_rate", "0.01"]
DEEPSEEK_LAYOUTS = {"deepseek-fsdp2-ep2": [*LAYOUTS["fsdp2"], *DEEPSEEK, "--parallel.ep", "2"],
                    # ZeRO-3 partitions the weights, not the bias buffers, which every rank updates alike
                    "deepseek-zero3": [*LAYOUTS["zero3"], *DEEPSEEK]}
# MuonClip (train/optim/muon.py) on Kimi K2's structure under fsdp2 + ep 2: Muon orthogonalises each sharded 2-D
# momentum whole (full_tensor) and the expert stacks shard by shard; QK-Clip (a tau below the debug model's logits,
# so heads are clipped every step) MAX-reduces the heads' logits and scales DTensor rows
MUON_K2 = ["--model.family", "deepseek_v3", "--model.flavor", "kimi-k2-debug", "--optim.name", "muon",
           "--optim.qk_clip_tau", "0.02"]
MUON_LAYOUTS = {"k2-muon-fsdp2-ep2": [*LAYOUTS["fsdp2"], *MUON_K2, "--parallel.ep", "2"]}
# 4 ranks: dp_shard 4 = 2 (FSDP2 shards the experts over the ranks holding the same ones) x ep 2
MOE_LAYOUTS_4 = {"mixtral-fsdp2-ep2-shard4": [*STEPS, "--train.micro_batch_size", "1", "--train.grad_accum", "2",
                                              "--parallel.backend", "fsdp2", "--parallel.dp_shard", "4",
                                              "--parallel.ep", "2", *MIXTRAL]}


def with_sgd(layouts: dict) -> dict:
    return {**layouts, **{f"{name}-sgd": [*args, *SGD] for name, args in layouts.items()}}


CASES, CASES_4 = {**with_sgd(LAYOUTS), **OPTIONS}, with_sgd(LAYOUTS_4)


def launch(out: Path, data: Path, cases: dict, *torchrun_args: str, nproc: int = 2, timeout: float = 600):
    """torchrun (with its stores bound to loopback: workbench.parallel.rendezvous) the worker on `cases`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "workbench.parallel.rendezvous", "--standalone", "--nproc-per-node", str(nproc),
           *torchrun_args, str(WORKER), str(out), str(data), json.dumps(cases)]
    proc, listened = run_watching_listeners(cmd, timeout=timeout, env=env)
    # S6: torchrun's stores and the ranks' gloo sockets listen on loopback only
    assert listened and all(ip in LOOPBACK for ip, _ in listened), listened
    return proc


def torchrun(out: Path, data: Path, cases: dict, *torchrun_args: str, nproc: int = 2) -> dict:
    """Every case's results as rank 0 saw them (the launch must succeed)."""
    proc = launch(out, data, cases, *torchrun_args, nproc=nproc)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "results-0.json").read_text())


def train_single(out: Path, name: str, data: Path, *extra: str, resume: bool = False) -> list[dict]:
    from workbench.config import load_config
    from workbench.job import JobConfig

    job = load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out), "--run.name", name, "--data.dir",
                                              str(data), "--train.sample_tokens", "0", *SINGLE, *extra])
    return Trainer(job, resume=resume, log=lambda *a, **k: None).fit()


def back_to_step_3(src: Path, dst: Path) -> None:
    """A copy of run folder `src` whose newest checkpoint is step 3 (as if it had stopped there)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step-6")


@pytest.fixture(scope="module")
def single(tmp_path_factory, debug_data):
    out = tmp_path_factory.mktemp("single")
    return out / "single", train_single(out, "single", debug_data)


@pytest.fixture(scope="module")
def single_sgd(tmp_path_factory, debug_data):
    out = tmp_path_factory.mktemp("single-sgd")
    return out / "single", train_single(out, "single", debug_data, *SGD)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, debug_data, single):
    out = tmp_path_factory.mktemp("dp")
    back_to_step_3(single[0], out / "from-single")  # resumed on 2 ranks under fsdp2 in the same launch
    cases = dict(CASES, **MOE_LAYOUTS, **DEEPSEEK_LAYOUTS, **MUON_LAYOUTS, **{"from-single": [*CASES["fsdp2"], "--resume"],
                           "nangrad": [*CASES["ddp"], "--fault=nangrad@3:1"],
                           "zero1-nangrad": [*CASES["zero1"], "--fault=nangrad@3:1"],
                           "zero3-nangrad": [*CASES["zero3"], "--fault=nangrad@3:1"],
                           # the same layout continued from its own step-3 checkpoint (DCP, DeepSpeed state)
                           "fsdp2-resumed": [*CASES["fsdp2"], "--copy-from=fsdp2:3", "--resume"],
                           **{f"zero{n}-resumed": [*CASES[f"zero{n}"], f"--copy-from=zero{n}:3", "--resume"]
                              for n in (1, 2, 3)}})
    results = torchrun(out, debug_data, cases)
    out4 = tmp_path_factory.mktemp("dp4")
    results.update(torchrun(out4, debug_data, {**CASES_4, **MOE_LAYOUTS_4}, nproc=4))
    for name in {**CASES_4, **MOE_LAYOUTS_4}:
        shutil.move(out4 / name, out / name)
    return out, results


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted({**CASES, **CASES_4}))
def test_parallel_layouts_match_single_process(case, launched, single, single_sgd):
    out, results = launched
    sgd = case.endswith("-sgd")
    single_dir, history = single_sgd if sgd else single
    got = results[case]
    assert got["world_size"] == (4 if case in CASES_4 else 2) and len(got["losses"]) == len(history) == 6
    assert isinstance(got["sample"], str) and got["sample"]  # generation after training works on every layout
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor([r["loss"] for r in history]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor([r["grad_norm"] for r in history]),
                               rtol=1e-5, atol=0)
    ours, ref = load_model_state(latest_checkpoint(out / case)), load_model_state(latest_checkpoint(single_dir))
    assert ours.keys() == ref.keys()
    for name in ref:  # the consolidated checkpoint holds whole tensors, whatever the engine sharded
        if sgd:  # linear in the gradient: equal to rounding
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
        else:  # AdamW: rounding in a near-zero gradient moves a weight by up to ~1e-6 of lr 3e-3
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def single_mixtral(tmp_path_factory, debug_data):
    out = tmp_path_factory.mktemp("single-mixtral")
    return out / "single", train_single(out, "single", debug_data, *MIXTRAL)


@pytest.fixture(scope="module")
def single_muon_k2(tmp_path_factory, debug_data):
    out = tmp_path_factory.mktemp("single-muon-k2")
    return out / "single", train_single(out, "single", debug_data, *MUON_K2)


@pytest.mark.slow
def test_muonclip_under_fsdp2_and_expert_parallel_matches_single_process(launched, single_muon_k2):
    out, results = launched
    single_dir, history = single_muon_k2
    got = results["k2-muon-fsdp2-ep2"]
    assert history[0]["qk_clip_heads"] > 0  # QK-Clip acts (from the first step on)
    assert got["qk_clip_heads"] == [h["qk_clip_heads"] for h in history]  # on the same heads
    # measured: equal to ~1e-7 relative (reduction order only)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor([r["loss"] for r in history]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor([r["grad_norm"] for r in history]),
                               rtol=1e-5, atol=0)
    ours, ref = load_model_state(latest_checkpoint(out / "k2-muon-fsdp2-ep2")), load_model_state(
        latest_checkpoint(single_dir))
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def single_deepseek(tmp_path_factory, debug_data):
    out = tmp_path_factory.mktemp("single-deepseek")
    return out / "single", train_single(out, "single", debug_data, *DEEPSEEK)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DEEPSEEK_LAYOUTS))
def test_deepseek_v3_under_expert_parallel_matches_single_process_router_biases_included(case, launched,
                                                                                       single_deepseek):
    out, results = launched
    single_dir, history = single_deepseek
    got = results[case]
    # the two MoE layers' experts split over 2 ranks; the MTP module's (outside the plan's `layers.*`) stay whole
    assert got["expert_parallel"] == ([2, 2, 1] if "-ep2" in case else [1, 1, 1])
    for key, ref_key in (("losses", "loss"), ("grad_norms", "grad_norm"), ("balance_losses", "balance_loss")):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor([r[ref_key] for r in history]),
                                   rtol=1e-5, atol=0, msg=key)
    ours, ref = load_model_state(latest_checkpoint(out / case)), load_model_state(latest_checkpoint(single_dir))
    biases = [name for name in ref if name.endswith("router.bias")]
    assert len(biases) == 3 and all(ref[name].abs().max() > 0 for name in biases)  # the update ran, MTP's too
    for name in ref:  # weights and the router biases
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted({**MOE_LAYOUTS, **MOE_LAYOUTS_4}))
def test_moe_layouts_match_single_process_balance_loss_included(case, launched, single_mixtral):
    out, results = launched
    single_dir, history = single_mixtral
    got = results[case]
    assert got["world_size"] == (4 if case in MOE_LAYOUTS_4 else 2)
    assert got["expert_parallel"] == [2 if "-ep2" in case else 1] * 2  # both layers' experts, split or whole
    for key, ref_key in (("losses", "loss"), ("grad_norms", "grad_norm"), ("balance_losses", "balance_loss")):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor([r[ref_key] for r in history]),
                                   rtol=1e-5, atol=0, msg=key)
    ours, ref = load_model_state(latest_checkpoint(out / case)), load_model_state(latest_checkpoint(single_dir))
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sgd_moves_the_weights_far_beyond_the_tolerance(single_sgd, tmp_path, debug_data):
    """The weight check above can fail: six SGD steps move the weights by far more than its atol of 1e-7."""
    from workbench.checkpoint.run import list_checkpoints

    first, last = (load_model_state(c) for c in list_checkpoints(single_sgd[0]))  # steps 3 and 6
    moved = max(float((last[k] - first[k]).abs().max()) for k in last)
    assert moved > 1e-3, moved


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fsdp2", "zero1", "zero2", "zero3"])
def test_a_same_layout_resume_is_bit_identical(case, launched):
    """R1: the run continued from its own step-3 checkpoint (DCP shards for fsdp2, DeepSpeed's partitioned
    state for zero1-3) gives steps 4-6 bit for bit as the uninterrupted run."""
    _, results = launched
    got = results[f"{case}-resumed"]
    assert got["steps"] == [4, 5, 6] and got["losses"] == results[case]["losses"][3:]
    assert got["grad_norms"] == results[case]["grad_norms"][3:]


@pytest.mark.slow
def test_checkpoints_move_between_layouts(launched, single, tmp_path, debug_data):
    """fsdp2 on 2 ranks resumes in one process, and one process resumes on 2 fsdp2 ranks: the checkpoint is
    layout-free (whole tensors, optimizer state by parameter name) and the data cursor is global."""
    out, results = launched
    reference = [r["loss"] for r in single[1]]
    # 1 -> 2: the single run stopped at step 3, continued by fsdp2 on 2 ranks (in the launch)
    torch.testing.assert_close(torch.tensor(results["from-single"]["losses"]), torch.tensor(reference[3:]),
                               rtol=1e-5, atol=0)
    # 2 -> 1: the fsdp2 run stopped at step 3, continued here in one process
    back_to_step_3(out / "fsdp2", tmp_path / "from-fsdp2")
    resumed = train_single(tmp_path, "from-fsdp2", debug_data, resume=True)
    assert (out / "fsdp2" / "checkpoints" / "step-6" / "engine" / "dcp" / ".metadata").is_file()
    assert [r["step"] for r in resumed] == [4, 5, 6]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in resumed]), torch.tensor(reference[3:]),
                               rtol=1e-5, atol=0)


@pytest.mark.slow
def test_a_nan_gradient_on_one_rank_means_no_rank_steps(launched):
    """R8: rank 1's gradient turns NaN at step 3 (its loss stays finite): the all-reduced gradient norm is
    NaN on every rank, so every rank skips that update, and training goes on."""
    out, _ = launched
    for case in ("nangrad", "zero1-nangrad", "zero3-nangrad"):  # our check (ddp), DeepSpeed's (stages 1-2, 3)
        for rank in (0, 1):
            got = json.loads((out / f"results-{rank}.json").read_text())[case]
            assert got["skipped"] == [False, False, True, False, False, False], (case, rank, got)
            assert all(map(math.isfinite, got["losses"])) and not math.isfinite(got["grad_norms"][2])


@pytest.mark.slow
def test_a_killed_rank_restarts_from_the_last_checkpoint_bit_identically(launched, tmp_path, debug_data):
    """R2: SIGKILL of rank 1 before step 5 under --max-restarts=1: torchrun restarts both workers once, they
    resume from the step-3 checkpoint, and steps 4-6 equal the uninterrupted run's bit for bit."""
    out, results = launched
    got = torchrun(tmp_path, debug_data, {"killed": [*CASES["ddp"], "--resume", "--fault=kill@5:1"]},
                   "--max-restarts", "1")["killed"]
    assert got["restarts"] == 1 and got["steps"] == [4, 5, 6]
    assert got["losses"] == results["ddp"]["losses"][3:]


@pytest.mark.slow
def test_a_hung_rank_stops_every_rank_within_the_timeout_naming_it(tmp_path, debug_data):
    """R7: rank 1 hangs outside any collective at step 3 with parallel.timeout_s = 10: rank 0's collective
    times out and its error names rank 1; torchrun's SIGTERM then ends rank 1 within the same grace."""
    t0 = time.monotonic()
    proc = launch(tmp_path, debug_data, {"hung": [*CASES["ddp"], "--parallel.timeout_s", "10", "--fault=hang@3:1"]},
                  timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "step 3: a collective waited longer than parallel.timeout_s = 10 s (rank 1 did not answer)" in proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"  # launch ~5 + timeout 10 + barrier 5 + grace 10, and teardown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_through_the_launch_script(tmp_path, debug_data, single):
    """launch/torchrun.sh as two "nodes" (two torchrun agents, --nnodes 2, one process each) rendezvous on
    127.0.0.1 and run `workbench train` under ddp: the same per-step losses as one process."""
    env = dict(os.environ, NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID="loopback",
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    args = [str(ROOT / "launch" / "torchrun.sh"), "train", str(DEBUG_TOML), "--run.out_dir", str(tmp_path),
            "--data.dir", str(debug_data), "--train.sample_tokens", "0", *CASES["ddp"]]
    nodes = [subprocess.Popen(args, env=dict(env, NODE_RANK=str(r)), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-4000:]
    assert outs[0][1].count("# resolved config") == 1  # rank 0 speaks for the run
    records = [json.loads(line) for line in (tmp_path / "llama3-debug" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([r["loss"] for r in single[1]]), rtol=1e-5, atol=0)
