"""The long-context generators (passkey, NIAH, multi-key, variable tracking) and their eval tasks: needles
where asked, budgets kept, seeds reproducing; each task's scorer run end to end with an oracle Generator
(reads the answer out of the prompt: accuracy 1) and a random one (accuracy at the stated chance)."""

import math
import random
import re

import pytest
import torch

from data_pipelines import long_context as lc
from data_pipelines.tokenizer import byte_tokenizer
from evals import registry
from evals.tasks import _long_context as common
from evals.tasks import niah, passkey, ppl_position, ruler_multikey, variable_tracking
from workbench.config import from_dict
from workbench.errors import ConfigError, WorkbenchError
from workbench.inference.generator import Completion
from workbench.models.base import ModelSection, build_model

TOK = byte_tokenizer()


def within_chance(value: float, n: int, p: float, sd: float = 4.0) -> bool:
    """A mean of n draws with success probability p is within `sd` standard deviations of p."""
    return abs(value - p) <= sd * math.sqrt(p * (1 - p) / n) + 1e-9


class FakeGenerator:
    """A Generator answering each prompt (decoded, bos dropped) with `answer(prompt_text, rng)`."""

    def __init__(self, answer, seed: int = 0):
        self.answer, self.rng = answer, random.Random(seed)

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            text = self.answer(TOK.decode(p[1:]), self.rng)
            out.append(Completion(prompt_tokens=list(p), tokens=TOK.encode(text, add_special_tokens=False), text=text))
        return out


def context(tmp_path, generator, model=None):
    return registry.EvalContext(model=model, tokenizer=TOK, generator=generator, out_dir=tmp_path, source={},
                                batch_size=64, max_length=256, log=lambda *_: None)


def config(task, **values):
    return from_dict(task.Config, values, path=task.name)


# ---- oracles: read the answer out of the prompt ---------------------------------------------------------
def passkey_oracle(prompt, _rng):
    return " " + re.search(r"The pass key is (\d+)\. Remember it\.", prompt).group(1)


def niah_oracle(prompt, _rng):
    key = re.search(r"What is the special magic number for (\S+) mentioned", prompt).group(1)
    return " " + re.search(rf"The special magic number for {key} is: (\d+)\.", prompt).group(1)


def multikey_oracle(prompt, _rng):
    key = re.search(r"special magic numbers? for (\S+) mentioned", prompt).group(1)
    return " " + ", ".join(re.findall(rf"One of the special magic numbers for {key} is: (\d+)\.", prompt))


def vt_oracle(prompt, _rng):
    value = re.search(r"assigned the value (\d+) in the text above", prompt).group(1)
    held, names = {value}, []
    for name, source in re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", prompt):  # in text order: a chain reads forward
        if source in held:
            held.add(name)
            names.append(name)
    return " " + " ".join(names)


def random_number(digits):
    return lambda _prompt, rng: " " + lc.random_number(rng, digits)


def random_values(digits, n_values):
    def answer(_prompt, rng):
        values = set()
        while len(values) < n_values:
            values.add(lc.random_number(rng, digits))
        return " " + ", ".join(sorted(values))
    return answer


def random_names(h):
    return lambda prompt, rng: " " + " ".join(rng.sample(sorted(set(re.findall(r"VAR ([A-Z]{5}) =", prompt))), h))


# ---- generators -----------------------------------------------------------------------------------------
def test_passkey_parts_put_one_needle_at_the_asked_depth():
    for depth in (0.0, 0.3, 0.5, 0.77, 1.0):
        for n in (0, 1, 7, 40):
            context_, question, answer = lc.passkey_parts(random.Random(f"{depth}/{n}"), n, depth, digits=6)
            key = answer.strip()
            assert question == " What is the pass key? The pass key is" and answer == " " + key
            assert len(key) == 6 and key[0] != "0" and key.isdigit()
            needle = f"The pass key is {key}. Remember it. {key} is the pass key."
            assert context_.count(needle) == 1 and context_.count("pass key") == 2
            before = context_[: context_.index(needle)]
            sentences_before = before.count(".")
            assert sentences_before == round(depth * n)  # the boundary nearest depth
            assert context_.replace(needle, "").split() == " ".join(lc.filler_sentences(n)).split()
    doc = lc.passkey_document(random.Random(1), 10)
    assert doc.endswith(" What is the pass key? The pass key is " + re.search(r"key is (\d+)\.", doc).group(1))


def test_generators_reproduce_from_their_seed_and_differ_across_seeds():
    assert lc.passkey_parts(random.Random(5), 9, 0.5) == lc.passkey_parts(random.Random(5), 9, 0.5)
    assert lc.passkey_parts(random.Random(5), 9, 0.5) != lc.passkey_parts(random.Random(6), 9, 0.5)
    for spec in (lambda r: lc.niah_spec(r, 0.4), lambda r: lc.multikey_spec(r, 4, 2), lambda r: lc.vt_spec(r, 2, 3)):
        assert spec(random.Random(3)) == spec(random.Random(3)) != spec(random.Random(4))
    # a task's sample is fixed by its cell, whatever other cells are asked for
    assert common.sample_rng("passkey", 1, 256, 0.5, 0).random() == common.sample_rng("passkey", 1, 256, 0.5, 0).random()


