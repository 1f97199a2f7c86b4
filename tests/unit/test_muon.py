"""MuonClip (workbench/train/optim/muon.py): Newton-Schulz orthogonalisation, the RMS-matched update, which
parameters get Muon or AdamW, QK-Clip on MHA, GQA and MLA, the config refusals, and training runs (the loss
falls; a resume is bit-identical; the pretrain config of configs/kimi_k2 runs)."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from workbench.config import ConfigError, load_config
from workbench.job import JobConfig
from workbench.models.deepseek_v3 import FLAVORS as DSV3
from workbench.models.deepseek_v3 import DeepSeekV3
from workbench.models.llama3 import FLAVORS as LLAMA
from workbench.models.llama3 import Llama3
from workbench.train.optim import build_optimizer
from workbench.train.optim.muon import (
    NS_COEFFS,
    Muon,
    enable_qk_clip,
    muon_param_groups,
    muon_update,
    newton_schulz5,
    qk_clip_,
    qk_clip_modules,
)

ROOT = Path(__file__).resolve().parents[2]
QUIET = dict(log=lambda *_: None)


def _p5(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = NS_COEFFS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32)])
def test_newton_schulz_keeps_the_singular_vectors_and_maps_singular_values_into_a_band(shape):
    torch.manual_seed(0)
    G = torch.randn(shape, dtype=torch.float64).float()
    O = newton_schulz5(G)
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    # NS5 acts on singular values only: O = U p^5(S / ||G||_F) V^T (the singular vectors are G's)
    want = U @ torch.diag(_p5(S / S.norm())) @ Vh
    torch.testing.assert_close(O.double(), want, atol=2e-5, rtol=0)
    s = torch.linalg.svdvals(O.double())
    assert s.max() < 1.21  # p^5 never exceeds 1.2 on [0, 1]
    # each singular value of G above 1% of ||G||_F comes out in [0.68, 1.14]
    big = S / S.norm() >= 1e-2
    out = _p5(S / S.norm())[big]
    assert big.float().mean() > 0.9 and out.min() > 0.68 and out.max() < 1.14
    if shape[0] != shape[1]:  # a random 1:4 matrix is well conditioned: all of them are in the band
        assert s.min() > 0.68 and s.max() < 1.14
    # close to U V^T itself
    cos = torch.nn.functional.cosine_similarity(O.double().flatten(), (U @ Vh).flatten(), dim=0)
    assert cos > 0.97


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32), (8, 512)])
def test_the_update_rms_is_0_2_times_the_rms_of_the_orthogonalised_singular_values(shape):
    torch.manual_seed(1)
    G = torch.randn(shape)
    u = muon_update(G)
    s = torch.linalg.svdvals(newton_schulz5(G))
    rms = u.pow(2).mean().sqrt()
    # RMS(O sqrt(max(n, m)) 0.2) = 0.2 sqrt(mean_i s_i^2): 0.2 exactly for a semi-orthogonal O
    assert rms.item() == pytest.approx(0.2 * s.pow(2).mean().sqrt().item(), rel=1e-4)
    assert 0.16 < rms < 0.22  # measured 0.163-0.218 over these shapes


def test_stacked_experts_are_orthogonalised_one_by_one_and_gate_up_in_halves():
    torch.manual_seed(2)
    W = torch.randn(3, 16, 8)
    u = muon_update(W)
    for e in range(3):
        torch.testing.assert_close(u[e], muon_update(W[e]), atol=1e-6, rtol=0)
    u2 = muon_update(W, split=2)  # (E, 2F, D): gate rows and up rows are two matrices
    for e in range(3):
        torch.testing.assert_close(u2[e, :8], muon_update(W[e, :8]), atol=1e-6, rtol=0)
        torch.testing.assert_close(u2[e, 8:], muon_update(W[e, 8:]), atol=1e-6, rtol=0)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_muon_gets_hidden_matrices_and_adamw_gets_embeddings_head_and_norms():
    model = DeepSeekV3(DSV3["kimi-k2-debug"])
    groups = muon_param_groups(model, 0.1)
    muon = set().union(*(_names(model, g) for g in groups if g["use_muon"]))
    adam = set().union(*(_names(model, g) for g in groups if not g["use_muon"]))
    assert not muon & adam and muon | adam == {n for n, _ in model.named_parameters()}
    assert {"tok_embeddings.weight", "output.weight", "norm.weight", "layers.0.attention.kv_norm.weight"} <= adam
    assert all(n.endswith("norm.weight") or n in ("tok_embeddings.weight", "output.weight") for n in adam)
    assert {"layers.0.attention.wq_b.weight", "layers.0.attention.wkv_a.weight", "layers.0.feed_forward.w1.weight",
            "layers.1.moe.router.gate.weight", "layers.1.moe.experts.down_proj"} <= muon
    fused = next(g for g in groups if g["use_muon"] and g["split"] == 2)
    assert _names(model, fused) == {"layers.1.moe.experts.gate_up_proj", "layers.2.moe.experts.gate_up_proj"}
    decayed = next(g for g in groups if not g["use_muon"] and g["weight_decay"] > 0)
    assert _names(model, decayed) == {"output.weight"}  # the head: AdamW, decayed; embeddings and norms: not
    tied = Llama3(dataclasses.replace(LLAMA["debug"], tie_embeddings=True))
    adam = set().union(*(_names(tied, g) for g in muon_param_groups(tied, 0.1) if not g["use_muon"]))
    assert "tok_embeddings.weight" in adam and not any(".wq." in n for n in adam)


def test_the_adamw_part_equals_torch_adamw():
    torch.manual_seed(3)
    a, b = torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(7))
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    ours = Muon([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1e-2)
    ref = torch.optim.AdamW([{"params": [a2], "weight_decay": 0.1}, {"params": [b2], "weight_decay": 0.0}], lr=1e-2,
                            betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(4):
        g = torch.randn(5, 4), torch.randn(7)
        a.grad, b.grad, a2.grad, b2.grad = g[0], g[1], g[0].clone(), g[1].clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, a2, atol=1e-7, rtol=0)
    torch.testing.assert_close(b, b2, atol=1e-7, rtol=0)


def test_a_muon_step_is_the_formula():
    torch.manual_seed(4)
    W = torch.nn.Parameter(torch.randn(6, 10))
    W0 = W.detach().clone()
    opt = Muon([{"params": [W], "use_muon": True, "weight_decay": 0.1}], lr=0.05, momentum=0.9)
    g1, g2 = torch.randn(6, 10), torch.randn(6, 10)
    W.grad = g1
    opt.step()
    W1 = W0 - 0.05 * (muon_update(g1) + 0.1 * W0)  # M_1 = G_1
    torch.testing.assert_close(W.detach(), W1, atol=1e-6, rtol=0)
    W.grad = g2
    opt.step()
    W2 = W1 - 0.05 * (muon_update(0.9 * g1 + g2) + 0.1 * W1)  # M_2 = mu M_1 + G_2 (no Nesterov)
    torch.testing.assert_close(W.detach(), W2, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ QK-Clip


def _capture_attention_inputs(model):
    """Forward pre-hooks keeping each attention module's inputs, so it can be rerun alone after the clip
    (rerunning the whole model would change later layers' inputs too)."""
    saved = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, saved=saved: saved.setdefault(mod, args))
             for m in qk_clip_modules(model)]
    return saved, hooks


