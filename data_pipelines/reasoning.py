"""Verifiable reasoning problems: generated with known parameters, answered in `<answer>`, checked by a program.

Each problem is a JSON object

    {"id": "mod-000017", "kind": "mod", "params": {"a": 37, "b": 12, "m": 7},
     "prompt": "...What is 37 * 12 mod 7? ...", "answer": "3"}

and `check(problem, text)` decides whether a model's output is right by *recomputing* the answer from
`kind` and `params` (the `answer` field is only a convenience for SFT data and for reading), after pulling
the answer out of the last complete `<answer>...</answer>` span. The same pieces serve three pipelines:
the eval harness (`evals/tasks/reasoning.py`, accuracy against chance), SFT data (prompt + a worked
`<think>` + `<answer>`, `make_sft_records`) and R1-style RL rewards (format and accuracy).

Why these kinds. Every kind has a bounded answer space whose size is known for every problem, so the
accuracy of answering at random ("chance") is known exactly and a scorer can be validated against it: an
oracle scores 1, uniform random answers from the space score the mean of 1 / |space| (`chance`). The space
is listed by `answer_space`; a kind whose space is long to list also gives its size (`Kind.space_size`,
which `chance` then uses; the two agree, tested). The kinds need different skills and come in sizes a small
model can learn from a few thousand examples. The first six are single-step (carrying, comparison, modular
arithmetic, counting, sorting, parity); the MULTI_STEP kinds take several dependent steps, arithmetic or
symbolic, each shown in the worked `<think>`:

    add       a + b, 0 <= a, b < 100                  space: 0..198
    compare   the larger of a and b (a != b)            space: {a, b}
    mod       a * b mod m, m in 3..9                     space: 0..m-1
    count     occurrences of a letter in a word          space: 0..len(word)
    parity    whether a sum of 3-5 numbers is even/odd   space: {even, odd}
    sort      the numbers in ascending order             space: every permutation of them
    chain     start 1..20, then 2-4 steps of + or -      space: every integer from the least to the greatest
              1..20 or * 2..5; the final value                  result of any chain with the same steps
                                                                (any start and operands; space_size)
    linear    x from a*x + b = c; |a| in 2..9,           space: -10..10
              b in +-1..20, x in -10..10
    boolean   2-3 of and/or/xor/not over p, q, r with    space: {true, false}
              given values, compound operands in ()
    poly      (x + a)(x + b) expanded, a, b in +-1..9,   space: the 171 expansions reachable (one per
              written x^2 + px + q, signs folded                pair {a, b}: p, q fix the roots)

Answers are compared after normalisation (`normalize`: strip, lower case, spaces around commas
removed), so "2, 5, 9" and "2,5,9" are the same answer and " Odd" is "odd"; a kind may normalise further
(`Kind.canon`: poly drops every space, so "x^2-2x-15" is "x^2 - 2x - 15"; "x^2 + -2x - 15" is not).

Default set. `make_problems(kinds=None)`, the command line without `--kinds` and the `reasoning` eval take
DEFAULT_KINDS, the first six, so problem sets drawn before the MULTI_STEP kinds existed (the eval's held-out
set, recorded numbers) are unchanged byte for byte (tested); the others are asked for by name.

    python -m data_pipelines.reasoning --out data/reasoning.jsonl --n 1000 --seed 0 [--kinds add,mod]
    python -m data_pipelines.reasoning --sft --out data/rz --n-train 5000 --n-val 500 --seed 0 \
        --kinds chain,linear,boolean,poly

The second writes chat records (`make_sft_records`) to OUT/train.jsonl and OUT/val.jsonl. Train draws
from seed 2*S and val from seed 2*S + 1, so no seed S' ever draws a train set from another S's val seed;
the eval's held-out seed 20261127 is odd, so it is never a train seed. Small kinds repeat problems across
seeds, so val records whose prompt is also a train prompt are dropped (the count is printed). A record is
a problem record (id, kind, params, prompt, answer: `check`, the eval's `--reasoning.data` read it as is)
plus the chat form `messages` (`workbench.data.chat`) and `problem`, the problem alone.
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
    space_size: Callable[[dict], int] | None = None  # len(space(params)) without listing it, for `chance`
    canon: Callable[[str], str] | None = None  # further normalisation of answers after `normalize`


def _join(xs: Sequence[int]) -> str:
    return ", ".join(str(x) for x in xs)


def _draw_compare(r: random.Random) -> dict:
    a, b = r.sample(range(1000), 2)
    return {"a": a, "b": b}


# ---- chain: multi-step arithmetic ------------------------------------------------------------------
CHAIN_START = (1, 20)  # inclusive ranges: the start, the + and - operands, the * operands
CHAIN_ADD = (1, 20)
CHAIN_MUL = (2, 5)
CHAIN_OPS = {"add": ("add {}", "+"), "sub": ("subtract {}", "-"), "mul": ("multiply by {}", "*")}


def _draw_chain(r: random.Random) -> dict:
    ops = []
    for _ in range(r.randint(2, 4)):
        op = r.choice(list(CHAIN_OPS))
        ops.append([op, r.randint(*(CHAIN_MUL if op == "mul" else CHAIN_ADD))])
    return {"start": r.randint(*CHAIN_START), "ops": ops}


def _chain_step(value: int, op: str, n: int) -> int:
    return value + n if op == "add" else value - n if op == "sub" else value * n


def _chain_values(p: dict) -> list[int]:
    """The start and the value after each step."""
    values = [p["start"]]
    for op, n in p["ops"]:
        values.append(_chain_step(values[-1], op, n))
    return values


def _chain_question(p: dict) -> str:
    steps = [CHAIN_OPS[op][0].format(n) for op, n in p["ops"]]
    steps[0] = steps[0][0].upper() + steps[0][1:]
    return f"Start with {p['start']}. {', '.join(steps[:-1])}, then {steps[-1]}. What is the result?"


def _chain_bounds(p: dict) -> tuple[int, int]:
    """The least and greatest result of any chain with the same steps: interval arithmetic over the start's and
    every operand's range, exact here since each step is monotone in the running value and in its operand."""
    lo, hi = CHAIN_START
    for op, _ in p["ops"]:
        if op == "add":
            lo, hi = lo + CHAIN_ADD[0], hi + CHAIN_ADD[1]
        elif op == "sub":
            lo, hi = lo - CHAIN_ADD[1], hi - CHAIN_ADD[0]
        else:
            ends = [v * k for v in (lo, hi) for k in CHAIN_MUL]
            lo, hi = min(ends), max(ends)
    return lo, hi


