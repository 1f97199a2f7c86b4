"""lm-evaluation-harness on a workbench model: the adapter's numbers against direct forwards, lm-eval's
bits_per_byte against ours, `model="workbench"` on a run folder, and the `lm_eval` harness task.

The lm-eval tasks are local YAMLs over jsonl files (no network): a multiple-choice task, a rolling
perplexity task and a generate_until task, a handful of documents each, on the debug llama3 with the
byte-level tokenizer.
"""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval (the evals / dev extra) is not installed")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from evals.lm_eval_adapter import WorkbenchLM  # noqa: E402
from evals.scoring import bits_per_byte, prefix_ids, rolling_nll  # noqa: E402
from workbench.errors import ConfigError, DataError, WorkbenchError  # noqa: E402
from workbench.inference.generator import KVCacheGenerator, SamplingParams  # noqa: E402
from workbench.nn.attention import MaskSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

MC_DOCS = [
    {"q": "1 + 1 =", "choices": ["2", "3", "11"], "label": 0},
    {"q": "The sky is", "choices": ["blue", "green"], "label": 0},
    {"q": "def f(x):", "choices": ["return x", "pass"], "label": 1},
]
ROLL_DOCS = ["import os\nprint(os.getcwd())  # where am I?", "  hello world  ", "é über naïve ☃", "x" * 40]
GEN_DOCS = [{"prompt": "x = ", "answer": "1"}, {"prompt": "for i in", "answer": " range(3):"}]


