"""Bad input gives one clear line naming the thing, and a non-zero exit; nothing is half-done.

Each case runs the real CLI entry point (`workbench.cli.main`) in-process; one case runs the installed
console script in a subprocess to pin the process exit status.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEBUG_TOML

from workbench.cli import main

pytest.importorskip("transformers", reason="transformers (the dev extra) builds the HF directories")


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


@pytest.fixture
def hf_copy(hf_llama_dir, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(hf_llama_dir, dst)
    return dst


def gen(directory):
    return ("generate", "--hf-dir", str(directory), "--prompt", "x", "--max-new-tokens", "2")


def test_malformed_config_toml(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = = 3\n")
    assert_one_line_error(*run_cli(capsys, "train", str(bad)), str(bad), "invalid TOML")


def test_config_with_wrong_value_names_the_key(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nflavor = "2M"\nn_kv_heads = 3\n')
    assert_one_line_error(*run_cli(capsys, "train", str(bad), "--run.out_dir", str(tmp_path)),
                          "model.n_kv_heads", "must divide n_heads")
    assert not (tmp_path / "run").exists()


def test_missing_hf_dir(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, *gen(tmp_path / "nowhere")), "nowhere", "not found")


def test_hf_dir_without_config(capsys, hf_copy):
    (hf_copy / "config.json").unlink()
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), "config.json", "not found")


def test_corrupt_config_json(capsys, hf_copy):
    (hf_copy / "config.json").write_text('{"hidden_size": 64,')
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), "config.json", "not valid JSON")


def test_unsupported_architecture(capsys, hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), "BertModel", "not supported", "LlamaForCausalLM")


def test_config_missing_a_field(capsys, hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    del cfg["intermediate_size"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), "config.json", "intermediate_size")


def test_missing_shard(capsys, hf_copy):
    shard = sorted(hf_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), shard.name, "not found")


def test_truncated_safetensors(capsys, hf_copy):
    shard = sorted(hf_copy.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), shard.name, "truncated or corrupt")


def test_garbage_safetensors_header(capsys, hf_copy):
    shard = sorted(hf_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), shard.name)


def test_weights_that_do_not_fit_the_config(capsys, hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), "feed_forward.w1.weight", "shape", "(96, 64)")


def test_tokenizer_bigger_than_the_model_vocabulary(capsys, hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["vocab_size"] = 300  # the tokenizer has 320 tokens
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), "320", "300")


def test_missing_tokenizer(capsys, hf_copy):
    (hf_copy / "tokenizer.json").unlink()
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), "tokenizer.json")


def test_pickle_only_directory_is_refused(capsys, hf_copy):
    for f in hf_copy.glob("model*.safetensors*"):
        f.unlink()
    (hf_copy / "pytorch_model.bin").write_bytes(b"not loaded")
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), ".bin", "safetensors")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from workbench.config import load_config
    from workbench.job import JobConfig
    from workbench.train.trainer import Trainer

    out = tmp_path_factory.mktemp("runs")
    job = load_config(JobConfig, DEBUG_TOML,
                      ["--run.out_dir", str(out), "--train.steps", "2", "--train.sample_tokens", "0"])
    trainer = Trainer(job, log=lambda *_: None)
    trainer.fit()
    return trainer.run_dir


def test_bit_flipped_checkpoint_is_refused(capsys, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = next((run / "checkpoints").glob("step-*")) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit inside tensor data: safetensors itself cannot notice
    weights.write_bytes(bytes(data))
    rc, err = run_cli(capsys, "generate", "--ckpt", str(run), "--prompt", "x")
    assert_one_line_error(rc, err, "model.safetensors", "sha256")


def test_run_folder_without_checkpoints(capsys, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "checkpoints")
    assert_one_line_error(*run_cli(capsys, "generate", "--ckpt", str(run), "--prompt", "x"), "no complete checkpoint")


def test_incomplete_checkpoint_is_skipped_for_the_previous_complete_one(capsys, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    step = next((run / "checkpoints").glob("step-*"))
    shutil.copytree(step, run / "checkpoints" / "step-99")
    (run / "checkpoints" / "step-99" / "COMPLETE").unlink()
    (run / "checkpoints" / "step-99" / "model.safetensors").write_bytes(b"partial")
    rc, err = run_cli(capsys, "generate", "--ckpt", str(run), "--prompt", "x", "--max-new-tokens", "2")
    assert rc == 0, err


def test_console_script_exit_status(tmp_path):
    script = Path(sys.executable).parent / "workbench"  # the installed entry point
    res = subprocess.run([str(script), "generate", "--hf-dir", str(tmp_path / "none"),
                          "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [f"error: model directory {tmp_path / 'none'}: not found"]


def test_hf_config_errors_use_the_hf_field_names(capsys, hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(capsys, *gen(hf_copy)), "config.json", "'num_key_value_heads'",
                          "num_attention_heads (4)")


@pytest.mark.parametrize("flags,needle", [
    (["--top-p", "0"], "--top-p: expected a number > 0"),
    (["--temperature", "-1"], "--temperature: expected a number >= 0"),
    (["--stop", ""], "--stop: stop strings must not be empty"),
])
def test_generate_flag_errors_name_the_flag(capsys, hf_llama_dir, flags, needle):
    assert_one_line_error(*run_cli(capsys, *gen(hf_llama_dir), *flags), needle)


def test_cuda_on_a_machine_without_one_names_the_flag(capsys, hf_llama_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU, so --device cuda is valid here")
    assert_one_line_error(*run_cli(capsys, *gen(hf_llama_dir), "--device", "cuda"), "--device", "no CUDA GPU")


def test_export_errors(capsys, hf_llama_dir, tmp_path):
    assert_one_line_error(*run_cli(capsys, "export", "--hf-dir", str(hf_llama_dir), "--out", str(tmp_path / "x"),
                                   "--max-shard-mb", "0"), "--max-shard-mb", "> 0")
    (tmp_path / "file").write_text("")
    assert_one_line_error(*run_cli(capsys, "export", "--hf-dir", str(hf_llama_dir), "--out", str(tmp_path / "file")),
                          "file", "already exists")
    assert_one_line_error(*run_cli(capsys, "export", "--hf-dir", str(hf_llama_dir), "--out", str(hf_llama_dir)),
                          "source directory")


def test_override_missing_its_value(capsys):
    assert_one_line_error(*run_cli(capsys, "train", str(DEBUG_TOML), "--optim.lr", "--train.steps", "3"),
                          "--optim.lr", "value is missing")


def test_tokenizer_too_big_for_the_model_is_caught_in_the_config(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "train", str(DEBUG_TOML), "--data.vocab_size", "1024",
                                   "--run.out_dir", str(tmp_path)),
                          "data.vocab_size", "model.vocab_size (512)")
    assert not list(tmp_path.iterdir())
