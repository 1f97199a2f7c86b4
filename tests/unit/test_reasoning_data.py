"""The reasoning task maker's multi-step kinds (chain, linear, boolean, poly), its SFT writer, and the default
problem set it must never change. Each kind is validated like a scorer: the oracle passes, its worked steps
are recomputed independently, other problems' answers fail, random answers score chance."""

import hashlib
import json
import math
import random
import re

import pytest

from data_pipelines import reasoning as rz
from data_pipelines.tokenizer import byte_tokenizer
from evals.runner import task_configs
from evals.tasks import reasoning
from workbench.data.chat import ChatTemplate, messages_of

# sha256 of the jsonl (`json.dumps(q) + "\n"` per problem, as `--out` writes it) of make_problems(12,
# seed=20261127) and of the eval's default set (120 problems, EVAL_SEED), computed before the MULTI_STEP kinds
DEFAULT_12 = "81fa1beb2794dacb9867f97b3d743f9d739bf9895b2075e68104ece0bde7b84d"
DEFAULT_EVAL_120 = "db7e7585e34cd721a5bd3bb9b055a924f34d5ba8428aee8aef0df94eef9b2ecc"
NUM = r"\(?(-?\d+)\)?"  # a number, negative ones possibly in parentheses


def sha(problems) -> str:
    return hashlib.sha256("".join(json.dumps(q) + "\n" for q in problems).encode()).hexdigest()


def test_the_default_problem_sets_are_unchanged(tmp_path):
    assert rz.DEFAULT_KINDS == ("add", "compare", "mod", "count", "parity", "sort")
    assert set(rz.MULTI_STEP) == set(rz.KINDS) - set(rz.DEFAULT_KINDS)
    assert sha(rz.make_problems(12, seed=20261127)) == DEFAULT_12
    assert sha(reasoning.TASK.problems(reasoning.Config())) == DEFAULT_EVAL_120
    out = tmp_path / "p.jsonl"
    rz.main(["--out", str(out), "--n", "12", "--seed", "20261127"])  # the command line without --kinds
    assert hashlib.sha256(out.read_bytes()).hexdigest() == DEFAULT_12


# ---- each new kind: oracle, space, chance, wrong answers -------------------------------------------


@pytest.mark.parametrize("kind", rz.MULTI_STEP)
def test_oracle_passes_and_the_space_is_exact(kind):
    k = rz.KINDS[kind]
    for p in rz.make_problems(150, seed=7, kinds=[kind]):
        out = rz.worked_output(p)
        assert rz.check(p, out) and rz.well_formed(out), out
        assert rz.extract_answer(out) == p["answer"] == rz.solution(p)
        space = rz.answer_space(p)
        canon = k.canon or (lambda s: s)
        assert len({canon(rz.normalize(a)) for a in space}) == len(space)  # distinct answers, as compared
        assert sum(rz.check(p, f"<answer>{a}</answer>") for a in space) == 1  # exactly one is right
        if k.space_size:
            assert k.space_size(p["params"]) == len(space)
        assert rz.chance(p) == pytest.approx(1 / len(space))


@pytest.mark.parametrize("kind", rz.MULTI_STEP)
def test_answers_to_other_problems_fail(kind):
    problems = rz.make_problems(80, seed=8, kinds=[kind])
    wrong = 0
    for p, q in zip(problems, problems[1:] + problems[:1]):
        if not rz.same_answer(p, rz.solution(p), rz.solution(q)):
            assert not rz.check(p, rz.worked_output(q))
            wrong += 1
    assert wrong >= 30  # the comparison above really happened (boolean answers agree half the time)


@pytest.mark.parametrize("kind", rz.MULTI_STEP)
def test_uniform_random_answers_score_chance(kind):
    rng = random.Random(kind)
    problems = rz.make_problems(1500, seed=9, kinds=[kind])
    hits = sum(rz.check(p, f"<think>?</think><answer>{rng.choice(rz.answer_space(p))}</answer>") for p in problems)
    ps = [rz.chance(p) for p in problems]
    # hits is a sum of independent Bernoulli(p_i): within 4 standard deviations of its mean
    assert abs(hits - sum(ps)) <= 4 * math.sqrt(sum(p * (1 - p) for p in ps)) + 1, (hits, sum(ps))


