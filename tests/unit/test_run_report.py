"""report.md: regenerated from a run folder's files alone (config, metrics, plots, checkpoints, evals)."""

import json
import statistics
from pathlib import Path

import torch

from workbench.checkpoint.run import save_checkpoint
from workbench.config import dumps_toml, load_config
from workbench.job import JobConfig
from workbench.train.report import format_number, write_run_report

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_S = [4000.0, 5200.0, 4800.0, 6100.0]
INFO = {"parameters": 1_234_567, "flops_per_token": 7.5e6, "device": "cpu", "layout": "single on 1 rank"}
RESULTS = {
    "format": "workbench-eval/1",
    "source": {"ckpt": "runs/x/checkpoints/step-2", "run_dir": "runs/x", "step": 2},
    "updated": "2026-11-27T12:00:00Z",
    "tasks": {"perplexity": {"task": "perplexity", "primary": "bits_per_byte", "higher_is_better": False,
                             "metrics": {"bits_per_byte": 1.87312, "perplexity": 95.3},
                             "baselines": {"uniform": 12.0, "unigram": 5.4321},
                             "n": 24, "elapsed_s": 3.2, "plots": ["perplexity.png"]}},
}


def make_run(run_dir: Path) -> Path:
    job = load_config(JobConfig, ROOT / "configs" / "llama3" / "debug.toml")
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(dumps_toml(job))
    records = [{"step": 0, "val_loss": 6.3, "val_bpb": 3.1}]
    for i, tps in enumerate(TOKENS_PER_S, start=1):
        records.append({"step": 5 * i, "loss": 6.0 - i / 2, "lr": 1e-3 * i, "grad_norm": 2.0 / i,
                        "tokens_per_s": tps, "gflops": tps * 7.5e6 / 1e9, "skipped": False})
    records.append({"step": 20, "val_loss": 4.25, "val_bpb": 2.0625})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_checkpoint(run_dir, 2, {"w": torch.zeros(64, 64)}, {"step": 2})
    (run_dir / "evals" / "step-2").mkdir(parents=True)
    (run_dir / "evals" / "step-2" / "results.json").write_text(json.dumps(RESULTS))
    (run_dir / "evals" / "broken").mkdir()
    (run_dir / "evals" / "broken" / "results.json").write_text('{"format": "workbench-eval/1", "tasks": ')
    return run_dir


