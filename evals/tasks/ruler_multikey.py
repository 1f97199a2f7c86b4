"""RULER-style multi-key needle in a haystack: find one key's value(s) among distractor keys' needles.

    ... One of the special magic numbers for calm-river is: 2217630. ...
    ... One of the special magic numbers for quiet-harbor is: 4921736. ...
    What is the special magic number for quiet-harbor mentioned in the text above?
    The special magic number for quiet-harbor is| 4921736

`n_keys` distinct keys: the asked one and n_keys - 1 distractors, each needle at a uniform random depth
(`data_pipelines.long_context.multikey_spec`, RULER's niah_multikey). With `n_values` > 1 the asked key
has that many needles and the question asks for all of them (RULER's niah_multivalue).

Metrics
    accuracy   every value of the asked key appears in the output (as a run of digits)
    recall     the fraction of them that appears (RULER's string-match score)
Chance (exact, for a guess of n_values distinct random numbers of the same form, S = 9 * 10^(digits-1)):
accuracy 1 / C(S, n_values), recall n_values / S. Answering with a distractor's value scores 0, which the
samples show as `distractor` (the output holds some distractor's value).

    workbench eval --task ruler_multikey --ckpt runs/NAME --ruler_multikey.n_keys 4 --ruler_multikey.n_values 2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from data_pipelines import long_context as lc
from evals.plots import lines
from evals.registry import EvalContext, TaskResult
from evals.tasks import _long_context as common
from workbench.config import fail, field_
from workbench.data.shards import Manifest


@dataclass
class Config:
    lengths: list[int] = field_([256, 512, 1024, 2048, 4096], doc="prompt lengths in tokens (bos included)")
    n: int = field_(10, gt=0, doc="samples per length")
    n_keys: int = field_(4, ge=1, le=len(lc.KEYS), doc="keys with needles: the asked one + distractors")
    n_values: int = field_(1, ge=1, le=16, doc="values of the asked key (> 1: RULER's multivalue)")
    digits: int = field_(7, ge=1, le=20)
    haystack: Literal["auto", "filler", "data"] = field_("auto", doc="auto: the run's held-out text, else filler")
    data: str | None = field_(None, doc="dataset folder for the haystack; default: the run's data.dir")
    split: str = "val"
    seed: int = common.EVAL_SEED
    past_window: bool = field_(True, doc="run lengths past the trained window (false: refuse them)")

    def validate(self) -> None:
        if not self.lengths or any(n < 2 for n in self.lengths):
            fail("lengths", f"expected a non-empty list of lengths >= 2 tokens, got {self.lengths}")
        if self.n_keys - 1 + self.n_values > lc.number_space(self.digits):
            fail("digits", f"{self.digits} digits give too few distinct values for {self.n_keys} keys")
        if self.data is not None:
            Manifest.load(self.data)


def score_outputs(items: list[dict], outputs: list[str]) -> tuple[dict, list[dict]]:
    """(metrics, samples) of outputs against items (`fit_sample` dicts of MULTIKEY + "length")."""
    samples = []
    for it, out in zip(items, outputs):
        exact, recall = lc.score_values(out, it["values"])
        found = set(lc.DIGITS_RE.findall(out))
        samples.append({"length": it["length"], "key": it["key"], "answer": ", ".join(it["values"]), "output": out,
                        "correct": exact, "recall": recall,
                        "distractor": any(v in found for v in it["distractors"].values()),
                        "n_tokens": it["n_tokens"], "prompt_end": common.tail(it["prompt"])})
    n = len(samples)
    return ({"accuracy": sum(s["correct"] for s in samples) / n, "recall": sum(s["recall"] for s in samples) / n,
             "distractor_rate": sum(s["distractor"] for s in samples) / n}, samples)


class RulerMultikey:
    name = "ruler_multikey"
    description = "RULER multi-key / multi-value needle retrieval among distractor keys, by length, vs chance"
    Config = Config

    def items(self, ctx: EvalContext, cfg: Config, lengths: list[int] | None = None,
              hay: lc.Haystack | None = None) -> list[dict]:
        hay = hay or common.haystack(ctx, self.name, cfg.haystack, cfg.data, cfg.split)
        count = common.counter(ctx.tokenizer)
        return common.fitted_items(
            self.name, cfg.seed, lengths or sorted(set(cfg.lengths)), [None], cfg.n,
            lambda rng, length, _: lc.fit_sample(lc.MULTIKEY, lc.multikey_spec(rng, cfg.n_keys, cfg.n_values,
                                                                               cfg.digits), hay, length, count))

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        lengths = common.check_lengths(ctx, self.name, cfg.lengths, cfg.past_window)
        window = common.trained_window(ctx)
        hay = common.haystack(ctx, self.name, cfg.haystack, cfg.data, cfg.split)
        items = self.items(ctx, cfg, lengths, hay)
        metrics, samples = score_outputs(items, common.greedy_answers(ctx, items, self.name))
        chance, recall_chance = lc.multikey_chance(cfg.digits, cfg.n_values)
        by_length = common.group(samples, "length", ("correct", "recall", "distractor"), window)
        plot = "ruler_multikey.png"
        lines(ctx.out_dir / plot, lengths, {k: [by_length[n][f] for n in lengths] for k, f in
                                            (("accuracy", "correct"), ("recall", "recall"),
                                             ("distractor's value", "distractor"))},
              hlines={"chance": chance}, vline=("trained window", window),
              title=f"multi-key NIAH ({cfg.n_keys} keys, {cfg.n_values} value(s), {hay.name})",
              xlabel="prompt length (tokens)", ylabel="fraction of samples", logx=True, ylim=(-0.03, 1.03))
        return TaskResult(
            task=self.name, primary="accuracy", metrics=metrics, baselines={"chance": chance}, n=len(samples),
            samples=samples, plots=[plot],
            details={"recall_chance": recall_chance, "haystack": hay.name, "trained_window": window,
                     "by_length": by_length})


TASK = RulerMultikey()
