"""DeepSeek-V3 parity with transformers' DeepseekV3ForCausalLM on the tiny config of reference/models.md (fp32, eager).

Logits and every hidden state at atol 1e-5 with a random selection bias (so biased group-limited routing is
exercised), with YaRN and without, with a plain query projection (q_lora_rank None), interleaved and
half-split rope layouts; the experts chosen per token and layer; cached greedy decoding through both MLA
paths (absorbed and expanded) equal to the uncached forward; bit-exact adapter round trips; an exported
directory loading in transformers; `workbench generate --hf-dir` printing transformers' greedy text.
"""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")

from conftest import make_hf_deepseek_v3_dir  # noqa: E402

from workbench.checkpoint.hf import export_hf_dir, load_hf_dir  # noqa: E402
from workbench.checkpoint.hf.deepseek_v3 import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    fit_config,
    state_dict_from_hf,
    state_dict_to_hf,
)
from workbench.checkpoint.safetensors_io import read_dir  # noqa: E402
from workbench.models.deepseek_v3 import DeepSeekV3  # noqa: E402

E, K = 8, 2
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0}


def make_hf(seed: int = 0, **over):
    torch.manual_seed(seed)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
              first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=E, n_shared_experts=1,
              num_experts_per_tok=K, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
              rope_interleave=True, rms_norm_eps=1e-6, initializer_range=0.1, max_position_embeddings=64,
              attn_implementation="eager")
    kw.update(over)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kw)).eval()
    with torch.no_grad():  # random norms and selection biases, so neither can hide behind its default
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    return model


def ours_from(hf_model, backend="sdpa", **over):
    cfg = config_from_hf(hf_model.config.to_dict())
    cfg = fit_config(cfg, hf_model.state_dict())
    for k, v in over.items():
        setattr(cfg, k, v)
    cfg.attn_backend = backend
    model = DeepSeekV3(cfg).eval()
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), cfg), strict=True)
    return model


def hf_chosen_experts(hf, ids):
    """The experts transformers' routers pick, per MoE layer (recorded by a forward hook)."""
    picked = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: picked.append(o[2].sort(-1).values))
             for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        hf(input_ids=ids)
    for h in hooks:
        h.remove()
    return picked


def ours_chosen_experts(model, ids):
    picked = []
    hooks = [block.moe.router.register_forward_hook(lambda m, i, o: picked.append(o[3].sort(-1).values))
             for block in model.layers if hasattr(block, "moe")]
    with torch.no_grad():
        model({"input_ids": ids})
    for h in hooks:
        h.remove()
    return picked


CASES = {
    "default": {},
    "yarn": {"rope_scaling": YARN},
    # a length-dependent scaling: the 40-token prompt runs past max_position_embeddings (16), so the
    # frequencies grow with it (tests/parity/test_rope_hf.py covers generation across the window)
    "dynamic": {"rope_scaling": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                "max_position_embeddings": 16},
    "plain-q": {"q_lora_rank": None},
    "half-split": {"rope_interleave": False},
}


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_hidden_states_and_chosen_experts_match(case, backend):
    hf = make_hf(**CASES[case])
    ours = ours_from(hf, backend)
    assert ours.cfg.mtp_layers == 0  # transformers saves no MTP module
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))  # past the yarn window
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours({"input_ids": ids, "output_hidden_states": True, "output_router_logits": True})
        logits = ours.logits(out.hidden)
    assert len(ref.hidden_states) == len(out.hidden_states)
    for i, (a, b) in enumerate(zip(out.hidden_states[:-1], ref.hidden_states[:-1])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, i=i: f"hidden state {i}: {m}")
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    theirs, mine = hf_chosen_experts(hf, ids), ours_chosen_experts(ours, ids)
    assert len(theirs) == len(mine) == 2
    for layer, (a, b) in enumerate(zip(mine, theirs)):
        assert torch.equal(a, b), f"MoE layer {layer}: experts differ"
    assert (out.aux["expert_counts_per_layer"] > 0).sum() > E  # many experts used: the check is not vacuous