def _chain_think(p: dict) -> str:
    v = _chain_values(p)
    return "; ".join(f"{a} {CHAIN_OPS[op][1]} {n} = {b}" for a, (op, n), b in zip(v, p["ops"], v[1:]))


# ---- linear: solve a*x + b = c -------------------------------------------------------------------
LINEAR_X = 10  # x in -10..10


def _draw_linear(r: random.Random) -> dict:
    a = r.choice([-1, 1]) * r.randint(2, 9)
    b = r.choice([-1, 1]) * r.randint(1, 20)
    x = r.randint(-LINEAR_X, LINEAR_X)
    return {"a": a, "b": b, "c": a * x + b}


def _signed(n: int) -> str:
    """+ 5 or - 5: a term after the first, its sign folded into the operator."""
    return f"+ {n}" if n >= 0 else f"- {-n}"


def _paren(n: int) -> str:
    return str(n) if n >= 0 else f"({n})"


def _linear_think(p: dict) -> str:
    a, b, c = p["a"], p["b"], p["c"]
    move = f"subtract {b} from both sides: {a}x = {c} - {b}" if b > 0 else f"add {-b} to both sides: {a}x = {c} + {-b}"
    return f"{move} = {c - b}; divide both sides by {a}: x = {c - b} / {_paren(a)} = {(c - b) // a}"


# ---- boolean: a small expression over named truth values -------------------------------------------
# An expression is a variable name, ["not", e] or [op, e1, e2] with op in and / or / xor (JSON lists).
BOOL_VARS = ("p", "q", "r")
BOOL_BINARY = {"and": lambda x, y: x and y, "or": lambda x, y: x or y, "xor": lambda x, y: x != y}


def _bool_shape(r: random.Random, ops: int, under_not: bool = False):
    """A random tree with `ops` operators (leaves None); no "not not"."""
    if ops == 0:
        return None
    op = r.choice([*BOOL_BINARY] + ([] if under_not else ["not"]))
    if op == "not":
        return ["not", _bool_shape(r, ops - 1, under_not=True)]
    left = r.randint(0, ops - 1)
    return [op, _bool_shape(r, left), _bool_shape(r, ops - 1 - left)]


def _bool_fill(e, names: list[str]):
    if e is None:
        return names.pop()
    return [e[0], *(_bool_fill(x, names) for x in e[1:])]


def _bool_leaves(e) -> int:
    return 1 if e is None else sum(_bool_leaves(x) for x in e[1:])


def _draw_boolean(r: random.Random) -> dict:
    shape = _bool_shape(r, r.randint(2, 3))
    leaves = _bool_leaves(shape)
    names = r.sample(BOOL_VARS, min(leaves, len(BOOL_VARS)))  # distinct while there are enough names
    names += [r.choice(BOOL_VARS) for _ in range(leaves - len(names))]
    r.shuffle(names)
    expr = _bool_fill(shape, names)
    used = sorted(set(_bool_names(expr)))
    return {"values": {v: r.random() < 0.5 for v in used}, "expr": expr}