def test_chance_of_each_kind():
    assert rz.chance({"kind": "linear", "params": {"a": 2, "b": 1, "c": 3}}) == pytest.approx(1 / 21)
    assert rz.chance({"kind": "boolean", "params": {"values": {"p": True}, "expr": ["not", "p"]}}) == 0.5
    assert rz.chance({"kind": "poly", "params": {"a": 1, "b": 2}}) == pytest.approx(1 / 171)  # 18 * 19 / 2 pairs
    # start 1..20, + 1..20 -> 2..40, * 2..5 -> 4..200: 197 integers
    assert rz.chance({"kind": "chain", "params": {"start": 3, "ops": [["add", 1], ["mul", 2]]}}) == pytest.approx(1 / 197)
    # brute force: every start and operand with the same steps lands inside the bounds, and reaches both ends
    for ops in (["add", "mul"], ["sub", "mul", "sub"], ["mul", "sub", "mul"]):
        ranges = [range(1, 21)] + [range(2, 6) if op == "mul" else range(1, 21) for op in ops]
        results = set()
        for start in ranges[0]:
            values = {start}
            for op, r in zip(ops, ranges[1:]):
                values = {rz._chain_step(v, op, n) for v in values for n in r}
            results |= values
        assert rz._chain_bounds({"ops": [[op, 0] for op in ops]}) == (min(results), max(results))


# ---- the worked steps, recomputed -----------------------------------------------------------------


def think_of(p) -> str:
    return re.fullmatch(r"<think>(.*)</think><answer>.*</answer>", rz.worked_output(p)).group(1)


def test_chain_steps_show_every_intermediate_value():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for p in rz.make_problems(200, seed=10, kinds=["chain"]):
        steps = think_of(p).split("; ")
        assert 2 <= len(steps) == len(p["params"]["ops"]) <= 4
        value = p["params"]["start"]
        for step, (op, n) in zip(steps, p["params"]["ops"]):
            a, sym, b, result = re.fullmatch(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)", step).groups()
            assert int(a) == value and int(b) == n and sym == {"add": "+", "sub": "-", "mul": "*"}[op]
            assert ops[sym](int(a), int(b)) == int(result)
            value = int(result)
        assert str(value) == rz.solution(p)
        question = rz.KINDS["chain"].question(p["params"])
        assert re.fullmatch(r"Start with \d+\. [A-Z][a-z ,0-9]+ then [a-z ]+\d+\. What is the result\?", question)
    p = {"kind": "chain", "params": {"start": 7, "ops": [["add", 5], ["mul", 3], ["sub", 4]]}}
    assert rz.KINDS["chain"].question(p["params"]) == ("Start with 7. Add 5, multiply by 3, then subtract 4. "
                                                       "What is the result?")
    assert think_of(p) == "7 + 5 = 12; 12 * 3 = 36; 36 - 4 = 32" and rz.solution(p) == "32"


def test_linear_steps_isolate_x():
    pattern = (rf"(subtract|add) (\d+) (?:from|to) both sides: (-?\d+)x = (-?\d+) ([-+]) (\d+) = (-?\d+); "
               rf"divide both sides by (-?\d+): x = (-?\d+) / {NUM} = (-?\d+)")
    for p in rz.make_problems(200, seed=11, kinds=["linear"]):
        a, b, c = p["params"]["a"], p["params"]["b"], p["params"]["c"]
        assert rz.KINDS["linear"].question(p["params"]).startswith(f"Solve for x: {a}x {'+' if b > 0 else '-'} {abs(b)} = {c}.")
        move, n, a1, c1, sign, n1, rhs, a2, rhs2, a3, x = re.fullmatch(pattern, think_of(p)).groups()
        n, rhs, x = int(n), int(rhs), int(x)
        assert (move, sign) == (("subtract", "-") if b > 0 else ("add", "+")) and n == int(n1) == abs(b)
        assert int(a1) == int(a2) == int(a3) == a and int(c1) == c and int(rhs2) == rhs
        assert rhs == (c - n if move == "subtract" else c + n) == c - b  # a*x = c - b
        assert x * a == rhs and a * x + b == c and -10 <= x <= 10 and str(x) == rz.solution(p)


