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


def assert_one_line_error(rc, err, *needles, after_log: bool = False):
    """Exit status 2 and one `error: ` line naming each needle; `after_log`: progress lines may precede it."""
    assert rc == 2
    lines = err.splitlines()
    assert [i for i, line in enumerate(lines) if line.startswith("error: ")] == [len(lines) - 1], err
    assert after_log or len(lines) == 1, err
    for n in needles:
        assert str(n) in lines[-1], (n, lines[-1])


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
def trained_run(tmp_path_factory, debug_data):
    from workbench.config import load_config
    from workbench.job import JobConfig
    from workbench.train.trainer import Trainer

    out = tmp_path_factory.mktemp("runs")
    job = load_config(JobConfig, DEBUG_TOML, ["--run.out_dir", str(out), "--data.dir", str(debug_data),
                                              "--train.steps", "2", "--train.sample_tokens", "0"])
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
    # the short form `export RUN_DIR --to hf OUT`: one model, one output, a known format
    assert_one_line_error(*run_cli(capsys, "export", str(tmp_path), "--to", "onnx", str(tmp_path / "y")),
                          "--to", "expected 'hf'")
    assert_one_line_error(*run_cli(capsys, "export", str(tmp_path), "--hf-dir", str(hf_llama_dir), "--to", "hf",
                                   str(tmp_path / "y")), "give the model once")
    assert_one_line_error(*run_cli(capsys, "export", "--to", "hf", str(tmp_path / "y")), "which model")
    assert_one_line_error(*run_cli(capsys, "export", "--hf-dir", str(hf_llama_dir)), "where to")


def test_override_missing_its_value(capsys):
    assert_one_line_error(*run_cli(capsys, "train", str(DEBUG_TOML), "--optim.lr", "--train.steps", "3"),
                          "--optim.lr", "value is missing")


def test_tokenizer_too_big_for_the_model_is_caught_in_the_config(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "train", str(DEBUG_TOML), "--data.vocab_size", "1024",
                                   "--run.out_dir", str(tmp_path)),
                          "data.vocab_size", "model.vocab_size (512)")
    assert not list(tmp_path.iterdir())


# --- data and training input (the data-and-training issue)


def write_tree(root: Path, n: int, text: str = "def f(x):\n    return x + {i}\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"m{i}.py").write_text(text.format(i=i) * 40)
    return root


def train_argv(tmp_path, *extra):
    return ("train", str(DEBUG_TOML), "--run.out_dir", str(tmp_path / "runs"), "--data.dir",
            str(tmp_path / "data"), "--train.sample_tokens", "0", *extra)


@pytest.mark.parametrize("command", ["data", "train"])
def test_nonexistent_data_path(capsys, tmp_path, command):
    argv = train_argv(tmp_path, "--data.source", str(tmp_path / "nope"))
    assert_one_line_error(*run_cli(capsys, command, *argv[1:]), str(tmp_path / "nope"), "does not exist",
                          after_log=command == "train")
    assert not list(tmp_path.iterdir())  # no data folder, no run folder


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "blank.py").write_text("   \n")
    (tmp_path / "src" / "notes.bin").write_bytes(b"\0" * 100)
    assert_one_line_error(*run_cli(capsys, *train_argv(tmp_path, "--data.source", str(tmp_path / "src"))),
                          str(tmp_path / "src"), "no files with extensions", ".py", after_log=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_corpus_of_one_document(capsys, tmp_path):
    src = write_tree(tmp_path / "src", 1)
    assert_one_line_error(*run_cli(capsys, "data", *train_argv(tmp_path, "--data.source", str(src))[1:]),
                          "1 document", "at least 2")
    assert not (tmp_path / "data").exists()


def test_unknown_flavor(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, *train_argv(tmp_path, "--model.flavor", "7Q")),
                          "model.flavor", "7Q", "2M")
    assert not list(tmp_path.iterdir())


def test_data_folder_built_from_other_settings_is_not_overwritten(capsys, tmp_path):
    src = write_tree(tmp_path / "src", 6)
    argv = train_argv(tmp_path, "--data.source", str(src))[1:]
    assert run_cli(capsys, "data", *argv)[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    assert_one_line_error(*run_cli(capsys, "data", *argv, "--data.vocab_size", "300"),
                          "data.vocab_size", "--force")
    assert_one_line_error(*run_cli(capsys, *train_argv(tmp_path, "--data.source", str(src),
                                                       "--data.val_fraction", "0.5")), "data.val_fraction",
                          after_log=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before
    assert not (tmp_path / "runs").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert_one_line_error(*run_cli(capsys, "data", *argv, "--data.dir", str(tmp_path / "other")),
                          "not a workbench dataset")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["keep.txt"]


def test_resume_with_a_dataset_tokenized_by_another_tokenizer(capsys, tmp_path):
    src = write_tree(tmp_path / "src", 8)
    argv = train_argv(tmp_path, "--data.source", str(src), "--train.steps", "2", "--data.seq_len", "32")
    assert run_cli(capsys, *argv)[0] == 0
    write_tree(src, 8, "class C{i}:\n    pass\n")  # the same settings, other text: another tokenizer
    assert run_cli(capsys, "data", *argv[1:], "--force")[0] == 0
    run = tmp_path / "runs" / "llama3-debug"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert_one_line_error(*run_cli(capsys, *argv, "--resume"), "tokenizer.json", "another tokenizer",
                          after_log=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_checkpoint_of_another_model_shape(capsys, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = (run / "config.toml").read_text()
    (run / "config.toml").write_text(config.replace("n_layers = 2", "n_layers = 3"))
    rc, err = run_cli(capsys, "generate", "--ckpt", str(run), "--prompt", "x")
    assert_one_line_error(rc, err, "model.safetensors", "layers.2")
