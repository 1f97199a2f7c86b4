"""PPO and GRPO pieces against hand-computed values: group advantages, the k3 KL, the clipped surrogate, GRPO's
three aggregations, GAE, whitening, the rewards, the sampling seeds; and the losses' gradients on a tiny model
against the formulas they implement."""

import math

import pytest
import torch

from workbench.job import ObjectiveSection
from workbench.train.objectives.grpo import GRPOObjective, clipped_surrogate, group_advantages, k3
from workbench.train.objectives.ppo import PPOObjective, attach_value_head, gae, whiten
from workbench.train.objectives.rewards import planted_reward, r1_reward
from workbench.train.objectives.rollout import sample_seed


def test_group_advantages_normalise_within_each_group_with_the_unbiased_std():
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), group=4)
    std = math.sqrt(1 / 3)  # unbiased: sum of squares 4 x 0.25 over n - 1 = 3
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    torch.testing.assert_close(a[:4], expected)
    assert torch.equal(a[4:], torch.zeros(4))  # a group that scored alike teaches nothing
    # Dr. GRPO: no division by the std
    torch.testing.assert_close(group_advantages(torch.tensor([2.0, 0.0, 1.0]), 3, scale=False),
                               torch.tensor([1.0, -1.0, 0.0]))


def test_k3_is_zero_at_the_reference_and_matches_its_formula():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(k3(logp, logp), torch.zeros(3))
    # d = ref - logp = 1: e - 1 - 1;  d = -1: 1/e + 1 - 1
    torch.testing.assert_close(k3(torch.tensor([-2.0, -1.0]), torch.tensor([-1.0, -2.0])),
                               torch.tensor([math.e - 2, 1 / math.e]))


def test_clipped_surrogate_takes_the_pessimistic_side():
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1]))
    old = torch.zeros(5)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    # -min(rho A, clip(rho) A): 1.5 -> 1.2 for A > 0 (clipped); A < 0 keeps 1.5; 0.5 -> 0.8 only for A < 0
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8, -1.1]))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    # clip-higher: the upper bound 1 + 0.28
    loss, _ = clipped_surrogate(logp[:1], old[:1], adv[:1], 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([-1.28]))


def _cfg(**kw) -> ObjectiveSection:
    cfg = ObjectiveSection(**kw)
    cfg.validate()
    return cfg


def test_grpo_aggregations_divide_as_documented():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    mb = {"mask": mask.bool(), "rewards": torch.zeros(2)}
    grpo = GRPOObjective(_cfg(name="grpo", aggregation="grpo"))
    assert float(grpo.aggregate(per_token, mask)) == pytest.approx(2.0 + 4.0)  # token means 2 and 4, summed
    assert grpo.units(mb) == 2  # completions
    dr = GRPOObjective(_cfg(name="grpo", aggregation="dr_grpo", max_new_tokens=8))
    assert float(dr.aggregate(per_token, mask)) == pytest.approx(10.0 / 8) and dr.units(mb) == 2
    dapo = GRPOObjective(_cfg(name="grpo", aggregation="dapo"))
    assert float(dapo.aggregate(per_token, mask)) == pytest.approx(10.0) and dapo.units(mb) == 4  # tokens


