"""Reasoning accuracy: the answer inside `<answer>...</answer>` checked by a program.

Problems are the verifiable kinds of `data_pipelines.reasoning`: generated from `seed` (a seed the training
recipes do not use, so these are held out), by default of its DEFAULT_KINDS (arithmetic, comparison, modular
arithmetic, counting, parity, sorting; the default set never changes), or of the kinds named
(`--reasoning.kinds chain,linear,boolean,poly`, its multi-step ones); or read from a jsonl of problems
(`--reasoning.data FILE`, each with `kind` and `params`, which the maker's SFT records `val.jsonl` also
are). The model's output, special tokens kept, is checked by recomputing the answer from the problem's
parameters (`check`), never by trusting a stored answer. `--reasoning.chat true` asks each problem as a user
turn of the chat template, the format an SFT model was trained in (`data_pipelines.reasoning.make_sft_records`).

Metrics
    accuracy   the answer in the last complete <answer> span is right
    format     R1's format: a <think> block, then exactly one <answer> block
    answered   some <answer> span exists (a model can be right without the <think> block)

Greedy by default. `--reasoning.samples K --reasoning.temperature T` follows DeepSeek-R1's evaluation instead: K
completions per problem sampled at temperature T (each from its own seed), `accuracy` = pass@1 = the mean
correctness over all of them, `pass_at_k` = the share of problems with at least one right answer, and
`greedy_accuracy` from one greedy pass besides. RL moves the first two apart: it raises pass@1 by making the
policy pick its better answers more often, which can lower pass@k (the samples grow alike); the greedy answer
may not change at all.
Chance is the mean over problems of 1 / |answer space| (`rz.chance`: every kind's space has a known size),
the score of answering uniformly at random; per-kind accuracy and chance are plotted side by side.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from data_pipelines import reasoning as rz
from evals.plots import bars
from evals.registry import EvalContext, TaskResult, data_file, read_jsonl
from evals.scoring import fit_prompts
from workbench.config import fail, field_
from workbench.errors import DataError
from workbench.inference.generator import SamplingParams

EVAL_SEED = 20261127  # held out: training recipes draw their problems from other seeds


@dataclass
class Config:
    data: str | None = field_(None, doc="jsonl of problems (kind, params, prompt); default: generated from seed")
    n: int = field_(120, gt=0, doc="problems (the first n of a file)")
    seed: int = EVAL_SEED
    kinds: list[str] = field_([], doc=f"generated kinds, from {', '.join(rz.KINDS)}; [] = {','.join(rz.DEFAULT_KINDS)}")
    max_new_tokens: int = field_(64, gt=0)
    chat: bool = field_(False, doc="ask each problem as a user turn of the chat template (an SFT model's format; "
                                   "the reply ends at <|end|>)")
    samples: int = field_(1, gt=0, doc="completions per problem; > 1 samples at `temperature` and reports pass@1 "
                                       "(the mean over them), pass@k and the greedy accuracy (R1's protocol)")
    temperature: float = field_(0.0, ge=0, doc="sampling temperature with samples > 1 (R1 used 0.6)")

    def validate(self) -> None:
        if self.data is not None:
            data_file(self.data, "reasoning.data")  # before the model loads
        if self.samples == 1 and self.temperature > 0:
            fail("samples", f"temperature {self.temperature} samples, and one sample per problem would be scored as "
                            f"the greedy pass; set reasoning.samples > 1 (pass@1 over them) or temperature 0")
        if self.samples > 1 and self.temperature == 0:
            fail("temperature", f"{self.samples} samples per problem at temperature 0 would all be the greedy one; "
                                f"set reasoning.temperature > 0 (R1 evaluated at 0.6) or reasoning.samples = 1")
        unknown = [k for k in self.kinds if k not in rz.KINDS]
        if unknown:
            fail("kinds", f"unknown kind {unknown[0]!r} (known: {', '.join(rz.KINDS)})")


def score_outputs(problems: list[dict], outputs: list[str]) -> tuple[dict, dict, list[dict]]:
    """(metrics, per-kind {accuracy, chance, n}, samples) of outputs against problems: the scorer alone,
    so tests can validate it on oracle and random outputs."""
    samples = []
    for p, out in zip(problems, outputs):
        samples.append({"id": p.get("id"), "kind": p["kind"], "prompt": p["prompt"], "output": out,
                        "answer": rz.solution(p), "extracted": rz.extract_answer(out),
                        "correct": rz.check(p, out), "format": rz.well_formed(out), "chance": rz.chance(p)})
    n = len(samples)
    metrics = {"accuracy": sum(s["correct"] for s in samples) / n, "format": sum(s["format"] for s in samples) / n,
               "answered": sum(s["extracted"] is not None for s in samples) / n}
    groups = defaultdict(list)
    for s in samples:
        groups[s["kind"]].append(s)
    per_kind = {k: {"accuracy": sum(s["correct"] for s in g) / len(g), "chance": sum(s["chance"] for s in g) / len(g),
                    "n": len(g)} for k, g in sorted(groups.items())}
    return metrics, per_kind, samples


class Reasoning:
    name = "reasoning"
    description = "accuracy of the <answer> on generated verifiable problems, checked by a program, beside chance"
    Config = Config

    def problems(self, cfg: Config) -> list[dict]:
        if cfg.data is None:
            return rz.make_problems(cfg.n, cfg.seed, cfg.kinds or None)
        problems = read_jsonl(cfg.data, "reasoning.data", ("kind", "params", "prompt"))[: cfg.n]
        for i, p in enumerate(problems, 1):
            try:
                rz.solution(p)
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{cfg.data}: problem {i}: {e}") from None
        return problems

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        problems = self.problems(cfg)
        tok = ctx.tokenizer
        if cfg.chat:
            prompts, stop_ids = ctx.chat_prompts([[{"role": "user", "content": p["prompt"]}] for p in problems],
                                                 cfg.max_new_tokens, "reasoning.max_new_tokens")
        else:
            prompts, _ = fit_prompts(tok, [p["prompt"] for p in problems], ctx.max_length, cfg.max_new_tokens,
                                     "reasoning.max_new_tokens", truncate=False)
            stop_ids = None
        greedy = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop_token_ids=stop_ids or [])
        completions = ctx.generate(prompts, greedy, desc="reasoning")
        # special tokens kept: <think>, <answer> are reserved tokens that a plain decode would drop
        outputs = [tok.decode(c.tokens, skip_special_tokens=False) for c in completions]
        metrics, per_kind, samples = score_outputs(problems, outputs)
        if cfg.samples > 1:
            metrics, per_kind, samples = self.sampled(ctx, cfg, problems, prompts, stop_ids, metrics, per_kind)
        chance = sum(s["chance"] for s in samples) / len(samples)
        plot = "reasoning.png"
        bars(ctx.out_dir / plot, list(per_kind), [v["accuracy"] for v in per_kind.values()],
             [v["chance"] for v in per_kind.values()],
             title=f"reasoning accuracy by kind ({len(problems)} problems"
                   + (f", pass@1 of {cfg.samples} samples)" if cfg.samples > 1 else ")"),
             ylabel="accuracy")
        return TaskResult(task=self.name, primary="accuracy", metrics=metrics, baselines={"chance": chance},
                          n=len(problems), samples=samples, plots=[plot],
                          details={"per_kind": per_kind, "samples": cfg.samples, "temperature": cfg.temperature})

    def sampled(self, ctx: EvalContext, cfg: Config, problems, prompts, stop_ids, greedy: dict, greedy_kinds: dict):
        """K samples per problem: pass@1 (the mean), pass@k, beside the greedy accuracy (metrics and per kind)."""
        k = cfg.samples
        params = [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 seed=cfg.seed * 1000 + i * k + j, stop_token_ids=stop_ids or [])
                  for i in range(len(prompts)) for j in range(k)]
        completions = ctx.generate([p for p in prompts for _ in range(k)], params, desc=f"reasoning x{k}")
        outputs = [ctx.tokenizer.decode(c.tokens, skip_special_tokens=False) for c in completions]
        metrics, per_kind, samples = score_outputs([p for p in problems for _ in range(k)], outputs)
        for i, s in enumerate(samples):
            s["sample"] = i % k
        hit = [any(s["correct"] for s in samples[i * k : (i + 1) * k]) for i in range(len(problems))]
        metrics.update(pass_at_k=sum(hit) / len(hit), greedy_accuracy=greedy["accuracy"])
        for kind, v in per_kind.items():
            mine = [h for h, p in zip(hit, problems) if p["kind"] == kind]
            v.update(n=len(mine), pass_at_k=sum(mine) / len(mine), greedy=greedy_kinds[kind]["accuracy"])
        return metrics, per_kind, samples


TASK = Reasoning()
