"""In-context copying: does the model finish an identifier it saw a few lines earlier?

    def zebra_alpha_count(x):
        return x


    result = zebra_alpha            <- the model should continue with "_count"

Each prompt defines a function whose name joins three words of a fixed list with underscores, then starts to
use it, cut after the second word (at an underscore, so the cut falls between tokens as it would in real code);
greedy decoding must continue with the third word. Nothing but the context says which word comes next, so this
measures the in-context copying ("induction") that chat answers need: repeating the function or the numbers a
question names. Chance: a model that knows the word list but not the context picks one of the words not yet used,
1 / (len(WORDS) - 2).

Why it is here: a small model pretrained on a little code can lack the ability entirely (the demo's ~2M model
finishes none; docs/post-training.md), which limits what post-training can teach it; this task makes that
visible in one number.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from evals.plots import bars
from evals.registry import EvalContext, TaskResult
from evals.scoring import fit_prompts
from workbench.config import field_
from workbench.inference.generator import SamplingParams

WORDS = ("widget", "zebra", "alpha", "total", "count", "render", "buffer", "socket", "matrix", "vector", "parse",
         "token")


@dataclass
class Config:
    n: int = field_(100, gt=0, doc="prompts")
    seed: int = field_(0, doc="which names are drawn")


def make_items(n: int, seed: int = 0) -> list[dict]:
    """`n` prompts with the word each must be continued with."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a, b, c = rng.sample(WORDS, 3)
        items.append({"prompt": f"def {a}_{b}_{c}(x):\n    return x\n\n\nresult = {a}_{b}", "answer": f"_{c}"})
    return items


def score(items: list[dict], outputs: list[str]) -> float:
    """The share of outputs that continue with the answer (then anything)."""
    return sum(out.startswith(it["answer"]) for it, out in zip(items, outputs)) / len(items)


class Copying:
    name = "copying"
    description = "finish an identifier defined a few lines earlier (in-context copying), beside chance"
    Config = Config

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        items = make_items(cfg.n, cfg.seed)
        prompts, _ = fit_prompts(ctx.tokenizer, [it["prompt"] for it in items], ctx.max_length, 8,
                                 truncate=False)
        outputs = [c.text for c in ctx.generate(prompts, SamplingParams(max_new_tokens=8), desc="copying")]
        accuracy = score(items, outputs)
        chance = 1 / (len(WORDS) - 2)
        plot = "copying.png"
        bars(ctx.out_dir / plot, ["copied"], [accuracy], [chance], title=f"in-context copying ({len(items)} prompts)",
             ylabel="accuracy")
        samples = [dict(it, output=out, correct=out.startswith(it["answer"])) for it, out in zip(items, outputs)]
        return TaskResult(task=self.name, primary="accuracy", metrics={"accuracy": accuracy},
                          baselines={"chance": chance}, n=len(items), samples=samples, plots=[plot])


TASK = Copying()
