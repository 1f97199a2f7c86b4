"""Needle in a haystack: a length x depth grid of retrieval accuracy, drawn as the familiar heatmap.

    ...haystack... The special magic number for quiet-harbor is: 4921736. ...haystack...
    What is the special magic number for quiet-harbor mentioned in the text above?
    The special magic number for quiet-harbor is| 4921736

The haystack is the run's held-out text (the lines of its val split that hold no digits, so a number in
the output can only come from the needle) or the filler sentences (`haystack = filler`; `auto` uses the
run's data when it has some). Each cell has `n` samples (`data_pipelines.long_context.niah_spec`: a
random key and a `digits`-digit value, fitted to the cell's length). Scoring and chance are the passkey's:
the first run of digits in the output is the value (exact), and per digit; chance 1 / (9 * 10^(digits-1)).

The heatmap (niah.png) has depth down, length across, red = 0 and green = 1, and a dotted line where the
trained window ends.

    workbench eval --task niah --ckpt runs/NAME --niah.lengths "[128, 256, 512, 1024]" --niah.n 2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from data_pipelines import long_context as lc
from evals.plots import heatmap
from evals.registry import EvalContext, TaskResult
from evals.tasks import _long_context as common
from evals.tasks.passkey import validate_grid
from workbench.config import field_
from workbench.data.shards import Manifest


@dataclass
class Config:
    lengths: list[int] = field_([256, 512, 1024, 2048, 4096], doc="haystack lengths in tokens (prompt, bos included)")
    depths: list[float] = field_([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], doc="needle depths, 0 = start, 1 = end")
    n: int = field_(2, gt=0, doc="samples per (length, depth) cell")
    digits: int = field_(7, ge=1, le=20, doc="digits of the magic number")
    haystack: Literal["auto", "filler", "data"] = field_("auto", doc="auto: the run's held-out text, else filler")
    data: str | None = field_(None, doc="dataset folder for the haystack; default: the run's data.dir")
    split: str = "val"
    seed: int = common.EVAL_SEED
    past_window: bool = field_(True, doc="run lengths past the trained window (false: refuse them)")

    def validate(self) -> None:
        validate_grid(self.lengths, self.depths)
        if self.data is not None:
            Manifest.load(self.data)  # before the model loads


def score_outputs(items: list[dict], outputs: list[str]) -> tuple[dict, list[dict]]:
    """(metrics, samples) of outputs against items (`fit_sample` dicts of NIAH + "length")."""
    samples = []
    for it, out in zip(items, outputs):
        exact, per_digit = lc.score_number(out, it["answer"])
        samples.append({"length": it["length"], "depth": it["depth"], "answer": it["value"], "output": out,
                        "correct": exact, "digit_accuracy": per_digit, "key": it["key"], "n_tokens": it["n_tokens"],
                        "prompt_end": common.tail(it["prompt"])})
    n = len(samples)
    return ({"accuracy": sum(s["correct"] for s in samples) / n,
             "digit_accuracy": sum(s["digit_accuracy"] for s in samples) / n}, samples)


class Niah:
    name = "niah"
    description = "needle in a haystack: retrieval accuracy over a length x depth grid (heatmap) vs chance"
    Config = Config

    def items(self, ctx: EvalContext, cfg: Config, lengths: list[int] | None = None,
              hay: lc.Haystack | None = None) -> list[dict]:
        hay = hay or common.haystack(ctx, self.name, cfg.haystack, cfg.data, cfg.split)
        count = common.counter(ctx.tokenizer)
        return common.fitted_items(
            self.name, cfg.seed, lengths or sorted(set(cfg.lengths)), cfg.depths, cfg.n,
            lambda rng, length, depth: lc.fit_sample(lc.NIAH, lc.niah_spec(rng, depth, cfg.digits), hay, length,
                                                     count))

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        lengths = common.check_lengths(ctx, self.name, cfg.lengths, cfg.past_window)
        window = common.trained_window(ctx)
        hay = common.haystack(ctx, self.name, cfg.haystack, cfg.data, cfg.split)
        items = self.items(ctx, cfg, lengths, hay)
        metrics, samples = score_outputs(items, common.greedy_answers(ctx, items, self.name))
        chance, digit_chance = lc.number_chance(cfg.digits)
        depths = sorted(set(cfg.depths))
        grid = [[sum(s["correct"] for s in cell) / len(cell)
                 for cell in ([s for s in samples if s["length"] == n and s["depth"] == d] for n in lengths)]
                for d in depths]  # grid[depth][length]
        past = [i for i, n in enumerate(lengths) if n > window]
        plot = "niah.png"
        heatmap(ctx.out_dir / plot, grid, [str(n) for n in lengths], [f"{d:.0%}" for d in depths],
                title=f"NIAH accuracy, {cfg.n} per cell\n(haystack: {hay.name})", xlabel="prompt length (tokens)",
                ylabel="needle depth", mark_x=past[0] - 0.5 if past else None)
        return TaskResult(
            task=self.name, primary="accuracy", metrics=metrics, baselines={"chance": chance}, n=len(samples),
            samples=samples, plots=[plot],
            details={"digit_chance": digit_chance, "haystack": hay.name, "trained_window": window,
                     "lengths": lengths, "depths": depths, "grid": grid,
                     "by_length": common.group(samples, "length", ("correct", "digit_accuracy"), window)})


TASK = Niah()
