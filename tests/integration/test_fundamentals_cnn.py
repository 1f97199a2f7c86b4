"""Task "cnn" end to end through the fundamentals runner: the CIFAR-10 loading path on small files written in the
official format, and the fallback when CIFAR-10 is absent; both learn above chance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workbench.data.images import write_cifar_batches
from workbench.errors import ConfigError, DataError
from workbench.train.fundamentals.runner import load_job, run_job

ROOT = Path(__file__).resolve().parents[2]
RESNET_TOML = ROOT / "configs" / "fundamentals" / "resnet.toml"
DIGITS_TOML = ROOT / "configs" / "fundamentals" / "cnn_digits.toml"


def _colour_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A planted task: class c's images are noisy with channel c brighter than the others."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.uniform(0.2, 0.6, (n, 3, 32, 32))
    x[np.arange(n), y] += 0.3
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8), y


def test_cnn_task_reads_cifar_batches_and_learns(tmp_path):
    x, y = _colour_images(400, 0)
    xt, yt = _colour_images(90, 1)
    folder = write_cifar_batches(tmp_path / "cifar" / "cifar-10-batches-py", x, y, ["red", "green", "blue"], xt, yt)
    results = run_job(RESNET_TOML, overrides=[
        "--run.out_dir", str(tmp_path / "runs"), "--task.data_dir", str(tmp_path / "cifar"),
        "--task.model", "plain-tiny", "--train.optimizer", "adamw", "--train.lr", "3e-3", "--train.nesterov", "false",
        "--train.warmup_steps", "0", "--train.batch_size", "32", "--train.max_steps", "25"], log=lambda m: None)
    assert results["dataset"] == "cifar10"
    run_dir = Path(results["run_dir"])
    saved = json.loads((run_dir / "results.json").read_text())
    assert str(folder) in saved["results"]["dataset"]["note"]
    # the test set is the written test batch: 90 images, 3 classes
    assert "90 test images" in saved["results"]["test_accuracy"]["note"]
    assert results["chance_accuracy"] == pytest.approx(1 / 3)
    assert results["test_accuracy"] >= results["majority_accuracy"] + 0.3
    for name in ("cnn-confusion.png", "cnn-samples.png", "report.md", "metrics.jsonl", "loss.png"):
        assert (run_dir / name).is_file(), name
    assert any(f["file"] == "cnn-confusion.png" for f in saved["figures"])


def test_cnn_task_falls_back_when_cifar_is_absent_and_learns(tmp_path):
    logs: list[str] = []
    results = run_job(RESNET_TOML, overrides=[
        "--run.out_dir", str(tmp_path), "--task.data_dir", str(tmp_path / "empty"), "--task.fallback", "digits",
        "--task.model", "tiny", "--train.optimizer", "adamw", "--train.lr", "3e-3", "--train.nesterov", "false",
        "--train.warmup_steps", "0", "--train.batch_size", "64", "--train.max_steps", "40"], log=logs.append)
    assert results["dataset"] == "digits"
    assert any("not found" in m and "fallback 'digits'" in m for m in logs)
    saved = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert "fallback: CIFAR-10 not found" in saved["results"]["dataset"]["note"]
    assert results["chance_accuracy"] == pytest.approx(0.1)
    assert results["test_accuracy"] >= 0.5  # chance 0.1, majority about 0.1
    assert results["margin"] >= 0.35
    assert (Path(results["run_dir"]) / "cnn-errors.png").is_file()


def test_shapes_fallback_and_resume(tmp_path):
    """The README default (no data_dir -> shapes) runs; --resume of a finished run keeps its results."""
    args = ["--run.out_dir", str(tmp_path), "--task.model", "tiny", "--task.n", "240", "--task.size", "16",
            "--train.max_steps", "4", "--train.batch_size", "32"]
    first = run_job(RESNET_TOML, overrides=args, log=lambda m: None)
    assert first["dataset"] == "shapes"
    again = run_job(RESNET_TOML, overrides=args, resume=True, log=lambda m: None)
    assert again["test_accuracy"] == first["test_accuracy"]  # no new steps: the same weights


def test_broken_cifar_files_are_an_error_not_a_fallback(tmp_path):
    x, y = _colour_images(20, 0)
    write_cifar_batches(tmp_path, x, y, ["r", "g", "b"], x[:5], y[:5])
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        run_job(RESNET_TOML, overrides=["--run.out_dir", str(tmp_path / "runs"), "--task.data_dir", str(tmp_path),
                                         "--train.max_steps", "1"], log=lambda m: None)


def test_cnn_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="task.model.*resnet19"):
        load_job(RESNET_TOML, ["--task.model", "resnet19"])
    with pytest.raises(ConfigError, match="task.fallback"):
        load_job(RESNET_TOML, ["--task.fallback", "cifar10"])
    with pytest.raises(ConfigError, match="task.data_dir"):
        load_job(RESNET_TOML, ["--task.dataset", "digits", "--task.data_dir", "/x"])
    assert load_job(RESNET_TOML).task.config.dataset == "cifar10"


def test_cnn_data_sizes_are_checked_against_the_set_the_run_loads(tmp_path):
    """Before any work, naming the key: the fallback's limits when CIFAR-10 is absent, CIFAR-10's when present."""
    with pytest.raises(ConfigError, match=r"task\.size.*got 4 \(for the fallback 'shapes'"):
        load_job(RESNET_TOML, ["--task.size", "4"])
    with pytest.raises(ConfigError, match=r"task\.n.*1797 images.*got 3000 \(for the fallback 'digits'"):
        load_job(RESNET_TOML, ["--task.fallback", "digits", "--task.n", "3000"])
    with pytest.raises(ConfigError, match=r"task\.n.*got 5$"):
        load_job(DIGITS_TOML, ["--task.n", "5"])
    x, y = _colour_images(12, 0)
    write_cifar_batches(tmp_path, x, y, ["red", "green", "blue"], x, y)
    present = ["--task.data_dir", str(tmp_path)]
    assert load_job(RESNET_TOML, present + ["--task.fallback", "digits", "--task.n", "3000"]).task.config.n == 3000
    with pytest.raises(ConfigError, match=r"task\.n.*CIFAR-10.*got 60000$"):
        load_job(RESNET_TOML, present + ["--task.n", "60000"])
