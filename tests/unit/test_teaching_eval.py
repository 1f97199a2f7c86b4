"""The `teaching` eval task: its scorer validated on oracle answers (the chosen ones: 1) and on answers without a
working example (terse, wrong, random text: 0), the task end to end with fake and real generators, and its
bad input."""

import json
import random

import pytest
import torch

from data_pipelines.tokenizer import byte_tokenizer
from evals import registry
from evals.tasks import teaching
from workbench.config import from_dict
from workbench.data.chat import ChatTemplate
from workbench.errors import ConfigError, DataError, WorkbenchError
from workbench.inference.generator import Completion, KVCacheGenerator
from workbench.models.base import ModelSection, build_model

TOK = byte_tokenizer()
TEMPLATE = ChatTemplate(TOK)

RECORDS = [
    {"prompt": "How do I use math.sqrt?", "subject": "math.sqrt", "kind": "wrong", "source": "<built-in math>:0",
     "chosen": "`math.sqrt(x)` returns the square root of x.\nExample:\n>>> import math\n>>> math.sqrt(16)\n4.0",
     "rejected": "`math.sqrt(x)` returns the square root of x.\nExample:\n>>> import math\n>>> math.sqrt(16)\n5.0"},
    {"prompt": "Explain textwrap.dedent with an example.", "subject": "textwrap.dedent", "kind": "terse",
     "source": "textwrap.py:414",
     "chosen": "`textwrap.dedent(text)` removes any common leading whitespace from every line in `text`.\n"
               "Example:\n>>> import textwrap\n>>> textwrap.dedent('  a\\n  b')\n'a\\nb'",
     "rejected": "Use `textwrap.dedent`."},
    {"prompt": "Show me how to call statistics.median.", "subject": "statistics.median", "kind": "wrong",
     "source": "statistics.py:549",
     "chosen": "`statistics.median(data)` returns the median (middle value) of numeric data.\nExample:\n"
               ">>> from statistics import median\n>>> median([1, 3, 5])\n3\n>>> median([1, 3, 5, 7])\n4.0",
     "rejected": "`statistics.median(data)` returns the median (middle value) of numeric data.\nExample:\n"
                 ">>> from statistics import median\n>>> median([1, 3, 5])\n3\n>>> median([1, 3, 5, 7])\n5.0"},
    {"prompt": "How does bisect.bisect work?", "subject": "bisect.bisect", "kind": "terse", "source": "bisect.py:1",
     "chosen": "`bisect.bisect(a, x)`: Return the index where to insert item x in list a.\nExample:\n"
               ">>> import bisect\n>>> bisect.bisect([1, 3, 5, 7], 4)\n2",
     "rejected": "bisect.bisect does what its name says."},
]


class FakeGenerator:
    """A Generator answering each chat prompt with `answer(user text)` and then `<|end|>` and some noise (which
    the task must cut off)."""

    def __init__(self, answer):
        self.answer = answer

    def generate(self, prompts, params):
        out = []
        for p, sp in zip(prompts, params):  # scoring.generate passes one SamplingParams per prompt
            user = TOK.decode(p)  # the role tokens are special: dropped, leaving the user's text
            tokens = TOK.encode(self.answer(user), add_special_tokens=False) + [TEMPLATE.end_id]
            tokens += TOK.encode(" trailing noise", add_special_tokens=False)
            out.append(Completion(prompt_tokens=list(p), tokens=tokens[: sp.max_new_tokens]))
        return out


def context(tmp_path, generator, model=None, max_length=1024):
    return registry.EvalContext(model=model, tokenizer=TOK, generator=generator, out_dir=tmp_path, source={},
                                batch_size=3, max_length=max_length, log=lambda *_: None)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_scorer_gives_oracle_answers_1_and_answers_without_a_working_example_0():
    chosen, checks = teaching.score_answers([r["chosen"] for r in RECORDS])
    assert chosen == {"passes": 1.0, "runs": 1.0, "has_example": 1.0} and all(c["passes"] for c in checks)
    rejected, _ = teaching.score_answers([r["rejected"] for r in RECORDS])
    assert rejected == {"passes": 0.0, "runs": 0.5, "has_example": 0.5}  # two wrong (they run), two terse
    rng = random.Random(0)
    noise = ["".join(rng.choice("abc >()=.\n0123456789'") for _ in range(120)) for _ in range(6)]
    noise += [">>> " + n.replace("\n", " ") for n in noise[:3]]  # prompts followed by junk: found, does not run
    shares, _ = teaching.score_answers(noise)
    assert shares["passes"] == 0.0 and shares["runs"] == 0.0


