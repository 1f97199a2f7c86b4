"""workbench.parallel.memory_plan: the formulas on hand-computed cases, against memory measured on small CPU
models, and the `workbench plan-context` command's parsing."""

from __future__ import annotations

import pytest

from workbench.cli import main
from workbench.errors import ConfigError
from workbench.models import deepseek_v3, llama3
from workbench.parallel import memory_plan as mp


def test_token_counts_and_patterns():
    assert mp.parse_tokens("128k") == 131072 and mp.parse_tokens("1M") == 1048576 and mp.parse_tokens("4096") == 4096
    for bad in ("12q", "0", "1.5", "k"):
        with pytest.raises(ConfigError, match="--seq-len"):
            mp.parse_tokens(bad)
    # causal (query, key) pairs, T = 5: dense 1+2+3+4+5; window 2: 1+2+2+2+2; MoBA B=2, k=1 sees min(t, 2)
    assert mp.Pattern.parse("dense").pairs(5) == 15
    assert mp.Pattern.parse("sliding:2").pairs(5) == 9
    moba = mp.Pattern.parse("moba:2:1")
    assert moba.pairs(5) == 9 and moba.gate_pairs(5) == 1 + 1 + 2 + 2 + 3  # ceil(t / 2)
    assert mp.Pattern.parse("sliding:4k").cached(1 << 20) == 4096
    for bad in ("moba:4", "window:8", "sliding:x", "moba:64:0"):
        with pytest.raises(ConfigError, match="--pattern"):
            mp.Pattern.parse(bad)


def test_llama_debug_activations_by_hand():
    """Llama-3 debug (d 64, H 4, KV 2, D 16, F 192, V 512, L 2), fp32, T = 256, flash kernel."""
    cfg = llama3.FLAVORS["debug"]
    d, H, KV, D, F, V, T = 64, 4, 2, 16, 192, 512, 256
    norm = 4 * d + 2 * 4 * d + 4  # fp32 input, normalised, output, 1/rms
    layer = 2 * norm + 4 * (2 * H * D + 2 * KV * D) + 4 * H + 4 * 4 * F
    head = norm + 4 * V + 2 * 4 * D  # final norm, log-softmax, the cos / sin tables
    got = mp.activation_bytes("llama3", cfg, T, 1, 4, "flash", "none")
    assert got["saved"] == T * (2 * layer + head) == 3_519_488
    full = mp.activation_bytes("llama3", cfg, T, 1, 4, "flash", "full")
    assert full["saved"] == T * (2 * 4 * d + head) and full["recompute"] == T * layer
    # eager: + probabilities 4 H T per token and a T x T boolean mask per layer
    eager = mp.activation_bytes("llama3", cfg, T, 1, 4, "eager", "none")["saved"]
    assert eager - got["saved"] == 2 * T * (4 * H * T + 4 * (2 * H * D - 2 * KV * D) - 4 * H) + 2 * T * T


def test_real_shapes():
    p8 = mp.plan("llama3:8B", 131072)
    assert mp._counts("llama3", llama3.FLAVORS["8B"]).params == 8_030_261_248  # Meta's Llama-3-8B
    assert p8.weights == 2 * 8_030_261_248 and p8.optimizer == 12 * 8_030_261_248
    # KV cache: 32 layers x (k, v) x 8 heads x 128 x 2 bytes = 128 KiB per token
    assert p8.kv_cache == 131072 * 128 * 1024
    # DESIGN.md's convention: 6 N + 12 L H Q T
    n_matmul = 8_030_261_248 - 128256 * 4096 - (2 * 32 + 1) * 4096  # no embedding lookup, no norms
    assert p8.flops_per_token_convention - 6 * n_matmul == 12 * 32 * 32 * 128 * 131072
    # cp shards the activations and the parameters; MLA caches (512 + 64) per token and layer
    v3 = mp.plan("deepseek_v3:671B", 1 << 20, cp=8, ep=8, ac="full")
    assert v3.kv_cache == (1 << 20) / 8 * 61 * 576 * 2
    k2 = mp._counts("deepseek_v3", mp.resolve_model("kimi-k2")[2])
    assert 1.02e12 < k2.params < 1.05e12  # "1.04T parameters"
    assert mp.plan("llama3:8B", 1 << 20, pattern="sliding:4096").attn_fwd < p8.attn_fwd * 64 / 8


@pytest.mark.parametrize("family,backend,ac,lengths", [
    ("llama3", "sdpa", "none", (256, 1024)),
    ("llama3", "sdpa", "full", (256, 1024)),
    ("llama3", "math", "none", (256, 512)),
    ("deepseek_v3", "math", "none", (256, 512)),
    ("deepseek_v3", "sdpa", "full", (256, 512)),
])
def test_prediction_matches_measured_memory(family, backend, ac, lengths):
    """Saved activations within 0.1% (in fact to the few bytes of loss scalars and expert offsets); weights,
    gradients, AdamW moments and the filled KV / MLA cache exactly."""
    for T in lengths:
        r = mp.measure(family, T, ac, backend)
        assert abs(r["act_error"]) < 1e-3 and abs(r["act_measured"] - r["act_predicted"]) <= 128, r
        assert r["weights_measured"] == r["weights_predicted"] == r["grads_measured"]
        assert r["optimizer_measured"] == r["optimizer_predicted"]
        assert r["kv_measured"] == r["kv_predicted"]


def test_cli_table_and_errors(capsys):
    assert main(["plan-context", "--model", "llama3:debug", "--seq-len", "1k", "--cp", "1,2"]) == 0
    out = capsys.readouterr().out
    assert out.count("| llama3:debug | 1k |") == 2
    for argv, option in ((["--seq-len", "12q"], "--seq-len"), (["--cp", "3"], "--cp"), (["--cp", "0"], "--cp"),
                         (["--pattern", "moba:4"], "--pattern"), (["--model", "llama3:9B"], "--model"),
                         (["--ac", "partial"], "--ac"), (["--ep", "3", "--cp", "2"], "--ep"),
                         (["--tp", "1,2"], "--tp"), (["--kernel", "triton"], "--kernel")):
        assert main(["plan-context", "--model", "llama3:debug", "--seq-len", "4k", *argv]) == 2
        assert f"error: {option}" in capsys.readouterr().err


def test_kimi_k2_shape():
    cfg = mp.resolve_model("deepseek_v3:kimi-k2")[2]
    assert (cfg.n_experts, cfg.n_heads, cfg.n_dense_layers, cfg.vocab_size) == (384, 64, 1, 163840)
    assert mp.resolve_model("kimi-k2")[2] == cfg and isinstance(cfg, deepseek_v3.Config)