def test_boolean_steps_give_each_sub_expression_its_value():
    table = {"and": lambda x, y: x and y, "or": lambda x, y: x or y, "xor": lambda x, y: x != y}
    tf = {"true": True, "false": False}
    for p in rz.make_problems(200, seed=12, kinds=["boolean"]):
        values, expr = p["params"]["values"], rz._bool_text(p["params"]["expr"])
        steps = think_of(p).split("; ")
        assert len(steps) == len(re.findall(r"\b(?:and|or|xor|not)\b", expr)) in (2, 3)
        for step in steps:
            sub, shown, value = step.split(" = ")
            words = shown.split()
            got = (not tf[words[1]]) if words[0] == "not" else table[words[1]](tf[words[0]], tf[words[2]])
            assert got == tf[value]
            # independently: the sub-expression's text evaluated by Python (compound operands are parenthesised,
            # so Python's precedence cannot change the meaning)
            assert eval(sub.replace("xor", "^"), {}, dict(values)) == tf[value], step
        assert steps[-1].startswith(expr + " = ") and steps[-1].endswith(" = " + rz.solution(p))
        assert set(re.findall(r"\b[pqr]\b", expr)) == set(values)  # every variable used is given, no more
    p = {"kind": "boolean", "params": {"values": {"p": True, "q": False, "r": True},
                                       "expr": ["xor", ["or", "p", "q"], ["not", "r"]]}}
    assert rz.KINDS["boolean"].question(p["params"]) == ("Given p = true, q = false and r = true, "
                                                         "is (p or q) xor (not r) true or false?")
    assert think_of(p) == ("p or q = true or false = true; not r = not true = false; "
                           "(p or q) xor (not r) = true xor false = true")


def poly_value(text: str, x: int) -> int:
    """The canonical form read back as Python and evaluated at x."""
    return eval(re.sub(r"(\d)x", r"\1*x", text.replace("^", "**")), {}, {"x": x})


def test_poly_steps_and_the_canonical_form():
    for p in rz.make_problems(200, seed=13, kinds=["poly"]):
        a, b = p["params"]["a"], p["params"]["b"]
        m = re.fullmatch(rf".*; {NUM} \+ {NUM} = (-?\d+); {NUM} \* {NUM} = (-?\d+); so (.*)", think_of(p))
        a1, b1, s, a2, b2, prod, final = m.groups()
        assert (int(a1), int(b1), int(a2), int(b2)) == (a, b, a, b)
        assert int(s) == a + b and int(prod) == a * b and final == rz.solution(p)
        for x in range(-3, 4):  # the answer is the polynomial (x + a)(x + b)
            assert poly_value(final, x) == (x + a) * (x + b)
    for answer in rz.POLY_SPACE:  # every answer is canonical: no 1x, 0x, + -, trailing + 0
        assert re.fullmatch(r"x\^2( [-+] ([2-9]|1[0-8])?x)?( [-+] [1-9]\d?)?", answer), answer
    assert len(rz.POLY_SPACE) == 171
    cases = {(2, -5): "x^2 - 3x - 10", (4, -4): "x^2 - 16", (1, 2): "x^2 + 3x + 2", (-1, 2): "x^2 + x - 2",
             (1, -2): "x^2 - x - 2"}
    for (a, b), want in cases.items():
        assert rz.solution({"kind": "poly", "params": {"a": a, "b": b}}) == want
    p = {"kind": "poly", "params": {"a": 2, "b": -5}}
    assert rz.KINDS["poly"].question(p["params"]) == "Expand (x + 2)(x - 5) into the form x^2 + px + q."
    for ok in ("x^2-3x-10", " X^2 - 3x -10 ", "x^2 -3x - 10"):  # any spacing, any case
        assert rz.check(p, f"<answer>{ok}</answer>"), ok
    for bad in ("x^2 + -3x - 10", "x^2 - 3x + -10", "x^2 - 3*x - 10", "x^2 - 3x - 10 + 0", "x^2 - 3x + 10"):
        assert not rz.check(p, f"<answer>{bad}</answer>"), bad
    assert not rz.check({"kind": "poly", "params": {"a": -1, "b": 2}}, "<answer>x^2 + 1x - 2</answer>")