def test_task_scores_an_oracle_1_and_terse_answers_0_against_the_baselines(tmp_path, data):
    by_prompt = {r["prompt"]: r for r in RECORDS}
    cfg = teaching.Config(data=str(data))
    oracle = teaching.TASK.run(context(tmp_path, FakeGenerator(lambda q: by_prompt[q]["chosen"])), cfg)
    assert oracle.primary == "passes" and oracle.n == 4
    assert oracle.metrics["passes"] == 1.0 and oracle.metrics["runs"] == 1.0 and oracle.metrics["has_example"] == 1.0
    assert oracle.baselines == {"rejected": 0.0, "chosen": 1.0}
    lengths = [len(TOK.encode(r["chosen"], add_special_tokens=False)) for r in RECORDS]
    assert oracle.metrics["mean_answer_tokens"] == sum(lengths) / 4  # the noise after <|end|> is not counted
    sample = oracle.samples[0]
    assert sample["output"] == RECORDS[0]["chosen"] and sample["passes"] and sample["stopped"]
    assert sample["subject"] == "math.sqrt" and (tmp_path / "teaching.png").read_bytes().startswith(b"\x89PNG")

    terse = teaching.TASK.run(context(tmp_path, FakeGenerator(lambda q: "Use it.")), cfg)
    assert terse.metrics["passes"] == 0.0 and terse.metrics["has_example"] == 0.0
    wrong = teaching.TASK.run(context(tmp_path, FakeGenerator(lambda q: by_prompt[q]["rejected"])), cfg)
    assert wrong.metrics["passes"] == 0.0 and wrong.metrics["runs"] == 0.5
    # prompts only: no baselines
    bare = tmp_path / "prompts.jsonl"
    bare.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in RECORDS))
    plain = teaching.TASK.run(context(tmp_path, FakeGenerator(lambda q: by_prompt[q]["chosen"])),
                              teaching.Config(data=str(bare), n=2))
    assert plain.baselines == {} and plain.n == 2 and plain.metrics["passes"] == 1.0


def test_task_with_a_real_model_stops_at_the_end_token(tmp_path, data):
    torch.manual_seed(0)
    model = build_model(ModelSection.of("llama3", "debug")).eval()
    ctx = context(tmp_path, KVCacheGenerator(model, TOK), model=model)
    result = teaching.TASK.run(ctx, teaching.Config(data=str(data), n=2, max_new_tokens=8))
    assert result.n == 2 and result.metrics["passes"] == 0.0 and result.metrics["mean_answer_tokens"] <= 8
    assert all(s["tokens"] <= 8 for s in result.samples)


def test_bad_input_names_the_option_the_file_and_the_record(tmp_path, data):
    with pytest.raises(ConfigError, match="teaching.data.*required"):
        from_dict(teaching.Config, {}, path="teaching")
    with pytest.raises(DataError, match="teaching.data: data file .*nope.jsonl does not exist"):
        from_dict(teaching.Config, {"data": str(tmp_path / "nope.jsonl")}, path="teaching")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"chosen": "x"}\n')
    ctx = context(tmp_path, FakeGenerator(lambda q: ""))
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing key 'prompt'"):
        teaching.TASK.run(ctx, teaching.Config(data=str(bad)))
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: record 1: 'prompt' must be a non-empty string"):
        teaching.TASK.run(ctx, teaching.Config(data=str(bad)))
    with pytest.raises(WorkbenchError, match="prompts .* do not fit with teaching.max_new_tokens = 40"):
        teaching.TASK.run(context(tmp_path, FakeGenerator(lambda q: ""), max_length=64),
                          teaching.Config(data=str(data), max_new_tokens=40))