def _rerun(model, saved):
    for m in qk_clip_modules(model):
        m.qk_max_logit = None
    with torch.no_grad():
        for m, args in saved.items():
            m(*args)
    return {m: m.qk_max_logit.clone() for m in saved}


@pytest.mark.parametrize("kind", ["llama3-gqa", "llama3-mha", "kimi-k2-mla", "mla-plain-q"])
def test_qk_clip_bounds_every_heads_max_logit_and_leaves_the_others_alone(kind):
    torch.manual_seed(5)
    if kind.startswith("llama3"):
        model = Llama3(dataclasses.replace(LLAMA["debug"], n_kv_heads=2 if kind == "llama3-gqa" else 4))
    else:
        model = DeepSeekV3(dataclasses.replace(DSV3["kimi-k2-debug"], q_lora_rank=0 if kind == "mla-plain-q" else 32))
    with torch.no_grad():  # grow the query/key weights so that logits spread out well above 1
        for name, p in model.named_parameters():
            if any(k in name for k in (".wq", ".wk.", ".wkv_b")):
                p.mul_(6.0)
    model.train()
    assert enable_qk_clip(model) == len(model.layers)
    saved, hooks = _capture_attention_inputs(model)
    with torch.no_grad():
        model({"input_ids": torch.randint(0, 512, (2, 40))})
    for h in hooks:
        h.remove()
    before = {m: m.qk_max_logit.clone() for m in saved}
    all_heads = torch.cat(list(before.values()))
    tau = float(all_heads.quantile(0.6))  # about 40% of the heads are above it
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = qk_clip_(model, tau)
    assert metrics["qk_clip_max_logit"] == pytest.approx(float(all_heads.max()))
    assert metrics["qk_clip_heads"] == int((all_heads > tau).sum()) > 0
    assert all(m.qk_max_logit is None for m in saved)  # the records are cleared for the next step
    after = _rerun(model, saved)
    for m in saved:
        hi = before[m] > tau
        # clipped heads land on tau; the others keep their logits exactly
        torch.testing.assert_close(after[m][hi], torch.full_like(after[m][hi], tau), rtol=1e-4, atol=0)
        assert torch.equal(after[m][~hi], before[m][~hi])
        assert (after[m] <= tau * (1 + 1e-4)).all()
    params = dict(model.named_parameters())
    for i, layer in enumerate(model.layers):
        hi = before[layer.attention] > tau
        att = f"layers.{i}.attention"
        if kind.startswith("llama3"):
            D = layer.attention.head_dim
            q_rows = weights[f"{att}.wq.weight"].view(-1, D, 64)
            assert torch.equal(params[f"{att}.wq.weight"].view(-1, D, 64)[~hi], q_rows[~hi])
            assert not torch.equal(params[f"{att}.wq.weight"].view(-1, D, 64)[hi], q_rows[hi]) or not hi.any()
            if kind == "llama3-gqa":  # the shared key heads are left alone
                assert torch.equal(params[f"{att}.wk.weight"], weights[f"{att}.wk.weight"])
            assert torch.equal(params[f"{att}.wv.weight"], weights[f"{att}.wv.weight"])
        else:
            # MLA: the shared rotary key (wkv_a, with the latent) and the values are untouched
            assert torch.equal(params[f"{att}.wkv_a.weight"], weights[f"{att}.wkv_a.weight"])
            kv = params[f"{att}.wkv_b.weight"].view(4, 32, -1)  # (H, dn + dv, r)
            kv0 = weights[f"{att}.wkv_b.weight"].view(4, 32, -1)
            assert torch.equal(kv[:, 16:], kv0[:, 16:]) and torch.equal(kv[~hi], kv0[~hi])
            gamma = tau / before[layer.attention]
            torch.testing.assert_close(kv[hi, :16], kv0[hi, :16] * gamma[hi].sqrt()[:, None, None])
            wq = "wq" if kind == "mla-plain-q" else "wq_b"
            q, q0 = params[f"{att}.{wq}.weight"].view(4, 24, -1), weights[f"{att}.{wq}.weight"].view(4, 24, -1)
            torch.testing.assert_close(q[hi, :16], q0[hi, :16] * gamma[hi].sqrt()[:, None, None])
            torch.testing.assert_close(q[hi, 16:], q0[hi, 16:] * gamma[hi][:, None, None])  # rope rows: gamma
            assert torch.equal(q[~hi], q0[~hi])