def test_gae_by_hand():
    # one row, completion at positions 1..3 of 5; gamma 1, lambda 0.5
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 9.0]])  # the 9s are off the completion: ignored
    values = torch.tensor([[9.0, 0.5, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=3: delta = 1 - 0.4 = 0.6, A = 0.6;  t=2: delta = 0.4 - 0.2 = 0.2, A = 0.2 + 0.5 x 0.6 = 0.5
    # t=1: delta = 0.2 - 0.5 = -0.3, A = -0.3 + 0.5 x 0.5 = -0.05;  R = A + V
    torch.testing.assert_close(adv, torch.tensor([[0.0, -0.05, 0.5, 0.6, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.45, 0.7, 1.0, 0.0]]))
    # gamma discounts the next value: gamma 0.5, lambda 1 at t=2: 0 + 0.5 x 0.4 - 0.2 + 0.5 x A_3 (0.6)
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    assert float(adv[0, 2]) == pytest.approx(0.5 * 0.4 - 0.2 + 0.5 * 0.6)


def test_whiten_uses_the_masked_entries_and_the_unbiased_variance():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    torch.testing.assert_close(whiten(x, mask, lambda t: t), torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-4, rtol=0)
    # two "ranks" holding halves give the statistics of the whole (the all-reduce sums their parts)
    part = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    whole = whiten(torch.cat(part), torch.ones(4, dtype=torch.bool), lambda t: t)
    stats = [torch.stack([p.sum(), (p * p).sum(), torch.tensor(2.0)]).double() for p in part]
    summed = stats[0] + stats[1]
    got = whiten(part[0], torch.ones(2, dtype=torch.bool), lambda t: summed)
    torch.testing.assert_close(got, whole[:2])


def test_r1_reward_checks_the_answer_by_program_and_the_format():
    problem = {"kind": "add", "params": {"a": 2, "b": 3}}
    reward = r1_reward(format_weight=0.2)
    assert reward(problem, "<think>2 + 3 = 5</think><answer>5</answer>", []) == (1.2, {"accuracy": 1.0, "format": 1.0})
    assert reward(problem, "<think>hmm</think><answer>6</answer>", []) == (0.2, {"accuracy": 0.0, "format": 1.0})
    assert reward(problem, "<answer>5</answer>", []) == (1.0, {"accuracy": 1.0, "format": 0.0})  # no <think>
    assert reward(problem, "5", []) == (0.0, {"accuracy": 0.0, "format": 0.0})
    with pytest.raises(ValueError, match="'kind' and 'params'"):
        reward({"id": 1}, "<answer>5</answer>", [])


def test_planted_reward_is_the_share_of_even_token_ids():
    assert planted_reward({}, "", [2, 4, 5, 7]) == (0.5, {})
    assert planted_reward({}, "", []) == (0.0, {})


def test_sample_seeds_depend_on_each_coordinate_only():
    s = sample_seed(0, 3, 17, 2)
    assert s == sample_seed(0, 3, 17, 2) and 0 <= s < 2**63
    assert len({s, sample_seed(1, 3, 17, 2), sample_seed(0, 4, 17, 2), sample_seed(0, 3, 18, 2),
                sample_seed(0, 3, 17, 3)}) == 5


def test_rl_options_are_checked():
    from workbench.errors import ConfigError

    with pytest.raises(ConfigError, match="group_size.*at least 2"):
        _cfg(name="grpo", group_size=1)
    with pytest.raises(ConfigError, match="vf_coef.*'ppo'.*'grpo'"):
        _cfg(name="grpo", vf_coef=0.5)
    with pytest.raises(ConfigError, match="kl_coef.*'grpo' or 'ppo'.*is 'dpo'"):
        _cfg(name="dpo", kl_coef=0.1)
    assert _cfg(name="grpo").rl_defaults() == (8, 1) and _cfg(name="ppo").rl_defaults() == (1, 4)
    assert _cfg(name="ppo").updates_per_step() == 4 and _cfg(name="sft").updates_per_step() == 1


# ---------------------------------------------------------------------------------------------- losses on a model


def _tiny_engine(value_head: bool = False):
    from workbench.models.base import ModelSection, build_model
    from workbench.parallel.single import SingleEngine

    torch.manual_seed(0)
    model = build_model(ModelSection.of("llama3", "debug"), torch.device("cpu"))
    if value_head:
        attach_value_head(model)
        torch.nn.init.normal_(model.value_head.weight, std=0.1)
    return SingleEngine(model, torch.optim.SGD(model.parameters(), lr=0.0))


def _rows():
    """Two prompt + completion rows: completions of 3 and 2 tokens."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 11, 12, 0, 0]])
    labels = torch.full_like(ids, -100)
    labels[0, 1:4], labels[1, 1:3] = ids[0, 2:5], ids[1, 2:4]  # the completion tokens follow the prompt (5, 6)
    mask = labels != -100
    return {"input_ids": ids, "labels": labels, "mask": mask, "positions": torch.arange(6).expand(2, 6)}


def _grads(engine):
    return torch.cat([p.grad.flatten() for p in engine.unwrap().parameters() if p.grad is not None])


def _logp(engine, mb):
    hidden = engine.forward({"input_ids": mb["input_ids"], "positions": mb["positions"]}).hidden
    logp = torch.log_softmax(engine.logits(hidden).float(), -1)
    return logp.gather(-1, mb["labels"].clamp(min=0)[..., None])[..., 0] * mb["mask"]


def test_grpo_loss_gradient_is_the_group_baseline_policy_gradient():
    """epochs = 1: rho = 1 in value, and the gradient is -sum_i A_i mean_t grad log pi(o_i,t) / completions."""
    cfg = _cfg(name="grpo", kl_coef=0.0, logprob_chunk=2)
    obj = GRPOObjective(cfg)
    engine = _tiny_engine()
    mb = {**_rows(), "advantages": torch.tensor([0.7, -0.7])}
    out = obj.loss({"policy": engine}, mb, total_units=2)
    assert float(out.loss.detach()) == pytest.approx(0.0, abs=1e-7)  # -sum_i A_i (one per token) / 2 with A summing to 0
    out.loss.backward()
    got = _grads(engine)
    engine.zero_grad()
    logp = _logp(engine, mb)
    n = mb["mask"].sum(1)
    (-(mb["advantages"] * logp.sum(1) / n).sum() / 2).backward()
    torch.testing.assert_close(got, _grads(engine), rtol=1e-5, atol=1e-6)


def test_grpo_kl_term_adds_the_k3_gradient():
    cfg = _cfg(name="grpo", kl_coef=0.5, aggregation="dapo")
    obj = GRPOObjective(cfg)
    engine = _tiny_engine()
    mb = {**_rows(), "advantages": torch.zeros(2)}
    with torch.no_grad():
        mb["ref_logps"] = _logp(engine, mb) - 0.3 * mb["mask"]  # a reference 0.3 nats below on every token
    out = obj.loss({"policy": engine}, mb, total_units=5)
    # k3 with d = -0.3 on 5 tokens, averaged over them, x 0.5
    assert float(out.loss.detach()) == pytest.approx(0.5 * (math.exp(-0.3) + 0.3 - 1), rel=1e-4)
    assert out.sums["kl"] == pytest.approx(5 * (math.exp(-0.3) + 0.3 - 1), rel=1e-4)


def test_ppo_first_update_loss_is_minus_the_mean_advantage_plus_the_value_loss():
    cfg = _cfg(name="ppo", vf_coef=0.5)
    obj = PPOObjective(cfg)
    engine = _tiny_engine(value_head=True)
    mb = _rows()
    with torch.no_grad():
        mb["old_logps"], mb["old_values"], _ = obj.logprobs_and_values(engine, mb)
    mask = mb["mask"].float()
    mb["advantages"] = torch.tensor([[0, 1.0, -2.0, 0.5, 0, 0], [0, 3.0, 1.0, 0, 0, 0]]) * mask
    mb["returns"] = (mb["old_values"] + 0.1) * mask  # every value 0.1 short of its return
    mb["kl_sum"] = torch.tensor(0.0)
    out = obj.loss({"policy": engine}, mb, total_units=5)
    # rho = 1: policy loss -A per token; value loss 0.5 x 0.1^2 per token (no clipping at V = V_old)
    expected = (-(1.0 - 2.0 + 0.5 + 3.0 + 1.0) + 0.5 * 5 * 0.5 * 0.01) / 5
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert out.sums["value_loss"] == pytest.approx(5 * 0.5 * 0.01, rel=1e-4)
    assert out.sums["clip_frac"] == 0.0
    out.loss.backward()
    assert engine.unwrap().value_head.weight.grad.abs().sum() > 0  # the critic trains


def test_ppo_value_clip_takes_the_worse_of_clipped_and_unclipped():
    """New values 1.0 past the old ones (clip 0.2) and equal to their returns: unclipped (V - R)^2 = 0, clipped
    (V_old + 0.2 - R)^2 = 0.8^2; the loss takes 0.5 x 0.64 per token."""
    obj = PPOObjective(_cfg(name="ppo", value_clip=0.2))
    engine = _tiny_engine(value_head=True)
    mb = _rows()
    with torch.no_grad():
        mb["old_logps"], values, _ = obj.logprobs_and_values(engine, mb)
    mask = mb["mask"].float()
    mb["old_values"], mb["returns"] = (values - 1.0) * mask, values * mask
    mb["advantages"], mb["kl_sum"] = torch.zeros_like(mask), torch.tensor(0.0)
    out = obj.loss({"policy": engine}, mb, total_units=5)
    assert out.sums["value_loss"] == pytest.approx(5 * 0.5 * 0.64, rel=1e-4)


def test_ppo_experience_charges_the_kl_per_token_and_pays_the_score_on_the_last():
    """finish_experience: r_t = -kl_coef (old - ref) on every completion token, + the score on the row's last; with
    gamma = lambda = 1 and V = 0 each advantage is the sum of the rewards from its token on."""
    obj = PPOObjective(_cfg(name="ppo", kl_coef=0.1, gamma=1.0, lam=1.0, whiten_advantages=False))
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    old = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    obj.logprobs_and_values = lambda engine, mb: (old, torch.zeros_like(old), None)
    mb = {"mask": mask, "rewards": torch.tensor([1.0, 2.0]), "ref_logps": ref}
    engine = type("E", (), {"all_reduce": staticmethod(lambda t: t)})()
    obj.finish_experience({"policy": engine}, [mb])
    # row 0: -0.1 x 0.5 = -0.05 at t=1; -0.1 x -1.0 + 1 = 1.1 at t=2;  row 1: 0 + 2 at t=1
    torch.testing.assert_close(mb["advantages"], torch.tensor([[0.0, 1.05, 1.1, 0.0], [0.0, 2.0, 0.0, 0.0]]))
    torch.testing.assert_close(mb["returns"], mb["advantages"])  # V = 0
    assert float(mb["kl_sum"]) == pytest.approx(0.5 - 1.0)
    # whitened over the masked tokens of every micro-batch (here: one "rank")
    obj = PPOObjective(_cfg(name="ppo", kl_coef=0.1, gamma=1.0, lam=1.0))
    obj.logprobs_and_values = lambda engine, mb: (old, torch.zeros_like(old), None)
    mb = {"mask": mask, "rewards": torch.tensor([1.0, 2.0]), "ref_logps": ref}
    obj.finish_experience({"policy": engine}, [mb])
    white = mb["advantages"][mask]
    assert float(white.mean()) == pytest.approx(0.0, abs=1e-6) and float(white.std()) == pytest.approx(1.0, rel=1e-4)


def test_prompt_records_keep_their_meta_and_drop_prompts_without_room(tmp_path):
    from data_pipelines.tokenizer import byte_tokenizer
    from workbench.data.chat import ChatTemplate
    from workbench.data.examples import ExampleSet
    from workbench.errors import DataError

    tok = byte_tokenizer()
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "What is 2 + 3?", "kind": "add", "params": {"a": 2, "b": 3}}\n'
                    '{"prompt": "' + "word " * 20 + '"}\n')
    logs = []
    data = ExampleSet(path, "prompts", ChatTemplate(tok), seq_len=64, log=logs.append)  # bytes: 100 ids > 64
    assert len(data) == 1 and data.examples[0].meta == {"kind": "add", "params": {"a": 2, "b": 3}}
    assert "1 dropped (no room for a completion)" in logs[0]
    batch = data.collate([data.sample(0)])
    assert batch["examples"][0] is data.examples[0] and batch["index"].tolist() == [0]
    path.write_text('{"question": "x"}\n')
    with pytest.raises(DataError, match="p.jsonl:1: missing key 'prompt'"):
        ExampleSet(path, "prompts", ChatTemplate(tok), seq_len=64)


def test_rl_layouts_that_are_not_built_are_refused_by_name(tmp_path):
    from pathlib import Path

    from workbench.config import load_config
    from workbench.errors import ConfigError
    from workbench.job import JobConfig

    toml = Path(__file__).resolve().parents[2] / "configs" / "llama3" / "debug.toml"
    base = ["--objective.name", "grpo", "--data.train_file", "p.jsonl", "--train.init_from", "runs/x"]
    load_config(JobConfig, toml, [*base, "--lora.r", "4", "--parallel.backend", "zero2"])  # replicas: fine
    with pytest.raises(ConfigError, match="lora.r.*'grpo' under sharded parameters \\(zero3\\)"):
        load_config(JobConfig, toml, [*base, "--lora.r", "4", "--parallel.backend", "zero3"])
    with pytest.raises(ConfigError, match="parallel.ep.*frozen second model"):
        load_config(JobConfig, toml, [*base, "--model.family", "mixtral", "--model.flavor", "debug",
                                      "--parallel.ep", "2", "--parallel.dp_shard", "2", "--parallel.backend", "fsdp2"])
    with pytest.raises(ConfigError, match="data.train_file.*'ppo' needs a jsonl of prompts"):
        load_config(JobConfig, toml, ["--objective.name", "ppo"])
