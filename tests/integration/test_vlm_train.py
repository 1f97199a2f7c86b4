"""The VLM recipe end to end through the command line, on a tiny vision folder and a tiny paligemma2.

`workbench train` runs the three shipped stages (configs/paligemma2: blind, warm-up, fine-tune) for a few steps
each, shrunk by overrides; then `workbench eval --task vqa` scores the fine-tuned run on the test split beside the
blind run. Checked: the tokenizer trained on the train split sits in the data folder and the run folders, its
<image> is the model's image_token_id; the warm-up starts from the blind run's weights and leaves its language
model bit-identical while the image side moves; the fine-tune moves every part; validation records exact match
per question type; a stage cut back to a checkpoint and resumed gives the same steps bit for bit; the eval writes exact match, the noise-image
check, the majority and blind-run baselines with the margin, per type, and its plots.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from workbench.checkpoint.run import latest_checkpoint, load_model_state
from workbench.cli import main
from workbench.data.tokenizer import Tokenizer
from workbench.train.metrics import METRICS_FILE, read_metrics

SHRINK = ["--model.flavor", "debug", "--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2",
          "--model.n_kv_heads", "1", "--model.head_dim", "16", "--model.ffn_dim", "64",
          "--model.query_pre_attn_scalar", "16", "--model.vocab_size", "300", "--model.vision.image_size", "32",
          "--model.vision.patch_size", "16", "--model.vision.dim", "32", "--model.vision.n_layers", "1",
          "--model.vision.n_heads", "2", "--model.vision.mlp_dim", "64", "--data.vocab_size", "300", "--data.seq_len", "256",
          "--train.micro_batch_size", "8", "--train.log_every", "2", "--train.eval_every", "0",
          "--train.sample_tokens", "4", "--objective.val_questions", "12", "--objective.answer_tokens", "6",
          "--optim.warmup_steps", "1"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    from workbench.data.vision import build_vision_dataset

    root = tmp_path_factory.mktemp("vlm")
    data = build_vision_dataset(root / "diagrams", n_train=24, n_val=4, n_test=6, size=64, seed=1,
                                log=lambda *a: None)
    runs = root / "runs"
    common = ["--run.out_dir", str(runs), "--data.dir", str(data), *SHRINK]
    assert main(["train", "configs/paligemma2/blind.toml", *common, "--train.steps", "4"]) == 0
    assert main(["train", "configs/paligemma2/warmup.toml", *common, "--train.steps", "3",
                 "--train.init_from", str(runs / "vlm-blind")]) == 0
    ft = ["configs/paligemma2/finetune.toml", *common, "--train.init_from", str(runs / "vlm-warmup"),
          "--train.steps", "4", "--train.ckpt_every", "2"]
    assert main(["train", *ft]) == 0
    # a copy cut back to its step-2 checkpoint, resumed: the same steps 3 and 4 (the data cursor continues)
    shutil.copytree(runs / "vlm-finetune", runs / "resumed")
    shutil.rmtree(runs / "resumed" / "checkpoints" / "step-4")
    assert main(["train", *ft, "--run.name", "resumed", "--resume"]) == 0
    assert main(["eval", "--task", "vqa", "--ckpt", str(runs / "vlm-finetune"), "--vqa.blind_run",
                 str(runs / "vlm-blind"), "--vqa.examples", "4"]) == 0
    return data, runs


def weights(run):
    return load_model_state(latest_checkpoint(run))


def test_tokenizer_and_stages(recipe):
    data, runs = recipe
    tok = Tokenizer.from_file(data / "vlm-tokenizer.json")
    assert tok.token_to_id("<image>") == 11 and tok.vocab_size <= 300
    for stage in ("blind", "warmup", "finetune"):
        assert (runs / f"vlm-{stage}" / "tokenizer.json").read_bytes() == (data / "vlm-tokenizer.json").read_bytes()
    blind, warm, fine = (weights(runs / f"vlm-{s}") for s in ("blind", "warmup", "finetune"))
    for name in blind:
        top = name.split(".")[0]
        if top == "language_model":  # frozen in the warm-up: bit-identical to the blind run's
            assert torch.equal(warm[name], blind[name]), name
    for top in ("vision_tower", "multi_modal_projector"):
        assert any(not torch.equal(warm[n], blind[n]) for n in blind if n.startswith(top + ".")), top
    for top in ("vision_tower", "multi_modal_projector", "language_model"):  # full fine-tuning moves every part
        assert any(not torch.equal(fine[n], warm[n]) for n in warm if n.startswith(top + ".")), top


def test_validation_and_resume_records(recipe):
    _, runs = recipe
    recs = read_metrics(runs / "vlm-finetune" / METRICS_FILE)
    val = [r for r in recs if "val_loss" in r]
    assert val and 0 <= val[-1]["val_exact_match"] <= 1
    types = {k for k in val[-1] if k.startswith("val_em_")}
    assert types and all(0 <= val[-1][k] <= 1 for k in types)
    train = {r["step"]: r for r in recs if "loss" in r and "val_loss" not in r}
    resumed = {r["step"]: r for r in read_metrics(runs / "resumed" / METRICS_FILE) if "loss" in r
               and "val_loss" not in r}
    assert resumed[4]["loss_step"] == train[4]["loss_step"]  # bit-identical after the resume
    assert torch.equal(*(weights(runs / r)["multi_modal_projector.weight"] for r in ("vlm-finetune", "resumed")))
    assert json.loads((latest_checkpoint(runs / "resumed") / "train_state.json").read_text())["cursor"] == {
        "position": 4 * 8}


def test_eval_vqa_writes_the_blind_baselines(recipe):
    data, runs = recipe
    out = runs / "vlm-finetune" / "evals" / "step-4"
    task = json.loads((out / "results.json").read_text())["tasks"]["vqa"]
    m, base = task["metrics"], task["baselines"]
    assert set(base) == {"majority (train)", "blind run"}
    assert m["margin_over_blind"] == pytest.approx(m["exact_match"] - base["blind run"])
    assert m["margin_over_majority"] == pytest.approx(m["exact_match"] - base["majority (train)"])
    assert "exact_match_noise" in m and any(k.startswith("blind_em_") for k in m)
    assert task["details"]["split"] == "test" and task["details"]["questions"] > 0
    assert {"vqa_types.png", "vqa_examples.png"} <= set(task["plots"]) and (out / "vqa_types.png").is_file()
    samples = [json.loads(line) for line in (out / "samples" / "vqa.jsonl").read_text().splitlines()]
    assert len(samples) == task["n"] and {"output", "output_noise", "output_blind", "majority"} <= set(samples[0])
    # the majority baseline is the train split's most frequent answer: scored here by hand
    hits = [s["majority"] == " ".join(s["answer"].lower().split()) for s in samples if s["type"] != "caption"]
    assert base["majority (train)"] == pytest.approx(sum(hits) / len(hits))
