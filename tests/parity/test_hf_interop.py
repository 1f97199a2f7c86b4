"""Hugging Face directories: import, export, bit-exact round trips, and greedy text equal to transformers."""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")

from conftest import DEBUG_TOML, make_hf_llama_dir  # noqa: E402

from workbench.checkpoint.hf import export_hf_dir, load_hf_dir  # noqa: E402
from workbench.checkpoint.safetensors_io import INDEX_NAME, read_dir  # noqa: E402


def hf_greedy(directory, prompt: str, n: int) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tie,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_import_export_round_trip_is_bit_exact(tmp_path, tie, dtype):
    src = make_hf_llama_dir(tmp_path / "src", tie=tie, dtype=dtype, max_shard_size="40KB")
    assert (src / INDEX_NAME).is_file()  # really sharded
    model, tokenizer, section = load_hf_dir(src)
    assert next(model.parameters()).dtype == dtype and section.config.tie_embeddings == tie
    out = export_hf_dir(model, section, tokenizer, tmp_path / "out", tokenizer_source=src, max_shard_bytes=40_000)
    a, b = read_dir(src), read_dir(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the config keeps every field that defines the model
    ca, cb = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert ca[key] == cb[key], key
    # and importing the export gives the same model again
    again, _, _ = load_hf_dir(out)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_exported_workbench_model_loads_in_transformers_with_equal_logits(hf_llama_dir, tmp_path):
    model, tokenizer, section = load_hf_dir(hf_llama_dir)
    out = export_hf_dir(model, section, tokenizer, tmp_path / "exp")  # our tokenizer writer, single file
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("def spam(eggs):\n    return")])
    with torch.no_grad():
        ref = theirs(input_ids=ids).logits
        mine = model.logits(model({"input_ids": ids}).hidden)
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(out)("x = 1").input_ids == tokenizer.encode("x = 1")


@pytest.mark.slow
def test_generate_hf_dir_prints_transformers_greedy_text(hf_llama_dir):
    prompt, n = "import os\n\ndef main(", 24
    expected = hf_greedy(hf_llama_dir, prompt, n)
    res = cli("generate", "--hf-dir", str(hf_llama_dir), "--prompt", prompt, "--max-new-tokens", str(n),
              "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"
    assert len(expected) > 5  # a real continuation, not an immediate eos


@pytest.mark.slow
def test_generate_ckpt_run_folder_matches_transformers_on_its_export(tmp_path):
    from workbench.config import load_config
    from workbench.job import JobConfig
    from workbench.train.trainer import Trainer

    job = load_config(JobConfig, DEBUG_TOML,
                      ["--run.out_dir", str(tmp_path), "--train.steps", "8", "--train.sample_tokens", "0"])
    trainer = Trainer(job, log=lambda *_: None)
    trainer.fit()
    run = trainer.run_dir
    exported = tmp_path / "exported"
    assert cli("export", "--ckpt", str(run), "--out", str(exported)).returncode == 0
    short = tmp_path / "exported-short"  # `export RUN_DIR --to hf OUT` is the same command
    assert cli("export", str(run), "--to", "hf", str(short)).returncode == 0
    assert (short / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()
    prompt, n = "class ", 16
    expected = hf_greedy(exported, prompt, n)
    res = cli("generate", "--ckpt", str(run), "--prompt", prompt, "--max-new-tokens", str(n))
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"


def test_export_never_overwrites_and_leaves_no_partial_folder(hf_llama_dir, tmp_path):
    from workbench.errors import CheckpointError

    model, tokenizer, section = load_hf_dir(hf_llama_dir)
    out = export_hf_dir(model, section, tokenizer, tmp_path / "exp", max_shard_bytes=40_000)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        export_hf_dir(model, section, tokenizer, out, dtype=torch.bfloat16)
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(CheckpointError, match="is the source directory"):
        export_hf_dir(model, section, tokenizer, hf_llama_dir, tokenizer_source=hf_llama_dir)
    (tmp_path / "empty").mkdir()
    export_hf_dir(model, section, tokenizer, tmp_path / "empty", dtype=torch.bfloat16)  # an empty folder is fine
    assert not list(tmp_path.glob("*.tmp"))
    again, _, _ = load_hf_dir(tmp_path / "empty")
    assert next(again.parameters()).dtype == torch.bfloat16
