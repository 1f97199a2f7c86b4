"""Rewards for the RL objectives (ppo, grpo): programs that score a completion, no learned reward model.

    r1        DeepSeek-R1's rule rewards on the verifiable reasoning problems of data_pipelines.reasoning:
              accuracy  1 when the last <answer>...</answer> holds the right answer, recomputed from the record's
                        kind and params by `data_pipelines.reasoning.check` (never read from the file), else 0
              format    1 when the reply is <think>...</think> followed by exactly one <answer>...</answer>
              reward = accuracy + objective.format_weight * format
    planted   the share of the completion's tokens whose id is even (its closing <|end|> not counted; an empty
              reply scores 0): a reward planted in the token ids, which
              any model of any vocabulary can raise from about 0.5 towards 1 within a few dozen updates. The CI
              tests use it to show that an objective climbs a reward at all, in a minute, on an untrained model.

A reward function takes (the prompt record's meta, the completion's text, its token ids without the closing stop
token) and returns the reward
and its parts (logged as means over the step's completions: `accuracy`, `format`).

R1 also rewarded the language being consistent and, for code, ran test cases; the problems here have one short
answer each, so accuracy and format are the whole of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

RewardFn = Callable[[dict, str, Sequence[int]], tuple[float, dict[str, float]]]


def r1_reward(format_weight: float) -> RewardFn:
    from data_pipelines.reasoning import check, well_formed

    def reward(meta: dict, text: str, tokens: Sequence[int]) -> tuple[float, dict[str, float]]:
        if "kind" not in meta or "params" not in meta:
            raise ValueError("reward 'r1' checks reasoning problems: every prompt record needs 'kind' and 'params' "
                             "(data_pipelines.reasoning writes them)")
        accuracy = float(check(meta, text))
        fmt = float(well_formed(text))
        return accuracy + format_weight * fmt, {"accuracy": accuracy, "format": fmt}

    return reward


def planted_reward(meta: dict, text: str, tokens: Sequence[int]) -> tuple[float, dict[str, float]]:
    share = sum(1 for t in tokens if t % 2 == 0) / max(len(tokens), 1)
    return share, {}


def build_reward(cfg) -> RewardFn:
    """The reward function named by `objective.reward`."""
    if cfg.reward == "r1":
        return r1_reward(cfg.format_weight)
    if cfg.reward == "planted":
        return planted_reward
    raise ValueError(f"unknown reward {cfg.reward!r}: expected 'r1' or 'planted'")
