"""Mixtral parity with transformers' MixtralForCausalLM on the tiny config of reference/models.md (fp32, eager).

Logits and every hidden state at atol 1e-5, the experts chosen per token and layer, the Switch balance
loss from our summed aux against `out.aux_loss`, bit-exact adapter round trips (5.x stacked and 4.x
per-expert names), a directory exported by us loading in transformers, and `workbench generate --hf-dir`
printing transformers' greedy text.
"""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")

from conftest import make_hf_mixtral_dir  # noqa: E402

from workbench.checkpoint.hf import export_hf_dir, load_hf_dir  # noqa: E402
from workbench.checkpoint.hf.mixtral import config_from_hf, state_dict_from_hf, state_dict_to_hf  # noqa: E402
from workbench.checkpoint.safetensors_io import read_dir  # noqa: E402
from workbench.models.mixtral import Mixtral  # noqa: E402
from workbench.models.moe import switch_balance_loss  # noqa: E402
from workbench.nn.attention import MaskSpec  # noqa: E402

E, K = 4, 2


def make_hf(seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=K, output_router_logits=True,
        initializer_range=0.1, attn_implementation="eager", **over)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms, so a swapped or missing norm weight cannot hide behind all-ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def ours_from(hf_model, backend="sdpa"):
    cfg = config_from_hf(hf_model.config.to_dict())
    cfg.attn_backend = backend
    model = Mixtral(cfg).eval()
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), cfg), strict=True)
    return model


def run_both(hf, ours, ids, attention_mask=None):
    batch = {"input_ids": ids, "output_hidden_states": True, "output_router_logits": True}
    if attention_mask is not None:
        batch["mask"] = MaskSpec(key_padding=attention_mask.bool())
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True, output_router_logits=True)
        out = ours(batch)
        logits = ours.logits(out.hidden)
    return ref, out, logits