def _bool_names(e) -> list[str]:
    return [e] if isinstance(e, str) else [n for x in e[1:] for n in _bool_names(x)]


def _bool_text(e) -> str:
    """Unambiguous without precedence rules: every compound operand is parenthesised."""
    def operand(x):
        return x if isinstance(x, str) else f"({_bool_text(x)})"
    if isinstance(e, str):
        return e
    if e[0] == "not":
        return f"not {operand(e[1])}"
    return f"{operand(e[1])} {e[0]} {operand(e[2])}"


def _bool_eval(e, values: dict, steps: list[str] | None = None) -> bool:
    """The value of `e`; appends "sub-expression = operand values = value" for every operator to `steps`."""
    if isinstance(e, str):
        return values[e]
    args = [_bool_eval(x, values, steps) for x in e[1:]]
    v = (not args[0]) if e[0] == "not" else BOOL_BINARY[e[0]](*args)
    if steps is not None:
        shown = f"not {_tf(args[0])}" if e[0] == "not" else f"{_tf(args[0])} {e[0]} {_tf(args[1])}"
        steps.append(f"{_bool_text(e)} = {shown} = {_tf(v)}")
    return v


def _tf(v: bool) -> str:
    return "true" if v else "false"


def _bool_question(p: dict) -> str:
    given = [f"{k} = {_tf(v)}" for k, v in p["values"].items()]
    given = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
    return f"Given {given}, is {_bool_text(p['expr'])} true or false?"


def _bool_think(p: dict) -> str:
    steps: list[str] = []
    _bool_eval(p["expr"], p["values"], steps)
    return "; ".join(steps)


# ---- poly: expand (x + a)(x + b) -----------------------------------------------------------------
POLY_ROOTS = [n for n in range(-9, 10) if n != 0]


def _poly(p_: int, q: int) -> str:
    """x^2 + p x + q in canonical form: zero terms dropped, signs folded, coefficient 1 written as x."""
    text = "x^2"
    if p_:
        text += f" {'+' if p_ > 0 else '-'} {'' if abs(p_) == 1 else abs(p_)}x"
    if q:
        text += f" {_signed(q)}"
    return text


# every (a + b, a * b) reachable; distinct pairs {a, b} give distinct (p, q) (they are the roots)
POLY_SPACE = sorted({_poly(a + b, a * b) for a in POLY_ROOTS for b in POLY_ROOTS})


def _factor(a: int) -> str:
    return f"(x {_signed(a)})"


def _poly_think(p: dict) -> str:
    a, b = p["a"], p["b"]
    return (f"{_factor(a)}{_factor(b)} = x^2 + ({_paren(a)} + {_paren(b)})x + {_paren(a)} * {_paren(b)}; "
            f"{_paren(a)} + {_paren(b)} = {a + b}; {_paren(a)} * {_paren(b)} = {a * b}; so {_poly(a + b, a * b)}")


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
    Kind("chain", _draw_chain, _chain_question,
         lambda p: str(_chain_values(p)[-1]),
         lambda p: [str(i) for i in range(_chain_bounds(p)[0], _chain_bounds(p)[1] + 1)],
         _chain_think,
         space_size=lambda p: _chain_bounds(p)[1] - _chain_bounds(p)[0] + 1),
    Kind("linear", _draw_linear,
         lambda p: f"Solve for x: {p['a']}x {_signed(p['b'])} = {p['c']}. What is x?",
         lambda p: str((p["c"] - p["b"]) // p["a"]),
         lambda p: [str(i) for i in range(-LINEAR_X, LINEAR_X + 1)],
         _linear_think),
    Kind("boolean", _draw_boolean, _bool_question,
         lambda p: _tf(_bool_eval(p["expr"], p["values"])),
         lambda p: ["true", "false"],
         _bool_think),
    Kind("poly", lambda r: {"a": r.choice(POLY_ROOTS), "b": r.choice(POLY_ROOTS)},
         lambda p: f"Expand {_factor(p['a'])}{_factor(p['b'])} into the form x^2 + px + q.",
         lambda p: _poly(p["a"] + p["b"], p["a"] * p["b"]),
         lambda p: list(POLY_SPACE),
         _poly_think,
         canon=lambda s: s.replace(" ", "")),
)}
DEFAULT_KINDS = ("add", "compare", "mod", "count", "parity", "sort")  # what kinds=None means: frozen, see above
MULTI_STEP = ("chain", "linear", "boolean", "poly")


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
    """`n` problems, kinds taken in turn (so each is equally represented), reproducible from `seed`;
    `kinds=None` is DEFAULT_KINDS (never every kind: that would change the default sets already drawn)."""
    kinds = list(kinds or DEFAULT_KINDS)
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


