"""`workbench eval` end to end on a trained debug run and on a Hugging Face directory, and its bad input."""

import json
import shutil

import pytest
from conftest import DEBUG_TOML

from workbench.checkpoint.run import MARKER
from workbench.cli import main
from workbench.config import load_config
from workbench.job import JobConfig
from workbench.train.trainer import Trainer

# the debug run's window is 64 tokens, too short for a reasoning prompt of its small vocabulary
SMALL = ["--max-length", "128", "--exact_match.n", "6", "--reasoning.n", "6", "--reasoning.max_new_tokens", "8",
         "--perplexity.max_documents", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, debug_data):
    """A debug run trained for 15 steps (its model is clearly better than uniform, not yet good)."""
    out = tmp_path_factory.mktemp("runs")
    job = load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out), "--data.dir", str(debug_data),
                                              "--train.sample_tokens", "0", "--train.steps", "15"])
    trainer = Trainer(job, log=lambda *_: None)
    trainer.fit()
    return trainer.run_dir


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out.strip(), captured.err.strip().splitlines()


def test_eval_writes_results_a_report_and_the_runs_report(capsys, run):
    rc, out, err = cli(capsys, "eval", "--task", "perplexity,exact_match,reasoning", "--ckpt", run, *SMALL)
    folder = run / "evals" / "step-15"
    assert rc == 0 and out == str(folder / "report.md")
    results = json.loads((folder / "results.json").read_text())
    assert results["source"]["step"] == 15 and list(results["tasks"]) == ["perplexity", "exact_match", "reasoning"]
    ppl = results["tasks"]["perplexity"]
    assert ppl["n"] == 3 and ppl["details"]["same_tokenizer_as_dataset"]
    assert ppl["metrics"]["bits_per_byte"] < ppl["baselines"]["uniform"]
    assert results["tasks"]["exact_match"]["n"] == 6 and results["tasks"]["reasoning"]["n"] == 6
    assert len((folder / "samples" / "reasoning.jsonl").read_text().splitlines()) == 6
    assert len((folder / "exact_match.data.jsonl").read_text().splitlines()) == 6  # the mined pairs, kept
    report = (folder / "report.md").read_text()
    for name in ("perplexity", "exact_match", "reasoning"):
        assert f"## {name}" in report and f"![{name}]({name}.png)" in report
        assert (folder / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    run_report = (run / "report.md").read_text()
    assert "[report](evals/step-15/report.md)" in run_report and "| reasoning | accuracy |" in run_report
    assert any(line.startswith("run report:") for line in err)

    # one task again: its entry is replaced, the others stay
    rc, _, _ = cli(capsys, "eval", "--task", "reasoning", "--ckpt", run, "--reasoning.n", "3",
                   "--reasoning.max_new_tokens", "4", "--max-length", "128")
    results = json.loads((folder / "results.json").read_text())
    assert rc == 0 and list(results["tasks"]) == ["perplexity", "exact_match", "reasoning"]
    assert results["tasks"]["reasoning"]["n"] == 3 and results["tasks"]["perplexity"]["n"] == 3


def test_perplexity_equals_a_direct_forward_over_each_document(capsys, run, tmp_path):
    """With a window longer than every document, each is one forward pass: recompute bits per byte by hand."""
    import math

    import torch

    from workbench.checkpoint.load import load_run
    from workbench.data.shards import read_texts

    rc, _, _ = cli(capsys, "eval", "--task", "perplexity", "--ckpt", run, "--out", tmp_path / "ev",
                   "--max-length", "4096", "--perplexity.max_documents", "2")
    task = json.loads((tmp_path / "ev" / "results.json").read_text())["tasks"]["perplexity"]
    model, tok, _ = load_run(run)
    job = load_config(JobConfig, run / "config.toml")
    nll, tokens, n_bytes = 0.0, 0, 0
    for _, text in read_texts(job.data.dir, "val", log=lambda *_: None)[:2]:
        ids = tok.encode(text)  # bos + text, as the documents were trained on
        assert ids[0] == tok.bos_id and len(ids) < 4096
        with torch.no_grad():
            logits = model.logits(model({"input_ids": torch.tensor([ids[:-1]])}).hidden)[0].float()
        nll -= float(torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).double().sum())
        tokens += len(ids) - 1
        n_bytes += len(text.encode("utf-8"))
    assert rc == 0 and task["details"]["tokens"] == tokens and task["details"]["bytes"] == n_bytes
    assert task["metrics"]["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert task["metrics"]["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_eval_of_a_hugging_face_directory_on_a_workbench_dataset(capsys, hf_llama_dir, debug_data, tmp_path,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = cli(capsys, "eval", "--task", "perplexity", "--hf-dir", hf_llama_dir, "--perplexity.data",
                     debug_data, "--perplexity.max_documents", "2", "--max-length", "32")
    folder = tmp_path / "runs" / "evals" / hf_llama_dir.name
    assert rc == 0 and out == str(folder.relative_to(tmp_path) / "report.md")
    task = json.loads((folder / "results.json").read_text())["tasks"]["perplexity"]
    assert not task["details"]["same_tokenizer_as_dataset"] and "unigram" not in task["baselines"]
    assert task["details"]["max_length"] == 32 and task["n"] == 2 and task["metrics"]["bits_per_byte"] > 0


def test_eval_list_names_every_task_and_its_options(capsys):
    rc, out, _ = cli(capsys, "eval", "--list")
    assert rc == 0
    for needle in ("perplexity", "exact_match", "reasoning", "--reasoning.kinds", "--exact_match.data"):
        assert needle in out


def one_error(rc, err, *needles):
    assert rc == 2 and err[-1].startswith("error: "), err
    for n in needles:
        assert str(n) in err[-1], (n, err[-1])


def test_eval_bad_input_names_the_problem(capsys, run, tmp_path):
    one_error(*cli(capsys, "eval", "--task", "perplexity,nope", "--ckpt", run)[::2],
              "unknown eval task 'nope'", "known tasks: ", *(f"{t}, " for t in ("exact_match", "passkey", "perplexity")))
    one_error(*cli(capsys, "eval", "--ckpt", run)[::2], "--task")
    one_error(*cli(capsys, "eval", "--task", "perplexity")[::2], "--ckpt RUN_DIR or --hf-dir DIR")

    # a checkpoint whose write never finished is refused, named; a run with no complete one too
    half_run = tmp_path / "half"
    shutil.copytree(run, half_run, ignore=shutil.ignore_patterns("evals", "tb"))
    broken = half_run / "checkpoints" / "step-15"
    (broken / MARKER).unlink()
    one_error(*cli(capsys, "eval", "--task", "perplexity", "--ckpt", broken)[::2], str(broken), "no COMPLETE marker")
    one_error(*cli(capsys, "eval", "--task", "perplexity", "--ckpt", half_run)[::2], "no complete checkpoint")

    # task data that is not there: the file or folder is named
    missing = tmp_path / "nowhere.jsonl"
    one_error(*cli(capsys, "eval", "--task", "exact_match", "--ckpt", run, "--exact_match.data", missing)[::2],
              "exact_match.data", str(missing), "does not exist")
    one_error(*cli(capsys, "eval", "--task", "reasoning", "--ckpt", run, "--reasoning.data", missing)[::2],
              str(missing))
    one_error(*cli(capsys, "eval", "--task", "perplexity", "--ckpt", run, "--perplexity.data", tmp_path / "nodata")[::2],
              "nodata", "does not exist")

    # options: an unknown key, a bad value, a task not asked for
    one_error(*cli(capsys, "eval", "--task", "reasoning", "--ckpt", run, "--reasoning.bogus", "1")[::2],
              "reasoning.bogus", "unknown key")
    one_error(*cli(capsys, "eval", "--task", "reasoning", "--ckpt", run, "--reasoning.n", "0")[::2],
              "reasoning.n", "> 0")
    one_error(*cli(capsys, "eval", "--task", "reasoning", "--ckpt", run, "--reasoning.kinds", "[riddle]")[::2],
              "reasoning.kinds", "riddle")
    one_error(*cli(capsys, "eval", "--task", "perplexity", "--ckpt", run, "--reasoning.n", "3")[::2],
              "--reasoning.n", "not among those asked for")

    # results of one model never mix with another's
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"format": "workbench-eval/1", "source": {"hf_dir": "/x"},
                                                    "tasks": {}}))
    one_error(*cli(capsys, "eval", "--task", "reasoning", "--ckpt", run, "--out", other, "--reasoning.n", "1")[::2],
              str(other), "another model")


