"""Post-training runs end to end on the debug flavor: SFT (packed) with its chat sample and chat evals, LoRA's
checkpoint files and bit-identical resume, DPO's reference choices, and the errors a user can cause."""

import json
from pathlib import Path

import pytest
import torch

from data_pipelines.reasoning import make_sft_records
from data_pipelines.shards import build_dataset
from workbench.checkpoint.load import load_run
from workbench.checkpoint.run import latest_checkpoint, load_model_state
from workbench.cli import main
from workbench.config import load_config
from workbench.errors import CheckpointError, ConfigError, DataError
from workbench.job import JobConfig
from workbench.train.trainer import Trainer

QUIET = dict(log=lambda *_: None)
DEBUG_TOML = Path(__file__).resolve().parents[2] / "configs" / "llama3" / "debug.toml"


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def post(tmp_path_factory, debug_data):
    """A pretrained start and chat / pair files built from verifiable problems."""
    out = tmp_path_factory.mktemp("post")
    job = load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out), "--run.name", "base", "--data.dir",
                                              str(debug_data), "--train.sample_tokens", "0", "--train.steps", "8"])
    Trainer(job, **QUIET).fit()
    records = make_sft_records(48, seed=9, kinds=["add", "compare", "parity"])
    pairs = [{"prompt": r["prompt"], "chosen": r["messages"][1]["content"], "rejected": f"<answer>{i}</answer>",
              "kind": "terse"} for i, r in enumerate(records)]
    return {"base": str(out / "base"), "sft": write(out / "sft.jsonl", records[:40]),
            "sft_val": write(out / "sft-val.jsonl", records[40:]), "pairs": write(out / "pairs.jsonl", pairs[:40]),
            "pairs_val": write(out / "pairs-val.jsonl", pairs[40:])}


def sft_args(post, *extra):
    return ("--objective.name", "sft", "--data.train_file", post["sft"], "--data.val_file", post["sft_val"],
            "--train.init_from", post["base"], "--data.seq_len", "128", *extra)


def test_sft_packed_run_learns_samples_a_chat_reply_and_evaluates_in_chat_form(tmp_path, debug_job, post):
    from evals.runner import run_eval

    job = debug_job(tmp_path, *sft_args(post, "--data.pack", "true", "--train.steps", "12", "--train.eval_every", "6",
                                        "--train.micro_batch_size", "8", "--optim.lr", "3e-3"))
    trainer = Trainer(job, **QUIET)
    assert trainer.baseline is None and len(trainer.val_batches()) == 1  # 8 held-out conversations
    history = trainer.fit()
    assert history[-1]["loss"] < history[0]["loss"]
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 6, 12] and val[-1]["val_loss"] < val[0]["val_loss"]
    assert json.loads((trainer.run_dir / "run_info.json").read_text())["objective"] == "sft"
    text = trainer.sample("What is 2 + 3?", 8)
    assert isinstance(text, str)
    out = run_eval("exact_match,reasoning", ckpt=str(trainer.run_dir),
                   options=["--exact_match.data", post["sft_val"], "--exact_match.chat", "true",
                            "--reasoning.data", post["sft_val"], "--reasoning.chat", "true",
                            "--reasoning.max_new_tokens", "40", "--exact_match.max_new_tokens", "40"], **QUIET)
    results = json.loads((out / "results.json").read_text())["tasks"]
    assert results["exact_match"]["details"]["chat"] is True and results["exact_match"]["n"] == 8
    assert set(results["exact_match"]["details"]["per_kind"]) <= {"add", "compare", "parity"}
    assert results["reasoning"]["n"] == 8 and 0 <= results["reasoning"]["metrics"]["accuracy"] <= 1


