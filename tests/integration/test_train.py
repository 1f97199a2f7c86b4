"""The trainer end to end on the debug flavor: learning, the run folder, resume, accumulation, NaN guard."""

import json

import pytest
import torch

from workbench.checkpoint.run import MARKER, list_checkpoints, verify
from workbench.config import load_config
from workbench.errors import ConfigError, DataError, WorkbenchError
from workbench.job import JobConfig
from workbench.train.trainer import Trainer

QUIET = dict(log=lambda *_: None)


def test_debug_run_learns_and_writes_a_complete_run_folder(tmp_path, debug_job):
    j = debug_job(tmp_path, "--train.steps", "40", "--train.ckpt_every", "10", "--train.keep_last", "2")
    trainer = Trainer(j, **QUIET)
    history = trainer.fit()
    losses = [h["loss"] for h in history]
    assert losses[0] > 6.0  # about ln(512) at initialization
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # and clearly lower after 40 steps
    run = trainer.run_dir
    assert load_config(JobConfig, run / "config.toml") == j
    assert (run / "tokenizer.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(5, 41, 5)) and all(r["gflops"] > 0 for r in train)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 40]  # at the start and the end
    assert val[1]["val_loss"] < val[0]["val_loss"] and 0 < val[1]["val_bpb"] < val[0]["val_bpb"]
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG") and any((run / "tb").iterdir())
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step-30", "step-40"]  # keep_last = 2
    for c in ckpts:
        verify(c)
        assert (c / MARKER).is_file() and (c / "engine" / "dcp" / ".metadata").is_file()
        assert json.loads((c / "train_state.json").read_text())["cursor"]["position"] == int(c.name[5:]) * 8
    # report.md, rewritten at each checkpoint and at the end: lists the kept checkpoints, embeds both plots
    assert trainer.report_path == run / "report.md"
    report = trainer.report_path.read_text()
    assert report.startswith(f"# {run.name}\n") and "step 40 / 40" in report
    assert "| 30 |" in report and "`checkpoints/step-30`" in report and "`checkpoints/step-40`" in report
    assert "`checkpoints/step-20`" not in report  # removed by keep_last before the report was rewritten
    for name in ("loss.png", "lr.png"):
        assert f"]({name})" in report and (run / name).read_bytes().startswith(b"\x89PNG")
    assert "- tokens/s: median " in report and "GFLOP/s: median " in report
    assert f"parameters: {trainer.n_params:,}" in report and "parallel layout: single on 1 rank" in report
    assert trainer.sample("def ", 8)  # the trained model generates through the Generator


def test_resume_continues_bit_identically(tmp_path, debug_job):
    full = Trainer(debug_job(tmp_path / "a", "--train.steps", "6"), **QUIET).fit()
    crashed = Trainer(debug_job(tmp_path / "b", "--train.steps", "6"), **QUIET)
    for _ in range(3):
        crashed.train_step()
    crashed.save()
    assert "| 3 |" in (crashed.run_dir / "report.md").read_text()  # the report follows each checkpoint
    del crashed  # the process "dies" after its step-3 checkpoint
    resumed = Trainer(debug_job(tmp_path / "b", "--train.steps", "6"), resume=True, **QUIET)
    assert resumed.step == 3 and resumed.cursor.position == 24
    tail = resumed.fit()
    assert [h["loss"] for h in tail] == [h["loss"] for h in full[3:]]
    assert [h["grad_norm"] for h in tail] == [h["grad_norm"] for h in full[3:]]


def test_a_run_folder_is_not_overwritten_without_resume(tmp_path, debug_job):
    Trainer(debug_job(tmp_path, "--train.steps", "1"), **QUIET).fit()
    with pytest.raises(WorkbenchError, match="already has checkpoints: pass --resume"):
        Trainer(debug_job(tmp_path, "--train.steps", "1"), **QUIET)


def test_gradient_accumulation_gives_the_same_steps(tmp_path, debug_job):
    one = Trainer(debug_job(tmp_path / "a", "--train.steps", "3", "--train.micro_batch_size", "8"), **QUIET).fit()
    two = Trainer(debug_job(tmp_path / "b", "--train.steps", "3", "--train.micro_batch_size", "4",
                      "--train.grad_accum", "2"), **QUIET).fit()
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["tokens"] == b["tokens"] == 8 * 64


def test_non_finite_loss_skips_the_update_and_names_the_step(tmp_path, debug_job):
    messages = []
    trainer = Trainer(debug_job(tmp_path, "--train.steps", "3"), log=messages.append)
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real_loss = trainer.objective.loss

    def poisoned(models, mb, n):
        out = real_loss(models, mb, n)
        out.loss = out.loss * float("nan")
        return out

    trainer.objective.loss = poisoned
    rec = trainer.train_step()
    assert rec["skipped"] and any("step 2" in m and "not applied" in m for m in messages)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resume_refuses_changes_that_make_it_another_run(tmp_path, debug_job):
    Trainer(debug_job(tmp_path, "--train.steps", "2"), **QUIET).fit()
    for override, key in ((["--optim.lr", "0.5"], "optim.lr"), (["--data.seq_len", "32"], "data.seq_len"),
                          (["--run.seed", "7"], "run.seed"), (["--train.steps", "4"], "train.steps"),
                          (["--model.n_layers", "3"], "model.n_layers")):
        with pytest.raises(ConfigError, match=f"config key '{key}': --resume keeps the run's settings"):
            Trainer(debug_job(tmp_path, "--train.steps", "2", *override), resume=True, **QUIET)
    # cadence and sampling may change
    t = Trainer(debug_job(tmp_path, "--train.steps", "2", "--train.log_every", "1", "--train.sample_tokens", "3"),
                resume=True, **QUIET)
    assert t.step == 2


def test_resume_of_a_finished_run_trains_nothing_and_rewrites_nothing(tmp_path, debug_job):
    first = Trainer(debug_job(tmp_path, "--train.steps", "2"), **QUIET)
    first.fit()
    ckpt = list_checkpoints(first.run_dir)[-1]
    stamp = (ckpt / MARKER).stat().st_mtime_ns
    again = Trainer(debug_job(tmp_path, "--train.steps", "2"), resume=True, **QUIET)
    assert again.fit() == []
    assert list_checkpoints(first.run_dir) == [ckpt] and (ckpt / MARKER).stat().st_mtime_ns == stamp


def test_resume_flag_on_a_new_run_starts_it(tmp_path, debug_job):
    t = Trainer(debug_job(tmp_path, "--train.steps", "1"), resume=True, **QUIET)
    assert t.resume_from is None and t.step == 0
    t.fit()
    assert [c.name for c in list_checkpoints(t.run_dir)] == ["step-1"]


def test_metrics_have_no_duplicate_steps_after_a_crash_and_resume(tmp_path, debug_job):
    crashed = Trainer(debug_job(tmp_path, "--train.steps", "6", "--train.log_every", "1", "--train.ckpt_every", "2"),
                      **QUIET)
    real_step = crashed.train_step

    def dies_at_step_4():
        if crashed.step == 3:  # step 3 was logged, its checkpoint never written
            raise KeyboardInterrupt
        return real_step()

    crashed.train_step = dies_at_step_4
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    resumed = Trainer(debug_job(tmp_path, "--train.steps", "6", "--train.log_every", "1", "--train.ckpt_every", "2"),
                      resume=True, **QUIET)
    assert resumed.step == 2
    resumed.fit()
    records = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 6]