def _yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("mc", MC_DOCS), ("roll", [{"text": t} for t in ROLL_DOCS]), ("gen", GEN_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "mc_task.yaml").write_text(_yaml("mc_task", folder / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_target: label\ndoc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")))
    (folder / "roll_task.yaml").write_text(_yaml("roll_task", folder / "roll.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")))
    (folder / "gen_task.yaml").write_text(_yaml("gen_task", folder / "gen.jsonl", (
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n")))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The debug model and byte tokenizer, a folder of lm-eval task YAMLs, and a run folder of the model."""
    from data_pipelines.tokenizer import byte_tokenizer
    from workbench.checkpoint.run import save_checkpoint
    from workbench.config import dumps_toml, load_config
    from workbench.job import JobConfig
    from workbench.models.base import ModelSection, build_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        root = tmp_path_factory.mktemp("lm_eval")
        torch.manual_seed(0)
        model = build_model(ModelSection.of("llama3", "debug"), "cpu").eval()
        tokenizer = byte_tokenizer()
        run_dir = root / "run"
        save_checkpoint(run_dir, 1, model.state_dict(), {"step": 1})
        job = load_config(JobConfig, ROOT / "configs" / "llama3" / "debug.toml")
        (run_dir / "config.toml").write_text(dumps_toml(job))
        tokenizer.save(run_dir / "tokenizer.json")
        yield {"model": model, "tok": tokenizer, "tasks": write_tasks(root / "tasks"), "run": run_dir,
               "seq_len": job.data.seq_len, "manager": TaskManager(include_path=str(root / "tasks"),
                                                                   include_defaults=False)}


def req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of one forward over `ids`: row i is the distribution of token i + 1."""
    x = torch.tensor([ids])
    with torch.no_grad():
        hidden = model({"input_ids": x, "positions": torch.arange(len(ids))[None], "mask": MaskSpec()}).hidden
        return torch.log_softmax(model.logits(hidden)[0].double(), dim=-1)


def direct_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """The reference: move the context's trailing space, prefix + context + continuation in one forward."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = prefix_ids(tok) + tok.encode(stripped, add_special_tokens=False)
    cont = tok.encode(stripped + continuation, add_special_tokens=False)[len(ctx) - len(prefix_ids(tok)):]
    lp = full_logprobs(model, ctx + cont)
    rows = lp[len(ctx) - 1 : len(ctx) - 1 + len(cont)]
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def greedy_pair(model, tok) -> tuple[str, str]:
    """A (context, continuation) whose one-character continuation is the model's greedy next token."""
    prefix = prefix_ids(tok)
    for context in ("a", "b", "x = ", "def", "1 + 1 =", "print(", "the", "import", "zz", "q"):
        ids = prefix + tok.encode(context, add_special_tokens=False)
        best = int(full_logprobs(model, ids)[-1].argmax())
        char = tok.decode([best])
        printable = len(char) == 1 and char.isprintable() and char.strip()
        if printable and tok.encode(char, add_special_tokens=False) == [best]:
            return context, char
    raise AssertionError("no context among the probes has a printable greedy next character")


def test_loglikelihood_equals_one_full_forward(env):
    model, tok = env["model"], env["tok"]
    lm = WorkbenchLM(model, tok, batch_size=3, max_length=64)
    greedy_ctx, greedy_char = greedy_pair(model, tok)
    pairs = [("The sky is", " blue"), ("1 + 1 = ", "2"), ("", "hello"), ("def f(x):\n    ", "return x"),
             (greedy_ctx, greedy_char), ("naïve ", "café ☃")]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (c, x), (ll, greedy) in zip(pairs, got):
        want_ll, want_greedy = direct_loglikelihood(model, tok, c, x)
        assert isinstance(ll, float) and isinstance(greedy, bool)
        assert ll == pytest.approx(want_ll, abs=1e-5), (c, x)
        assert greedy == want_greedy, (c, x)
    assert got[4][1] is True  # the greedy next character is greedy
    # the trailing space moved: "1 + 1 = " + "2" scores " 2" after "1 + 1 ="
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert lm.encode_pair("1 + 1 = ", "2") == (prefix_ids(tok) + enc("1 + 1 ="), enc(" 2"))
    assert lm.encode_pair("", "hi") == (prefix_ids(tok), enc("hi"))
    # a continuation longer than max_length is scored in windows, each token once
    short = WorkbenchLM(model, tok, batch_size=4, max_length=8)
    (ll_long, _), = short.loglikelihood([req("loglikelihood", "ab", "cdefghijklmnopqrstuvwxyz")])
    cont = tok.encode("cdefghijklmnopqrstuvwxyz", add_special_tokens=False)
    nll, n = rolling_nll(model, prefix_ids(tok) + tok.encode("ab", add_special_tokens=False), [cont], 8)[0]
    assert n == len(cont) and ll_long == pytest.approx(-nll, abs=1e-9)


def test_encode_pair_follows_lm_eval_boundary_rule_with_merges():
    """With a BPE that merges across the boundary, the continuation is the tail beyond the encoded context."""
    from data_pipelines.tokenizer import train_bpe

    tok = train_bpe(["the cat sat on the mat; the cat ate the rat"] * 50, 300)
    lm = WorkbenchLM(torch.nn.Linear(1, 1), tok)  # encoding needs no model
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert len(enc(" cat")) == 1  # the merge this test is about
    for context, continuation in (("the cat ", "sat"), ("the c", "at sat"), ("the", " cat")):
        stripped = context.rstrip()
        ctx, cont = lm.encode_pair(context, continuation)
        assert ctx == prefix_ids(tok) + enc(stripped)
        assert cont == enc(context + continuation)[len(enc(stripped)):]
    assert lm.encode_pair("the cat ", "sat")[1] == enc(" sat")
    assert lm.encode_pair("the", " cat")[1] == enc(" cat")


def test_loglikelihood_rolling_windows(env):
    model, tok = env["model"], env["tok"]
    text = "import os\nprint(os.getcwd())  # a text of more than sixteen bytes, " * 2
    tokens = tok.encode(text, add_special_tokens=False)
    prefix = prefix_ids(tok)
    assert len(tokens) > 3 * 16
    # a window covering the text: exactly the full forward's sum
    wide = WorkbenchLM(model, tok, max_length=256)
    (whole,) = wide.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    lp = full_logprobs(model, prefix + tokens)
    assert whole == pytest.approx(float(lp[:-1].gather(1, torch.tensor(tokens)[:, None]).sum()), abs=1e-4)
    # max_length 16: lm-eval's own windows (utils.get_rolling_token_windows), each scored by a forward
    small = WorkbenchLM(model, tok, batch_size=3, max_length=16)
    (rolled,) = small.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix[0], 16, 1)]
    want, predicted = 0.0, []
    for context, pred in windows:
        inputs = (context + pred)[:-1]
        assert len(inputs) <= 16
        rows = full_logprobs(model, inputs)[-len(pred):]
        want += float(rows.gather(1, torch.tensor(pred)[:, None]).sum())
        predicted += pred
    assert predicted == tokens  # every token once
    assert rolled == pytest.approx(want, abs=1e-4)
    nll, n = rolling_nll(model, prefix, [tokens], 16)[0]
    assert n == len(tokens) and rolled == pytest.approx(-nll, abs=1e-9)
    assert abs(rolled - whole) > 1e-3  # less context per token: a different number
    assert small.loglikelihood_rolling([req("loglikelihood_rolling", "")]) == [0.0]


def test_generate_until_is_greedy_kv_cache_text_cut_at_stop(env):
    model, tok = env["model"], env["tok"]
    lm = WorkbenchLM(model, tok, batch_size=2, max_length=64, max_gen_toks=12)
    prefix = prefix_ids(tok)
    gen = KVCacheGenerator(model, tok)
    contexts = ["x = ", "def f(x):", "The sky is"]
    free = [c.text for c in gen.generate([prefix + tok.encode(c, add_special_tokens=False) for c in contexts],
                                         SamplingParams(max_new_tokens=12, temperature=0.0))]
    # a stop string the first completion really produces (from its third character on)
    stop = next(ch for ch in free[0][2:] if ch.isprintable() and ch != "\ufffd")
    requests = [req("generate_until", contexts[0], {"until": [stop, "\n\n"], "max_gen_toks": 12}),
                req("generate_until", contexts[1], {"until": stop, "do_sample": False, "temperature": 0.7}),
                req("generate_until", contexts[2], {"until": [], "max_gen_toks": 5, "temperature": 0})]
    got = lm.generate_until(requests)
    assert got[0] == free[0][: free[0].index(stop)] and len(got[0]) >= 2
    assert got[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])
    five = gen.generate([prefix + tok.encode(contexts[2], add_special_tokens=False)],
                        SamplingParams(max_new_tokens=5, temperature=0.0))[0]
    assert got[2] == five.text and len(five.tokens) == 5
    for kwargs in ({"until": ["\n"], "do_sample": True, "temperature": 0.7}, {"temperature": 1.0},
                   {"do_sample": True}):
        with pytest.raises(ValueError, match="greedily only"):
            lm.generate_until([req("generate_until", "x", kwargs)])


def test_bits_per_byte_agrees_with_our_perplexity(env):
    model, tok = env["model"], env["tok"]
    lm = WorkbenchLM(model, tok, batch_size=4, max_length=16)
    out = lm_eval.simple_evaluate(model=lm, tasks=["roll_task"], task_manager=env["manager"],
                                  bootstrap_iters=0)
    result = out["results"]["roll_task"]
    # ours, as evals/tasks/perplexity.py computes it: every token once after the prefix, per UTF-8 byte
    docs = tok.encode_batch(ROLL_DOCS, add_special_tokens=False)
    scored = rolling_nll(model, prefix_ids(tok), docs, 16, batch_size=4)  # batched as the adapter is
    nll = sum(s[0] for s in scored)
    n_bytes = sum(len(t.encode("utf-8")) for t in ROLL_DOCS)
    assert result["bits_per_byte,none"] == pytest.approx(bits_per_byte(nll, n_bytes), abs=1e-6)
    assert result["byte_perplexity,none"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-9)
    # lm-eval counts words as re.split(r"\s+"): "  hello world  " is 4 "words" (two empty ones)
    words = sum(len(re.split(r"\s+", t)) for t in ROLL_DOCS)
    assert result["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-9)
    assert out["n-samples"]["roll_task"]["effective"] == len(ROLL_DOCS)


def test_simple_evaluate_with_model_name_on_a_run_folder(env):
    lm = WorkbenchLM.create_from_arg_string(f"ckpt={env['run']},batch_size=4")
    assert (lm.batch_size, lm.max_length, lm.max_gen_toks) == (4, env["seq_len"], 256)
    with pytest.raises(ValueError, match="unknown model_args pretrained"):
        WorkbenchLM.create_from_arg_string(f"ckpt={env['run']},pretrained=gpt2")
    out = lm_eval.simple_evaluate(model="workbench", model_args=f"ckpt={env['run']},batch_size=4",
                                  tasks=["mc_task", "gen_task"], task_manager=env["manager"],
                                  bootstrap_iters=0)
    assert out["config"]["model"] == "workbench"
    # the same weights in memory give the same numbers
    mine = WorkbenchLM(env["model"], env["tok"], batch_size=4, max_length=env["seq_len"])
    ref = lm_eval.simple_evaluate(model=mine, tasks=["mc_task", "gen_task"], task_manager=env["manager"],
                                  bootstrap_iters=0)
    for task in ("mc_task", "gen_task"):
        got = [s["filtered_resps"] for s in out["samples"][task]]
        want = [s["filtered_resps"] for s in ref["samples"][task]]
        assert got == want
    assert out["results"]["mc_task"]["acc,none"] == ref["results"]["mc_task"]["acc,none"]
    # acc from our own loglikelihoods: the argmax over the choices' log-likelihoods is the label
    correct = 0
    for doc in MC_DOCS:
        scored = mine.loglikelihood([req("loglikelihood", doc["q"], " " + c) for c in doc["choices"]])
        lls = [ll for ll, _ in scored]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == doc["label"])
    assert out["results"]["mc_task"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))


