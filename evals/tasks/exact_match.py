"""Greedy exact match on prompt/answer pairs: does the model's greedy continuation equal the answer?

Data: a jsonl file of {"prompt": ..., "answer": ...} objects (`--exact_match.data FILE`; other keys are
kept in the samples). Without one, pairs are mined from the held-out split of the run's dataset: finish a
line of code cut at a word boundary (data_pipelines.completions), written to the eval folder as
`exact_match.data.jsonl` so the score can be reproduced and inspected.

Chat models (`--exact_match.chat true`): the prompt is asked as a user turn through the chat template
(`workbench.data.chat`) and the reply, which ends at `<|end|>`, is the output (a conversation too long for the
window with `max_new_tokens` is left out, and counted: its start is its question); a file of chat records (the
instruction pairs of `data_pipelines.instructions`, the SFT records of `data_pipelines.reasoning`) is read as
conversations: everything before the last assistant turn is the prompt, that turn's text the answer. Records
with a `kind` get a score per kind beside the overall one.

Scoring: the prompt is encoded as a document is (the tokenizer's bos first; a prompt too long for the
scoring window keeps its end, `evals.scoring.fit_prompts`; the count is in the details), decoded greedily up to
`max_new_tokens` or a stop string (default: end of line), and compared with the answer after stripping
surrounding whitespace (`strip`). Chance: the accuracy of answering each prompt with an answer drawn at
random from the file's own answers, sum_i count(answer_i) / N^2: it is what a model that has learned the
answer distribution but not the prompts scores. Beside it, `f1`: the SQuAD-style F1 of the words and
punctuation the output shares with the answer (`token_f1`; partial credit, e.g. a def line with the right
arguments and a wrong name), with its own chance (the mean F1 of a random answer from the file, `f1_chance`).
"""

from __future__ import annotations

import json
import re
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
    stop: list[str] | None = field_(None, doc="generation stops at any of these; default: the end of the line, "
                                              "and for chat prompts nothing (a reply ends at <|end|>)")
    strip: bool = field_(True, doc="compare with surrounding whitespace removed")
    chat: bool = field_(False, doc="ask each prompt as a user turn of the chat template (a chat model's replies end "
                                   "at <|end|>); chat records (messages) are read as conversations")

    def validate(self) -> None:
        if self.data is not None:
            data_file(self.data, "exact_match.data")  # before the model loads


def as_pair(record: dict, where: str) -> dict:
    """A {prompt, answer} record as is, or a chat record (`messages`) as its conversation up to the last
    assistant turn (`conversation`, and its text as `prompt`) and that turn's text (`answer`)."""
    if "messages" in record:
        from workbench.data.chat import messages_of

        messages = messages_of(record, where)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{where}: a chat record needs an assistant turn to compare with")
        prompt = "\n".join(m["content"] for m in messages[:last])
        return {**{k: v for k, v in record.items() if k != "messages"}, "prompt": prompt,
                "answer": messages[last]["content"], "conversation": messages[:last]}
    missing = [k for k in ("prompt", "answer") if k not in record]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r} (each line needs prompt and answer, or messages)")
    return record


WORD = re.compile(r"\w+|[^\w\s]")


def token_f1(output: str, answer: str) -> float:
    """SQuAD-style F1 of the words and punctuation marks two texts share (counted with multiplicity): partial
    credit where exact match gives none (a def line with the right arguments and the wrong name)."""
    out, gold = Counter(WORD.findall(output)), Counter(WORD.findall(answer))
    if not out or not gold:
        return float(out == gold)
    common = sum((out & gold).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(out.values()), common / sum(gold.values())
    return 2 * precision * recall / (precision + recall)


def f1_chance(answers: list[str]) -> float:
    """Expected token F1 of answering each item with a uniformly random answer from the same list."""
    return sum(token_f1(a, b) for a in answers for b in answers) / len(answers) ** 2


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
            return [as_pair(r, f"{cfg.data}: record {i + 1}") for i, r in
                    enumerate(read_jsonl(cfg.data, "exact_match.data", ()))][: cfg.n]
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
        if cfg.chat:  # a conversation cut at its start loses its question: those that do not fit are left out
            conversations = [it.get("conversation") or [{"role": "user", "content": it["prompt"]}] for it in items]
            prompts, stop_ids = ctx.chat_prompts(conversations, cfg.max_new_tokens, "exact_match.max_new_tokens",
                                                 skip_long=True)
            kept = [i for i, p in enumerate(prompts) if p is not None]
            cut = len(items) - len(kept)
            if not kept:
                raise DataError(f"exact_match: no chat prompt fits the scoring window of {ctx.max_length} tokens with "
                                f"exact_match.max_new_tokens = {cfg.max_new_tokens}")
            if cut:
                ctx.log(f"exact_match: {cut} of {len(items)} chat prompts do not fit the scoring window of "
                        f"{ctx.max_length} tokens with {cfg.max_new_tokens} new tokens; left out")
            items, prompts = [items[i] for i in kept], [prompts[i] for i in kept]
        else:
            prompts, cut = fit_prompts(ctx.tokenizer, [it["prompt"] for it in items], ctx.max_length,
                                       cfg.max_new_tokens, "exact_match.max_new_tokens")
            stop_ids = []
        stop = cfg.stop if cfg.stop is not None else ([] if cfg.chat else ["\n"])
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop=list(stop),
                                stop_token_ids=stop_ids)
        outputs = [c.text for c in ctx.generate(prompts, params, desc="exact_match")]
        norm = (lambda s: s.strip()) if cfg.strip else (lambda s: s)
        samples = [dict({k: v for k, v in it.items() if k != "conversation"}, output=out,
                        correct=norm(out) == norm(it["answer"]), f1=token_f1(out, it["answer"]))
                   for it, out in zip(items, outputs)]
        accuracy = sum(s["correct"] for s in samples) / len(samples)
        base = chance([norm(it["answer"]) for it in items])
        f1 = sum(s["f1"] for s in samples) / len(samples)
        metrics, details = {"exact_match": accuracy, "f1": f1}, {"f1_chance": f1_chance([it["answer"] for it in items])}
        kinds = sorted({s["kind"] for s in samples if isinstance(s.get("kind"), str)})
        names, values, floors = ["exact match"], [accuracy], [base]
        if kinds:
            per_kind = {}
            for k in kinds:
                group = [s for s in samples if s.get("kind") == k]
                per_kind[k] = {"accuracy": sum(s["correct"] for s in group) / len(group), "n": len(group),
                               "chance": chance([norm(s["answer"]) for s in group]),
                               "f1": sum(s["f1"] for s in group) / len(group),
                               "f1_chance": f1_chance([s["answer"] for s in group])}
                metrics[f"exact_match_{k}"] = per_kind[k]["accuracy"]
                names.append(k), values.append(per_kind[k]["accuracy"]), floors.append(per_kind[k]["chance"])
            details["per_kind"] = per_kind
        plot = "exact_match.png"
        bars(ctx.out_dir / plot, names, values, floors, title=f"greedy exact match ({len(items)} pairs)",
             ylabel="accuracy")
        return TaskResult(task=self.name, primary="exact_match", metrics=metrics,
                          baselines={"chance": base}, n=len(samples), samples=samples, plots=[plot],
                          details={"data": cfg.data or "mined from the val split: exact_match.data.jsonl",
                                   ("prompts_left_out" if cfg.chat else "prompts_cut_to_fit"): cut, "chat": cfg.chat,
                                   **details})


TASK = ExactMatch()