def test_sequence_longer_than_the_corpus_is_a_clear_error(tmp_path, debug_job):
    with pytest.raises(DataError, match="config key 'data.seq_len': 100000000 is longer than the whole train split"):
        Trainer(debug_job(tmp_path, "--data.seq_len", "100000000"), **QUIET)
    assert not (tmp_path / "llama3-debug").exists()


def test_bf16_precision_autocasts_on_cpu_too(tmp_path, debug_job):
    t = Trainer(debug_job(tmp_path, "--train.steps", "1", "--run.precision", "bf16"), **QUIET)
    assert t.engine.autocast_dtype == torch.bfloat16
    mb = t.next_micro_batches()[0]
    out = t.engine.forward({"input_ids": mb["input_ids"]})
    assert t.engine.logits(out.hidden).dtype == torch.bfloat16  # matmuls run in bf16
    assert next(t.model.parameters()).dtype == torch.float32  # weights stay fp32
    auto = Trainer(debug_job(tmp_path / "auto", "--train.steps", "1"), **QUIET)
    assert auto.engine.autocast_dtype is None  # precision = "auto" is fp32 on a CPU (bf16 on CUDA)


def test_validation_loss_and_bits_per_byte_follow_their_definitions(tmp_path, debug_job):
    import math

    from workbench.data.packed import IGNORE_INDEX
    from workbench.nn.attention import MaskSpec

    t = Trainer(debug_job(tmp_path, "--train.steps", "1", "--train.eval_tokens", "512"), **QUIET)
    rec = t.evaluate()
    nll, text_nll, text_bytes = [], 0.0, 0
    sizes = t.tokenizer.token_bytes()
    with torch.no_grad():
        for b in t.val_batches():
            hidden = t.model({"input_ids": b["input_ids"], "positions": b["positions"],
                              "mask": MaskSpec(document_ids=b["document_ids"])}).hidden
            logp = torch.log_softmax(t.model.logits(hidden).double(), -1)
            for row, labels in zip(logp, b["labels"]):
                for lp, label in zip(row, labels.tolist()):
                    if label == IGNORE_INDEX:
                        continue
                    nll.append(-float(lp[label]))
                    if sizes[label]:  # eos and other special tokens are no text
                        text_nll += nll[-1]
                        text_bytes += sizes[label]
    assert len(t.val_batches()) == 1 and t.val_batches()[0]["input_ids"].numel() == 512  # eval_tokens
    assert rec["val_loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert rec["val_bpb"] == pytest.approx(text_nll / math.log(2) / text_bytes, rel=1e-5)


@pytest.mark.parametrize("n_shared", [0, 1])  # 1: the always-on shared expert beside the routed ones
def test_a_mixtral_run_optimizes_the_balance_loss_beside_the_lm_loss(tmp_path, debug_job, n_shared):
    j = debug_job(tmp_path, "--model.family", "mixtral", "--model.flavor", "debug", "--train.steps", "12",
                  "--train.log_every", "4", "--train.grad_accum", "2", "--train.micro_batch_size", "4",
                  "--model.n_shared_experts", str(n_shared))
    trainer = Trainer(j, **QUIET)
    history = trainer.fit()
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    for h in history:  # Switch's loss is top_k = 2 at perfect balance; the load is max / mean >= 1
        assert 1.9 < h["balance_loss"] < 4.0 and h["expert_load"] >= 1.0
        assert h["aux_loss"] == pytest.approx(0.02 * h["balance_loss"], rel=1e-4)
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "balance_loss" in r] == [4, 8, 12]