@pytest.mark.parametrize("sliding_window", [None, 8])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_logits_hidden_states_and_chosen_experts_match(backend, sliding_window):
    hf = make_hf(sliding_window=sliding_window)
    ours = ours_from(hf, backend)
    assert ours.cfg.sliding_window == sliding_window
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    ref, out, logits = run_both(hf, ours, ids)
    assert len(ref.hidden_states) == len(out.hidden_states)
    for i, (a, b) in enumerate(zip(out.hidden_states[:-1], ref.hidden_states[:-1])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, i=i: f"hidden state {i}: {m}")
    torch.testing.assert_close(out.hidden, ref.hidden_states[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert len(out.aux["router_logits"]) == len(ref.router_logits) == 2
    for layer, (a, b) in enumerate(zip(out.aux["router_logits"], ref.router_logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        chosen, theirs = a.softmax(-1).topk(K).indices, b.softmax(-1).topk(K).indices  # (B*T, k)
        assert torch.equal(chosen, theirs), f"layer {layer}: experts differ"
    # every expert is used somewhere, so the comparison is not vacuous
    assert (out.aux["expert_counts_per_layer"] > 0).all()


def test_sliding_window_changes_the_output():
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ours_from(make_hf())({"input_ids": ids}).hidden
        windowed = ours_from(make_hf(sliding_window=8))({"input_ids": ids}).hidden
    torch.testing.assert_close(full[:, :8], windowed[:, :8])  # inside the window nothing changes
    assert not torch.allclose(full[:, 8:], windowed[:, 8:])


def test_balance_loss_from_summed_aux_equals_transformers_aux_loss():
    hf = make_hf()
    ours = ours_from(hf)
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(2))
    ref, out, _ = run_both(hf, ours, ids)
    assert out.aux["tokens"].item() == 2 * 3 * 17  # summed over layers, like the reference's concatenation
    mine = switch_balance_loss(out.aux, E, K)
    assert abs(mine.item() - ref.aux_loss.item()) < 1e-6


def test_balance_loss_with_padding_equals_transformers():
    hf = make_hf()
    ours = ours_from(hf)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    attn = torch.ones(2, 12, dtype=torch.long)
    attn[0, 9:] = 0  # right padding in one row
    ref, out, _ = run_both(hf, ours, ids, attn)
    assert out.aux["tokens"].item() == 2 * 21
    assert abs(switch_balance_loss(out.aux, E, K).item() - ref.aux_loss.item()) < 1e-6


def test_adapter_round_trips_every_tensor_bit_exactly(tmp_path):
    hf = make_hf()
    cfg = config_from_hf(hf.config.to_dict())
    v5 = hf.state_dict()
    ours = state_dict_from_hf(v5, cfg)
    back = state_dict_to_hf(ours)
    assert sorted(back) == sorted(v5)
    for k in v5:
        assert back[k].dtype == v5[k].dtype and torch.equal(back[k], v5[k]), k
    # transformers' own save writes the hub's per-expert names: they import to the same tensors
    hf.save_pretrained(tmp_path)
    v4 = read_dir(tmp_path)
    assert any(".block_sparse_moe.experts.3.w2.weight" in k for k in v4)
    from_v4 = state_dict_from_hf(v4, cfg)
    assert sorted(from_v4) == sorted(ours)
    for k in ours:
        assert torch.equal(from_v4[k], ours[k]), k
    per_expert = state_dict_to_hf(from_v4, per_expert=True)
    assert sorted(per_expert) == sorted(v4)
    for k in v4:
        assert torch.equal(per_expert[k], v4[k]), k


def test_config_round_trip():
    from workbench.checkpoint.hf.mixtral import config_to_hf

    cfg = config_from_hf(make_hf(sliding_window=16).config.to_dict())
    again = config_from_hf(config_to_hf(cfg, 1, 2, None))
    assert again == cfg


def test_exported_directory_loads_in_transformers_with_equal_logits(tmp_path):
    src = make_hf_mixtral_dir(tmp_path / "src")
    model, tokenizer, section = load_hf_dir(src)
    assert section.family == "mixtral"
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


def test_generate_hf_dir_prints_transformers_greedy_text(tmp_path):
    directory = make_hf_mixtral_dir(tmp_path / "mixtral")
    prompt, n = "import os\n\ndef main(", 24
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    expected = tok.decode(model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:],
                          skip_special_tokens=True)
    res = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "--hf-dir", str(directory), "--prompt",
                          prompt, "--max-new-tokens", str(n), "--temperature", "0"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"
    assert len(expected) > 5  # a real continuation, not an immediate eos


def test_training_loss_with_the_balance_term_equals_transformers_loss_and_gradients():
    """The LM objective on one engine: cross-entropy + router_aux_loss_coef * balance loss, as transformers'
    loss with labels and output_router_logits; the gradients agree too."""
    from workbench.data.packed import IGNORE_INDEX
    from workbench.parallel.single import SingleEngine
    from workbench.train.objectives.lm import LMObjective

    hf = make_hf(seed=3, router_aux_loss_coef=0.05)
    ours = ours_from(hf, backend="math")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    hf.train()
    ref = hf(input_ids=ids, labels=ids, output_router_logits=True)
    ref.loss.backward()
    objective, engine = LMObjective(), SingleEngine(ours, torch.optim.SGD(ours.parameters(), lr=0.0))
    mb = {"input_ids": ids, "labels": labels}
    objective.experience(0, {"policy": engine}, [mb])
    out = objective.loss({"policy": engine}, mb, objective.units(mb))
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert out.metrics["balance_loss"] == pytest.approx(float(ref.aux_loss.detach()), rel=1e-5)
    assert out.metrics["aux_loss"] == pytest.approx(0.05 * float(ref.aux_loss.detach()), rel=1e-5)
    hf_grads = dict(hf.named_parameters())
    ours_gate = ours.layers[0].moe.router.gate.weight.grad
    torch.testing.assert_close(ours_gate, hf_grads["model.layers.0.mlp.gate.weight"].grad, atol=1e-5, rtol=1e-4)