def test_yarn_changes_the_output_and_scales_attention():
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    plain, yarn = ours_from(make_hf()), ours_from(make_hf(rope_scaling=YARN))
    assert yarn.cfg.softmax_scale > plain.cfg.softmax_scale  # m(s, mscale_all_dim)^2 > 1
    assert yarn.rope.attention_factor != 1.0  # mscale 0.707 vs mscale_all_dim 1.0
    with torch.no_grad():
        assert not torch.allclose(plain({"input_ids": ids}).hidden, yarn({"input_ids": ids}).hidden)


@pytest.mark.parametrize("mla_decode", ["absorb", "expand"])
@pytest.mark.parametrize("case", ["default", "yarn"])
def test_cached_decoding_equals_the_uncached_forward_on_both_mla_paths(case, mla_decode):
    ours = ours_from(make_hf(**CASES[case]), mla_decode=mla_decode)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours.logits(ours({"input_ids": ids}).hidden)  # (2, 30, V)
        cache = ours.make_kv_cache(2, 32)
        steps = [ours.logits(ours({"input_ids": ids[:, :20], "kv_cache": cache}).hidden)]
        for t in range(20, 30):
            steps.append(ours.logits(ours({"input_ids": ids[:, t:t + 1], "kv_cache": cache}).hidden))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-5)
    # the cache holds the latent and the rope key only: r + d_r = 16 + 8 numbers per token and layer
    assert [tuple(b.shape[2:]) for b in cache.buffers[0]] == [(16,), (8,)]


def test_absorbed_and_expanded_decode_agree_token_by_token():
    hf = make_hf(rope_scaling=YARN)
    a, b = ours_from(hf, mla_decode="absorb"), ours_from(hf, mla_decode="expand")
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(5))
    ca, cb = a.make_kv_cache(3, 24), b.make_kv_cache(3, 24)
    with torch.no_grad():
        xa, xb = a({"input_ids": ids, "kv_cache": ca}).hidden, b({"input_ids": ids, "kv_cache": cb}).hidden
        torch.testing.assert_close(xa, xb, atol=1e-5, rtol=1e-5)
        nxt = a.logits(xa[:, -1:]).argmax(-1)
        for _ in range(8):
            la = a.logits(a({"input_ids": nxt, "kv_cache": ca}).hidden)
            lb = b.logits(b({"input_ids": nxt, "kv_cache": cb}).hidden)
            torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
            nxt = la.argmax(-1)


def test_adapter_round_trips_every_tensor_bit_exactly(tmp_path):
    hf = make_hf()
    cfg = fit_config(config_from_hf(hf.config.to_dict()), hf.state_dict())
    v5 = hf.state_dict()
    ours = state_dict_from_hf(v5, cfg)
    back = state_dict_to_hf(ours)
    assert sorted(back) == sorted(v5)
    for k in v5:
        assert back[k].dtype == v5[k].dtype and torch.equal(back[k], v5[k]), k
    hf.save_pretrained(tmp_path)  # the hub's per-expert names
    per = read_dir(tmp_path)
    assert any(".mlp.experts.7.down_proj.weight" in k for k in per)
    from_per = state_dict_from_hf(per, cfg)
    assert sorted(from_per) == sorted(ours)
    for k in ours:
        assert torch.equal(from_per[k], ours[k]), k
    again = state_dict_to_hf(from_per, per_expert=True)
    assert sorted(again) == sorted(per)
    for k in per:
        assert torch.equal(again[k], per[k]), k


