"""Task "autograd" end to end through the fundamentals runner: the NumPy engine learns the digits in a few dozen
steps, writes its run folder, and a run stopped by SIGTERM resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from workbench.errors import ConfigError
from workbench.train.fundamentals.runner import Interrupted, load_job, run_job

ROOT = Path(__file__).resolve().parents[2]
MLP_TOML = ROOT / "configs" / "fundamentals" / "autograd_mlp.toml"
CNN_TOML = ROOT / "configs" / "fundamentals" / "autograd_cnn.toml"
QUIET = {"log": lambda m: None}


def records(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("toml,steps", [(MLP_TOML, 40), (CNN_TOML, 60)])
def test_a_short_run_learns_the_digits(tmp_path, toml, steps):
    r = run_job(toml, ["--run.out_dir", str(tmp_path), "--train.max_steps", str(steps), "--train.log_every", "5",
                       "--task.compare_torch", "false"], **QUIET)
    # chance is 1/10 and the majority class about as much: 40 steps of 32 images must be far above both
    assert r["chance_accuracy"] == pytest.approx(0.1)
    assert r["majority_accuracy"] < 0.15
    assert r["test_accuracy"] > 0.6, r
    assert r["margin"] == pytest.approx(r["test_accuracy"] - max(r["chance_accuracy"], r["majority_accuracy"]))
    recs = records(r["run_dir"])
    train = [x for x in recs if "loss" in x]
    val = [x for x in recs if "val_loss" in x]
    assert [x["step"] for x in train] == list(range(5, steps + 1, 5))
    assert train[-1]["loss"] < train[0]["loss"] - 0.4  # from log(10) = 2.30 nats
    assert val[0]["step"] == 0 and val[-1]["step"] == steps and val[-1]["val_acc"] > val[0]["val_acc"] + 0.4
    assert all(x["items_per_s"] > 0 and x["lr"] > 0 for x in train)
    run_dir = Path(r["run_dir"])
    assert (run_dir / "autograd-confusion.png").stat().st_size > 1000
    assert "autograd-confusion.png" in (run_dir / "report.md").read_text()
    assert (run_dir / "checkpoints" / f"step-{steps}" / "COMPLETE").is_file()


def test_the_torch_twin_starts_from_the_same_weights_and_agrees(tmp_path):
    r = run_job(MLP_TOML, ["--run.out_dir", str(tmp_path), "--train.max_steps", "30", "--task.compare_torch", "true"],
                **QUIET)
    # same initial weights, batches and schedule: after 30 float32 steps the two predict nearly alike
    assert r["torch_agreement"] > 0.95
    assert abs(r["torch_test_accuracy"] - r["test_accuracy"]) < 0.03
    assert r["engine_ms_per_step"] > 0 and r["torch_ms_per_step"] > 0


def test_sigterm_saves_and_resume_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    import workbench.train.fundamentals.autograd as task

    common = ["--run.out_dir", str(tmp_path), "--train.max_steps", "30", "--train.log_every", "5",
              "--train.schedule", "cosine", "--task.dropout", "0.2", "--train.optimizer", "adamw",
              "--train.nesterov", "false", "--train.lr", "3e-3", "--task.compare_torch", "false"]
    straight = run_job(MLP_TOML, common + ["--run.name", "straight"], **QUIET)

    real_fit = task.fit

    def fit_with_a_signal(*args, on_log, **kw):
        def hook(pos, metrics):
            on_log(pos, metrics)
            if pos.step == 10:
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would: the handler sets ctx.stop_signal
        return real_fit(*args, on_log=hook, **kw)

    monkeypatch.setattr(task, "fit", fit_with_a_signal)
    with pytest.raises(Interrupted) as stopped:
        run_job(MLP_TOML, common + ["--run.name", "resumed"], **QUIET)
    assert stopped.value.signum == signal.SIGTERM
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert ckpts == [f"step-{stopped.value.step}"] and 10 <= stopped.value.step < 30
    monkeypatch.setattr(task, "fit", real_fit)

    resumed = run_job(MLP_TOML, common + ["--run.name", "resumed"], resume=True, **QUIET)
    assert resumed["test_loss"] == straight["test_loss"]  # bit for bit: weights, moments, batches, dropout masks
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    a = [(x["step"], x["loss"]) for x in records(straight["run_dir"]) if "loss" in x]
    b = [(x["step"], x["loss"]) for x in records(resumed["run_dir"]) if "loss" in x]
    assert a == b


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"task.channels.*at most 3 blocks"):
        load_job(CNN_TOML, ["--task.channels", "[4,4,4,4]"])
    with pytest.raises(ConfigError, match=r"task.kernel_size.*odd"):
        load_job(CNN_TOML, ["--task.kernel_size", "2"])
    with pytest.raises(ConfigError, match=r"task.hidden.*positive"):
        load_job(MLP_TOML, ["--task.hidden", "[64,0]"])
    with pytest.raises(ConfigError, match=r"task.dtype"):
        load_job(MLP_TOML, ["--task.dtype", "float16"])
    for n in ("3000", "5"):  # more than the digits hold; too few for every class in every split
        with pytest.raises(ConfigError, match=rf"task\.n.*1797 images.*got {n}"):
            load_job(MLP_TOML, ["--task.n", n])


def test_float64_run_keeps_float64_weights(tmp_path):
    from workbench.checkpoint.safetensors_io import read_file

    r = run_job(CNN_TOML, ["--run.out_dir", str(tmp_path), "--train.max_steps", "3", "--task.dtype", "float64",
                           "--task.compare_torch", "false"], **QUIET)
    weights = read_file(Path(r["run_dir"]) / "checkpoints" / "step-3" / "model.safetensors")
    assert {str(v.dtype) for v in weights.values()} == {"torch.float64"}
    assert np.isfinite(r["test_loss"])


def test_the_speed_benchmark_runs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("autograd_cpu", ROOT / "benchmarks" / "autograd_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for model in ("mlp", "cnn"):
        engine_ms, torch_ms = bench.bench(model, batch=4, threads=1, steps=2, reps=1)
        assert engine_ms > 0 and torch_ms > 0
