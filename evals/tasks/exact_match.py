"""Greedy exact match on prompt/answer pairs: does the model's greedy continuation equal the answer?

Data: a jsonl file of {"prompt": ..., "answer": ...} objects (`--exact_match.data FILE`; other keys are
kept in the samples). Without one, pairs are mined from the held-out split of the run's dataset: finish a
line of code cut at a word boundary (data_pipelines.completions), written to the eval folder as
`exact_match.data.jsonl` so the score can be reproduced and inspected.

Scoring: the prompt is encoded as a document is (the tokenizer's bos first; a prompt too long for the
scoring window keeps its end, `evals.scoring.fit_prompts`; the count is in the details), decoded greedily up to
`max_new_tokens` or a stop string (default: end of line), and compared with the answer after stripping
surrounding whitespace (`strip`). Chance: the accuracy of answering each prompt with an answer drawn at
random from the file's own answers, sum_i count(answer_i) / N^2: it is what a model that has learned the
answer distribution but not the prompts scores.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from data_pipelines.completions import line_completions
from evals.plots import bars
from evals.registry import EvalContext, TaskResult, data_file, read_jsonl
from evals.scoring import fit_prompts
from workbench.config import field_
from workbench.data.shards import read_texts
from workbench.errors import DataError
from workbench.inference.generator import SamplingParams


@dataclass
class Config:
    data: str | None = field_(None, doc="jsonl of {prompt, answer}; default: line completions mined from the run's val split")
    n: int = field_(200, gt=0, doc="at most this many pairs (the first n of a file; n mined ones)")
    seed: int = field_(0, doc="which lines are mined")
    max_new_tokens: int = field_(32, gt=0)
    stop: list[str] = field_(["\n"], doc="generation stops at any of these")
    strip: bool = field_(True, doc="compare with surrounding whitespace removed")

    def validate(self) -> None:
        if self.data is not None:
            data_file(self.data, "exact_match.data")  # before the model loads


def chance(answers: list[str]) -> float:
    """Expected accuracy of answering with a uniformly random answer from the same list."""
    counts = Counter(answers)
    return sum(counts[a] for a in answers) / len(answers) ** 2


class ExactMatch:
    name = "exact_match"
    description = "greedy exact match on a prompt/answer jsonl (default: finish held-out lines of the run's data)"
    Config = Config

    def pairs(self, ctx: EvalContext, cfg: Config) -> list[dict]:
        if cfg.data is not None:
            return read_jsonl(cfg.data, "exact_match.data", ("prompt", "answer"))[: cfg.n]
        if ctx.job is None:
            raise DataError("exact_match: give --exact_match.data FILE (a jsonl of prompt/answer objects); "
                            "a Hugging Face model has no held-out split to mine")
        items = line_completions(read_texts(ctx.job.data.dir, "val", log=ctx.log), cfg.n, cfg.seed)
        if not items:
            raise DataError(f"exact_match: no line of the val split of {ctx.job.data.dir} can be cut into a pair")
        path = ctx.out_dir / "exact_match.data.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in items), encoding="utf-8")
        return items

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        items = self.pairs(ctx, cfg)
        for i, item in enumerate(items):
            if not isinstance(item["prompt"], str) or not isinstance(item["answer"], str):
                raise DataError(f"exact_match: record {i + 1}: prompt and answer must be strings")
        prompts, cut = fit_prompts(ctx.tokenizer, [it["prompt"] for it in items], ctx.max_length, cfg.max_new_tokens,
                                   "exact_match.max_new_tokens")
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop=list(cfg.stop))
        outputs = [c.text for c in ctx.generate(prompts, params, desc="exact_match")]
        norm = (lambda s: s.strip()) if cfg.strip else (lambda s: s)
        samples = [dict(it, output=out, correct=norm(out) == norm(it["answer"])) for it, out in zip(items, outputs)]
        accuracy = sum(s["correct"] for s in samples) / len(samples)
        base = chance([norm(it["answer"]) for it in items])
        plot = "exact_match.png"
        bars(ctx.out_dir / plot, ["exact match"], [accuracy], [base], title=f"greedy exact match ({len(items)} pairs)",
             ylabel="accuracy")
        return TaskResult(task=self.name, primary="exact_match", metrics={"exact_match": accuracy},
                          baselines={"chance": base}, n=len(samples), samples=samples, plots=[plot],
                          details={"data": cfg.data or "mined from the val split: exact_match.data.jsonl",
                                   "prompts_cut_to_fit": cut})


TASK = ExactMatch()
