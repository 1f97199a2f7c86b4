"""PPO and GRPO runs end to end on the debug flavor: each raises a planted reward within a few dozen updates (the
CI check that the objectives learn at all), PPO's critic is saved beside the weights and a stopped run resumes
bit-identically, and the mistakes a user can make stop the run before it starts, naming the key."""

import json
import shutil
from pathlib import Path

import pytest

from data_pipelines.reasoning import make_problems
from workbench.checkpoint.load import load_run
from workbench.checkpoint.run import latest_checkpoint
from workbench.checkpoint.safetensors_io import read_file
from workbench.errors import ConfigError, DataError
from workbench.train.trainer import VALUE_HEAD_FILE, Trainer

QUIET = dict(log=lambda *_: None)
WORDS = ("apple", "river", "stone", "cloud", "green", "north", "seven", "table")


def write(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def rl(tmp_path_factory, debug_data):
    """A start (8 LM steps) and files of short prompts: planted-reward prompts and reasoning problems."""
    from workbench.config import load_config
    from workbench.job import JobConfig

    out = tmp_path_factory.mktemp("rl")
    toml = Path(__file__).resolve().parents[2] / "configs" / "llama3" / "debug.toml"
    job = load_config(JobConfig, toml, ["--run.out_dir", str(out), "--run.name", "base", "--data.dir",
                                        str(debug_data), "--train.sample_tokens", "0", "--train.steps", "8"])
    Trainer(job, **QUIET).fit()
    prompts = [{"prompt": f"Write about {w} {i}"} for i, w in enumerate(WORDS * 4)]
    return {"base": str(out / "base"), "prompts": write(out / "prompts.jsonl", prompts),
            "val": write(out / "val.jsonl", prompts[:8]),
            "problems": write(out / "problems.jsonl", make_problems(16, seed=3, kinds=["add", "parity"]))}


def planted(rl, name, *extra):
    return ("--objective.name", name, "--objective.reward", "planted", "--data.train_file", rl["prompts"],
            "--data.val_file", rl["val"], "--train.init_from", rl["base"], "--objective.max_new_tokens", "16",
            "--objective.group_size", "4", "--train.micro_batch_size", "8", "--optim.lr", "1e-2",
            "--optim.warmup_steps", "2", "--train.log_every", "1", *extra)


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_each_objective_raises_a_planted_reward(tmp_path, debug_job, rl, name):
    """The share of even token ids: about 0.5 for any start (the first step's rollouts come from the start), and
    the rollouts' mean climbs well past it. PPO's per-token KL reward holds it nearer its start: a lighter one."""
    kl = ["--objective.kl_coef", "0.01"] if name == "ppo" else []
    job = debug_job(tmp_path, *planted(rl, name, "--train.steps", "16", "--train.eval_every", "16", *kl))
    history = Trainer(job, **QUIET).fit()
    rewards = [r["reward"] for r in history]
    assert 0.3 < rewards[0] < 0.7
    assert mean(rewards[-3:]) > rewards[0] + 0.2, rewards
    val = [json.loads(x) for x in (job_dir(job) / "metrics.jsonl").read_text().splitlines() if "val_reward" in x]
    assert [r["step"] for r in val] == [0, 16] and val[-1]["val_reward"] > val[0]["val_reward"]
    assert all(r["length"] > 0 and 0 <= r["stopped"] <= 1 for r in history)
    if name == "grpo":
        assert all("kl" in r for r in history) and history[-1]["kl"] > 0  # the policy left its reference
    else:
        assert history[0]["loss_first_update"] != history[0]["loss"]  # 4 updates over the same experience
        assert any(r["clip_frac"] > 0 for r in history)


def job_dir(job) -> Path:
    return Path(job.run.out_dir) / job.run.name


def test_ppo_saves_its_critic_beside_the_weights_and_resumes_bit_identically(tmp_path, debug_job, rl):
    args = planted(rl, "ppo", "--train.steps", "4", "--train.ckpt_every", "2", "--objective.epochs", "2",
                   "--run.name", "ppo")
    whole = Trainer(debug_job(tmp_path, *args), **QUIET).fit()
    run = tmp_path / "ppo"
    ckpt = latest_checkpoint(run)
    weights = read_file(ckpt / "model.safetensors")
    assert not any(k.startswith("value_head") for k in weights)  # a plain language model for every consumer
    assert set(read_file(ckpt / VALUE_HEAD_FILE)) == {"value_head.weight", "value_head.bias"}
    model, _, _ = load_run(run, "cpu")  # what generate, eval and export read
    assert not hasattr(model, "value_head")
    # stopped at step 2, resumed: the same rollouts, losses and rewards as the run that never stopped
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step-4")
    resumed = Trainer(debug_job(tmp_path, *args[:-2], "--run.name", "cut"), resume=True, **QUIET).fit()
    assert [r["step"] for r in resumed] == [3, 4]
    for key in ("loss", "reward", "grad_norm", "value_loss"):
        assert [r[key] for r in resumed] == [r[key] for r in whole[2:]], key


def test_grpo_scores_reasoning_problems_with_the_r1_reward(tmp_path, debug_job, rl):
    job = debug_job(tmp_path, "--objective.name", "grpo", "--data.train_file", rl["problems"], "--data.val_file",
                    rl["problems"], "--train.init_from", rl["base"], "--objective.max_new_tokens", "8",
                    "--objective.group_size", "2", "--train.micro_batch_size", "4", "--train.steps", "2",
                    "--data.seq_len", "128", "--objective.aggregation", "dr_grpo", "--objective.epochs", "2")
    history = Trainer(job, **QUIET).fit()
    assert all({"accuracy", "format", "reward"} <= set(r) for r in history)
    val = [json.loads(x) for x in (job_dir(job) / "metrics.jsonl").read_text().splitlines() if "val_reward" in x]
    assert {"val_accuracy", "val_format", "val_reward"} <= set(val[-1])


def test_mistakes_stop_the_run_before_it_starts(tmp_path, debug_job, rl):
    # the r1 reward on prompts that are not reasoning problems
    with pytest.raises(DataError, match="data.train_file.*32 prompt.*no 'kind' and 'params'"):
        Trainer(debug_job(tmp_path, "--objective.name", "grpo", "--data.train_file", rl["prompts"],
                          "--train.init_from", rl["base"]), **QUIET)
    # a KL penalty with no reference to measure it against
    with pytest.raises(ConfigError, match="objective.kl_coef.*there is none: set train.init_from"):
        Trainer(debug_job(tmp_path, "--objective.name", "ppo", "--objective.reward", "planted",
                          "--data.train_file", rl["prompts"]), **QUIET)
    # a value head option on grpo
    with pytest.raises(ConfigError, match="vf_coef.*objective.name = 'ppo'"):
        debug_job(tmp_path, "--objective.name", "grpo", "--objective.vf_coef", "0.5")


def test_rl_report_writes_the_measured_section_from_run_folders(tmp_path):
    """launch/rl_report.py on synthetic run folders: the tables, the per-seed changes and both plots."""
    import runpy

    root = Path(__file__).resolve().parents[2]
    runs = tmp_path / "runs"

    def reasoning_eval(run: str, acc: float, mod: float) -> None:
        folder = runs / run / "evals" / "rl"
        folder.mkdir(parents=True)
        per_kind = {"mod": {"accuracy": mod, "chance": 0.2, "n": 10, "pass_at_k": 0.6, "greedy": 0.3},
                    "parity": {"accuracy": 0.5, "chance": 0.5, "n": 10, "pass_at_k": 0.9, "greedy": 0.5}}
        (folder / "results.json").write_text(json.dumps({"tasks": {"reasoning": {
            "n": 20, "metrics": {"accuracy": acc, "format": 1.0, "pass_at_k": 0.8, "greedy_accuracy": 0.4},
            "baselines": {"chance": 0.35}, "details": {"per_kind": per_kind, "samples": 8, "temperature": 1.0}}}}))

    reasoning_eval("post-sft", 0.40, 0.2)
    for seed, (g, p) in enumerate(((0.45, 0.42), (0.43, 0.39))):
        reasoning_eval(f"rl-grpo-s{seed}", g, 0.3)
        reasoning_eval(f"rl-ppo-s{seed}", p, 0.25)
        for name in ("grpo", "ppo"):
            (runs / f"rl-{name}-s{seed}" / "metrics.jsonl").write_text("".join(
                json.dumps(r) + "\n" for r in ({"step": 0, "val_accuracy": 0.4}, {"step": 1, "reward": 0.3, "kl": 0.0},
                                               {"step": 2, "reward": 0.5, "kl": 0.1}, {"step": 2, "val_accuracy": 0.5})))
    doc = tmp_path / "docs" / "rl.md"
    doc.parent.mkdir()
    doc.write_text("# hand-written\n\n<!-- measured:begin (launch/rl_report.py) -->\nold\n<!-- measured:end -->\ntail\n")
    module = runpy.run_path(str(root / "launch/rl_report.py"))
    assert module["main"](["--runs", str(runs), "--doc", str(doc), "--images", str(tmp_path / "docs" / "images"),
                           "--seeds", "0 1"]) == 0
    text = doc.read_text()
    assert text.startswith("# hand-written") and text.rstrip().endswith("tail") and "\nold\n" not in text
    assert "| SFT start | - | 0.400 | - | 0.800 | 0.400 | 1.000 | 0.200 | 0.500 |" in text
    assert "| GRPO | 0 | 0.450 | +0.050 |" in text and "| PPO | 1 | 0.390 | -0.010 |" in text
    assert "GRPO: held-out pass@1 0.400 -> 0.440 on average, +0.040 (std 0.014); higher than the start in 2 of 2" in text
    assert "PPO: held-out pass@1 0.400 -> 0.405 on average" in text and "in 1 of 2 seeds" in text
    assert "| rl-grpo-s0 | 0.300 | 0.500 | 0.100 | 0.400 -> 0.500 |" in text
    for name in ("rl-kinds.png", "rl-curves.png"):
        assert (tmp_path / "docs" / "images" / name).read_bytes().startswith(b"\x89PNG")
        assert f"(images/{name})" in text
