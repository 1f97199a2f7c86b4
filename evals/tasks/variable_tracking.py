"""RULER-style variable tracking: follow chains of assignments through a haystack.

    ... VAR QWERT = 12345. ... VAR ZXCVB = 67890. ... VAR ASDFG = QWERT. ... VAR POIUY = ASDFG. ...
    Which variables are assigned the value 12345 in the text above?
    The variables assigned the value 12345 are| QWERT ASDFG POIUY

`n_chains` chains of 1 + n_hops assignments (five-letter names, one value per chain), each statement at a
uniform random depth, each chain in order (`data_pipelines.long_context.vt_spec`, RULER's vt). The
question asks for chain 0's names; the other chains are distractors.

Metrics
    accuracy   the set of five-capital-letter names in the output is exactly chain 0's names
    recall     the fraction of chain 0's names present (RULER's score)
Chance (exact, for a guess of h = 1 + n_hops distinct names among the m = n_chains * h names in the text):
accuracy 1 / C(m, h), recall h / m. With one chain a guess of every name is right: use n_chains >= 2.

    workbench eval --task variable_tracking --ckpt runs/NAME --variable_tracking.n_hops 2
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
    n_chains: int = field_(2, ge=1, le=20, doc="chains of assignments (the asked one + distractors)")
    n_hops: int = field_(3, ge=0, le=20, doc="assignments after the first in each chain")
    digits: int = field_(5, ge=1, le=20, doc="digits of each chain's value")
    haystack: Literal["auto", "filler", "data"] = field_("filler", doc="filler (RULER's noise); auto: the run's held-out text")
    data: str | None = field_(None, doc="dataset folder for the haystack; default: the run's data.dir")
    split: str = "val"
    seed: int = common.EVAL_SEED
    past_window: bool = field_(True, doc="run lengths past the trained window (false: refuse them)")

    def validate(self) -> None:
        if not self.lengths or any(n < 2 for n in self.lengths):
            fail("lengths", f"expected a non-empty list of lengths >= 2 tokens, got {self.lengths}")
        if self.n_chains > lc.number_space(self.digits):
            fail("digits", f"{self.digits} digits give too few distinct values for {self.n_chains} chains")
        if self.data is not None:
            Manifest.load(self.data)


def score_outputs(items: list[dict], outputs: list[str]) -> tuple[dict, list[dict]]:
    """(metrics, samples) of outputs against items (`fit_sample` dicts of VARIABLE_TRACKING + "length")."""
    samples = []
    for it, out in zip(items, outputs):
        exact, recall = lc.score_names(out, it["names"])
        samples.append({"length": it["length"], "value": it["value"], "answer": " ".join(it["names"]), "output": out,
                        "correct": exact, "recall": recall, "n_tokens": it["n_tokens"],
                        "prompt_end": common.tail(it["prompt"])})
    n = len(samples)
    return ({"accuracy": sum(s["correct"] for s in samples) / n,
             "recall": sum(s["recall"] for s in samples) / n}, samples)


class VariableTracking:
    name = "variable_tracking"
    description = "RULER variable tracking: which variables hold a value through chains of assignments, vs chance"
    Config = Config

    def items(self, ctx: EvalContext, cfg: Config, lengths: list[int] | None = None,
              hay: lc.Haystack | None = None) -> list[dict]:
        hay = hay or common.haystack(ctx, self.name, cfg.haystack, cfg.data, cfg.split)
        count = common.counter(ctx.tokenizer)
        return common.fitted_items(
            self.name, cfg.seed, lengths or sorted(set(cfg.lengths)), [None], cfg.n,
            lambda rng, length, _: lc.fit_sample(lc.VARIABLE_TRACKING,
                                                 lc.vt_spec(rng, cfg.n_chains, cfg.n_hops, cfg.digits), hay, length,
                                                 count))

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        lengths = common.check_lengths(ctx, self.name, cfg.lengths, cfg.past_window)
        window = common.trained_window(ctx)
        hay = common.haystack(ctx, self.name, cfg.haystack, cfg.data, cfg.split)
        items = self.items(ctx, cfg, lengths, hay)
        metrics, samples = score_outputs(items, common.greedy_answers(ctx, items, self.name))
        chance, recall_chance = lc.vt_chance(cfg.n_chains, cfg.n_hops)
        by_length = common.group(samples, "length", ("correct", "recall"), window)
        plot = "variable_tracking.png"
        lines(ctx.out_dir / plot, lengths, {"accuracy": [by_length[n]["correct"] for n in lengths],
                                            "recall": [by_length[n]["recall"] for n in lengths]},
              hlines={"chance": chance, "recall chance": recall_chance}, vline=("trained window", window),
              title=f"variable tracking ({cfg.n_chains} chains x {1 + cfg.n_hops} names, {hay.name})",
              xlabel="prompt length (tokens)", ylabel="fraction", logx=True, ylim=(-0.03, 1.03))
        return TaskResult(
            task=self.name, primary="accuracy", metrics=metrics, baselines={"chance": chance}, n=len(samples),
            samples=samples, plots=[plot],
            details={"recall_chance": recall_chance, "haystack": hay.name, "trained_window": window,
                     "by_length": by_length})


TASK = VariableTracking()
