"""RoPE scalings against transformers' rope-initialisation functions, and Hugging Face models that use them.

Each scaling's frequencies (at the original length and at three times it) and attention factor equal
`ROPE_INIT_FUNCTIONS[kind]` for the same parameters; a Llama (and a Mixtral) config.json with that rope type
imports through the shared adapter (`workbench/checkpoint/hf/rope.py`) and gives transformers' logits on a
prompt three times the original window; for the length-dependent ones (dynamic NTK, LongRoPE) greedy
generation from inside the window to far past it gives transformers' tokens.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from workbench.checkpoint.hf import llama3 as llama_adapter  # noqa: E402
from workbench.checkpoint.hf import mixtral as mixtral_adapter  # noqa: E402
from workbench.checkpoint.hf.rope import rope_from_hf, rope_to_hf  # noqa: E402
from workbench.errors import CheckpointError  # noqa: E402
from workbench.models.llama3 import Llama3  # noqa: E402
from workbench.models.mixtral import Mixtral  # noqa: E402
from workbench.nn.rope import RopeConfig, rope_attention_factor, rope_frequencies  # noqa: E402

ORIGINAL = 16
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                    "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.707, "mscale_all_dim": 1.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": ORIGINAL,
                 "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0],
                 "long_factor": [1.0, 1.2, 1.6, 2.2, 3.0, 4.0, 5.5, 7.0]},
}


def llama_config(kind: str, theta: float = 10000.0):
    return transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, initializer_range=0.1,
        max_position_embeddings=ORIGINAL if kind == "dynamic" else 4 * ORIGINAL,  # dynamic scales against it
        rope_parameters={"rope_theta": theta, **SCALINGS[kind]}, attn_implementation="eager")


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_frequencies_and_attention_factor_equal_transformers(kind):
    hf = llama_config(kind, theta=500000.0)
    inv_freq, factor = ROPE_INIT_FUNCTIONS[SCALINGS[kind]["rope_type"]](hf)
    ours = RopeConfig(**rope_from_hf(hf.to_dict(), "config.json", "llama3"))
    torch.testing.assert_close(rope_frequencies(16, ours), inv_freq, rtol=1e-6, atol=0)
    assert rope_attention_factor(ours) == pytest.approx(factor, rel=1e-12)
    for seq_len in (ORIGINAL, 3 * ORIGINAL):  # dynamic and longrope depend on the sequence's length
        theirs, _ = ROPE_INIT_FUNCTIONS[SCALINGS[kind]["rope_type"]](hf, seq_len=seq_len)
        torch.testing.assert_close(rope_frequencies(16, ours, seq_len=seq_len), theirs, rtol=1e-6, atol=0)
    back = rope_from_hf({"rope_parameters": rope_to_hf(ours), "max_position_embeddings": hf.max_position_embeddings},
                        "x", "llama3")
    assert RopeConfig(**back) == ours  # written and read back unchanged


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_a_llama_with_the_scaling_gives_transformers_logits_past_the_original_window(kind):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(llama_config(kind)).eval()
    cfg = llama_adapter.config_from_hf(hf.config.to_dict())
    assert cfg.rope.scaling == SCALINGS[kind]["rope_type"]
    ours = Llama3(cfg).eval()
    ours.load_state_dict(llama_adapter.state_dict_from_hf(hf.state_dict(), cfg), strict=True)
    ids = torch.randint(0, 128, (2, 3 * ORIGINAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours({"input_ids": ids}).hidden), hf(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    assert llama_adapter.config_from_hf(llama_adapter.config_to_hf(cfg)) == cfg


def test_a_mixtral_with_yarn_gives_transformers_logits():
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=4 * ORIGINAL,
        initializer_range=0.1, rope_parameters={"rope_theta": 1e6, **SCALINGS["yarn-mscale"]},
        attn_implementation="eager")).eval()
    cfg = mixtral_adapter.config_from_hf(hf.config.to_dict())
    ours = Mixtral(cfg).eval()
    ours.load_state_dict(mixtral_adapter.state_dict_from_hf(hf.state_dict(), cfg), strict=True)
    ids = torch.randint(0, 128, (1, 3 * ORIGINAL), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours({"input_ids": ids}).hidden), hf(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_unsupported_or_incomplete_rope_settings_are_refused_by_name():
    with pytest.raises(CheckpointError, match="rope type 'mrope' is not supported by llama3"):
        rope_from_hf({"rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}}, "c.json", "llama3")
    with pytest.raises(CheckpointError, match="rope type 'longrope' needs the field 'short_factor'"):
        rope_from_hf({"rope_parameters": {"rope_type": "longrope", "original_max_position_embeddings": 16},
                      "max_position_embeddings": 64}, "c.json", "llama3")
    with pytest.raises(CheckpointError, match="rope type 'linear' needs the field 'factor'"):
        rope_from_hf({"rope_scaling": {"type": "linear"}, "rope_theta": 1e4}, "c.json", "llama3")
    with pytest.raises(CheckpointError, match="not supported by deepseek_v3 \\(default, yarn\\)"):
        rope_from_hf({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "c.json", "deepseek_v3",
                     supported=("default", "yarn"))


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_greedy_generation_across_the_original_window_equals_transformers(kind):
    """The length-dependent scalings change their frequencies during generation: the tokens still agree."""
    from workbench.inference.generator import KVCacheGenerator, SamplingParams

    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(llama_config(kind)).eval()
    cfg = llama_adapter.config_from_hf(hf.config.to_dict())
    ours = Llama3(cfg).eval()
    ours.load_state_dict(llama_adapter.state_dict_from_hf(hf.state_dict(), cfg), strict=True)
    prompt = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    n = 3 * ORIGINAL  # from inside the original window to far past it
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, 10:].tolist()
    mine = KVCacheGenerator(ours, eos_ids=[]).generate([prompt[0].tolist()], SamplingParams(max_new_tokens=n))[0]
    assert mine.tokens == theirs


def test_static_ntk_equals_transformers_dynamic_ntk_where_the_two_coincide():
    """theta * s^(D/(D-2)) is dynamic NTK's base at S = L (2s - 1) / s (there s S / L - (s - 1) = s)."""
    s, L = 4.0, ORIGINAL
    hf = llama_config("dynamic", theta=500000.0)
    theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, seq_len=L * (2 * s - 1) / s)
    ours = rope_frequencies(16, RopeConfig(theta=500000.0, scaling="ntk", factor=s))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    base = rope_frequencies(16, RopeConfig(theta=500000.0))
    assert ours[0] == base[0] and ours[-1] < base[-1] / 3  # the fastest pair kept, the slowest slowed ~s-fold
