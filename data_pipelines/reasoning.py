"""Verifiable reasoning problems: generated with known parameters, answered in `<answer>`, checked by a program.

Each problem is a JSON object

    {"id": "mod-000017", "kind": "mod", "params": {"a": 37, "b": 12, "m": 7},
     "prompt": "...What is 37 * 12 mod 7? ...", "answer": "3"}

and `check(problem, text)` decides whether a model's output is right by *recomputing* the answer from
`kind` and `params` (the `answer` field is only a convenience for SFT data and for reading), after pulling
the answer out of the last complete `<answer>...</answer>` span. The same pieces serve three pipelines:
the eval harness (`evals/tasks/reasoning.py`, accuracy against chance), SFT data (prompt + a worked
`<think>` + `<answer>`) and R1-style RL rewards (format and accuracy).

Why these kinds. Every kind has a small, enumerable answer space (`answer_space`), so the accuracy of
answering at random ("chance") is known exactly for every problem and a scorer can be validated against
it: an oracle scores 1, uniform random answers score the mean of 1 / |space| (`chance`). The kinds need
different skills (carrying, comparison, modular arithmetic, counting, sorting, parity) and come in
sizes a small model can learn from a few thousand examples.

    add       a + b, 0 <= a, b < 100                  space: 0..198
    compare   the larger of a and b (a != b)            space: {a, b}
    mod       a * b mod m, m in 3..9                     space: 0..m-1
    count     occurrences of a letter in a word          space: 0..len(word)
    parity    whether a sum of 3-5 numbers is even/odd   space: {even, odd}
    sort      the numbers in ascending order             space: every permutation of them

Answers are compared after normalisation (`normalize`: strip, lower case, spaces around commas
removed), so "2, 5, 9" and "2,5,9" are the same answer and " Odd" is "odd".

    python -m data_pipelines.reasoning --out data/reasoning.jsonl --n 1000 --seed 0 [--kinds add,mod]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = ("Think step by step inside <think> </think>, then give only the final answer inside "
               "<answer> </answer>.")
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
WORDS = ("banana", "mississippi", "parallel", "gradient", "attention", "tensor", "kernel", "sequence",
         "checkpoint", "tokenizer", "committee", "balloon", "assessment", "bookkeeper", "referee")


@dataclass(frozen=True)
class Kind:
    """One kind of problem: how to draw its parameters, phrase it, solve it, and list its possible answers."""

    name: str
    draw: Callable[[random.Random], dict]
    question: Callable[[dict], str]
    solve: Callable[[dict], str]
    space: Callable[[dict], list[str]]
    think: Callable[[dict], str]  # a short worked solution, for SFT data and oracle outputs


def _join(xs: Sequence[int]) -> str:
    return ", ".join(str(x) for x in xs)


def _draw_compare(r: random.Random) -> dict:
    a, b = r.sample(range(1000), 2)
    return {"a": a, "b": b}


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("add", lambda r: {"a": r.randrange(100), "b": r.randrange(100)},
         lambda p: f"What is {p['a']} + {p['b']}?",
         lambda p: str(p["a"] + p["b"]),
         lambda p: [str(i) for i in range(199)],
         lambda p: f"{p['a']} + {p['b']} = {p['a'] + p['b']}"),
    Kind("compare", _draw_compare,
         lambda p: f"Which number is larger, {p['a']} or {p['b']}?",
         lambda p: str(max(p["a"], p["b"])),
         lambda p: [str(p["a"]), str(p["b"])],
         lambda p: f"{max(p['a'], p['b'])} > {min(p['a'], p['b'])}"),
    Kind("mod", lambda r: {"a": r.randrange(2, 50), "b": r.randrange(2, 50), "m": r.randrange(3, 10)},
         lambda p: f"What is {p['a']} * {p['b']} mod {p['m']}?",
         lambda p: str(p["a"] * p["b"] % p["m"]),
         lambda p: [str(i) for i in range(p["m"])],
         lambda p: f"{p['a']} * {p['b']} = {p['a'] * p['b']}, and {p['a'] * p['b']} mod {p['m']} = "
                   f"{p['a'] * p['b'] % p['m']}"),
    Kind("count", lambda r: (lambda w: {"word": w, "letter": r.choice(sorted(set(w)))})(r.choice(WORDS)),
         lambda p: f"How many times does the letter '{p['letter']}' appear in '{p['word']}'?",
         lambda p: str(p["word"].count(p["letter"])),
         lambda p: [str(i) for i in range(len(p["word"]) + 1)],
         lambda p: " ".join(c for c in p["word"] if c == p["letter"]) + f": {p['word'].count(p['letter'])}"),
    Kind("parity", lambda r: {"xs": [r.randrange(100) for _ in range(r.randrange(3, 6))]},
         lambda p: f"Is the sum of {_join(p['xs'])} even or odd?",
         lambda p: "even" if sum(p["xs"]) % 2 == 0 else "odd",
         lambda p: ["even", "odd"],
         lambda p: f"the sum is {sum(p['xs'])}"),
    Kind("sort", lambda r: {"xs": r.sample(range(100), r.randrange(3, 5))},
         lambda p: f"Sort these numbers in ascending order: {_join(p['xs'])}.",
         lambda p: _join(sorted(p["xs"])),
         lambda p: [_join(q) for q in itertools.permutations(p["xs"])],
         lambda p: f"smallest first: {_join(sorted(p['xs']))}"),
)}


def normalize(answer: str) -> str:
    """The form answers are compared in: stripped, lower case, single spaces, no spaces around commas."""
    answer = " ".join(answer.strip().lower().split())
    return re.sub(r"\s*,\s*", ",", answer)


def kind_of(problem: dict) -> Kind:
    name = problem.get("kind")
    if name not in KINDS:
        raise ValueError(f"unknown problem kind {name!r} (known: {', '.join(KINDS)})")
    return KINDS[name]


def make_problem(kind: str, rng: random.Random, index: int = 0) -> dict:
    k = KINDS[kind]
    params = k.draw(rng)
    return {"id": f"{kind}-{index:06d}", "kind": kind, "params": params,
            "prompt": f"{k.question(params)} {INSTRUCTION}", "answer": k.solve(params)}


def make_problems(n: int, seed: int = 0, kinds: Sequence[str] | None = None) -> list[dict]:
    """`n` problems, kinds taken in turn (so each is equally represented), reproducible from `seed`."""
    kinds = list(kinds or KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown problem kind(s) {', '.join(unknown)} (known: {', '.join(KINDS)})")
    rng = random.Random(seed)
    return [make_problem(kinds[i % len(kinds)], rng, i) for i in range(n)]


def extract_answer(text: str) -> str | None:
    """The content of the last complete `<answer>...</answer>` in `text`, or None if there is none."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else None