def test_long_context_evals_run_past_the_window_and_write_their_plots(capsys, run, tmp_path):
    """`workbench eval --task passkey --ckpt RUN_DIR` (and niah's heatmap): lengths past the run's 64-token
    window run as asked (the report, results and plots are written), and `past_window false` refuses them."""
    out = tmp_path / "lc"
    rc, report, err = cli(capsys, "eval", "--task", "passkey,niah", "--ckpt", run, "--out", out,
                          "--passkey.lengths", "[80, 160]", "--passkey.depths", "[0, 1]", "--passkey.n", "2",
                          "--niah.lengths", "[200, 260]", "--niah.depths", "[0, 0.5, 1]", "--niah.n", "1")
    assert rc == 0 and report == str(out / "report.md")
    results = json.loads((out / "results.json").read_text())["tasks"]
    pk, nh = results["passkey"], results["niah"]
    assert pk["n"] == 8 and pk["baselines"]["chance"] == pytest.approx(1 / 90000)
    assert pk["details"]["trained_window"] == 64 and pk["details"]["by_length"]["160"]["past_window"]
    assert 0 <= pk["metrics"]["accuracy"] <= pk["metrics"]["digit_accuracy"] <= 1
    assert nh["n"] == 6 and len(nh["details"]["grid"]) == 3 and len(nh["details"]["grid"][0]) == 2
    assert nh["details"]["haystack"].endswith(":val")  # the run's held-out text
    samples = [json.loads(line) for line in (out / "samples" / "passkey.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(s["n_tokens"] <= s["length"] for s in samples)
    text = (out / "report.md").read_text()
    for name in ("passkey", "niah"):
        assert f"## {name}" in text and f"![{name}]({name}.png)" in text
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert any("past the trained window of 64 tokens" in line for line in err)
    one_error(*cli(capsys, "eval", "--task", "passkey", "--ckpt", run, "--out", out, "--passkey.lengths", "[160]",
                   "--passkey.past_window", "false")[::2], "passkey.lengths", "160", "past_window true")


def test_reasoning_sampled_reports_pass_at_1_pass_at_k_and_greedy(capsys, run, tmp_path):
    """R1's protocol: K samples per problem; pass@1 is their mean, pass@k the share of problems with any right
    answer, and the greedy pass is scored beside them. Checked against the samples file by hand."""
    rc, _, _ = cli(capsys, "eval", "--task", "reasoning", "--ckpt", run, "--out", tmp_path / "ev", "--max-length",
                   "128", "--reasoning.n", "5", "--reasoning.max_new_tokens", "6", "--reasoning.samples", "3",
                   "--reasoning.temperature", "1.0", "--reasoning.kinds", "parity,compare")
    assert rc == 0
    task = json.loads((tmp_path / "ev" / "results.json").read_text())["tasks"]["reasoning"]
    samples = [json.loads(x) for x in (tmp_path / "ev" / "samples" / "reasoning.jsonl").read_text().splitlines()]
    assert task["n"] == 5 and len(samples) == 15 and [s["sample"] for s in samples[:6]] == [0, 1, 2, 0, 1, 2]
    assert task["metrics"]["accuracy"] == sum(s["correct"] for s in samples) / 15
    hits = [any(s["correct"] for s in samples[i * 3 : i * 3 + 3]) for i in range(5)]
    assert task["metrics"]["pass_at_k"] == sum(hits) / 5
    assert 0 <= task["metrics"]["greedy_accuracy"] <= 1 and task["details"]["samples"] == 3
    assert len({s["output"] for s in samples}) > 1  # sampled, not greedy
    # samples at temperature 0 would all be the greedy one
    rc, _, err = cli(capsys, "eval", "--task", "reasoning", "--ckpt", run, "--reasoning.samples", "4")
    assert rc != 0 and any("reasoning.temperature" in line or "'temperature'" in line for line in err)