def same_answer(problem: dict, a: str, b: str) -> bool:
    """Whether two answers to `problem` are the same after normalisation (`normalize`, then the kind's `canon`)."""
    canon = kind_of(problem).canon or (lambda s: s)
    return canon(normalize(a)) == canon(normalize(b))


def check(problem: dict, text: str) -> bool:
    """Whether `text` (a model's whole output) answers `problem` correctly inside `<answer>`."""
    answer = extract_answer(text)
    return answer is not None and same_answer(problem, answer, solution(problem))


def answer_space(problem: dict) -> list[str]:
    return kind_of(problem).space(problem["params"])


def chance(problem: dict) -> float:
    """The probability that a uniformly random answer from the problem's answer space is right."""
    k = kind_of(problem)
    return 1.0 / (k.space_size(problem["params"]) if k.space_size else len(answer_space(problem)))


def worked_output(problem: dict) -> str:
    """A correct, well-formed output: what SFT trains on and what an oracle answers."""
    k = kind_of(problem)
    return f"<think>{k.think(problem['params'])}</think><answer>{k.solve(problem['params'])}</answer>"


def make_sft_records(n: int, seed: int = 0, kinds: Sequence[str] | None = None) -> list[dict]:
    """`n` chat records for SFT (and prompts with a checker for RL): each problem of `make_problems(n, seed,
    kinds)` with its worked output as the assistant turn. A record is the problem record itself (so `check`
    and the eval's `--reasoning.data` take it as is) plus `messages` and `problem`, the problem alone; ids
    carry the seed ("chain-s3-000004"), so records drawn from different seeds never share one."""
    records = []
    for q in make_problems(n, seed, kinds):
        q = dict(q, id=f"{q['kind']}-s{seed}-{q['id'].rsplit('-', 1)[1]}")
        records.append({**q, "messages": [{"role": "user", "content": q["prompt"]},
                                          {"role": "assistant", "content": worked_output(q)}],
                        "problem": dict(q)})
    return records


def write_sft(out: str | Path, n_train: int, n_val: int, seed: int = 0,
              kinds: Sequence[str] | None = None) -> tuple[int, int, int]:
    """OUT/train.jsonl from seed 2*seed and OUT/val.jsonl from seed 2*seed + 1 (train seeds even, val seeds odd:
    disjoint for every `seed`), val without the problems whose prompt a train problem has. Returns (train
    records, val records, val problems dropped)."""
    train = make_sft_records(n_train, 2 * seed, kinds)
    seen = {r["prompt"] for r in train}
    drawn = make_sft_records(n_val, 2 * seed + 1, kinds)
    val = [r for r in drawn if r["prompt"] not in seen]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("val", val)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return len(train), len(val), len(drawn) - len(val)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.reasoning", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the jsonl file to write; with --sft, the folder for "
                                                "train.jsonl and val.jsonl")
    p.add_argument("--n", type=int, default=1000, help="problems (without --sft)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                   help=f"comma-separated, from {', '.join(KINDS)} (default: {','.join(DEFAULT_KINDS)})")
    p.add_argument("--sft", action="store_true", help="write chat records: OUT/train.jsonl (seed 2*SEED) and "
                                                      "OUT/val.jsonl (seed 2*SEED + 1, train prompts dropped)")
    p.add_argument("--n-train", type=int, default=None, help="train records (--sft; default 5000)")
    p.add_argument("--n-val", type=int, default=None, help="val records before dropping repeats (--sft; default 500)")
    p.add_argument("--exclude", default=None, metavar="FILE",
                   help="drop problems whose prompt is a prompt of this jsonl (a held-out set apart from a train set)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        p.error(f"--kinds: unknown kind(s) {', '.join(unknown)} (known: {', '.join(KINDS)})")
    if not args.sft:
        if args.n_train is not None or args.n_val is not None:
            p.error("--n-train and --n-val go with --sft (without it, --n problems go to one file)")
        problems = make_problems(args.n, args.seed, kinds)
        dropped = ""
        if args.exclude:
            from workbench.data.examples import jsonl_records

            seen = {rec.get("prompt") for _, rec in jsonl_records(args.exclude)}
            kept = [q for q in problems if q["prompt"] not in seen]
            dropped = f" ({len(problems) - len(kept)} dropped: their prompt is in {args.exclude})"
            problems = kept
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(q) + "\n" for q in problems), encoding="utf-8")
        print(f"{len(problems)} problems -> {out}{dropped}")
        return 0
    n_train = 5000 if args.n_train is None else args.n_train
    n_val = 500 if args.n_val is None else args.n_val
    n_train, n_val, dropped = write_sft(args.out, n_train, n_val, args.seed, kinds)
    print(f"{n_train} train records (seed {2 * args.seed}), {n_val} val records (seed {2 * args.seed + 1}; "
          f"{dropped} dropped, their prompt is a train prompt) -> {args.out}/train.jsonl, val.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