def test_fit_passkey_fills_the_budget_without_exceeding_it():
    longest_sentence = max(len(TOK.encode(s, add_special_tokens=False)) for s in lc.FILLER_SENTENCES) + 1
    for budget in (120, 200, 333, 1000, 2048):
        item = lc.fit_passkey(random.Random(budget), TOK, budget, 0.5)
        assert item["n_tokens"] == len(TOK.encode(item["prompt"])) <= budget
        assert budget - item["n_tokens"] <= longest_sentence  # one more sentence would not fit
        assert item["prompt"].endswith(lc.PASSKEY_QUESTION) and item["depth"] == 0.5
        assert f"The pass key is {item['answer'].strip()}." in item["prompt"]
    with pytest.raises(ValueError, match="budget of 20"):
        lc.fit_passkey(random.Random(0), TOK, 20, 0.5)


def test_niah_needle_sits_once_at_its_depth_in_a_text_haystack():
    hay = lc.text_haystack(["alpha beta\ngamma 12 delta\n\n  epsilon\nzeta eta theta\n"])
    assert hay.units == ("alpha beta", "  epsilon", "zeta eta theta")  # digit lines and blank lines dropped
    count = common.counter(TOK)
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        item = lc.fit_sample(lc.NIAH, lc.niah_spec(random.Random(2), depth), hay, 600, count)
        needle = f"The special magic number for {item['key']} is: {item['value']}."
        context_ = item["prompt"][: item["prompt"].rindex("\nWhat is")]
        assert context_.count(needle) == 1 and count(item["prompt"]) == item["n_tokens"] <= 600
        lines = context_.split("\n")
        assert lines.index(needle) == round(depth * item["n_units"])
        # as a fraction of the haystack's characters, within one unit of the asked depth
        at = context_.index(needle) / max(len(context_) - len(needle), 1)
        assert abs(at - depth) <= 1.5 / item["n_units"] + 0.02


def test_multikey_and_variable_tracking_samples_hold_what_they_ask():
    spec = lc.multikey_spec(random.Random(0), n_keys=5, n_values=3, digits=4)
    context_, question, answer = lc.MULTIKEY.render(spec, lc.FILLER_HAYSTACK, 50)
    assert len(spec["distractors"]) == 4 and spec["key"] not in spec["distractors"]
    assert answer == " " + ", ".join(spec["values"]) and "What are all" in question
    assert len(set(spec["values"]) | set(spec["distractors"].values())) == 7  # every value distinct
    for k, v in [(spec["key"], v) for v in spec["values"]] + list(spec["distractors"].items()):
        assert context_.count(f"One of the special magic numbers for {k} is: {v}.") == 1
    spec = lc.vt_spec(random.Random(0), n_chains=3, n_hops=2)
    context_, question, answer = lc.VARIABLE_TRACKING.render(spec, lc.FILLER_HAYSTACK, 40)
    assert answer.split() == spec["names"] and len(spec["all_names"]) == 9 and spec["value"] in question
    chain = spec["names"]
    positions = [context_.index(f"VAR {n} = ") for n in chain]
    assert positions == sorted(positions) and f"VAR {chain[0]} = {spec['value']}." in context_
    assert all(f"VAR {b} = {a}." in context_ for a, b in zip(chain, chain[1:]))
    assert vt_oracle(context_ + question, None) == answer


def test_scoring_rules_and_exact_chance():
    assert lc.score_number(" 48213. The", " 48213") == (True, 1.0)
    assert lc.score_number(" 4821", " 48213") == (False, 0.8)  # the missing digit is wrong
    assert lc.score_number(" 58213", " 48213") == (False, 0.8) and lc.score_number("none", "12") == (False, 0.0)
    assert lc.score_values(" 12, 34 and 56", ["34", "12"]) == (True, 1.0)
    assert lc.score_values(" 12, 3", ["34", "12"]) == (False, 0.5)
    assert lc.score_names(" ABCDE FGHIJ", ["FGHIJ", "ABCDE"]) == (True, 1.0)
    assert lc.score_names(" ABCDE FGHIJ KLMNO", ["FGHIJ", "ABCDE"]) == (False, 1.0)  # an extra name: not exact
    assert lc.number_chance(5) == (pytest.approx(1 / 90000), pytest.approx((1 / 9 + 0.4) / 5))
    assert lc.multikey_chance(1, 2) == (pytest.approx(1 / 36), pytest.approx(2 / 9))
    assert lc.vt_chance(2, 1) == (pytest.approx(1 / 6), pytest.approx(0.5))
    # the per-digit chance is what random numbers of the same form score
    rng = random.Random(0)
    draws = [lc.digit_accuracy(lc.random_number(rng, 3), lc.random_number(rng, 3)) for _ in range(20000)]
    assert sum(draws) / len(draws) == pytest.approx(lc.number_chance(3)[1], abs=0.01)


