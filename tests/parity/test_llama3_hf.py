"""Llama 3 parity with transformers' LlamaForCausalLM on tiny random configs (fp32, eager attention).

Covers the llama3 RoPE scaling (all three frequency bands), GQA, MHA, tied and untied embeddings, and
both attention backends. Hidden states are compared block by block, logits at atol 1e-5.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")

from workbench.checkpoint.hf.llama3 import config_from_hf, state_dict_from_hf  # noqa: E402
from workbench.models.llama3 import Llama3  # noqa: E402

ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

CASES = {
    "llama3-rope-gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   rope_parameters=ROPE_LLAMA3),
    "default-rope-mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama3-rope-mqa-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                 rope_parameters=ROPE_LLAMA3),
}


def make_hf(case: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, head_dim=32,
        rms_norm_eps=1e-5, max_position_embeddings=256, attn_implementation="eager", **CASES[case])
    model = transformers.LlamaForCausalLM(cfg).eval()
    # random norms too, so a swapped or missing norm weight cannot hide behind all-ones
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def ours_from(hf_model, backend="sdpa"):
    cfg = config_from_hf(hf_model.config.to_dict())
    cfg.attn_backend = backend
    model = Llama3(cfg).eval()
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), cfg), strict=True)
    return model


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_hidden_states_match(case, backend):
    hf = make_hf(case)
    ours = ours_from(hf, backend)
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(1))  # past the 64-token original window
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours({"input_ids": ids, "output_hidden_states": True})
        logits = ours.logits(out.hidden)
    # HF: embeddings, then each block's output; its last entry is after the final norm
    assert len(ref.hidden_states) == len(out.hidden_states)
    for i, (a, b) in enumerate(zip(out.hidden_states[:-1], ref.hidden_states[:-1])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, i=i: f"hidden state {i}: {m}")
    torch.testing.assert_close(out.hidden, ref.hidden_states[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert out.aux == {}


def test_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from workbench.nn.rope import RopeConfig, rope_frequencies

    hf = make_hf("llama3-rope-gqa-untied")
    theirs, scale = ROPE_INIT_FUNCTIONS["llama3"](hf.config, torch.device("cpu"))
    ours = rope_frequencies(32, config_from_hf(hf.config.to_dict()).rope)
    assert scale == 1.0
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    # the config really spans the three bands: some unchanged, some divided by the factor, some blended
    ratio = theirs / rope_frequencies(32, RopeConfig(theta=500000.0))
    assert (ratio == 1).any() and (ratio == 1 / 8).any() and ((ratio > 1 / 8) & (ratio < 1)).any()


def test_logits_at_selected_positions():
    ours = ours_from(make_hf("llama3-rope-gqa-untied"))
    ids = torch.randint(0, 256, (3, 12))
    with torch.no_grad():
        h = ours({"input_ids": ids}).hidden
        full = ours.logits(h)
        last = ours.logits(h, positions=torch.tensor([11]))
        per_row = ours.logits(h, positions=torch.tensor([[0, 5], [3, 3], [11, 1]]))
    torch.testing.assert_close(last[:, 0], full[:, 11])
    torch.testing.assert_close(per_row[1, 0], full[1, 3])
    torch.testing.assert_close(per_row[2], full[2, [11, 1]])
