"""Teaching: asked how to use a function, does the model show an example that really runs and prints what it shows?

Data: a jsonl of preference records (`--teaching.data FILE`, required; `data_pipelines.preferences` writes them:
use its val.jsonl, whose files were held out of training). Each record's "prompt" ("How do I use
textwrap.shorten?") is asked as one user turn through the chat template (`workbench.data.chat`), and the
model answers greedily until `<|end|>` or an eos (`ChatTemplate.stop_ids`) or `max_new_tokens`. A prompt that
does not fit in the scoring window together with `max_new_tokens` is an error, as in the reasoning task: a
question cut off its start cannot be answered.

Scoring: each answer goes through `data_pipelines.preferences.check_examples` (a sandboxed subprocess that
runs the answer's `>>>` examples with doctest and compares every shown output with the printed one):
    passes        every example ran and printed what the answer shows (primary)
    runs          every statement ran without an exception
    has_example   the answer contains at least one `>>>` example
    mean_answer_tokens   the answer's length in tokens (without the stop token)
    on_topic, passes_on_topic   (records with a `subject`) an example names the function asked about (`on_topic`),
                  and that answer also passes: a passing example of another function answers another question
Baselines, from the same records when they have them: the share of the dataset's own `rejected` answers that
pass (the floor: 0 by construction, terse answers have no example and wrong ones show a wrong output) and of
its `chosen` answers (the ceiling: 1 by construction, unless the sandbox differs from the one that made them,
e.g. a tree outside the standard library without `--teaching.paths`). `teaching.png` draws the model's three
shares with the chosen answers' as lines. Every sample is kept: prompt, the answer, its verdict and reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from data_pipelines.preferences import check_many
from evals.plots import bars
from evals.registry import EvalContext, TaskResult, data_file, read_jsonl
from workbench.config import fail, field_
from workbench.errors import DataError
from workbench.inference.generator import SamplingParams


@dataclass
class Config:
    data: str | None = field_(None, doc="jsonl of preference records (prompt; chosen/rejected for the baselines), "
                                        "e.g. data_pipelines.preferences' val.jsonl: required")
    n: int = field_(100, gt=0, doc="the first n records")
    max_new_tokens: int = field_(256, gt=0)
    timeout: float = field_(5.0, gt=0, doc="seconds for one answer's examples in the sandbox")
    workers: int = field_(2, gt=0, doc="sandbox processes running examples at once")
    paths: list[str] = field_([], doc="folders put on the sandbox's sys.path: the source tree of pairs that were "
                                      "not mined from the standard library")

    def validate(self) -> None:
        if self.data is None:
            fail("data", "required: a jsonl of preference records (python -m data_pipelines.preferences writes "
                         "OUT/val.jsonl)")
        data_file(self.data, "teaching.data")  # before the model loads


def score_answers(answers: list[str], timeout: float = 5.0, workers: int = 2, paths: list[str] | None = None,
                  progress: str | None = None) -> tuple[dict[str, float], list[dict]]:
    """({passes, runs, has_example} shares, one check per answer): the scorer alone, so tests can validate it
    on oracle answers (the chosen ones: 1) and on answers without a working example (0)."""
    if not answers:
        raise ValueError("no answers to score")
    checks = check_many(answers, timeout, workers, paths or (), progress=progress)
    n = len(checks)
    metrics = {"passes": sum(c["passes"] for c in checks) / n, "runs": sum(c["runs"] for c in checks) / n,
               "has_example": sum(c["found"] for c in checks) / n}
    return metrics, checks


def on_topic(answer: str, subject: str) -> bool:
    """Whether one of the answer's `>>>` statements names the subject asked about (its last dotted part, as a
    word: `isleap` for calendar.isleap): an example that passes but shows another function answers another
    question (a small model recites examples it memorised)."""
    name = subject.rpartition(".")[2]
    statements = [line.strip()[4:] for line in answer.splitlines() if line.strip().startswith((">>> ", "... "))]
    return bool(name) and any(re.search(rf"\b{re.escape(name)}\b", st) for st in statements)


class Teaching:
    name = "teaching"
    description = ("share of answers to 'how do I use X?' whose >>> example runs and prints what it shows "
                   "(sandboxed doctest), beside the dataset's rejected and chosen answers")
    Config = Config

    def records(self, cfg: Config) -> list[dict]:
        records = read_jsonl(cfg.data, "teaching.data", ("prompt",))[: cfg.n]
        for i, r in enumerate(records, 1):
            if not isinstance(r["prompt"], str) or not r["prompt"].strip():
                raise DataError(f"{cfg.data}: record {i}: 'prompt' must be a non-empty string")
            for key in ("chosen", "rejected"):
                if key in r and not isinstance(r[key], str):
                    raise DataError(f"{cfg.data}: record {i}: '{key}' must be a string")
        return records

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        records = self.records(cfg)
        prompts, stop_ids = ctx.chat_prompts([[{"role": "user", "content": r["prompt"]}] for r in records],
                                             cfg.max_new_tokens, "teaching.max_new_tokens")
        stops = set(stop_ids)  # the chat turn ends at <|end|>; the output is cut at the first stop id below
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop_token_ids=stop_ids)
        completions = ctx.generate(prompts, params, desc="teaching")
        answers, lengths, finished = [], [], []
        for c in completions:
            cut = next((k for k, t in enumerate(c.tokens) if t in stops), None)
            tokens = c.tokens if cut is None else c.tokens[:cut]
            answers.append(ctx.tokenizer.decode(tokens))
            lengths.append(len(tokens))
            finished.append(cut is not None)
        paths = list(cfg.paths)
        metrics, checks = score_answers(answers, cfg.timeout, cfg.workers, paths, progress="teaching: examples")
        metrics["mean_answer_tokens"] = sum(lengths) / len(lengths)
        baselines, details = {}, {"data": cfg.data, "ended_by_stop_token": sum(finished) / len(finished)}
        for key in ("rejected", "chosen"):
            if all(isinstance(r.get(key), str) for r in records):
                shares, _ = score_answers([r[key] for r in records], cfg.timeout, cfg.workers, paths,
                                          progress=f"teaching: {key} answers")
                baselines[key] = shares["passes"]
                details[key] = shares
        samples = []
        for r, answer, check, n_tokens, done in zip(records, answers, checks, lengths, finished):
            samples.append({"prompt": r["prompt"], "output": answer, "passes": check["passes"], "runs": check["runs"],
                            "has_example": check["found"], "detail": check["detail"], "tokens": n_tokens,
                            "stopped": done, **{k: r[k] for k in ("subject", "kind", "source") if k in r}})
            if isinstance(r.get("subject"), str):
                samples[-1]["on_topic"] = on_topic(answer, r["subject"])
        if samples and all("on_topic" in x for x in samples):
            metrics["on_topic"] = sum(x["on_topic"] for x in samples) / len(samples)
            metrics["passes_on_topic"] = sum(x["on_topic"] and x["passes"] for x in samples) / len(samples)
        plot = "teaching.png"
        labels = ["passes", "runs", "has_example"]
        ceiling = [details["chosen"][k] for k in labels] if "chosen" in details else None
        bars(ctx.out_dir / plot, labels, [metrics[k] for k in labels], ceiling,
             title=f"teaching: examples in {len(samples)} answers", ylabel="share of answers",
             baseline_label="chosen answers")
        return TaskResult(task=self.name, primary="passes", metrics=metrics, baselines=baselines, n=len(samples),
                          samples=samples, plots=[plot], details=details)


TASK = Teaching()
