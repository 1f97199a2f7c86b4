"""A training run survives being stopped: signals save a checkpoint, a kill mid-save loses only that save,
and resuming gives the very losses of a run that was never stopped (reliability.md R2, R3, R8 on one
process). Each fault runs the real `workbench train` in a subprocess; the reference runs in-process.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.checkpoint.run import MARKER, list_checkpoints
from workbench.train.trainer import Trainer

QUIET = dict(log=lambda *_: None)
FAST = ("--data.seq_len", "32", "--train.micro_batch_size", "4", "--train.log_every", "1",
        "--train.eval_tokens", "256")
CLI = [sys.executable, "-c", "import sys; from workbench.cli import main; sys.exit(main(sys.argv[1:]))"]


def reference_losses(debug_job, out_dir, steps: int, *overrides) -> list[float]:
    """Per-step losses of an uninterrupted run of the same config (the first `steps` steps)."""
    t = Trainer(debug_job(out_dir, *FAST, *overrides), **QUIET)
    return [t.train_step()["loss"] for _ in range(steps)]


def cli_args(debug_job, out_dir, *overrides) -> list[str]:
    job = debug_job(out_dir, *FAST, *overrides)
    return ["train", str(Path(__file__).parents[2] / "configs" / "llama3" / "debug.toml"),
            "--run.out_dir", str(out_dir), "--data.dir", job.data.dir, "--train.sample_tokens", "0",
            *FAST, *overrides]


def wait_for_step(metrics: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}: "
                                 f"{proc.stderr.read()[-2000:]}")
        if metrics.is_file():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} never came within {timeout}s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_resume_continues_bit_identically(tmp_path, debug_job, signum):
    steps = ("--train.steps", "3000")  # far more than run before the signal: the schedule is the same
    proc = subprocess.Popen([*CLI, *cli_args(debug_job, tmp_path / "run", *steps)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run" / "llama3-debug"
    wait_for_step(run / "metrics.jsonl", proc, 3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    ckpt = list_checkpoints(run)[-1]
    k = json.loads((ckpt / "train_state.json").read_text())["step"]
    assert 3 <= k < 3000 and (ckpt / MARKER).is_file()
    assert f"stopped by {signal.Signals(signum).name} at step {k}" in err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == k  # the steps before the stop are logged

    resumed = Trainer(debug_job(tmp_path / "run", *FAST, *steps), resume=True, **QUIET)
    assert resumed.step == k
    tail = [resumed.train_step()["loss"] for _ in range(4)]
    assert tail == reference_losses(debug_job, tmp_path / "ref", k + 4, *steps)[k:]


KILL_MID_SAVE = """
import os, signal, sys
import workbench.checkpoint.run as run
real = run._fsync_tree
def dying(folder):  # the checkpoint's files are written, its COMPLETE marker is not
    if folder.name == "step-4.tmp":
        os.kill(os.getpid(), signal.SIGKILL)
    real(folder)
run._fsync_tree = dying
from workbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, debug_job):
    args = cli_args(debug_job, tmp_path / "run", "--train.steps", "6", "--train.ckpt_every", "2")
    res = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, *args], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    run = tmp_path / "run" / "llama3-debug"
    assert (run / "checkpoints" / "step-4.tmp").is_dir()  # the half-written save is there ...
    assert [c.name for c in list_checkpoints(run)] == ["step-2"]  # ... and never counts as a checkpoint

    resumed = Trainer(debug_job(tmp_path / "run", *FAST, "--train.steps", "6", "--train.ckpt_every", "2"),
                      resume=True, **QUIET)
    assert resumed.step == 2
    tail = [h["loss"] for h in resumed.fit()]
    assert tail == reference_losses(debug_job, tmp_path / "ref", 6, "--train.steps", "6")[2:]
    assert [c.name for c in list_checkpoints(run)] == ["step-4", "step-6"]
    assert not (run / "checkpoints" / "step-4.tmp").exists()  # cleaned once a save succeeds
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # none lost, none twice


def test_non_finite_gradient_skips_the_update_and_training_goes_on(tmp_path, debug_job):
    import torch

    messages = []
    t = Trainer(debug_job(tmp_path, *FAST, "--train.steps", "4"), log=messages.append)
    t.train_step()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    opt_before = json.dumps(str(t.engine.optimizer.state_dict()["state"][0]["step"]))
    hook = t.model.layers[0].attention.wq.weight.register_hook(lambda g: g * float("inf"))
    rec = t.train_step()
    hook.remove()
    assert rec["skipped"] and not torch.isfinite(torch.tensor(rec["grad_norm"]))
    assert any("step 2" in m and "not applied" in m for m in messages)
    assert all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())
    assert json.dumps(str(t.engine.optimizer.state_dict()["state"][0]["step"])) == opt_before
    rec = t.train_step()  # the next step trains normally
    assert not rec["skipped"] and any(not torch.equal(v, before[k]) for k, v in t.model.state_dict().items())



@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("name", ["model.safetensors", "engine/dcp/__0_0.distcp", "engine/dcp/.metadata",
                                  "engine/state.json", "train_state.json"])
def test_a_damaged_checkpoint_is_refused_on_resume_naming_the_file(tmp_path, debug_job, damage, name):
    from workbench.errors import CheckpointError

    job = debug_job(tmp_path, *FAST, "--train.steps", "2")
    Trainer(job, **QUIET).fit()
    path = list_checkpoints(tmp_path / "llama3-debug")[-1] / name
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    expected = "truncated" if damage == "truncate" else "sha256 differs"
    with pytest.raises(CheckpointError, match=f"checkpoint file .*{name}: .*{expected}"):
        Trainer(job, resume=True, **QUIET)