def test_harness_task_writes_results(env, tmp_path):
    from evals.runner import run_eval

    quiet = dict(ckpt=str(env["run"]), device="cpu", log=lambda *_: None)
    out = run_eval("lm_eval", out=str(tmp_path / "ev"), batch_size=4, **quiet,
                   options={"lm_eval.tasks": ["mc_task"], "lm_eval.include_path": str(env["tasks"])})
    results = json.loads((out / "results.json").read_text())
    task = results["tasks"]["lm_eval"]
    assert task["primary"] == "mc_task/acc" and 0.0 <= task["metrics"]["mc_task/acc"] <= 1.0
    assert task["higher_is_better"] is True and task["n"] == len(MC_DOCS)
    assert task["config"]["tasks"] == ["mc_task"]
    samples = [json.loads(line) for line in (out / "samples" / "lm_eval.jsonl").read_text().splitlines()]
    assert len(samples) == len(MC_DOCS) and {s["task"] for s in samples} == {"mc_task"}
    assert all("acc" in s and len(s["response"]) == len(MC_DOCS[s["doc_id"]]["choices"]) for s in samples)
    assert (out / "lm_eval.png").is_file() and "mc_task/acc" in (out / "report.md").read_text()

    # the command-line form: `--lm_eval.tasks a,b` arrives as one string
    out2 = run_eval("lm_eval", out=str(tmp_path / "ev2"), **quiet,
                    options=["--lm_eval.tasks", "roll_task,gen_task", "--lm_eval.include_path",
                             str(env["tasks"]), "--lm_eval.limit", "2"])
    task = json.loads((out2 / "results.json").read_text())["tasks"]["lm_eval"]
    assert task["primary"] == "roll_task/word_perplexity" and task["higher_is_better"] is False
    want = {"roll_task/bits_per_byte", "roll_task/byte_perplexity", "gen_task/exact_match"}
    assert want <= set(task["metrics"])
    assert not any("stderr" in k for k in task["metrics"]) and task["n"] == 4


