"""The fundamentals runner (workbench/train/fundamentals/runner.py): config errors, the run folder, exact resume
after a signal, refusals; and the shared pictures (plots.py). A toy regression task defined here stands in for
the real ones (each of those has its own tests)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from workbench.checkpoint.run import latest_checkpoint, load_model_state
from workbench.config import field_
from workbench.errors import ConfigError, WorkbenchError
from workbench.train.fundamentals import runner
from workbench.train.fundamentals.plots import confusion_matrix, image_grid, plot_confusion
from workbench.train.metrics import read_metrics


@dataclass
class ToyConfig:
    n: int = field_(96, gt=0, doc="training examples")
    hidden: int = field_(8, gt=0)


CALLS = {"n": 0, "stop_at": 0}  # stop_at: this process gets SIGINT at that loss call (0 = never)


def run_toy(ctx: runner.Context, cfg: ToyConfig) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.n + 32, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(cfg.n + 32, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(3, cfg.hidden), torch.nn.Dropout(0.1), torch.nn.Tanh(),
                                torch.nn.Linear(cfg.hidden, 1))

    def loss_fn(m, batch):
        CALLS["n"] += 1
        if CALLS["stop_at"] and CALLS["n"] == CALLS["stop_at"]:
            os.kill(os.getpid(), signal.SIGINT)
        xb, yb = batch
        loss = ((m(xb).squeeze(-1) - yb) ** 2).mean()
        return loss, {"mse": loss.item()}

    def evaluate(m):
        return {"loss": ((m(x[cfg.n:]).squeeze(-1) - y[cfg.n:]) ** 2).mean().item()}

    ctx.fit(model, (x[:cfg.n], y[:cfg.n]), loss_fn, evaluate)
    ctx.result("val_mse", evaluate(model)["loss"], "held-out mean squared error")
    ctx.result("baseline_mse", y[cfg.n:].var(unbiased=False).item(), "predicting the mean")
    image_grid(torch.rand(6, 1, 5, 5), 3, ctx.figure("grid.png", "six random images"))


TASKS = {"toy": runner.Task(config=ToyConfig, run=run_toy)}


@pytest.fixture(autouse=True)
def toy_task(monkeypatch):
    monkeypatch.setitem(runner.TASK_MODULES, "toy", __name__)
    CALLS.update(n=0, stop_at=0)


def job(tmp_path: Path, name: str = "toy", **task) -> dict:
    return {"run": {"name": name, "out_dir": str(tmp_path), "seed": 3},
            "task": {"name": "toy", **task},
            "train": {"epochs": 4, "batch_size": 16, "lr": 0.05, "log_every": 2, "ckpt_every": 1, "keep_last": 5}}


def test_a_run_writes_its_folder_and_learns(tmp_path):
    results = runner.run_job(job(tmp_path), log=lambda m: None)
    run_dir = Path(results["run_dir"])
    assert results["val_mse"] < 0.25 * results["baseline_mse"]
    for name in ("config.toml", "metrics.jsonl", "loss.png", "results.json", "report.md", "grid.png"):
        assert (run_dir / name).is_file(), name
    records = read_metrics(run_dir / "metrics.jsonl")
    val = [r for r in records if "val_loss" in r]
    assert [r["epoch"] for r in val] == [0, 1, 2, 3, 4]  # the start and after every epoch
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert max(r["step"] for r in records) == 4 * 6  # 96 / 16 batches per epoch
    assert latest_checkpoint(run_dir).name == "step-24"
    report = (run_dir / "report.md").read_text()
    assert "task toy" in report and "## Results" in report and "val_mse" in report and "![six random images]" in report
    # the resolved config reloads to the same job
    assert runner.load_job(run_dir / "config.toml") == runner.load_job(job(tmp_path))


@pytest.mark.parametrize("stop_at", [9, 6])  # mid-epoch 2; the last batch of epoch 1 (6 batches an epoch)
def test_a_signal_saves_and_resume_continues_exactly(tmp_path, stop_at):
    straight = runner.run_job(job(tmp_path, "straight"), log=lambda m: None)
    CALLS.update(n=0, stop_at=stop_at)
    with pytest.raises(runner.Interrupted) as stop:
        runner.run_job(job(tmp_path, "cut"), log=lambda m: None)
    CALLS.update(stop_at=0)
    assert stop.value.signum == signal.SIGINT and stop.value.step == stop_at
    assert latest_checkpoint(tmp_path / "cut").name == f"step-{stop_at}"
    with pytest.raises(WorkbenchError, match="train.batch_size"):
        runner.run_job(job(tmp_path, "cut"), ["--train.batch_size", "32"], resume=True, log=lambda m: None)
    with pytest.raises(WorkbenchError, match="--resume"):
        runner.run_job(job(tmp_path, "cut"), log=lambda m: None)
    with pytest.raises(WorkbenchError, match="task"):
        runner.run_job(job(tmp_path, "cut", hidden=9), resume=True, log=lambda m: None)
    resumed = runner.run_job(job(tmp_path, "cut"), resume=True, log=lambda m: None)
    assert resumed["val_mse"] == straight["val_mse"]
    a = load_model_state(latest_checkpoint(tmp_path / "straight"))
    b = load_model_state(latest_checkpoint(tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    cut_records = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    steps = [r["step"] for r in cut_records if "loss" in r and "val_loss" not in r]
    assert steps == sorted(set(steps))  # the records after the checkpoint were not logged twice
    val = lambda records: [(r["step"], r["epoch"], r["val_loss"]) for r in records if "val_loss" in r]  # noqa: E731
    if stop_at % 6 == 0:  # stopped at an epoch's end: the same validations as the run that was never stopped
        assert val(cut_records) == val(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    # resuming a finished run trains nothing more and keeps its results
    again = runner.run_job(job(tmp_path, "cut"), resume=True, log=lambda m: None)
    assert again["val_mse"] == straight["val_mse"]


@pytest.mark.parametrize("change, match", [
    ({"task": {"name": "nope"}}, "task.name': unknown task 'nope'"),
    ({"task": {"name": "toy", "hiden": 3}}, "task.hiden': unknown key"),
    ({"task": {"name": "toy", "n": 0}}, "task.n'"),
    ({"train": {"optimizer": "adam"}}, "train.optimizer'"),
    ({"train": {"nesterov": True, "optimizer": "adamw"}}, "train.nesterov'"),
    ({"train": {"betas": [0.9, 1.0]}}, r"train.betas\[1\]'"),
    ({"task": {}}, "task.name': required"),
])
def test_bad_configs_name_the_key(tmp_path, change, match):
    raw = job(tmp_path)
    for section, values in change.items():
        raw[section] = values if section == "task" else {**raw[section], **values}
    with pytest.raises(ConfigError, match=match):
        runner.load_job(raw)


def test_a_file_without_a_task_section_is_refused(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[run]\nname = 'x'\n")
    with pytest.raises(ConfigError, match=r"no \[task\] section"):
        runner.load_job(path)


def test_confusion_matrix_and_pictures(tmp_path):
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    out = plot_confusion(cm, ["a", "b", "c"], tmp_path / "cm.png", "toy")
    grid = image_grid(torch.rand(5, 3, 4, 4), 2, tmp_path / "g.png", row_labels=["x", "y", "z"])
    from matplotlib.image import imread

    assert imread(out).shape[0] > 100 and imread(grid).ndim == 3
    with pytest.raises(ValueError, match="expected \\(N, 1 or 3, H, W\\)"):
        image_grid(torch.rand(5, 2, 4, 4), 2, tmp_path / "bad.png")


def test_results_json_lists_figures_once(tmp_path):
    runner.run_job(job(tmp_path), log=lambda m: None)
    data = json.loads((tmp_path / "toy" / "results.json").read_text())
    assert [f["file"] for f in data["figures"]] == ["grid.png"]
    assert data["task"] == "toy" and set(data["results"]) == {"val_mse", "baseline_mse"}