def test_qk_clip_uses_the_reduced_maximum_and_skips_unapplied_steps():
    torch.manual_seed(6)
    model = Llama3(LLAMA["debug"]).train()
    enable_qk_clip(model)

    def forward():
        with torch.no_grad():
            model({"input_ids": torch.randint(0, 512, (2, 16))})

    forward()
    w = model.layers[0].attention.wq.weight.detach().clone()
    local = float(torch.cat([m.qk_max_logit for m in qk_clip_modules(model)]).max())
    # a skipped step: the metrics, no change, the records cleared
    out = qk_clip_(model, tau=local / 2, applied=False)
    assert out == {"qk_clip_max_logit": pytest.approx(local), "qk_clip_heads": 0}
    assert torch.equal(model.layers[0].attention.wq.weight, w)
    assert all(m.qk_max_logit is None for m in qk_clip_modules(model))
    # another rank saw 10x larger logits: every head is clipped by the reduced value, identically everywhere
    forward()
    seen = []
    out = qk_clip_(model, tau=local * 5, reduce=lambda t: seen.append(t.clone()) or t * 10)
    assert out["qk_clip_heads"] == sum(int((t * 10 > local * 5).sum()) for t in seen) > 0
    assert not torch.equal(model.layers[0].attention.wq.weight, w)
    # nothing is recorded outside training or with the hook off
    model.eval()
    forward()
    assert all(m.qk_max_logit is None for m in qk_clip_modules(model))