def section(text: str, title: str) -> str:
    """The body of one '## title' section."""
    body = text.split(f"## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0]


def test_report_shows_config_curves_throughput_checkpoints_and_evals(tmp_path):
    run = make_run(tmp_path / "my-run")
    out = write_run_report(run, INFO)
    assert out == run / "report.md" and not (run / "report.md.tmp").exists()
    text = out.read_text()

    # title and summary, then the sections in order
    assert text.startswith("# my-run\n")
    summary = text.splitlines()[2]
    assert "llama3 debug" in summary and "step 20 / 30" in summary
    assert "val loss 4.25 nats/token, 2.062 bits/byte" in summary
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## Resolved config", "## Curves", "## Throughput", "## Checkpoints", "## Evaluations"]

    # the config verbatim in a toml block
    config = (run / "config.toml").read_text()
    assert f"```toml\n{config}```" in section(text, "Resolved config")

    # both plots drawn (loss.png was missing: redrawn from metrics.jsonl) and embedded relatively
    curves = section(text, "Curves")
    assert "![loss](loss.png)" in curves and "](lr.png)" in curves
    for name in ("loss.png", "lr.png"):
        assert (run / name).read_bytes().startswith(PNG_SIGNATURE)
        assert not (run / f"{name}.tmp").exists()

    # throughput: the median and the last of the train records, and the run's facts
    throughput = section(text, "Throughput")
    median = statistics.median(TOKENS_PER_S)
    assert f"tokens/s: median {format_number(median)}, last {format_number(TOKENS_PER_S[-1])}" in throughput
    assert format_number(median) == "5,000"
    gflops = [t * 7.5e6 / 1e9 for t in TOKENS_PER_S]
    assert f"GFLOP/s: median {format_number(statistics.median(gflops))}, last 45.75" in throughput
    assert "parameters: 1,234,567 (1.235 M)" in throughput and "FLOPs per token: 7.5 MFLOP" in throughput
    assert "device: cpu" in throughput and "parallel layout: single on 1 rank" in throughput

    # the checkpoint, its size on disk and its path
    rows = [line for line in section(text, "Checkpoints").splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1 and "`checkpoints/step-2`" in rows[0] and " UTC |" in rows[0]
    size_mib = float(rows[0].split("|")[2])
    on_disk = sum(p.stat().st_size for p in (run / "checkpoints" / "step-2").rglob("*") if p.is_file())
    assert abs(size_mib - on_disk / 2**20) < 1e-3 * size_mib and size_mib > 64 * 64 * 4 / 2**20

    # the evaluation row, and a note for the broken one (sorted by folder: broken first)
    evals = section(text, "Evaluations")
    assert "skipped `evals/broken`: results.json is unreadable (JSONDecodeError" in evals
    assert "### step-2" in evals and "checkpoint `runs/x/checkpoints/step-2`" in evals
    row = next(line for line in evals.splitlines() if line.startswith("| perplexity |"))
    assert row == ("| perplexity | bits_per_byte | 1.873 | uniform 12, unigram 5.432 | 24 | "
                   "[report](evals/step-2/report.md) |")
    assert evals.index("evals/broken") < evals.index("### step-2")
    assert "workbench eval" not in evals


def test_run_info_is_kept_for_a_later_regeneration(tmp_path):
    run = make_run(tmp_path / "run")
    write_run_report(run, INFO)
    assert json.loads((run / "run_info.json").read_text()) == INFO
    first = (run / "report.md").read_text()
    (run / "report.md").unlink()
    write_run_report(run)  # another process, without the trainer's facts: read back from run_info.json
    again = (run / "report.md").read_text()
    assert "parameters: 1,234,567" in again and again == first
    # an existing loss.png (RunLog's, with baselines) is kept, lr.png is redrawn
    (run / "loss.png").write_bytes(PNG_SIGNATURE + b"runlog's")
    write_run_report(run)
    assert (run / "loss.png").read_bytes() == PNG_SIGNATURE + b"runlog's"


def test_an_empty_run_folder_gets_a_report_that_says_so(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    text = write_run_report(run).read_text()
    assert text.startswith("# fresh\n") and "step 0 / —" in text and "no validation yet" in text
    assert "no config.toml in the run folder" in section(text, "Resolved config")
    assert "no metrics yet" in section(text, "Curves")
    assert "no training steps recorded yet" in section(text, "Throughput")
    assert "no checkpoint yet" in section(text, "Checkpoints")
    assert f"`workbench eval --task perplexity --ckpt {run}`" in section(text, "Evaluations")
    assert not (run / "lr.png").exists() and not (run / "run_info.json").exists()


def test_numbers_have_four_significant_digits():
    assert [format_number(x) for x in (1.87312, 95.3, 0.000123456, 12345.6, 9999.7, 1234, True, None)] == [
        "1.873", "95.3", "0.0001235", "12,350", "10,000", "1,234", "True", "—"]


def test_evals_are_ordered_by_step_and_a_foreign_model_is_named(tmp_path):
    run = make_run(tmp_path / "my-run")
    own = dict(RESULTS, source={"ckpt": str(run / "checkpoints" / "step-10"), "run_dir": str(run), "step": 10})
    hf = dict(RESULTS, source={"hf_dir": "/models/llama-1b"})
    for name, results in (("step-10", own), ("llama-1b", hf)):
        (run / "evals" / name).mkdir()
        (run / "evals" / name / "results.json").write_text(json.dumps(results))
    evals = section(write_run_report(run).read_text(), "Evaluations")
    assert evals.index("### step-2") < evals.index("### step-10")  # by step, not as strings
    assert "Hugging Face directory `/models/llama-1b` (not this run's model)" in evals
    step2 = evals.split("### step-2", 1)[1].split("###", 1)[0]
    step10 = evals.split("### step-10", 1)[1].split("###", 1)[0]
    assert "another run's model" in step2 and "another run's model" not in step10
