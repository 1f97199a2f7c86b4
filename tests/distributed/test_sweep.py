"""`workbench sweep` end to end on Ray (each test one real `workbench sweep` process, trials on the debug Llama):

- an ASHA sweep of 4 trials finishes: some stopped at a rung, the rest run to the end and are evaluated; the
  table, plots and best.toml are written, and best.toml trains with `workbench train`;
- 2-process TorchTrainer trials run under fsdp2 and ZeRO-2 (gloo) and agree with each other, every process
  of the sweep (Ray's, the trials', their process group's store) listening on loopback only;
- a sweep stopped by SIGTERM, then killed outright (SIGKILL to its whole process group), resumes both times
  without training a finished trial again, its unfinished trials continuing from their checkpoints;
- a trial whose process is killed mid-run is retried once and continues from its checkpoint;
- Ray listens on 127.0.0.1 only.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from listeners import run_watching_listeners

pytest.importorskip("ray", reason="Ray (the ray extra, in dev) is not installed")

from workbench.config import dumps_toml, load_config  # noqa: E402
from workbench.job import JobConfig  # noqa: E402
from workbench.train.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "llama3" / "debug.toml")
CLI = [sys.executable, "-c", "import sys; from workbench.cli import main; sys.exit(main(sys.argv[1:]))"]
FAST = {"train.sample_tokens": 0, "data.seq_len": 32, "train.micro_batch_size": 4, "train.eval_tokens": 512,
        "train.log_every": 5}


def write_sweep(tmp_path: Path, data: Path, name: str, sweep: dict, space: dict, overrides: dict) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(dumps_toml({"sweep": {"name": name, "out_dir": str(tmp_path / "sweeps"), "base": DEBUG, **sweep},
                                "space": space,
                                "overrides": {"data.dir": str(data), **FAST, **overrides}}))
    return path


def run_cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def attempts(sdir: Path) -> list[dict]:
    return read_metrics(sdir / "attempts.jsonl")


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{what} never came within {timeout} s")


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").exists()) \
        if (run_dir / "checkpoints").is_dir() else []


def test_an_asha_sweep_of_four_trials_stops_some_and_writes_the_best_config(tmp_path, debug_data):
    path = write_sweep(tmp_path, debug_data, "asha",
                       {"scheduler": "asha", "grace_period": 10, "reduction_factor": 2, "num_samples": 2, "seed": 0,
                        "max_concurrent": 1, "eval_tasks": ["perplexity"]},
                       {"optim.lr": {"loguniform": [1e-3, 3e-2]}, "model.dim": {"grid": [32, 64]}},
                       {"train.steps": 40, "train.eval_every": 10, "train.ckpt_every": 20})
    proc = run_cli("sweep", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdir = tmp_path / "sweeps" / "asha"
    assert proc.stdout.strip() == str(sdir / "best.toml")  # stdout: the best config, for scripts
    assert "ray: a private local instance on 127.0.0.1" in proc.stderr and "dashboard off" in proc.stderr
    rows = read_rows(sdir)
    assert len(rows) == 4
    finished = [r for r in rows if r["status"] == "finished"]
    stopped = [r for r in rows if r["status"].startswith("stopped")]
    assert finished and stopped and len(finished) + len(stopped) == 4, rows
    for r in stopped:  # ASHA stops trials at its rungs (grace_period x reduction_factor^k) before the end
        assert int(r["steps"]) in (10, 20), r
    for r in finished:  # ran to the end, evaluated on its checkpoint
        assert int(r["steps"]) == 40 and float(r["perplexity/bits_per_byte"]) > 0, r
    for trial in sdir.glob("trials/trial-*"):  # trial folders are run folders with reports
        for name in ("config.toml", "metrics.jsonl", "report.md", "loss.png", "train.log"):
            assert (trial / name).is_file(), trial / name
    for png in ("sweep.png", "curves.png"):
        assert (sdir / png).stat().st_size > 10_000
    # the best config is the best finished trial's, ready for `workbench train`
    best = min(finished, key=lambda r: float(r["val_loss"]))
    job = load_config(JobConfig, sdir / "best.toml")
    assert job.model.config.dim == int(best["model.dim"]) and job.optim.lr == pytest.approx(float(best["optim.lr"]))
    assert (job.run.name, job.train.steps) == ("asha-best", 40)
    proc = run_cli("train", str(sdir / "best.toml"), "--run.out_dir", str(tmp_path / "runs"), "--train.steps", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "asha-best" / "report.md").is_file()


def loopback(ip: str) -> bool:
    """127.0.0.1, ::1, or 127.0.0.1 written as IPv4-mapped IPv6 (Ray's gRPC servers report ::ffff:127.0.0.1)."""
    import ipaddress

    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def read_rows(sdir: Path) -> list[dict]:
    import csv

    return list(csv.DictReader((sdir / "results.csv").open()))


def test_two_process_torchtrainer_trials_under_fsdp2_and_zero2(tmp_path, debug_data):
    path = write_sweep(tmp_path, debug_data, "sharded", {"scheduler": "fifo", "workers": 2,
                                                         "eval_tasks": ["perplexity"]},
                       {"parallel.backend": {"grid": ["fsdp2", "zero2"]}},
                       {"train.steps": 6, "train.eval_every": 3, "parallel.dp_shard": 2, "train.micro_batch_size": 2})
    proc, listened = run_watching_listeners([*CLI, "sweep", str(path)], timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wide = sorted({ip for ip, _ in listened if not loopback(ip)})  # Ray, gloo and the process group's store alike
    assert listened and not wide, wide
    sdir = tmp_path / "sweeps" / "sharded"
    rows = {r["parallel.backend"]: r for r in read_rows(sdir)}
    assert set(rows) == {"fsdp2", "zero2"} and all(r["status"] == "finished" for r in rows.values()), rows
    assert all(float(r["perplexity/bits_per_byte"]) > 0 for r in rows.values())  # evaluated in each trial's rank 0
    for backend, r in rows.items():
        info = json.loads((sdir / "trials" / r["trial"] / "run_info.json").read_text())
        assert info["layout"].startswith(f"{backend} on 2 ranks"), info
        vals = [m for m in read_metrics(sdir / "trials" / r["trial"] / "metrics.jsonl") if "val_loss" in m]
        assert [m["step"] for m in vals] == [0, 3, 6]
        # what Tune heard: the workers' reports through Ray Train (steps 0, 3), then the trial's final one
        (ray_trial,) = [d for d in (sdir / "ray").iterdir() if d.is_dir() and f"_{int(r['trial'][-3:]):05d}_" in d.name]
        heard = read_metrics(ray_trial / "result.json")
        assert [h["step"] for h in heard] == [0, 3, 6] and heard[-1]["finished"] == 1, heard
    # the same global batch and initial weights: the two engines train the same model
    assert float(rows["fsdp2"]["val_loss"]) == pytest.approx(float(rows["zero2"]["val_loss"]), rel=1e-4)


def test_an_interrupted_then_killed_sweep_resumes_without_repeating_finished_trials(tmp_path, debug_data):
    path = write_sweep(tmp_path, debug_data, "resume", {"scheduler": "fifo", "max_concurrent": 1},
                       {"optim.lr": {"grid": [2e-3, 4e-3, 8e-3]}},
                       {"train.steps": 30, "train.eval_every": 10, "train.ckpt_every": 5})
    sdir = tmp_path / "sweeps" / "resume"
    trial = sdir / "trials"

    def start():
        return subprocess.Popen([*CLI, "sweep", str(path), "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, start_new_session=True)

    # 0. killed before Tune saved any state: the resume starts the same trials again
    proc = start()
    wait_for(lambda: (sdir / "sweep.toml").is_file(), proc, "the sweep folder")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    # 1. SIGTERM (a scheduler's stop; Ctrl-C's SIGINT takes the same path) while trial-001 trains: Tune saves
    # its state, the command exits 128 + 15
    proc = start()
    wait_for(lambda: (trial / "trial-000" / "sweep_result.json").is_file() and checkpoint_steps(trial / "trial-001"),
             proc, "trial-000 finishing and trial-001 checkpointing")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "no saved Tune state to restore" in err  # step 0's kill left none
    assert "--resume" in err and "sweep interrupted" in err
    assert "| trial-001 |" in (sdir / "results.md").read_text()  # the results are written when it stops
    finished_000 = (trial / "trial-000" / "metrics.jsonl").read_bytes()
    # 2. resumed, then killed outright (the driver, Ray and the trials: one process group) while trial-002 trains
    proc = start()
    wait_for(lambda: (trial / "trial-001" / "sweep_result.json").is_file() and checkpoint_steps(trial / "trial-002"),
             proc, "trial-001 finishing and trial-002 checkpointing")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    # 3. resumed to the end
    proc = start()
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    rows = {r["trial"]: r for r in read_rows(sdir)}
    assert [rows[t]["status"] for t in sorted(rows)] == ["finished"] * 3, rows
    trained = [a for a in attempts(sdir) if a["trains"]]
    assert [a["trial"] for a in trained].count("trial-000") == 1  # finished trials are never trained again
    assert (trial / "trial-000" / "metrics.jsonl").read_bytes() == finished_000
    # the interrupted trials continued from their own checkpoints
    for name in ("trial-001", "trial-002"):
        later = [a for a in trained if a["trial"] == name][1:]
        assert later and later[0]["resumed_from_step"] > 0, (name, trained)
        steps = [m["step"] for m in read_metrics(trial / name / "metrics.jsonl") if "val_loss" in m]
        assert steps == sorted(set(steps)) and steps[-1] == 30, steps  # no step logged twice
    assert int(rows["trial-001"]["attempts"]) >= 2


def test_a_crashed_trial_is_retried_once_from_its_checkpoint(tmp_path, debug_data):
    path = write_sweep(tmp_path, debug_data, "crash", {"scheduler": "fifo", "max_failures": 1},
                       {"optim.lr": {"grid": [4e-3]}},
                       {"train.steps": 40, "train.eval_every": 10, "train.ckpt_every": 5})
    sdir = tmp_path / "sweeps" / "crash"
    proc = subprocess.Popen([*CLI, "sweep", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    wait_for(lambda: checkpoint_steps(sdir / "trials" / "trial-000"), proc, "the trial's first checkpoint")
    os.kill(attempts(sdir)[0]["pid"], signal.SIGKILL)  # the trial's process dies: a crash
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert "crashed; retrying it from its newest checkpoint" in err
    tries = attempts(sdir)
    assert [a["attempt"] for a in tries] == [1, 2] and tries[1]["resumed_from_step"] >= 5, tries
    (row,) = read_rows(sdir)
    assert (row["status"], row["steps"], row["attempts"]) == ("finished", "40", "2")


def test_ray_listens_on_loopback_only():
    import ray

    from workbench.train.sweep import SweepSection, _listening, descendants, exposed_listeners, start_ray

    start_ray(SweepSection(base="x"), 1, log=lambda *_: None)
    try:
        mine = _listening(descendants(os.getpid()))
        assert len(mine) >= 3, mine  # GCS, raylet, workers: the check does see Ray's sockets
        assert exposed_listeners() == [], exposed_listeners()
        assert ray.util.get_node_ip_address() == "127.0.0.1"
    finally:
        ray.shutdown()

