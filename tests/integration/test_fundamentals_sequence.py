"""Tiny runs of the "sequence" and "sentiment" fundamentals tasks through run_job learn above their baselines.

The models are small enough that one thread is faster than two fighting over the shared cores; the configs'
`run.threads = 1` decides that, so the tests set no thread count themselves.
"""

import json
from pathlib import Path

import pytest

from workbench.errors import ConfigError
from workbench.train.fundamentals.runner import run_job

ROOT = Path(__file__).resolve().parents[2]
SEQUENCE = ROOT / "configs/fundamentals/rnn_sequence.toml"
SENTIMENT = ROOT / "configs/fundamentals/lstm_sentiment.toml"



def test_tiny_sequence_run_beats_persistence(tmp_path):
    r = run_job(SEQUENCE, overrides=[
        "--run.out_dir", str(tmp_path), "--task.n_train", "500", "--task.n_val", "100", "--task.n_test", "200",
        "--task.data.length", "40", "--task.model.hidden_size", "32", "--task.score_from", "8",
        "--task.ar_order", "4", "--train.max_steps", "80", "--train.warmup_steps", "10", "--train.lr", "1e-2",
    ], log=lambda m: None)
    assert r["test_mse"] < 0.6 * r["persistence_mse"], r
    # a prediction of the noisy value cannot beat the noise variance by much: a leak of the target would
    assert r["test_mse"] > 0.9 * r["noise_floor"], r
    assert r["test_mse_vs_clean"] < r["persistence_mse_vs_clean"], r
    run_dir = Path(r["run_dir"])
    figures = {f["file"] for f in json.loads((run_dir / "results.json").read_text())["figures"]}
    assert figures == {"predictions.png", "gradients.png"}
    assert all((run_dir / f).stat().st_size > 10_000 for f in figures)
    assert "test_mse" in (run_dir / "report.md").read_text()


def test_tiny_sentiment_run_needs_word_order(tmp_path):
    # one clause, half of them negated, no filler: a word's count says nothing about the label, order does
    r = run_job(SENTIMENT, overrides=[
        "--run.out_dir", str(tmp_path), "--task.n_train", "1000", "--task.n_val", "200", "--task.n_test", "400",
        "--task.data.p_contrast", "0", "--task.data.p_negate", "0.5", "--task.data.p_frame", "0",
        "--task.data.max_filler", "0", "--task.data.p_intensify", "0", "--task.model.embed_dim", "16",
        "--task.model.hidden_size", "32", "--train.max_steps", "250", "--train.batch_size", "32",
        "--train.lr", "1e-2", "--train.warmup_steps", "10",
    ], log=lambda m: None)
    assert r["test_accuracy"] > 0.9, r
    assert r["bow_accuracy"] < 0.65, r
    assert r["test_accuracy"] > r["bow_accuracy"] + 0.25, r
    assert abs(r["majority_accuracy"] - 0.5) < 0.1, r
    assert "test_accuracy_contrast" not in r  # no contrast reviews were drawn, so none is reported
    assert r["test_accuracy_negation"] > 0.85, r
    assert (Path(r["run_dir"]) / "confusion.png").is_file() and (Path(r["run_dir"]) / "forms.png").is_file()


@pytest.mark.parametrize("config,override,key", [
    (SEQUENCE, ["--task.model.readout", "last"], "task.model.readout"),
    (SENTIMENT, ["--task.model.readout", "steps"], "task.model.readout"),
    (SEQUENCE, ["--task.ar_order", "30"], "task.ar_order"),
    (SEQUENCE, ["--task.data.freq_max", "0.7"], "task.data.freq_max"),
    (SENTIMENT, ["--task.data.p_negate", "1.5"], "task.data.p_negate"),
])
def test_bad_task_options_name_the_key(tmp_path, config, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        run_job(config, overrides=["--run.out_dir", str(tmp_path), *override], log=lambda m: None)
    assert not any(tmp_path.iterdir())  # refused before any work