def test_lora_checkpoints_hold_merged_weights_and_the_adapter_alone_and_resume_bit_identically(tmp_path, debug_job,
                                                                                           post, capsys):
    import shutil

    from workbench.nn.lora import load_adapter

    base_run = tmp_path / "base"  # a copy: this test continues it later
    shutil.copytree(post["base"], base_run)
    args = sft_args(post, "--lora.r", "4", "--lora.dora", "true", "--optim.lr", "1e-2", "--train.steps", "6",
                    "--train.init_from", str(base_run))
    full = Trainer(debug_job(tmp_path / "a", *args), **QUIET).fit()
    crashed = Trainer(debug_job(tmp_path / "b", *args), **QUIET)
    assert crashed.lora_report["modules"] == 8 and crashed.lora_report["fraction"] < 0.2
    for _ in range(3):
        crashed.train_step()
    crashed.save()
    del crashed
    resumed = Trainer(debug_job(tmp_path / "b", *args), resume=True, **QUIET)
    tail = resumed.fit()
    assert [h["loss"] for h in tail] == [h["loss"] for h in full[3:]]
    ckpt = latest_checkpoint(resumed.run_dir)
    merged = load_model_state(ckpt)
    assert not any("lora" in k for k in merged)  # model.safetensors: the plain model's keys
    model, _, _ = load_run(ckpt)  # what generate / eval / export read
    base, _, _ = load_run(post["base"])
    load_adapter(base, ckpt / "adapter")  # the adapter alone, on the starting weights
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model.logits(model({"input_ids": ids}).hidden)
        b = base.logits(base({"input_ids": ids}).hidden)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    start, _, _ = load_run(post["base"])
    with torch.no_grad():
        assert not torch.allclose(a, start.logits(start({"input_ids": ids}).hidden), atol=1e-4)  # the adapters moved it
    # the command line: base + adapter folder generates what the merged checkpoint generates
    texts = []
    for argv in (["--ckpt", str(ckpt)], ["--ckpt", post["base"], "--adapter", str(ckpt / "adapter")]):
        assert main(["generate", *argv, "--prompt", "What is 2 + 3?", "--chat", "--max-new-tokens", "12"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    assert main(["generate", "--ckpt", post["base"], "--adapter", str(tmp_path), "--prompt", "x"]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err
    other = tmp_path / "other-adapter"  # an adapter whose recorded base used another tokenizer
    shutil.copytree(ckpt / "adapter", other)
    doc = json.loads((other / "adapter_config.json").read_text())
    doc["meta"]["tokenizer_sha256"] = "0" * 64
    (other / "adapter_config.json").write_text(json.dumps(doc))
    assert main(["generate", "--ckpt", post["base"], "--adapter", str(other), "--prompt", "x"]) == 2
    assert "trained on a base with another tokenizer" in capsys.readouterr().err
    # the folder train.init_from names now holds other weights (another run of the same dataset took its place)
    shutil.rmtree(base_run)
    shutil.copytree(tmp_path / "a" / "llama3-debug", base_run)
    with pytest.raises(CheckpointError, match="train.init_from.*no longer holds the weights"):
        Trainer(debug_job(tmp_path / "b", *args), resume=True, **QUIET)


def test_dpo_reference_is_the_start_or_the_lora_base_and_precomputing_drops_it(tmp_path, debug_job, post):
    dpo = ("--objective.name", "dpo", "--data.train_file", post["pairs"], "--data.val_file", post["pairs_val"],
           "--train.init_from", post["base"], "--data.seq_len", "128", "--train.steps", "3")
    frozen = Trainer(debug_job(tmp_path / "a", *dpo), **QUIET)
    assert set(frozen.engines) == {"policy", "reference"}
    first = frozen.fit()[0]["loss"]
    assert first == pytest.approx(0.6931, abs=1e-4)  # the policy starts as its reference: -log sigmoid(0)
    lora = Trainer(debug_job(tmp_path / "b", *dpo, "--lora.r", "4"), **QUIET)
    assert set(lora.engines) == {"policy"}  # the base model with its adapters off is the reference
    assert lora.fit()[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    pre = Trainer(debug_job(tmp_path / "c", *dpo, "--objective.precompute_reference", "true"), **QUIET)
    assert set(pre.engines) == {"policy"} and pre.objective.table["chosen"].shape == (40,)
    record = pre.fit()
    assert record[0]["loss"] == pytest.approx(first, rel=1e-6)
    # the per-pair means (reward accuracy, margin) do not depend on how the step's pairs are split
    split = Trainer(debug_job(tmp_path / "d", *dpo, "--objective.precompute_reference", "true",
                              "--train.micro_batch_size", "4", "--train.grad_accum", "2"), **QUIET).fit()
    for key in ("loss", "reward_acc", "reward_margin", "chosen_reward", "logp_acc"):
        assert [r[key] for r in split] == pytest.approx([r[key] for r in record], rel=1e-5, abs=1e-6), key
    assert record[-1]["reward_margin"] > 0 and "aux_loss" not in record[-1]


def test_post_training_errors_name_the_key_or_the_line(tmp_path, debug_job, post):
    with pytest.raises(ConfigError, match="data.train_file.*needs a jsonl of conversations"):
        debug_job(tmp_path, "--objective.name", "sft")
    with pytest.raises(ConfigError, match="lora.r.*set train.init_from"):
        debug_job(tmp_path, "--lora.r", "8")
    with pytest.raises(ConfigError, match="objective.teacher.*needs a teacher"):
        debug_job(tmp_path, "--objective.name", "distill")
    with pytest.raises(ConfigError, match="objective.reference.*needs a reference"):
        debug_job(tmp_path, "--objective.name", "dpo", "--data.train_file", post["pairs"])
    with pytest.raises(ConfigError, match="parallel.cp"):
        debug_job(tmp_path, *sft_args(post, "--parallel.cp", "2"))
    dpo = ("--objective.name", "dpo", "--data.train_file", post["pairs"], "--train.init_from", post["base"])
    with pytest.raises(ConfigError, match="data.pack.*reads pairs"):  # an option that would be ignored
        debug_job(tmp_path, *dpo, "--data.pack", "true")
    with pytest.raises(ConfigError, match="objective.label_smoothing.*IPO"):
        debug_job(tmp_path, *dpo, "--objective.loss_type", "ipo", "--objective.label_smoothing", "0.1")
    with pytest.raises(ConfigError, match="model.mtp_layers.*DDP"):  # DeepSeek-V3's MTP modules get no gradient
        debug_job(tmp_path, *dpo, "--model.family", "deepseek_v3", "--parallel.backend", "ddp")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: expected 'messages'"):  # a pairs file given to sft
        Trainer(debug_job(tmp_path / "x", *sft_args(post)[:2], "--data.train_file", post["pairs"],
                          "--train.init_from", post["base"]), **QUIET)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not JSON"):
        Trainer(debug_job(tmp_path / "y", "--objective.name", "sft", "--data.train_file", str(bad),
                          "--train.init_from", post["base"]), **QUIET)
    # a teacher trained on another tokenizer: its token ids mean other things
    other = tmp_path / "other-data"
    build_dataset(load_config(JobConfig, DEBUG_TOML, ["--data.dir", str(other), "--data.vocab_size", "400"]).data,
                  log=lambda *_: None)
    teacher = Trainer(load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(tmp_path), "--run.name", "teacher",
                                                          "--data.dir", str(other), "--data.vocab_size", "400",
                                                          "--train.steps", "1",
                                                          "--train.sample_tokens", "0"]), **QUIET)
    teacher.fit()
    with pytest.raises(DataError, match="objective.teacher.*not the tokenizer of this run's dataset"):
        Trainer(debug_job(tmp_path / "z", "--objective.name", "distill", "--objective.teacher",
                          str(teacher.run_dir)), **QUIET)


def test_preference_eval_scores_the_log_probs_dpo_trains_on(tmp_path, post):
    """The eval's log p(y | x) are the training objective's; against the model itself as reference every reward
    is 0 (a tie: not accurate)."""
    from evals.runner import run_eval
    from workbench.data.chat import ChatTemplate
    from workbench.data.examples import ExampleSet
    from workbench.parallel.single import SingleEngine
    from workbench.train.objectives.dpo import DPOObjective

    out = run_eval("preference", ckpt=post["base"], out=str(tmp_path / "ev"), max_length=128,
                   options=["--preference.data", post["pairs_val"], "--preference.reference", post["base"]], **QUIET)
    task = json.loads((out / "results.json").read_text())["tasks"]["preference"]
    assert task["primary"] == "reward_acc" and task["metrics"]["reward_acc"] == 0.0
    assert task["metrics"]["reward_margin"] == 0.0 and task["details"]["per_kind"]["terse"]["n"] == 8
    samples = [json.loads(x) for x in (out / "samples" / "preference.jsonl").read_text().splitlines()]
    model, tok, _ = load_run(post["base"])
    pairs = ExampleSet(post["pairs_val"], "pairs", ChatTemplate(tok), 127, shuffle=False, log=lambda *_: None)
    cfg = type("Cfg", (), {"logprob_chunk": 0})()
    logps = DPOObjective(cfg).logps(SingleEngine(model), pairs.batch(range(len(pairs))))[0]
    n = len(pairs)
    torch.testing.assert_close(torch.tensor([s["logp_chosen"] for s in samples]), logps[:n], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(torch.tensor([s["logp_rejected"] for s in samples]), logps[n:], rtol=1e-4, atol=1e-3)
    assert task["metrics"]["logp_acc"] == float((logps[:n] > logps[n:]).float().mean())


def test_recipe_configs_chain_the_stages_and_the_report_writes_tables_and_plots(tmp_path):
    """launch/post_training.sh's configs: SFT starts from the demo model on its dataset, DPO from the SFT run,
    distillation's teacher is the demo model; the report writer turns eval results and metrics into the
    document's measured section (fed with small stand-in results here)."""
    import runpy
    import subprocess

    root = Path(__file__).resolve().parents[2]
    demo, sft, dpo, teacher, distill = (load_config(JobConfig, root / p) for p in (
        "configs/llama3/demo.toml", "configs/post/sft.toml", "configs/post/dpo.toml", "configs/post/teacher.toml",
        "configs/post/distill.toml"))
    for job in (sft, dpo, teacher, distill):  # the demo's dataset settings: its folder and tokenizer are reused
        for key in ("dir", "max_bytes", "vocab_size", "val_fraction", "shard_bytes"):
            assert getattr(job.data, key) == getattr(demo.data, key), key
    assert sft.train.init_from == "runs/llama3-demo" and sft.objective.name == "sft"
    assert dpo.train.init_from == "runs/post-sft" and dpo.objective.name == "dpo"
    assert teacher.model == demo.model and teacher.train.steps > demo.train.steps
    assert distill.objective.teacher == "runs/post-teacher" and distill.model.config.dim < demo.model.config.dim
    script = root / "launch/post_training.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert all(f"configs/post/{n}.toml" in script.read_text() for n in ("sft", "dpo", "teacher", "distill"))

    runs = tmp_path / "runs"

    def results(run, folder, tasks):
        (runs / run / "evals" / folder).mkdir(parents=True)
        (runs / run / "evals" / folder / "results.json").write_text(json.dumps({"tasks": tasks}))

    def kinds(acc):
        return {"details": {"per_kind": {"add": {"accuracy": acc, "chance": 0.005, "n": 10}}},
                "metrics": {"accuracy": acc, "format": 1.0}, "baselines": {"chance": 0.2}}

    em = {"metrics": {"exact_match": 0.0, "f1": 0.3}, "baselines": {"chance": 0.01},
          "details": {"per_kind": {"docstring": {"accuracy": 0.0, "f1": 0.2, "n": 5}}}}
    results("llama3-demo", "post", {"reasoning": kinds(0.0), "exact_match": em})
    results("post-sft", "post", {"reasoning": kinds(0.2), "exact_match": em})
    results("post-dpo", "post", {"reasoning": kinds(0.2)})
    for run, acc in (("llama3-demo", 0.0), ("post-teacher", 0.02)):
        results(run, "copying", {"copying": {"metrics": {"accuracy": acc}, "baselines": {"chance": 0.1}}})
    for run, acc in (("post-sft", 0.0), ("post-dpo", 0.7)):
        for split in ("val", "rephrased"):
            results(run, f"pairs-{split}", {
                "preference": {"metrics": {"logp_acc": 0.4, "reward_acc": acc, "reward_margin": 3 * acc}},
                "teaching": {"n": 40, "metrics": {"passes": acc / 7, "runs": 0.2, "has_example": 0.9},
                             "baselines": {"rejected": 0.0, "chosen": 1.0}}})
    (runs / "post-dpo" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward_acc": s / 10, "val_reward_acc": s / 10}) + "\n" for s in range(5)))
    for seed in (0, 1):
        for name, end in ((f"post-distill-s{seed}", 5.0), (f"post-student-s{seed}", 5.2)):
            (runs / name).mkdir()
            (runs / name / "metrics.jsonl").write_text("".join(
                json.dumps({"step": s, "val_loss": end + 1 - s / 2, "val_teacher_loss": 4.6}) + "\n" for s in range(3)))
    doc = tmp_path / "docs" / "post-training.md"
    doc.parent.mkdir()
    doc.write_text("# hand-written\n\n<!-- measured:begin (launch/post_training_report.py) -->\nold\n<!-- measured:end -->\n"
                   "tail\n")
    module = runpy.run_path(str(root / "launch/post_training_report.py"))
    assert module["main"](["--runs", str(runs), "--doc", str(doc), "--images", str(tmp_path / "docs" / "images"),
                           "--seeds", "0 1"]) == 0
    text = doc.read_text()
    assert text.startswith("# hand-written") and text.rstrip().endswith("tail") and "\nold\n" not in text
    assert "| SFT | 0.200 |" in text
    assert "| DPO + RPO | unseen subjects (val) | 40 | 0.400 | 0.700 | 2.100 | 0.900 | 0.200 | 0.100 |" in text
    assert "pretrained 0.000, pretrained 1000 steps (the teacher) 0.020 (chance 0.100)" in text
    assert "0.200 nats/token lower" in text and "lower in 2 of 2 seeds" in text
    for name in ("post-sft.png", "post-dpo.png", "post-distill.png"):
        assert (tmp_path / "docs" / "images" / name).read_bytes().startswith(b"\x89PNG")
        assert f"(images/{name})" in text
