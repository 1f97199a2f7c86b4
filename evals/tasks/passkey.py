"""Passkey retrieval: a number hidden in repetitive filler, asked for at the end, over lengths and depths.

    ...The grass is green. The pass key is 48213. Remember it. 48213 is the pass key. The sky is blue...
    What is the pass key? The pass key is| 48213

Each of `n` samples per (length, depth) cell is `data_pipelines.long_context.fit_passkey`: a random key of
`digits` digits (first non-zero), its needle at the sentence boundary nearest `depth`, and as many filler
sentences as fit in `length` tokens (prefix included). The model answers greedily.

Metrics
    accuracy         the first run of digits in the output is the key
    digit_accuracy   the fraction of the key's digit positions right (position i of that run)
Chance (exact, for a uniformly random number of the same form): accuracy 1 / (9 * 10^(digits-1)), per
digit (1/9 + (digits-1)/10) / digits — about 10^-digits and 0.1. The details hold accuracy by length and
by depth; the plot is accuracy by length with chance and the trained window marked. Lengths past the
window run as asked (see evals/tasks/_long_context.py); that is where a model without context extension
falls to chance.

    workbench eval --task passkey --ckpt runs/NAME --passkey.lengths "[256, 1024, 4096]" --passkey.n 10
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipelines import long_context as lc
from evals.plots import lines
from evals.registry import EvalContext, TaskResult
from evals.tasks import _long_context as common
from workbench.config import fail, field_


@dataclass
class Config:
    lengths: list[int] = field_([256, 512, 1024, 2048, 4096], doc="prompt lengths in tokens (bos included)")
    depths: list[float] = field_([0.0, 0.25, 0.5, 0.75, 1.0], doc="needle depths, 0 = start, 1 = end")
    n: int = field_(4, gt=0, doc="samples per (length, depth) cell")
    digits: int = field_(5, ge=1, le=20, doc="digits of the pass key")
    seed: int = common.EVAL_SEED
    past_window: bool = field_(True, doc="run lengths past the trained window (false: refuse them)")

    def validate(self) -> None:
        validate_grid(self.lengths, self.depths)


def validate_grid(lengths: list[int], depths: list[float]) -> None:
    if not lengths or any(n < 2 for n in lengths):
        fail("lengths", f"expected a non-empty list of lengths >= 2 tokens, got {lengths}")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        fail("depths", f"expected a non-empty list of depths in [0, 1], got {depths}")


def score_outputs(items: list[dict], outputs: list[str]) -> tuple[dict, list[dict]]:
    """(metrics, samples) of outputs against items (`fit_passkey` dicts + "length"): the scorer alone, so
    tests can validate it on oracle and random outputs."""
    samples = []
    for it, out in zip(items, outputs):
        exact, per_digit = lc.score_number(out, it["answer"])
        samples.append({"length": it["length"], "depth": it["depth"], "answer": it["answer"].strip(),
                        "output": out, "correct": exact, "digit_accuracy": per_digit, "n_tokens": it["n_tokens"],
                        "prompt_end": common.tail(it["prompt"])})
    n = len(samples)
    metrics = {"accuracy": sum(s["correct"] for s in samples) / n,
               "digit_accuracy": sum(s["digit_accuracy"] for s in samples) / n}
    return metrics, samples


class Passkey:
    name = "passkey"
    description = "passkey retrieval in filler over lengths x depths (exact and per-digit accuracy vs chance)"
    Config = Config

    def items(self, ctx: EvalContext, cfg: Config, lengths: list[int] | None = None) -> list[dict]:
        count = common.counter(ctx.tokenizer)
        return common.fitted_items(
            self.name, cfg.seed, lengths or sorted(set(cfg.lengths)), cfg.depths, cfg.n,
            lambda rng, length, depth: lc.fit_passkey(rng, ctx.tokenizer, length, depth, cfg.digits, count=count))

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        lengths = common.check_lengths(ctx, self.name, cfg.lengths, cfg.past_window)
        window = common.trained_window(ctx)
        items = self.items(ctx, cfg, lengths)
        metrics, samples = score_outputs(items, common.greedy_answers(ctx, items, self.name))
        chance, digit_chance = lc.number_chance(cfg.digits)
        by_length = common.group(samples, "length", ("correct", "digit_accuracy"), window)
        by_depth = common.group(samples, "depth", ("correct", "digit_accuracy"))
        plot = "passkey.png"
        lines(ctx.out_dir / plot, lengths,
              {"accuracy": [by_length[n]["correct"] for n in lengths],
               "digit accuracy": [by_length[n]["digit_accuracy"] for n in lengths]},
              hlines={"chance": chance, "digit chance": digit_chance}, vline=("trained window", window),
              title=f"passkey retrieval ({cfg.digits} digits, {len(cfg.depths)} depths x {cfg.n} per length)",
              xlabel="prompt length (tokens)", ylabel="accuracy", logx=True, ylim=(-0.03, 1.03))
        return TaskResult(
            task=self.name, primary="accuracy", metrics=metrics, baselines={"chance": chance}, n=len(samples),
            samples=samples, plots=[plot],
            details={"digit_chance": digit_chance, "trained_window": window, "by_length": by_length,
                     "by_depth": by_depth})


TASK = Passkey()