def test_mtp_weights_travel_under_the_official_names():
    hf = make_hf()
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.mtp_layers == 1  # the config declares one; transformers' weights hold none
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    sd = model.state_dict()
    hf_sd = state_dict_to_hf(sd)
    assert "model.layers.3.eh_proj.weight" in hf_sd and "model.layers.3.shared_head.norm.weight" in hf_sd
    assert "model.layers.3.mlp.experts.gate_up_proj" in hf_sd
    assert torch.equal(hf_sd["model.layers.3.embed_tokens.weight"], sd["tok_embeddings.weight"])
    assert fit_config(cfg, hf_sd).mtp_layers == 1
    back = state_dict_from_hf(hf_sd, cfg)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_config_round_trip_and_refusals():
    for over in ({}, {"rope_scaling": YARN}, {"q_lora_rank": None}):
        cfg = config_from_hf(make_hf(**over).config.to_dict())
        assert config_from_hf(config_to_hf(cfg, 1, 2, None)) == cfg
    good = make_hf().config.to_dict()
    with pytest.raises(Exception, match="num_key_value_heads"):
        config_from_hf({**good, "num_key_value_heads": 2})
    with pytest.raises(Exception, match="rope type 'mrope'"):
        config_from_hf({**good, "rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}})
    with pytest.raises(Exception, match="n_group"):
        config_from_hf({**good, "n_group": 3})


def test_exported_directory_loads_in_transformers_with_equal_logits(tmp_path):
    src = make_hf_deepseek_v3_dir(tmp_path / "src")
    model, tokenizer, section = load_hf_dir(src)
    assert section.family == "deepseek_v3"
    out = export_hf_dir(model, section, tokenizer, tmp_path / "exp", tokenizer_source=src)
    ids = torch.tensor([tokenizer.encode("def spam(eggs):\n    return")])
    with torch.no_grad():
        mine = model.logits(model({"input_ids": ids}).hidden)
        for d in (src, out):
            theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            torch.testing.assert_close(mine, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    again, _, _ = load_hf_dir(out)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # a bf16 export casts the weights but keeps the router biases in float32, as the hub checkpoints do
    stored = read_dir(export_hf_dir(model, section, tokenizer, tmp_path / "bf16", dtype=torch.bfloat16))
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    half, _, _ = load_hf_dir(tmp_path / "bf16")
    assert half.tok_embeddings.weight.dtype == torch.bfloat16  # the weights' dtype, not the biases'


def test_generate_hf_dir_prints_transformers_greedy_text(tmp_path):
    directory = make_hf_deepseek_v3_dir(tmp_path / "dsv3")
    prompt, n = "import os\n\ndef main(", 24
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    expected = tok.decode(model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:],
                          skip_special_tokens=True)
    res = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "--hf-dir", str(directory), "--prompt",
                          prompt, "--max-new-tokens", str(n), "--temperature", "0"],
                         capture_output=True, timeout=300)  # bytes: a generated "\r" must stay one
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode("utf-8") == expected + "\n"
    assert len(expected) > 5  # a real continuation, not an immediate eos


def test_kimi_k2_flavor_matches_transformers_deepseek_v3_and_its_config_json_imports():
    """Kimi K2 is DeepseekV3ForCausalLM with other numbers: the kimi-k2-debug flavor (no group-limited routing,
    routed scaling 2.827, one dense layer, YaRN with beta_fast = beta_slow = 1, theta 5e4, no MTP) loads into
    transformers' class and gives its logits past the YaRN window; its config.json in K2's own form
    (model_type "kimi_k2", the older rope_scaling dict) reads back to the same Config."""
    import dataclasses

    from workbench.models.deepseek_v3 import FLAVORS

    torch.manual_seed(0)
    cfg = dataclasses.replace(FLAVORS["kimi-k2-debug"], init_std=0.1)
    ours = DeepSeekV3(cfg).eval()
    with torch.no_grad():  # random norms and selection biases, as in make_hf
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
        for block in ours.moe_blocks():
            block.moe.router.bias.uniform_(-0.1, 0.1)
    hf_json = config_to_hf(cfg, 1, 2, None)
    k2_json = {k: v for k, v in hf_json.items() if k != "rope_parameters"}
    rope = dict(hf_json["rope_parameters"])
    k2_json.update(model_type="kimi_k2", rope_theta=rope.pop("rope_theta"),
                   rope_scaling={"type": rope.pop("rope_type"), **rope})
    assert k2_json["rope_scaling"]["beta_fast"] == k2_json["rope_scaling"]["beta_slow"] == 1.0
    assert config_from_hf(k2_json) == cfg
    with pytest.raises(Exception, match="model_type"):
        config_from_hf({**k2_json, "model_type": "qwen2"})
    kw = {k: v for k, v in hf_json.items() if k not in ("architectures", "model_type")}
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kw, attn_implementation="eager")).eval()
    assert (hf.config.n_group, hf.config.topk_group, hf.config.routed_scaling_factor) == (1, 1, 2.827)
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours.state_dict()), strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing)
    ids = torch.randint(0, cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))  # window: 64
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        mine = ours.logits(ours({"input_ids": ids}).hidden)
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    theirs, chosen = hf_chosen_experts(hf, ids), ours_chosen_experts(ours, ids)
    assert all(torch.equal(a, b) for a, b in zip(chosen, theirs)) and len(chosen) == cfg.n_layers - 1