def well_formed(text: str) -> bool:
    """R1's format rule: a `<think>...</think>` block, then exactly one `<answer>...</answer>` after it."""
    think = THINK_RE.search(text)
    return bool(think) and len(ANSWER_RE.findall(text)) == 1 and ANSWER_RE.search(text).start() >= think.end()


def solution(problem: dict) -> str:
    """The true answer, recomputed from the problem's kind and parameters (never read from the file)."""
    return kind_of(problem).solve(problem["params"])


def check(problem: dict, text: str) -> bool:
    """Whether `text` (a model's whole output) answers `problem` correctly inside `<answer>`."""
    answer = extract_answer(text)
    return answer is not None and normalize(answer) == normalize(solution(problem))


def answer_space(problem: dict) -> list[str]:
    return kind_of(problem).space(problem["params"])


def chance(problem: dict) -> float:
    """The probability that a uniformly random answer from the problem's answer space is right."""
    return 1.0 / len(answer_space(problem))


def worked_output(problem: dict) -> str:
    """A correct, well-formed output: what SFT trains on and what an oracle answers."""
    k = kind_of(problem)
    return f"<think>{k.think(problem['params'])}</think><answer>{k.solve(problem['params'])}</answer>"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.reasoning", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the jsonl file to write")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {', '.join(KINDS)}")
    args = p.parse_args(argv)
    problems = make_problems(args.n, args.seed, [k for k in args.kinds.split(",") if k])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(q) + "\n" for q in problems), encoding="utf-8")
    print(f"{len(problems)} problems -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