# ---- SFT records and the eval ---------------------------------------------------------------------


def test_sft_writer_gives_chat_records_and_disjoint_train_and_val(tmp_path, capsys):
    kinds = ["chain", "linear", "boolean", "poly"]
    out = tmp_path / "rz"
    assert rz.main(["--sft", "--out", str(out), "--n-train", "400", "--n-val", "200", "--seed", "3",
                    "--kinds", ",".join(kinds)]) == 0
    printed = capsys.readouterr().out
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    dropped = 200 - len(val)
    assert len(train) == 400 and dropped > 0  # boolean and poly repeat at these sizes
    assert f"{len(val)} val records (seed 7; {dropped} dropped" in printed and "(seed 6)" in printed
    assert train == rz.make_sft_records(400, 6, kinds)  # the documented seeds: 2*S and 2*S + 1
    assert val == [r for r in rz.make_sft_records(200, 7, kinds) if r["prompt"] not in {t["prompt"] for t in train}]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert len({r["id"] for r in train + val}) == 600 - dropped
    template = ChatTemplate(byte_tokenizer())
    for r in train + val:
        user, assistant = messages_of(r)
        assert user == {"role": "user", "content": r["prompt"]} and assistant["role"] == "assistant"
        assert assistant["content"] == rz.worked_output(r["problem"]) and rz.well_formed(assistant["content"])
        assert r["answer"] == rz.extract_answer(assistant["content"]) and r["kind"] == r["problem"]["kind"]
        assert rz.check(r["problem"], assistant["content"]) and rz.check(r, assistant["content"])
        assert set(r["problem"]) == {"id", "kind", "params", "prompt", "answer"}
    assert any(template.encode(messages_of(train[0])).targets)
    assert {r["kind"] for r in val} == set(kinds)

    # the eval reads val.jsonl as a problem file and scores its oracle 1 against the right chance
    problems = reasoning.TASK.problems(reasoning.Config(data=str(out / "val.jsonl"), n=1000))
    assert len(problems) == len(val)
    metrics, per_kind, samples = reasoning.score_outputs(problems, [rz.worked_output(p) for p in problems])
    assert metrics == {"accuracy": 1.0, "format": 1.0, "answered": 1.0}
    assert per_kind["poly"]["chance"] == pytest.approx(1 / 171) and per_kind["boolean"]["chance"] == 0.5


def test_command_line_modes_refuse_mixed_options(tmp_path):
    with pytest.raises(SystemExit):
        rz.main(["--out", str(tmp_path / "p.jsonl"), "--n-train", "5"])  # --n-train needs --sft
    with pytest.raises(SystemExit):
        rz.main(["--out", str(tmp_path / "p.jsonl"), "--kinds", "chain,riddle"])
    assert not (tmp_path / "p.jsonl").exists()


def test_eval_takes_the_multi_step_kinds_and_their_chance(tmp_path):
    cfg = task_configs(["reasoning"], ["--reasoning.kinds", "chain,linear,boolean,poly", "--reasoning.n", "80"])
    cfg = cfg["reasoning"]
    cfg.validate()
    problems = reasoning.TASK.problems(cfg)
    assert [p["kind"] for p in problems] == ["chain", "linear", "boolean", "poly"] * 20
    rng = random.Random(0)
    outputs = [f"<answer>{rng.choice(rz.answer_space(p))}</answer>" for p in problems]
    metrics, per_kind, samples = reasoning.score_outputs(problems, outputs)
    for kind, size in (("linear", 21), ("boolean", 2), ("poly", 171)):
        assert per_kind[kind]["chance"] == pytest.approx(1 / size)
    chain = [p for p in problems if p["kind"] == "chain"]
    assert per_kind["chain"]["chance"] == pytest.approx(sum(1 / len(rz.answer_space(p)) for p in chain) / 20)
    assert metrics["format"] == 0.0 and metrics["answered"] == 1.0