# ---- tasks: oracle 1, random at chance ------------------------------------------------------------------
CASES = [  # (task, options, oracle, random answer, metric checked against chance, its chance)
    (passkey.TASK, {"lengths": [128, 192], "depths": [0.0, 0.5, 1.0], "n": 60, "digits": 2}, passkey_oracle,
     random_number(2), "accuracy", lc.number_chance(2)[0]),
    (passkey.TASK, {"lengths": [128], "depths": [0.5], "n": 200, "digits": 3}, passkey_oracle,
     random_number(3), "digit_accuracy", lc.number_chance(3)[1]),
    (niah.TASK, {"lengths": [192, 320], "depths": [0.0, 0.5, 1.0], "n": 70, "digits": 1, "haystack": "filler"},
     niah_oracle, random_number(1), "accuracy", lc.number_chance(1)[0]),
    (ruler_multikey.TASK, {"lengths": [400, 520], "n": 120, "n_keys": 3, "n_values": 2, "digits": 1,
                           "haystack": "filler"},
     multikey_oracle, random_values(1, 2), "accuracy", lc.multikey_chance(1, 2)[0]),
    (variable_tracking.TASK, {"lengths": [200, 300], "n": 150, "n_chains": 2, "n_hops": 1}, vt_oracle, random_names(2),
     "accuracy", lc.vt_chance(2, 1)[0]),
]


@pytest.mark.parametrize("task, options, oracle, guess, metric, chance", CASES,
                         ids=[f"{c[0].name}-{c[4]}" for c in CASES])
def test_task_scores_an_oracle_1_and_random_answers_at_chance(tmp_path, task, options, oracle, guess, metric, chance):
    cfg = config(task, **options)
    result = task.run(context(tmp_path / "oracle", FakeGenerator(oracle)), cfg)
    assert all(v == 1.0 for k, v in result.metrics.items() if k != "distractor_rate"), result.metrics
    assert result.plots and (tmp_path / "oracle" / result.plots[0]).read_bytes().startswith(b"\x89PNG")
    assert all(s["n_tokens"] <= s["length"] for s in result.samples)
    result = task.run(context(tmp_path / "random", FakeGenerator(guess, seed=1)), cfg)
    assert within_chance(result.metrics[metric], result.n, chance), (result.metrics, chance)
    if metric == "accuracy":
        assert result.baselines["chance"] == pytest.approx(chance)


def test_niah_grid_is_depth_by_length_and_past_window_lengths_are_marked(tmp_path):
    cfg = config(niah.TASK, lengths=[300, 200], depths=[1.0, 0.0], n=1, haystack="filler")
    result = niah.TASK.run(context(tmp_path, FakeGenerator(lambda p, _r: niah_oracle(p, _r) if "green" in p[:40]
                                                           else " 0")), cfg)
    d = result.details
    assert d["lengths"] == [200, 300] and d["depths"] == [0.0, 1.0] and len(d["grid"]) == 2 and len(d["grid"][0]) == 2
    assert d["by_length"][300]["past_window"] and not d["by_length"][200]["past_window"]  # window: 256
    assert (tmp_path / "niah.png").read_bytes().startswith(b"\x89PNG")
    # the needle at depth 0 precedes the filler, so this oracle misses exactly the depth-0 row
    assert d["grid"] == [[0.0, 0.0], [1.0, 1.0]]


def test_past_window_false_refuses_long_lengths_and_short_lengths_are_named(tmp_path):
    ctx = context(tmp_path, FakeGenerator(passkey_oracle))
    with pytest.raises(WorkbenchError, match=r"passkey.lengths: 300 exceed the window of 256.*past_window true"):
        passkey.TASK.run(ctx, config(passkey.TASK, lengths=[128, 300], past_window=False))
    with pytest.raises(WorkbenchError, match="ruler_multikey.lengths: 40 tokens is too short"):
        ruler_multikey.TASK.run(ctx, config(ruler_multikey.TASK, lengths=[40], haystack="filler"))
    with pytest.raises(ConfigError, match="'passkey.depths'"):
        config(passkey.TASK, depths=[1.5])


def test_position_nll_equals_a_direct_forward(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelSection.of("llama3", "debug")).eval()
    seq = [TOK.bos_id] + TOK.encode("def f(x):\n    return x + 1\n" * 4, add_special_tokens=False)
    total, count, per_seq = ppl_position.position_nll(model, [seq, seq[:20]], 200, head_chunk=16)
    with torch.no_grad():
        logits = model.logits(model({"input_ids": torch.tensor([seq[:-1]])}).hidden)[0].float()
    nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0].double().numpy()
    assert count[0] == 0 and count[1:20].tolist() == [2] * 19 and count[20 : len(seq)].tolist() == [1] * (len(seq) - 20)
    assert total[20 : len(seq)] == pytest.approx(nll[19:], rel=1e-5)
    assert per_seq[0] == pytest.approx(nll.mean(), rel=1e-5)
    assert ppl_position.bin_edges(100, "log2", 0) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert ppl_position.bin_edges(9, "linear", 4) == [1, 3, 5, 7, 9]
