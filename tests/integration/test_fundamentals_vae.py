"""Task "vae" end to end through the fundamentals runner: a short run of configs/fundamentals/vae.toml improves
the held-out ELBO over its step-0 value, beats the independent-pixel baseline, and writes its pictures; a data
size the image set cannot give is a config error naming its key."""

import json
from pathlib import Path

import pytest

from workbench.errors import ConfigError
from workbench.train.fundamentals.runner import load_job, run_job
from workbench.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "fundamentals" / "vae.toml"



def test_short_vae_run_learns_and_writes_its_pictures(tmp_path):
    results = run_job(CONFIG, overrides=["--run.out_dir", str(tmp_path), "--run.name", "vae", "--train.max_steps", "200",
                                         "--task.iw_samples", "50", "--task.n_samples", "16"], log=lambda m: None)
    run_dir = Path(results["run_dir"])
    val = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_elbo" in r]
    assert val[0]["step"] == 0 and val[-1]["step"] == 200
    # the ELBO is in nats per image (negative); step 0 starts at about the independent-pixel baseline
    assert val[-1]["val_elbo"] > val[0]["val_elbo"] + 2.0, (val[0], val[-1])
    # held out: ELBO <= IWAE bound, and the bound beats independent pixels by nats per image
    assert results["test_elbo"] <= results["test_log_px"] < 0
    assert results["margin"] == pytest.approx(results["test_log_px"] - results["baseline_log_px"], abs=1e-4)
    assert results["margin"] > 2.0, results
    assert 0 < results["active_units"] <= 8
    saved = json.loads((run_dir / "results.json").read_text())
    for name in ("samples.png", "reconstructions.png", "interpolation.png"):
        assert (run_dir / name).stat().st_size > 1000
        assert name in {f["file"] for f in saved["figures"]}
    report = (run_dir / "report.md").read_text()
    assert "interpolation.png" in report and "test_log_px" in report


def test_bad_data_sizes_name_the_key_before_any_work():
    with pytest.raises(ConfigError, match=r"task\.n.*1797 images.*got 5000"):
        load_job(CONFIG, ["--task.n", "5000"])
    with pytest.raises(ConfigError, match=r"task\.size.*shapes.*got 4"):
        load_job(CONFIG, ["--task.dataset", "shapes", "--task.size", "4"])
    assert load_job(CONFIG, ["--task.dataset", "shapes", "--task.size", "16", "--task.n", "600"]).task.config.size == 16