def test_a_deepseek_v3_run_trains_mtp_and_moves_the_router_biases_which_a_resume_continues(tmp_path, debug_job):
    import shutil

    from safetensors.torch import load_file

    j = debug_job(tmp_path, "--model.family", "deepseek_v3", "--model.flavor", "debug", "--train.steps", "8",
                  "--train.log_every", "4", "--train.grad_accum", "2", "--train.micro_batch_size", "4",
                  "--model.bias_update_rate", "0.01", "--train.ckpt_every", "4")
    trainer = Trainer(j, **QUIET)
    history = trainer.fit()
    assert history[-1]["loss"] < history[0]["loss"]
    for h in history:
        # at perfect balance the sequence-wise loss is 1 per MoE layer (3 here, the MTP block's included)
        assert 1.0 < h["balance_loss"] < 6.0 and 1.0 <= h["expert_load"] <= h["expert_load_max"]
        assert 3.0 < h["mtp_loss"] < 8.0  # the MTP head's cross-entropy, near ln(512) = 6.2 this early
        # each step moves every bias by -gamma, 0 or +gamma
        assert 0.0 < h["router_bias_absmax"] <= 0.01 * h["step"] + 1e-6
        assert h["aux_loss"] > 0
    bias = trainer.engine.unwrap().layers[1].moe.router.bias
    torch.testing.assert_close(bias, torch.round(bias / 0.01) * 0.01)  # whole multiples of gamma
    saved = load_file(str(trainer.run_dir / "checkpoints" / "step-8" / "model.safetensors"))
    assert torch.equal(saved["layers.1.moe.router.bias"], bias)  # the balancing state is in the checkpoint
    assert all(saved[k].abs().max() >= 0.02 for k in saved if k.endswith("router.bias"))  # every router, MTP's too
    # a run stopped at step 4 and resumed ends with the same biases (and weights) as the uninterrupted one
    again = tmp_path / "again"
    shutil.copytree(trainer.run_dir, again)
    shutil.rmtree(again / "checkpoints" / "step-8")
    Trainer(j, run_dir=again, resume=True, **QUIET).fit()
    resumed = load_file(str(again / "checkpoints" / "step-8" / "model.safetensors"))
    for name in saved:
        assert torch.equal(resumed[name], saved[name]), name


def test_a_chunked_loss_trains_exactly_as_the_whole_logits_loss(tmp_path, debug_job):
    """objective.loss_chunk through the trainer (accumulation, the step's global target count, clipping): the same
    losses and gradient norms as the default run, step by step (fp32), for a chunk that divides no micro-batch."""
    runs = {}
    for chunk in (0, 100):
        j = debug_job(tmp_path / str(chunk), "--train.steps", "4", "--train.log_every", "1", "--train.grad_accum", "2",
                      "--train.micro_batch_size", "2", "--objective.loss_chunk", str(chunk))
        runs[chunk] = Trainer(j, **QUIET).fit()
    for key in ("loss", "grad_norm"):
        assert [h[key] for h in runs[100]] == pytest.approx([h[key] for h in runs[0]], rel=1e-5)
    assert runs[0][-1]["loss"] < runs[0][0]["loss"]
