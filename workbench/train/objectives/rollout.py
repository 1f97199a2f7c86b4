"""What PPO and GRPO share: rollouts through the Generator, rewards, per-token log-probs, and held-out scoring.

One batch of experience (`RolloutObjective.experience`, per micro-batch of prompts)
    1. every prompt gets `group_size` completions, sampled by `KVCacheGenerator` from the policy with its parameters
       gathered for generation (`engine.gather_for_generation(independent=True)`: a whole model on every rank, so
       ranks holding different prompts stop decoding at different tokens without waiting for each other)
    2. each completion is scored by the reward program (`rewards.py`)
    3. prompt + completion become one right-padded row; the labels are the completion's tokens (its closing
       `<|end|>` included), so the same chunked log-prob code as DPO gives log pi(y_t | x, y_<t) per token
    4. the objective adds what its loss needs (advantages; the old and the reference log-probs; PPO's values)

Sampling is reproducible and independent of the layout: completion j of the prompt at file position i, at
training step s, draws from its own generator seeded by (run.seed, s, i, j). The same weights therefore give the
same completions on one process or on any number of ranks, up to the last bits of batched arithmetic (a row is
decoded beside other rows, left-padded to the longest prompt: the sums agree to float32 rounding, and a draw would
have to land within that of a boundary to flip); the layout tests check it with prompts of different lengths.

Temperature. Rollouts sample from softmax(z / T) (`objective.sampling_temperature`), and every log-prob of the
loss (new, old, reference) is computed from z / T as well, so the ratio compares the distributions that were
sampled from (TRL does the same). T = 1 is the plain policy.

Sharded engines. Each rank generates for its own prompts on a gathered copy; every forward of the sharded
policy or reference then runs once per micro-batch on every rank, with the head called equally often
(`logprobs.most_on_any_rank`), as DPO does.

Held-out scoring (`validation_sums`): one greedy completion per prompt of `data.val_file`; the mean reward and
its parts (accuracy and format for r1), the completion length and the share that stopped by themselves.
"""

from __future__ import annotations

import numpy as np
import torch

from workbench.data.chat import ChatTemplate
from workbench.data.examples import label_rows
from workbench.data.packed import IGNORE_INDEX
from workbench.errors import ConfigError, DataError
from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.nn.attention import MaskSpec
from workbench.train.objectives.base import ModelRole
from workbench.train.objectives.logprobs import label_logprobs, most_on_any_rank
from workbench.train.objectives.rewards import build_reward

EPS = 1e-4  # added to a group's reward std (TRL's)


def sample_seed(seed: int, step: int, index: int, j: int) -> int:
    """The seed of completion j of prompt `index` at step `step`: any rank computes it from these alone."""
    return int(np.random.SeedSequence([seed, step, index, j]).generate_state(1, dtype=np.uint64)[0] >> 1)


def scatter_tokens(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape) -> torch.Tensor:
    """(R, T) float32, zero except values at (rows, cols) (differentiable in `values`)."""
    out = torch.zeros(shape, dtype=torch.float32, device=values.device)
    return out.index_put((rows, cols), values.float())


def token_logprobs(engine, mb: dict, chunk: int, temperature: float = 1.0):
    """(log pi(label) per target position (R, T), zero elsewhere; the forward's output) of the rows of `mb`
    under `engine`, from the logits divided by `temperature`."""
    out = engine.forward({"input_ids": mb["input_ids"], "positions": mb["positions"], "mask": MaskSpec()})

    def logits(h):
        z = engine.logits(h)
        return z if temperature == 1.0 else z / temperature

    logp, rows, cols = label_logprobs(logits, out.hidden, mb["labels"], chunk, lambda n: most_on_any_rank(engine, n))
    return scatter_tokens(logp, rows, cols, mb["labels"].shape), out