def test_config_parsing_and_errors(env, tmp_path):
    from evals.runner import run_eval, task_configs
    from evals.tasks.lm_eval import TASK, Config

    def tasks_of(options):
        return task_configs(["lm_eval"], options)["lm_eval"].tasks

    assert tasks_of(["--lm_eval.tasks", "a,b"]) == ["a", "b"]
    assert tasks_of(["--lm_eval.tasks", '["a", "b"]']) == ["a", "b"]
    assert tasks_of(["--lm_eval.tasks", "hellaswag"]) == ["hellaswag"]
    assert tasks_of(["--lm_eval.tasks", "[a, b]"]) == ["a", "b"]
    assert tasks_of({"lm_eval.tasks": ["a"]}) == ["a"]
    with pytest.raises(ConfigError, match="lm_eval.tasks.*required"):
        task_configs(["lm_eval"], {})
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataError, match=f"include_path.*{missing}.*does not exist"):
        run_eval("lm_eval", ckpt=str(env["run"]), out=str(tmp_path / "ev"), device="cpu",
                 options={"lm_eval.tasks": ["mc_task"], "lm_eval.include_path": str(missing)})
    # lm-eval missing altogether: a one-line error saying what to install
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "lm_eval", None)
        with pytest.raises(WorkbenchError, match=r"lm-eval package is not installed \(pip install lm-eval\)"):
            TASK.run(None, Config(tasks=["mc_task"]))


@pytest.mark.slow
def test_unknown_task_name(env, tmp_path):
    """A name in neither include_path nor lm-eval's built-in tasks (indexing those takes ~20 s)."""
    from evals.runner import run_eval

    with pytest.raises(WorkbenchError, match="unknown lm-eval task 'mc_tsak'.*did you mean mc_task"):
        run_eval("lm_eval", ckpt=str(env["run"]), out=str(tmp_path / "ev"), device="cpu", log=lambda *_: None,
                 options={"lm_eval.tasks": ["mc_tsak"], "lm_eval.include_path": str(env["tasks"])})
