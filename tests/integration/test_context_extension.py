"""The context-extension recipe (launch/context_extension.sh, docs/context-extension.md) in a tiny mode: its
pieces connect, not its accuracy. A corpus with passkey documents mixed in; a short pretraining; a new run
started from it (`train.init_from`) with YaRN; the passkey eval on the extended model; the report writer.
Also the errors of `init_from` and of the mixing options."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipelines.shards import build_dataset
from workbench.checkpoint.load import load_run
from workbench.checkpoint.run import latest_checkpoint, load_model_state
from workbench.config import load_config
from workbench.errors import CheckpointError, ConfigError, DataError
from workbench.job import JobConfig
from workbench.models.base import ModelSection, build_model
from workbench.train.trainer import Trainer, load_init_weights

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN, EXTEND = ROOT / "configs/llama3/passkey-pretrain.toml", ROOT / "configs/llama3/passkey-extend.toml"
QUIET = dict(log=lambda *_: None)
# the recipe's configs shrunk: the debug model, a slice of the standard library, a few steps
TINY = ["--model.flavor", "debug", "--model.vocab_size", "512", "--data.max_bytes", "40000",
        "--data.vocab_size", "300", "--train.micro_batch_size", "2", "--train.eval_tokens", "256",
        "--train.log_every", "1"]


def test_recipe_configs_are_the_documented_extension():
    pre, ext = load_config(JobConfig, PRETRAIN), load_config(JobConfig, EXTEND)
    assert pre.data.seq_len == 256 and pre.data.passkey_fraction > 0
    rope = ext.model.config.rope
    assert rope.scaling == "yarn" and rope.original_max_seq_len == pre.data.seq_len
    assert rope.factor * rope.original_max_seq_len == ext.model.config.max_seq_len == 4096
    assert ext.train.init_from == "runs/passkey-pretrain" and ext.data.seq_len > pre.data.seq_len
    assert ext.data.tokenizer == "runs/passkey-pretrain/tokenizer.json"
    # the weights of one fit the other: only RoPE and max_seq_len differ between the model configs
    a, b = pre.model.config, ext.model.config
    assert [f for f in vars(a) if getattr(a, f) != getattr(b, f)] == ["rope", "max_seq_len"]
    script = ROOT / "launch/context_extension.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "passkey-pretrain.toml" in script.read_text() and "passkey-extend.toml" in script.read_text()


def test_passkey_documents_interleave_at_the_pace_of_the_corpus():
    from data_pipelines.corpus import Document, interleave, passkey_documents

    keys = passkey_documents(3000, [1, 5], seed=7)
    assert sum(len(d.text) for d in keys) >= 3000 and keys == passkey_documents(3000, [1, 5], seed=7)
    assert all(d.text.startswith("The ") and "What is the pass key? The pass key is " in d.text for d in keys)
    assert len(passkey_documents(1, [0, 0])) == 2  # one per split at least
    corpus = [Document(f"c{i}", "x" * 1000) for i in range(3)]
    mixed = interleave(corpus, keys)
    assert sorted(d.path for d in mixed) == sorted(d.path for d in corpus + keys)
    where = [i for i, d in enumerate(mixed) if d.path.startswith("c")]  # spread out, not bunched at one end
    assert where[0] < len(mixed) / 3 and where[-1] > len(mixed) / 2


def test_passkey_options_are_validated():
    with pytest.raises(ConfigError, match=r"'data.passkey_filler'.*\[min, max\]"):
        load_config(JobConfig, PRETRAIN, ["--data.passkey_filler", "[9, 3]"])
    with pytest.raises(ConfigError, match="'data.passkey_fraction'"):
        load_config(JobConfig, PRETRAIN, ["--data.passkey_fraction", "1.0"])


def test_tiny_recipe_pretrain_extend_with_yarn_and_evaluate(tmp_path):
    from evals.runner import run_eval

    runs = tmp_path / "runs"
    # 1. data with passkeys mixed in, and a few pretraining steps at 64 tokens
    pre = load_config(JobConfig, PRETRAIN, [*TINY, "--run.out_dir", str(runs), "--data.dir", str(tmp_path / "d64"),
                                            "--data.seq_len", "64", "--data.passkey_filler", "[0, 3]",
                                            "--data.passkey_fraction", "0.5", "--train.steps", "2"])
    manifest = build_dataset(pre.data, **QUIET)
    assert manifest.build["passkey_fraction"] == 0.5 and manifest.build["passkey_filler"] == [0, 3]
    from workbench.data.shards import read_texts

    for split in ("train", "val"):
        texts = [t for _, t in read_texts(pre.data.dir, split, **QUIET)]
        keyed = [t for t in texts if "What is the pass key?" in t]
        assert keyed and len(keyed) < len(texts)  # both kinds in both splits
        if split == "train":  # the passkey share of the text is the asked-for fraction (to a document or so)
            assert 0.4 < sum(map(len, keyed)) / sum(map(len, texts)) < 0.6
    trainer = Trainer(pre, **QUIET)
    trainer.fit()
    pre_run = trainer.run_dir

    # 2. a new run from its weights, with YaRN x4 over the original 64 tokens, at 128 tokens
    ext = load_config(JobConfig, EXTEND, [
        *TINY, "--run.out_dir", str(runs), "--data.dir", str(tmp_path / "d128"), "--data.seq_len", "128",
        "--data.tokenizer", str(pre_run / "tokenizer.json"), "--data.passkey_filler", "[4, 8]",
        "--train.init_from", str(pre_run), "--train.steps", "1", "--model.rope.factor", "4",
        "--model.rope.original_max_seq_len", "64", "--model.max_seq_len", "256"])
    extend = Trainer(ext, **QUIET)
    start = load_model_state(latest_checkpoint(pre_run))
    assert all(torch.equal(extend.model.state_dict()[k], v) for k, v in start.items())  # the pretrained weights
    assert extend.step == 0  # a new run, not a resume
    extend.fit()
    model, _, section = load_run(extend.run_dir)
    assert section.config.rope.scaling == "yarn" and model.rope.attention_factor > 1  # YaRN's temperature

    # 3. the passkey eval on the extended model, past its trained window, and the report writer
    out = run_eval("passkey", ckpt=str(extend.run_dir), out=str(extend.run_dir / "evals" / "passkey"),
                   options=["--passkey.lengths", "[128, 256]", "--passkey.depths", "[0.5]", "--passkey.n", "1"],
                   batch_size=2, device="cpu", **QUIET)
    assert (out / "results.json").is_file()
    pre_out = run_eval("passkey", ckpt=str(pre_run), out=str(pre_run / "evals" / "passkey"),
                       options=["--passkey.lengths", "[128]", "--passkey.depths", "[0.5]", "--passkey.n", "1"],
                       batch_size=2, device="cpu", **QUIET)
    assert (pre_out / "results.json").is_file()
    doc, image = tmp_path / "doc.md", tmp_path / "plot.png"
    doc.write_text("# hand-written\n\nkept\n")
    argv = sys.argv
    sys.argv = ["report", "--runs", str(runs), "--doc", str(doc), "--image", str(image)]
    try:
        runpy.run_path(str(ROOT / "launch/context_extension_report.py"), run_name="__main__")
    finally:
        sys.argv = argv
    text = doc.read_text()
    assert text.startswith("# hand-written\n\nkept\n") and "| pretrained (256, RoPE) | " in text
    assert "| 128 | 256 |" in text and image.read_bytes().startswith(b"\x89PNG")

    # init_from refuses weights that do not fit, naming the tensor, and another tokenizer's run
    other = build_model(ModelSection.of("llama3", "debug", vocab_size=512, ffn_dim=96))
    with pytest.raises(CheckpointError, match=r"train\.init_from.*feed_forward\.w1\.weight.*\(96, 64\)"):
        load_init_weights(other, str(pre_run), manifest.tokenizer_sha256, **QUIET)
    with pytest.raises(DataError, match=r"train\.init_from.*not the tokenizer"):
        load_init_weights(other, str(pre_run), "0" * 64, **QUIET)
    with pytest.raises(ConfigError, match=r"train\.init_from.*not found"):
        load_init_weights(other, str(tmp_path / "missing"), manifest.tokenizer_sha256, **QUIET)