def test_build_optimizer_turns_recording_on_only_with_tau():
    from workbench.job import OptimSection

    model = Llama3(LLAMA["debug"])
    opt = build_optimizer(model, OptimSection(name="muon"))
    assert isinstance(opt, Muon) and not any(m.qk_clip_record for m in qk_clip_modules(model))
    build_optimizer(model, OptimSection(name="adamw", qk_clip_tau=100.0))  # QK-Clip works with any optimizer
    assert all(m.qk_clip_record for m in qk_clip_modules(model))


# ------------------------------------------------------------------------------------------------ configs, runs


def test_muon_and_qk_clip_are_refused_with_zero_and_qk_clip_with_tp_or_cp():
    toml = ROOT / "configs" / "llama3" / "debug.toml"
    with pytest.raises(ConfigError, match=r"optim\.name.*'muon'.*parallel\.backend = 'zero2'"):
        load_config(JobConfig, toml, ["--optim.name", "muon", "--parallel.backend", "zero2"])
    with pytest.raises(ConfigError, match=r"optim\.qk_clip_tau.*parallel\.backend = 'zero3'"):
        load_config(JobConfig, toml, ["--optim.qk_clip_tau", "100", "--parallel.backend", "zero3"])
    with pytest.raises(ConfigError, match=r"optim\.qk_clip_tau.*parallel\.tp > 1"):
        load_config(JobConfig, toml, ["--optim.qk_clip_tau", "100", "--parallel.tp", "2"])
    with pytest.raises(ConfigError, match=r"config key 'optim.ns_steps'"):
        load_config(JobConfig, toml, ["--optim.ns_steps", "0"])


@pytest.mark.parametrize("name", ["pretrain", "extend"])
def test_the_kimi_k2_configs_load_and_validate(name):
    job = load_config(JobConfig, ROOT / "configs" / "kimi_k2" / f"{name}.toml")
    cfg = job.model.config
    assert job.model.flavor == "kimi-k2-debug" and job.optim.name == "muon" and job.optim.qk_clip_tau == 100.0
    assert (cfg.n_groups, cfg.topk_groups, cfg.routed_scaling, cfg.mtp_layers) == (1, 1, 2.827, 0)
    if name == "pretrain":
        assert cfg.rope.scaling == "default" and job.data.seq_len == 64
    else:  # YaRN over the pretraining context, K2's beta 1/1, 4x the context
        assert (cfg.rope.scaling, cfg.rope.factor, cfg.rope.original_max_seq_len) == ("yarn", 4.0, 64)
        assert cfg.rope.beta_fast == cfg.rope.beta_slow == 1.0 and job.data.seq_len == 256


def test_muon_training_lowers_the_loss_and_logs_qk_clip(tmp_path, debug_job):
    from workbench.train.trainer import Trainer

    j = debug_job(tmp_path, "--optim.name", "muon", "--optim.qk_clip_tau", "100", "--train.steps", "12",
                  "--train.eval_tokens", "256", "--optim.lr", "0.01")
    history = Trainer(j, **QUIET).fit()
    assert history[-1]["loss"] < history[0]["loss"] - 0.8  # measured: 6.24 -> 5.10 in 12 steps (AdamW: 5.52)
    assert all(0 < h["qk_clip_max_logit"] < 100 and h["qk_clip_heads"] == 0 for h in history)


