"""The Llama 3 family: flavors, meta-device construction, one init_weights, the decoder output contract."""

import pytest
import torch

from workbench.models.base import DecoderOutput, ModelSection, build_model, count_params
from workbench.models.llama3 import FLAVORS, Llama3

# published sizes (embedding included; tied models count it once)
EXPECTED = {"1B": 1.236e9, "3B": 3.213e9, "8B": 8.030e9, "70B": 70.554e9, "405B": 405.85e9}


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_every_flavor_builds_on_meta_without_memory(flavor):
    with torch.device("meta"):
        model = Llama3(FLAVORS[flavor])
    assert all(p.is_meta for p in model.parameters())
    n = count_params(model)
    if flavor in EXPECTED:
        assert abs(n - EXPECTED[flavor]) / EXPECTED[flavor] < 0.002, (flavor, n)
    elif flavor == "2M":
        assert 1.5e6 < n < 2.5e6
    elif flavor == "20M":
        assert 17e6 < n < 23e6


def test_init_weights_after_to_empty_matches_direct_construction():
    cfg = FLAVORS["debug"]
    direct = Llama3(cfg)  # built on CPU (nn.Linear's own init runs first, then init_weights)
    torch.manual_seed(0)
    direct.init_weights()
    with torch.device("meta"):
        late = Llama3(cfg)
    late.to_empty(device="cpu")
    torch.manual_seed(0)
    late.init_weights()
    for (name, a), b in zip(direct.state_dict().items(), late.state_dict().values()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(late.rope.inv_freq, direct.rope.inv_freq)  # the buffer is rebuilt too


def test_init_statistics():
    model = build_model(ModelSection.of("llama3", "2M"))
    std = model.cfg.init_std
    assert abs(model.layers[0].attention.wq.weight.std().item() - std * 0.88) < 0.003  # truncated at 3 std
    out_std = model.layers[0].attention.wo.weight.std().item()
    assert out_std < std / 2  # residual writers scaled by 1/sqrt(2L)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_tied_embeddings_have_one_matrix():
    model = build_model(ModelSection.of("llama3", "debug", tie_embeddings=True))
    assert model.output is None and "output.weight" not in model.state_dict()
    h = torch.randn(1, 3, model.cfg.dim)
    torch.testing.assert_close(model.logits(h), h @ model.tok_embeddings.weight.T)


def test_decoder_output_contract():
    model = build_model(ModelSection.of("llama3", "debug")).eval()
    ids = torch.randint(0, 512, (2, 7))
    out = model({"input_ids": ids, "output_hidden_states": True})
    assert isinstance(out, DecoderOutput)
    assert out.hidden.shape == (2, 7, 64) and isinstance(out.aux, dict)
    assert len(out.hidden_states) == model.cfg.n_layers + 1
    assert model.logits(out.hidden).shape == (2, 7, 512)
    # inputs_embeds is the same path as input_ids after the embedding (the VLM entry)
    out2 = model({"inputs_embeds": model.tok_embeddings(ids)})
    torch.testing.assert_close(out2.hidden, out.hidden)
    # positions are honoured: shifting them changes the result; default = 0..T-1
    same = model({"input_ids": ids, "positions": torch.arange(7).expand(2, 7)})
    torch.testing.assert_close(same.hidden, out.hidden)
    shifted = model({"input_ids": ids, "positions": torch.arange(7).expand(2, 7) + 3})
    assert not torch.allclose(shifted.hidden, out.hidden)
    # no loss inside the model: labels in the batch are ignored
    assert not hasattr(out, "loss")


def test_document_mask_isolates_packed_documents():
    model = build_model(ModelSection.of("llama3", "debug")).eval()
    from workbench.nn.attention import MaskSpec

    a, b = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 4))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 5 + [1] * 4])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    h = model({"input_ids": packed, "positions": pos, "mask": MaskSpec(document_ids=docs)}).hidden
    torch.testing.assert_close(h[:, 5:], model({"input_ids": b}).hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h[:, :5], model({"input_ids": a}).hidden, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_follows_the_mfu_convention(tie):
    section = ModelSection.of("llama3", "debug", tie_embeddings=tie)
    model = build_model(section)
    c = section.config
    kv = c.n_kv_heads * c.hd
    per_layer = c.dim * c.n_heads * c.hd * 2 + c.dim * kv * 2 + 3 * c.dim * c.ffn_dim  # wq, wo, wk, wv, w1-3
    n = c.n_layers * per_layer + c.vocab_size * c.dim  # + the output head, tied or not; no embedding lookup
    assert model.flops_per_token(128) == 6 * n + 12 * c.n_layers * c.n_heads * c.hd * 128