class RolloutObjective:
    data = "prompts"
    roles = {"policy": ModelRole(trainable=True), "reference": ModelRole(trainable=False)}
    value_head = False  # PPO's critic: a value head on the policy's trunk (the trainer attaches it)

    def __init__(self, cfg):
        self.cfg = cfg
        self.group_size, self.epochs = cfg.rl_defaults()
        self.reward_fn = build_reward(cfg)
        self.step_metrics: dict[str, float] = {}

    def setup(self, job, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer)
        self.seed = job.run.seed
        self.seq_len = job.data.seq_len
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def frozen_models(self, job) -> dict[str, tuple[str, str]]:
        """The reference of the KL penalty: objective.reference, else the starting weights (train.init_from); none
        with kl_coef = 0, or under LoRA without objective.reference (the policy with its adapters off)."""
        if self.cfg.kl_coef == 0:
            return {}
        if self.cfg.reference:
            return {"reference": (self.cfg.reference, "objective.reference")}
        if job.lora.enabled:
            return {}
        if not job.train.init_from:
            raise ConfigError(f"config key 'objective.kl_coef': {self.cfg.kl_coef} penalises the distance to a "
                              f"reference, and there is none: set train.init_from (the usual start: an SFT run) or "
                              f"objective.reference, or objective.kl_coef = 0")
        return {"reference": (job.train.init_from, "train.init_from")}

    def sample_prompt(self, text: str) -> tuple[list[int], list[int] | None]:
        return self.template.ask(text), self.template.stop_ids

    def prepare(self, models, train_data, val_batches, log=print) -> tuple[str, ...]:
        """Before the first rollout: every prompt must carry what the reward reads (r1: a problem's kind and
        params), checked here rather than steps into the run."""
        if self.cfg.reward == "r1":
            sets = [("data.train_file", train_data.path, train_data.examples)]
            sets += [("data.val_file", "the validation file", [e for b in val_batches for e in b["examples"]])]
            for key, path, examples in sets:
                bad = [e.index for e in examples if not {"kind", "params"} <= set(e.meta)]
                if bad:
                    raise DataError(f"config key '{key}': {path}: {len(bad)} prompt(s) (the first: prompt {bad[0]}) "
                                    f"have no 'kind' and 'params'; objective.reward = 'r1' checks reasoning problems "
                                    f"(data_pipelines.reasoning writes such records), or use another reward")
        return ()

    # ------------------------------------------------------------------------------------------ rollouts

    def generate(self, engine, batches: list[list], step: int, greedy: bool = False, group: int | None = None):
        """For each list of examples in `batches`: [(example, completion)], `group` completions per example (one,
        greedy, for validation). The policy's parameters are gathered once for all of them."""
        group = group or self.group_size
        with engine.gather_for_generation(independent=True) as model:
            gen = KVCacheGenerator(model, self.tokenizer, pad_id=self.pad_id)
            return [self._generate(gen, examples, step, greedy, group) for examples in batches]

    def _generate(self, gen, examples, step: int, greedy: bool, group: int):
        prompts, params, owners = [], [], []
        for ex in examples:
            room = self.seq_len + 1 - len(ex.ids)
            for j in range(group):
                prompts.append(ex.ids.tolist())
                params.append(SamplingParams(
                    max_new_tokens=min(self.cfg.max_new_tokens, room),
                    temperature=0.0 if greedy else self.cfg.sampling_temperature,
                    seed=sample_seed(self.seed, step, ex.index, j), stop_token_ids=self.template.stop_ids))
                owners.append(ex)
        completions = []
        size = self.cfg.rollout_batch
        for s in range(0, len(prompts), size):
            completions += gen.generate(prompts[s : s + size], params[s : s + size])
        return list(zip(owners, completions))

    def score(self, samples) -> tuple[torch.Tensor, dict[str, float]]:
        """(rewards (n,), sums of the reward's parts and of the completions' lengths and stops)."""
        rewards, sums = [], {"completions": float(len(samples)), "reward": 0.0, "length": 0.0, "stopped": 0.0}
        stops = set(self.template.stop_ids)
        for ex, c in samples:
            content = c.tokens[:-1] if c.tokens and c.tokens[-1] in stops else c.tokens  # without its <|end|>
            # special tokens kept: <think> and <answer> are reserved tokens that a plain decode drops
            r, parts = self.reward_fn(ex.meta, self.tokenizer.decode(content, skip_special_tokens=False), content)
            rewards.append(r)
            sums["reward"] += r
            sums["length"] += len(c.tokens)
            sums["stopped"] += c.finish_reason == "stop"
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        return torch.tensor(rewards, dtype=torch.float32), sums

    def rows(self, samples, device) -> dict:
        """Prompt + completion rows, right-padded; labels and `mask` on the completion's tokens."""
        seqs = []
        for ex, c in samples:
            ids = np.concatenate([ex.ids, np.asarray(c.tokens, dtype=np.int64)])
            targets = np.zeros(len(ids), dtype=bool)
            targets[len(ex.ids):] = True
            seqs.append((ids, targets))
        mb = {k: v.to(device) for k, v in label_rows(seqs, self.pad_id).items()}
        mb["mask"] = mb["labels"] != IGNORE_INDEX
        return mb

    @torch.no_grad()
    def reference_logprobs(self, models, mb: dict) -> torch.Tensor:
        if "reference" in models:
            return token_logprobs(models["reference"], mb, self.cfg.logprob_chunk, self.cfg.sampling_temperature)[0]
        from workbench.nn.lora import disabled  # LoRA: the base model is the reference

        with disabled(models["policy"].unwrap()):
            return token_logprobs(models["policy"], mb, self.cfg.logprob_chunk, self.cfg.sampling_temperature)[0]

    def experience(self, step, models, data):
        policy = models["policy"]
        out, sums = [], {}
        for samples in self.generate(policy, [mb["examples"] for mb in data], step):
            rewards, s = self.score(samples)
            for k, v in s.items():
                sums[k] = sums.get(k, 0.0) + v
            rows = self.rows(samples, policy.device)
            rows["rewards"] = rewards.to(policy.device)
            if self.cfg.kl_coef > 0:
                rows["ref_logps"] = self.reference_logprobs(models, rows)
            out.append(rows)
        self.finish_experience(models, out)
        self.step_metrics = self.reduce_means(policy, sums)
        return out

    def finish_experience(self, models, micro_batches: list[dict]) -> None:
        raise NotImplementedError

    @staticmethod
    def reduce_means(engine, sums: dict[str, float]) -> dict[str, float]:
        """Sums over the ranks, then means per completion."""
        keys = sorted(sums)
        total = engine.all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=engine.device))
        reduced = dict(zip(keys, total.tolist()))
        n = max(reduced.pop("completions"), 1.0)
        return {k: v / n for k, v in reduced.items()}

    # ------------------------------------------------------------------------------------------ validation

    @torch.no_grad()
    def validation_sums(self, models, batch: dict) -> dict[str, float]:
        samples = self.generate(models["policy"], [batch["examples"]], step=0, greedy=True, group=1)[0]
        return self.score(samples)[1]

    def validation_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["completions"], 1.0)
        return {f"val_{k}": v / n for k, v in sums.items() if k != "completions"}
