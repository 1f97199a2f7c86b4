"""`workbench train` unchanged under the deepspeed launcher and `accelerate launch` (launch/deepspeed.sh,
launch/accelerate.sh), 2 gloo ranks on loopback, against one process on the same global batch (losses and
gradient norms at rtol 1e-5, the final weights).

Each launcher only starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; the trainer
joins the group itself (ddp here). deepspeed adds `--local_rank=N` before the command, which the CLI ignores;
accelerate runs with a conflicting saved config, which the script's flags override.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from listeners import LOOPBACK, run_watching_listeners

from workbench.checkpoint.run import latest_checkpoint, load_model_state
from workbench.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
DEBUG_TOML = ROOT / "configs" / "llama3" / "debug.toml"
STEPS = ["--train.steps", "3", "--train.eval_every", "0", "--train.log_every", "1", "--train.eval_tokens", "2048",
         "--train.sample_tokens", "0"]
# global batch 4 samples: 2 per rank on 2 ddp ranks, 4 in one process
PER_RANK = [*STEPS, "--train.micro_batch_size", "2", "--parallel.backend", "ddp", "--parallel.dp_replicate", "2"]
SINGLE = [*STEPS, "--train.micro_batch_size", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory, debug_data) -> Path:
    """The same 3 steps in one process, in-process: its run folder."""
    from workbench.config import load_config
    from workbench.job import JobConfig
    from workbench.train.trainer import Trainer

    out = tmp_path_factory.mktemp("single")
    job = load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out), "--data.dir", str(debug_data), *SINGLE])
    trainer = Trainer(job, log=lambda *a, **k: None)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return out / job.run.name


# a saved `accelerate config` that disagrees with everything: launch/accelerate.sh must not care
ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
gpu_ids: "0"
machine_rank: 3
main_process_ip: 198.51.100.1
main_process_port: 1234
num_machines: 4
num_processes: 8
mixed_precision: bf16
rdzv_backend: c10d
same_network: true
"""


def launch(script: str, out: Path, data: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HOSTFILE", "NNODES", "NODE_RANK", "MASTER_ADDR")}
    env.update(PYTHON=sys.executable, NPROC="2", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    if script == "accelerate.sh":
        (out / "hf" / "accelerate").mkdir(parents=True)
        (out / "hf" / "accelerate" / "default_config.yaml").write_text(ACCELERATE_CONFIG)
        env["HF_HOME"] = str(out / "hf")
    cmd = ["bash", str(ROOT / "launch" / script), "train", str(DEBUG_TOML), "--run.out_dir", str(out),
           "--data.dir", str(data), *PER_RANK]
    proc, listened = run_watching_listeners(cmd, timeout=240, env=env, cwd=ROOT)
    # S6: the launcher's stores and the ranks' sockets listen on loopback only
    assert listened and all(ip in LOOPBACK for ip, _ in listened), listened
    return proc


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed: its launcher cannot be tested")


@pytest.mark.slow
@pytest.mark.parametrize("script", [
    pytest.param("deepspeed.sh", marks=needs("deepspeed")),
    pytest.param("accelerate.sh", marks=needs("accelerate")),
])
def test_launcher_runs_workbench_train_like_one_process(script, tmp_path, debug_data, single):
    proc = launch(script, tmp_path, debug_data)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stderr.count("# resolved config") == 1  # rank 0 speaks for the run
    run = tmp_path / "llama3-debug"
    assert latest_checkpoint(run).name == "step-3"
    got, ref = metrics(run), metrics(single)
    assert [r["step"] for r in got] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in got)
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in ref]),
                                   rtol=1e-5, atol=0, msg=key)
    ours, theirs = load_model_state(latest_checkpoint(run)), load_model_state(latest_checkpoint(single))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("argv", [
    ["--local_rank=1", "train", "c.toml"],  # where the deepspeed launcher puts it
    ["--local-rank", "1", "train", "c.toml"],
    ["train", "c.toml", "--local_rank", "1"],
    ["train", "c.toml", "--local-rank=1"],
])
def test_train_ignores_the_launchers_local_rank(argv):
    args, rest = build_parser().parse_known_args(argv)
    assert (args.command, args.config, args.resume, rest) == ("train", "c.toml", False, [])


def test_unknown_options_are_still_refused_beside_local_rank(capsys):
    assert main(["--local_rank=0", "train", str(DEBUG_TOML), "--bogus", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: override '--bogus'"), err
