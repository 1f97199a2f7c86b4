"""The eval harness's scorers, each validated on an oracle (scores perfectly) and on random output (scores
chance), plus the scoring primitives against a direct forward pass."""

import json
import math
import random

import pytest
import torch

from data_pipelines import reasoning as rz
from data_pipelines.completions import line_completions
from data_pipelines.tokenizer import byte_tokenizer
from evals import registry
from evals.scoring import fit_prompts, prefix_ids, rolling_nll, rolling_requests, score
from evals.tasks import exact_match, reasoning
from workbench.errors import WorkbenchError
from workbench.inference.generator import Completion
from workbench.models.base import DecoderOutput, ModelSection, build_model

TOK = byte_tokenizer()


def within_chance(hits: int, n: int, p: float) -> bool:
    """hits / n is within 4 standard deviations of p (a binomial draw with success probability p)."""
    return abs(hits / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9


class FakeGenerator:
    """A Generator whose output for each prompt is `answer(prompt_text)`, encoded with special tokens kept."""

    def __init__(self, answer):
        self.answer = answer

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            text = self.answer(TOK.decode(p[1:], skip_special_tokens=False))  # p[0]: the bos
            out.append(Completion(prompt_tokens=list(p), tokens=TOK.encode(text, add_special_tokens=False), text=text))
        return out


def context(tmp_path, generator, model=None):
    return registry.EvalContext(model=model, tokenizer=TOK, generator=generator, out_dir=tmp_path, source={},
                                batch_size=7, max_length=512, log=lambda *_: None)


# ---- reasoning ------------------------------------------------------------------------------------


def test_every_kind_checks_its_worked_answer_and_rejects_others():
    problems = rz.make_problems(300, seed=3)  # the default kinds
    assert {p["kind"] for p in problems} == set(rz.DEFAULT_KINDS)
    problems += rz.make_problems(120, seed=3, kinds=rz.MULTI_STEP)
    assert {p["kind"] for p in problems} == set(rz.KINDS)
    for p in problems:
        out = rz.worked_output(p)
        assert rz.check(p, out) and rz.well_formed(out)
        assert rz.solution(p) in rz.answer_space(p)  # the space really holds the answer
        wrong = next(a for a in rz.answer_space(p) if rz.normalize(a) != rz.normalize(rz.solution(p)))
        assert not rz.check(p, f"<think></think><answer>{wrong}</answer>")
    p = problems[0]
    assert rz.check(dict(p, answer="nonsense"), rz.worked_output(p))  # the program decides, not the stored answer


def test_answer_extraction_and_format_rules():
    p = {"kind": "sort", "params": {"xs": [9, 2, 5]}, "prompt": ""}
    assert rz.check(p, "<think>x</think><answer> 2,5 , 9 </answer>")  # normalised
    assert rz.check(p, "<answer>1</answer> then <answer>2, 5, 9</answer>")  # the last complete span counts
    assert not rz.check(p, "2, 5, 9") and not rz.check(p, "<answer>2, 5, 9")
    assert not rz.well_formed("<answer>2, 5, 9</answer><think>late</think>")
    assert not rz.well_formed("<think>a</think><answer>1</answer><answer>2</answer>")
    with pytest.raises(ValueError, match="unknown problem kind 'nope'"):
        rz.solution({"kind": "nope", "params": {}})


def test_reasoning_task_scores_an_oracle_1_and_random_answers_at_chance(tmp_path):
    task = reasoning.TASK
    cfg = reasoning.Config(n=600, seed=11)
    problems = {p["prompt"]: p for p in task.problems(cfg)}

    result = task.run(context(tmp_path, FakeGenerator(lambda q: rz.worked_output(problems[q]))), cfg)
    assert result.metrics == {"accuracy": 1.0, "format": 1.0, "answered": 1.0} and result.n == 600
    assert (tmp_path / "reasoning.png").read_bytes().startswith(b"\x89PNG")

    rng = random.Random(0)

    def guess(prompt):
        return f"<think>guess</think><answer>{rng.choice(rz.answer_space(problems[prompt]))}</answer>"

    result = task.run(context(tmp_path, FakeGenerator(guess)), cfg)
    chance = result.baselines["chance"]
    assert 0.05 < chance < 0.5
    assert within_chance(round(result.metrics["accuracy"] * 600), 600, chance)
    for kind, row in result.details["per_kind"].items():
        assert within_chance(round(row["accuracy"] * row["n"]), row["n"], row["chance"]), kind
    silent = task.run(context(tmp_path, FakeGenerator(lambda _: "I do not know")), cfg)
    assert silent.metrics == {"accuracy": 0.0, "format": 0.0, "answered": 0.0}


def test_reasoning_reads_problem_files_and_names_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    rz.main(["--out", str(path), "--n", "12", "--kinds", "add,parity"])
    got = reasoning.TASK.problems(reasoning.Config(data=str(path)))
    assert [p["kind"] for p in got] == ["add", "parity"] * 6
    path.write_text(json.dumps({"kind": "riddle", "params": {}, "prompt": "?"}) + "\n")
    with pytest.raises(Exception, match=r"p.jsonl: problem 1: unknown problem kind 'riddle'"):
        reasoning.TASK.problems(reasoning.Config(data=str(path)))


# ---- exact match -----------------------------------------------------------------------------------


def test_exact_match_chance_is_the_random_answer_accuracy():
    assert exact_match.chance(["a", "a", "b"]) == pytest.approx(5 / 9)
    assert exact_match.chance([str(i) for i in range(10)]) == pytest.approx(0.1)


def test_exact_match_scores_an_oracle_1_and_shuffled_answers_at_chance(tmp_path):
    rng = random.Random(1)
    pairs = [{"prompt": f"item {i}: colour?", "answer": rng.choice(["red", "green", "blue", "cyan"])} for i in range(800)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    truth = {p["prompt"]: p["answer"] for p in pairs}
    cfg = exact_match.Config(data=str(data), n=800)
    oracle = exact_match.TASK.run(context(tmp_path, FakeGenerator(lambda q: " " + truth[q] + " ")), cfg)
    assert oracle.metrics["exact_match"] == 1.0 and oracle.n == 800
    pool = [p["answer"] for p in pairs]
    shuffled = exact_match.TASK.run(context(tmp_path, FakeGenerator(lambda q: rng.choice(pool))), cfg)
    assert within_chance(round(shuffled.metrics["exact_match"] * 800), 800, shuffled.baselines["chance"])
    strict = exact_match.Config(data=str(data), n=800, strip=False)
    assert exact_match.TASK.run(context(tmp_path, FakeGenerator(lambda q: " " + truth[q])), strict).metrics[
        "exact_match"] == 0.0


def test_exact_match_names_a_missing_or_malformed_file(tmp_path):
    ctx = context(tmp_path, FakeGenerator(lambda q: ""))
    with pytest.raises(Exception, match=r"exact_match.data: data file .*nope.jsonl does not exist"):
        exact_match.TASK.run(ctx, exact_match.Config(data=str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl: record 2: missing key 'answer'"):
        exact_match.TASK.run(ctx, exact_match.Config(data=str(bad)))
    bad.write_text("[1, 2]\n")
    with pytest.raises(Exception, match=r"bad.jsonl:1: expected a JSON object"):
        exact_match.TASK.run(ctx, exact_match.Config(data=str(bad)))


def test_mined_line_completions_end_at_a_word_boundary_and_rebuild_the_line():
    text = "import os\n\n\ndef main(argv, env=None):\n    value = compute(argv[0], env)\n    return value\n"
    pairs = line_completions([("doc", text)], n=10, seed=0)
    assert pairs and len({p["line"] for p in pairs}) == len(pairs)
    lines = text.split("\n")
    for p in pairs:
        line = lines[p["line"] - 1]
        assert (p["prompt"] + p["answer"]).endswith(line) and 3 <= len(p["answer"]) <= 40
        assert p["answer"][0] in " ([.=,:" and text.startswith(p["prompt"])


# ---- perplexity and the scoring primitives ---------------------------------------------------------


class RuleModel(torch.nn.Module):
    """next token = rule[token]: an oracle for text that follows the rule, or uniform when `uniform`."""

    def __init__(self, rule: dict[int, int], vocab: int, uniform: bool = False):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab), requires_grad=False)
        if not uniform:
            for a, b in rule.items():
                self.table.data[a, b] = 50.0  # p(rule) = 1 - (V - 1) e^-50: log p is -1e-19

    def forward(self, batch):
        return DecoderOutput(hidden=torch.nn.functional.one_hot(batch["input_ids"], self.table.shape[0]).float())

    def logits(self, hidden, positions=None):
        return hidden @ self.table


def test_rolling_requests_predict_every_token_once_with_the_most_context():
    reqs = rolling_requests([0], list(range(1, 11)), max_length=4)
    assert [t for _, t in reqs] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert [len(c) for c, _ in reqs] == [1, 5, 9]  # score() trims each context to the last inputs that fit


def test_perplexity_of_an_oracle_is_1_and_of_a_uniform_model_is_the_vocabulary(tmp_path):
    text = "abc" * 60  # byte tokens a -> b -> c -> a ...
    ids = TOK.encode(text, add_special_tokens=False)
    prefix = prefix_ids(TOK)
    assert prefix == [TOK.bos_id]
    a, b, c = ids[:3]
    rule = {prefix[0]: a, a: b, b: c, c: a}
    for max_length in (7, 64, 1000):
        (nll, n), = rolling_nll(RuleModel(rule, TOK.vocab_size), prefix, [ids], max_length, batch_size=3)
        assert n == len(ids) and math.exp(nll / n) == pytest.approx(1.0, abs=1e-9)
        (nll, n), = rolling_nll(RuleModel(rule, TOK.vocab_size, uniform=True), prefix, [ids], max_length)
        assert math.exp(nll / n) == pytest.approx(TOK.vocab_size, rel=1e-6)  # float32 log-softmax


def tiny_llama():
    torch.manual_seed(0)
    return build_model(ModelSection.of("llama3", "debug")).eval()


def test_score_equals_a_full_forward_and_truncates_from_the_left():
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 30, 9)]
    requests = [(s[: len(s) // 2], s[len(s) // 2:]) for s in seqs]
    results = score(model, requests, batch_size=3, max_length=64)
    for (ctx, tgt), (logp, greedy) in zip(requests, results):
        full = torch.tensor([ctx + tgt])
        with torch.no_grad():
            ref = torch.log_softmax(model.logits(model({"input_ids": full[:, :-1]}).hidden).float(), -1)[0]
        want = ref[len(ctx) - 1:].gather(1, torch.tensor(tgt)[:, None])[:, 0]
        torch.testing.assert_close(logp.float(), want, atol=1e-5, rtol=1e-5)
        assert greedy == bool((ref[len(ctx) - 1:].argmax(-1) == torch.tensor(tgt)).all())
    # a window of 8: the target keeps the 8 inputs before its last token
    ctx, tgt = seqs[2][:25], seqs[2][25:]
    (logp, _), = score(model, [(ctx, tgt)], max_length=8)
    inputs = torch.tensor([(ctx + tgt)[:-1][-8:]])
    with torch.no_grad():
        ref = torch.log_softmax(model.logits(model({"input_ids": inputs}).hidden).float(), -1)[0]
    torch.testing.assert_close(logp.float(), ref[-len(tgt):].gather(1, torch.tensor(tgt)[:, None])[:, 0], atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="at least one token"):
        score(model, [([], [1])])


def test_prompts_keep_their_end_so_prompt_and_completion_fit_the_window():
    ids = TOK.encode("0123456789", add_special_tokens=False)
    assert fit_prompts(TOK, ["0123456789", ""], max_length=100, max_new_tokens=10) == ([[TOK.bos_id] + ids, [TOK.bos_id]], 0)
    assert fit_prompts(TOK, ["0123456789"], max_length=8, max_new_tokens=3) == ([[TOK.bos_id] + ids[-4:]], 1)
    with pytest.raises(WorkbenchError, match="opt = 7 leaves no room .* window of 8 tokens: lower opt"):
        fit_prompts(TOK, ["0123456789"], max_length=8, max_new_tokens=7, option="opt")
    with pytest.raises(WorkbenchError, match="1 of 2 prompts .the longest 10 tokens. do not fit with opt = 3"):
        fit_prompts(TOK, ["0123456789", "0"], max_length=8, max_new_tokens=3, option="opt", truncate=False)


def test_reasoning_refuses_questions_that_do_not_fit_instead_of_cutting_them(tmp_path):
    ctx = context(tmp_path, FakeGenerator(lambda q: ""))
    ctx.max_length = 64
    with pytest.raises(WorkbenchError, match="prompts .* do not fit with reasoning.max_new_tokens = 40"):
        reasoning.TASK.run(ctx, reasoning.Config(n=6, max_new_tokens=40))


def test_copying_scorer_on_an_oracle_and_on_random_words():
    from evals.tasks import copying

    items = copying.make_items(400, seed=3)
    assert all(it["prompt"].split("def ")[1].startswith(it["prompt"].rsplit("= ", 1)[1] + it["answer"]) for it in items)
    assert copying.score(items, [it["answer"] + "(x)" for it in items]) == 1.0
    rng = random.Random(0)
    guesses = ["_" + rng.choice([w for w in copying.WORDS if w not in it["prompt"].rsplit("= ", 1)[1].split("_")])
               for it in items]
    chance = 1 / (len(copying.WORDS) - 2)
    assert within_chance(round(copying.score(items, guesses) * 400), 400, chance)
