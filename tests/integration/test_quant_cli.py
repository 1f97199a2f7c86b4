"""`--quant` through the command line on a tiny trained run: `generate --quant int8` gives the quantized model's
greedy text, `export --quant int8` writes int8 safetensors that `generate --hf-dir` and `eval` read back to the same
text and perplexity, and a bad method is refused by the parser."""

import json

import pytest

from workbench.checkpoint.load import load_for_inference
from workbench.cli import main
from workbench.config import load_config
from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.job import JobConfig

pytestmark = pytest.mark.slow
PROMPT = "def main():"


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run  # conftest: the debug config trained 6 steps, shared by the session


def cli(capsys, *args) -> tuple[int, str, str]:
    """`workbench ARGS` in this process (no interpreter start per call): (status, stdout, stderr)."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def greedy(model, tokenizer, n=10) -> str:
    return KVCacheGenerator(model, tokenizer).generate([tokenizer.encode(PROMPT)], SamplingParams(max_new_tokens=n))[0].text


def test_generate_export_and_eval_with_quant(run, tmp_path, capsys):
    model, tokenizer, _ = load_for_inference(str(run), quant="int8")
    assert model.quantization["method"] == "int8"
    expected = greedy(model, tokenizer)
    rc, out, err = cli(capsys, "generate", "--ckpt", str(run), "--quant", "int8", "--prompt", PROMPT,
                       "--max-new-tokens", "10")
    assert rc == 0, err
    assert out == expected + "\n"
    fp_model, _, _ = load_for_inference(str(run))
    assert not hasattr(fp_model, "quantization")

    folder = tmp_path / "int8"
    rc, _, err = cli(capsys, "export", "--ckpt", str(run), "--quant", "int8", "--out", str(folder))
    assert rc == 0, err
    assert "exported llama3 int8" in err
    assert json.loads((folder / "config.json").read_text())["quantization"]["method"] == "int8"
    rc, out, err = cli(capsys, "generate", "--hf-dir", str(folder), "--prompt", PROMPT, "--max-new-tokens", "10")
    assert rc == 0, err
    assert out == expected + "\n"

    # eval: the exported directory and --quant on the run score the same windows with the same model
    data = str(load_config(JobConfig, run / "config.toml").data.dir)
    rc, _, err = cli(capsys, "eval", "--task", "perplexity", "--hf-dir", str(folder), "--out", str(tmp_path / "e1"),
                     "--perplexity.data", data, "--perplexity.max_documents", "3", "--max-length", "64")
    assert rc == 0, err
    rc, _, err = cli(capsys, "eval", "--task", "perplexity", "--ckpt", str(run), "--quant", "int8",
                     "--out", str(tmp_path / "e2"), "--perplexity.max_documents", "3", "--max-length", "64")
    assert rc == 0, err
    r1 = json.loads((tmp_path / "e1" / "results.json").read_text())
    r2 = json.loads((tmp_path / "e2" / "results.json").read_text())
    assert r1["source"]["quant"] == r2["source"]["quant"] == "int8"
    m1, m2 = r1["tasks"]["perplexity"]["metrics"], r2["tasks"]["perplexity"]["metrics"]
    assert m1["bits_per_byte"] == pytest.approx(m2["bits_per_byte"], rel=1e-6)


def test_quant_flag_refuses_an_unknown_method(run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--ckpt", str(run), "--quant", "int4", "--prompt", PROMPT])
    assert exit_.value.code == 2
    assert "--quant: invalid choice: 'int4'" in capsys.readouterr().err


def test_llm_int8_generation_matches_in_process(run, capsys):
    model, tokenizer, _ = load_for_inference(str(run), quant="llm-int8")
    expected = greedy(model, tokenizer, 6)
    rc, out, err = cli(capsys, "generate", "--ckpt", str(run), "--quant", "llm-int8", "--prompt", PROMPT,
                       "--max-new-tokens", "6")
    assert rc == 0, err
    assert out == expected + "\n"