def test_a_muon_run_resumes_bit_identically(tmp_path, debug_job):
    from workbench.train.trainer import Trainer

    args = ("--optim.name", "muon", "--optim.qk_clip_tau", "100", "--train.steps", "4", "--train.eval_tokens", "256")
    full = Trainer(debug_job(tmp_path / "a", *args), **QUIET).fit()
    crashed = Trainer(debug_job(tmp_path / "b", *args), **QUIET)
    for _ in range(2):
        crashed.train_step()
    crashed.save()
    momentum = {n: crashed.engine.optimizer.state[p]["momentum_buffer"].clone()
                for n, p in crashed.model.named_parameters() if n.endswith("wq.weight")}
    del crashed
    resumed = Trainer(debug_job(tmp_path / "b", *args), resume=True, **QUIET)
    for n, p in resumed.model.named_parameters():
        if n in momentum:
            assert torch.equal(resumed.engine.optimizer.state[p]["momentum_buffer"], momentum[n])
    tail = resumed.fit()
    assert [h["loss"] for h in tail] == [h["loss"] for h in full[2:]]
    assert [h["grad_norm"] for h in tail] == [h["grad_norm"] for h in full[2:]]
    assert [h["qk_clip_max_logit"] for h in tail] == [h["qk_clip_max_logit"] for h in full[2:]]


def test_the_kimi_k2_pretrain_config_runs(tmp_path, debug_data):
    from workbench.train.trainer import Trainer

    j = load_config(JobConfig, ROOT / "configs" / "kimi_k2" / "pretrain.toml",
                    ["--run.out_dir", str(tmp_path), "--data.dir", str(debug_data), "--train.steps", "2",
                     "--train.eval_tokens", "128", "--optim.qk_clip_tau", "0.05"])
    history = Trainer(j, **QUIET).fit()
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    # a tau below the initial logits: some MLA heads are clipped on the first step
    assert history[0]["qk_clip_max_logit"] > 0.05 and history[0]["qk_clip_heads"] > 0


def test_validation_batches_feed_no_qk_clip_record(tmp_path, debug_job):
    """The trainer validates in eval mode: held-out batches never count toward a step's S_max."""
    from workbench.train.trainer import Trainer

    trainer = Trainer(debug_job(tmp_path, "--optim.qk_clip_tau", "100", "--train.eval_tokens", "256"), **QUIET)
    modules = qk_clip_modules(trainer.model)
    assert modules and all(m.qk_clip_record and m.qk_max_logit is None for m in modules)
    trainer.evaluate()
    assert all(m.qk_max_logit is None for m in modules) and trainer.model.training
    trainer.train_step()  # a training step records, and its hook clears the records again
    assert all(m.qk_max_logit is None for m in modules)


def test_the_recorded_max_logit_under_moba_counts_only_the_picked_blocks():
    from workbench.nn.attention import MaskSpec, repeat_kv
    from workbench.nn.moba import MobaSpec, moba_mask
    from workbench.nn.qk_clip import head_max_logits

    torch.manual_seed(7)
    B, T, H, KV, D, scale = 2, 29, 4, 2, 8, 0.3
    q, k = torch.randn(B, H, T, D), torch.randn(B, KV, T, D)
    spec = MaskSpec(moba=MobaSpec(block_size=4, topk=2))
    scores = torch.matmul(q, repeat_kv(k, H // KV).transpose(2, 3)) * scale  # (B, H, T, T)
    allowed = moba_mask(q, k, spec, 0)  # (B, H, T, T)
    expected = scores.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))
    got = head_max_logits(q.transpose(1, 2), k.transpose(1, 2), spec, 0, scale, max_elements=300)  # 3 row blocks
    torch.testing.assert_close(got, expected)
    causal = scores.masked_fill(~MaskSpec().dense(T, T), float("-inf")).amax(dim=(0, 2, 3))
    assert (got <= causal).all() and (got < causal).any()  # the blocks MoBA skipped held larger logits
