"""Sliding-window and MoBA attention: the efficient paths ("block" gather, FlexAttention) equal the dense
reference (forward and gradients, fp32), MoBA's selection has the properties the paper states, and a Llama
with either pattern runs through the model config."""

from pathlib import Path

import pytest
import torch

from workbench.config import ConfigError, load_config
from workbench.job import JobConfig
from workbench.models.base import ModelSection, build_model
from workbench.nn.attention import (
    FLEX_Q_BLOCK,
    AttentionCore,
    MaskSpec,
    attention_block,
    attention_flex,
    attention_math,
    attention_sdpa,
    flex_block_mask,
)
from workbench.nn.moba import MobaSpec, moba_mask, moba_select

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def qkv(B=2, H=4, KV=2, T=37, D=8, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, KV, KV))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def docs_and_padding(B, T):
    docs = torch.zeros(B, T, dtype=torch.long)
    docs[:, T // 3 :] = 1
    docs[:, 2 * T // 3 :] = 2
    real = torch.ones(B, T, dtype=torch.bool)
    real[-1, :5] = False  # a left-padded row
    return docs, real


def specs(T, B=2):
    docs, real = docs_and_padding(B, T)
    return {
        "window": MaskSpec(sliding_window=5),
        "window-docs": MaskSpec(sliding_window=9, document_ids=docs),
        "window-pad-cap": MaskSpec(sliding_window=7, key_padding=real, soft_cap=2.0),
        "moba": MaskSpec(moba=MobaSpec(4, 3)),
        "moba-docs": MaskSpec(moba=MobaSpec(4, 2), document_ids=docs),
        "moba-pad-cap": MaskSpec(moba=MobaSpec(8, 2), key_padding=real, soft_cap=2.0),
        "moba-topk1": MaskSpec(moba=MobaSpec(5, 1)),
    }


SHAPES = {"gqa-T37": dict(T=37), "mha-T32": dict(H=2, KV=2, T=32), "mqa-T19-B1": dict(B=1, H=4, KV=1, T=19)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(specs(8)))
def test_block_path_equals_dense_forward_and_grads(name, shape):
    q, k, v = qkv(**SHAPES[shape])
    spec = specs(q.shape[2], q.shape[0])[name]
    scale = q.shape[-1] ** -0.5
    ref = attention_math(q, k, v, spec, 0, scale)
    out = attention_block(q, k, v, spec, 0, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    cot = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (q, k, v), cot)
    g_out = torch.autograd.grad(out, (q, k, v), cot)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the SDPA reference (dense boolean mask) agrees as well (it cannot soft-cap: the core sends that to math)
    if spec.soft_cap is None:
        torch.testing.assert_close(attention_sdpa(q, k, v, spec, 0, scale), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(specs(8)))
def test_flex_eager_equals_dense(name):
    q, k, v = qkv(T=37, grad=False)
    spec = specs(37)[name]
    ref = attention_math(q, k, v, spec, 0, 8**-0.5)
    torch.testing.assert_close(attention_flex(q, k, v, spec, 0, 8**-0.5), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["window-docs", "moba-docs", "moba-pad-cap"])
@pytest.mark.parametrize("q_offset,Tq", [(20, 17), (36, 1)])  # chunked prefill, one-token decode
def test_query_offset_equals_the_rows_of_a_full_forward(name, q_offset, Tq):
    q, k, v = qkv(T=37, grad=False)
    spec = specs(37)[name]
    full = attention_math(q, k, v, spec, 0, 8**-0.5)[:, :, q_offset : q_offset + Tq]
    part = q[:, :, q_offset : q_offset + Tq]
    for fn in (attention_math, attention_block, attention_flex):
        torch.testing.assert_close(fn(part, k, v, spec, q_offset, 8**-0.5), full, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_lists_exactly_the_tiles_with_an_allowed_pair():
    q, k, _ = qkv(B=1, T=300, D=8, grad=False)
    for spec in (MaskSpec(moba=MobaSpec(32, 2)), MaskSpec(sliding_window=40)):
        bm = flex_block_mask(q, k, spec, 0)
        allowed = moba_mask(q, k, spec) if spec.moba else spec.dense(300, 300).expand(1, 4, 300, 300)
        KB = bm.BLOCK_SIZE[1]
        nq, nk = -(-300 // FLEX_Q_BLOCK), -(-300 // KB)
        pad = torch.nn.functional.pad(allowed, (0, nk * KB - 300, 0, nq * FLEX_Q_BLOCK - 300))
        tiles = pad.view(1, 4, nq, FLEX_Q_BLOCK, nk, KB).any(5).any(3)  # (1, H, NQ, NK)
        assert torch.equal(bm.to_dense().bool().expand_as(tiles), tiles)
        assert tiles.float().mean() < 0.75  # and it is sparse: skipped tiles exist


def test_moba_selection_properties():
    q, k, _ = qkv(B=2, H=4, KV=2, T=45, grad=False)
    bs, topk = 4, 3
    idx, valid = moba_select(q, k, MaskSpec(moba=MobaSpec(bs, topk)))  # (B, H, T, 3)
    own = torch.arange(45) // bs  # (T,)
    assert torch.equal(idx[..., 0], own.expand(2, 4, 45))  # own block always chosen (and ranked first)
    assert not (valid & (idx > own[:, None])).any()  # never a future block
    # exactly min(topk, available) blocks, available = own + 1 (every past block is a candidate)
    assert torch.equal(valid.sum(-1), (own + 1).clamp(max=topk).expand(2, 4, 45))
    chosen = idx.masked_fill(~valid, -1)
    assert all(len(set(r.tolist()) - {-1}) == int(c) for r, c in zip(chosen.view(-1, 3), valid.sum(-1).view(-1)))
    # queries of the same KV group still gate separately (per query head): heads disagree somewhere
    assert not torch.equal(idx[:, 0], idx[:, 1])


def test_moba_topk_covering_every_block_is_plain_causal():
    q, k, v = qkv(T=37, grad=False)
    spec = MaskSpec(moba=MobaSpec(4, 10))  # 10 blocks
    assert torch.equal(moba_mask(q, k, spec), MaskSpec().dense(37, 37).expand(2, 4, 37, 37))
    causal = attention_sdpa(q, k, v, MaskSpec(), 0, 8**-0.5)
    torch.testing.assert_close(attention_block(q, k, v, spec, 0, 8**-0.5), causal, atol=1e-5, rtol=1e-5)


def test_moba_gate_picks_the_block_that_matches_the_query():
    # a planted key block: block 1's keys align with every query of block 5, the rest are orthogonal
    B, H, T, D, bs = 1, 1, 24, 4, 4
    q = torch.zeros(B, H, T, D)
    k = torch.zeros(B, H, T, D)
    q[..., 0], k[..., 1] = 1.0, 1.0
    k[:, :, 4:8, 0] = 5.0
    idx, valid = moba_select(q, k, MaskSpec(moba=MobaSpec(bs, 2)))
    assert idx[0, 0, 20:, 1].tolist() == [1] * 4 and valid[0, 0, 20:].all()


def test_moba_with_documents_never_spends_a_pick_on_another_document():
    docs, _ = docs_and_padding(1, 36)  # documents at slots [0, 12), [12, 24), [24, 36)
    q, k, _ = qkv(B=1, T=36, grad=False)
    spec = MaskSpec(moba=MobaSpec(4, 3), document_ids=docs)
    idx, valid = moba_select(q, k, spec)
    first_block_of_doc = (docs[0] * 12 // 4)  # (T,) blocks align with documents here
    assert (idx[0][valid[0]] >= first_block_of_doc[None, :, None].expand_as(idx[0])[valid[0]]).all()
    own = torch.arange(36) // 4
    assert torch.equal(valid[0].sum(-1), (own - first_block_of_doc + 1).clamp(max=3).expand(4, 36))


def test_errors_name_the_backend_and_the_combination():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        AttentionCore(1.0, backend="flash")
    with pytest.raises(ValueError, match="moba_mask"):
        MaskSpec(moba=MobaSpec(4, 2)).dense(8, 8)
    q, k, v = qkv(T=16)
    with pytest.raises(ValueError, match="sliding_window cannot be combined"):
        attention_block(q, k, v, MaskSpec(moba=MobaSpec(4, 2), sliding_window=3), 0, 1.0)
    with pytest.raises(ValueError, match="backend 'block'.*prefix_len"):
        attention_block(q, k, v, MaskSpec(sliding_window=3, prefix_len=torch.tensor([4, 4])), 0, 1.0)
    with pytest.raises(ValueError, match="causal=True"):
        AttentionCore(1.0, "math")(q, k, v, MaskSpec(causal=False, moba=MobaSpec(4, 2)))
    with pytest.raises(ValueError, match="backend 'flex' has no backward pass on CPU"):
        AttentionCore(1.0, "flex")(q, k, v, MaskSpec(sliding_window=3))
    with pytest.raises(ValueError, match="block_size > 0"):
        MobaSpec(0, 2)


# ------------------------------------------------------------------------------------------------ compiled


@pytest.fixture(scope="session")
def compiled_flex():
    """torch.compile(flex_attention), built once per test run; a missing C++ compiler skips by name."""
    from torch._inductor.exc import InvalidCxxCompiler

    from workbench.nn.attention import compiled_flex_attention

    fn = compiled_flex_attention()

    def call(*args, **kwargs):
        try:
            return attention_flex(*args, **kwargs, flex_fn=fn)
        except InvalidCxxCompiler as e:
            pytest.skip(f"torch.compile(flex_attention) needs a C++ compiler for inductor on CPU: {e}")

    return call


@pytest.mark.slow
def test_compiled_flex_equals_dense(compiled_flex):
    B, T = 2, 300  # not a multiple of the 128-query tile nor of the MoBA block
    q, k, v = qkv(B=B, T=T, D=16, grad=False)
    docs, _ = docs_and_padding(B, T)
    for spec in (MaskSpec(moba=MobaSpec(32, 3), document_ids=docs), MaskSpec(sliding_window=40)):
        ref = attention_math(q, k, v, spec, 0, 0.25)
        torch.testing.assert_close(compiled_flex(q, k, v, spec, 0, 0.25), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ the model


def llama(**over):
    torch.manual_seed(0)
    return build_model(ModelSection.of("llama3", "debug", **over))


def test_llama_config_builds_the_per_layer_pattern():
    model = llama(n_layers=3, moba_block_size=8, moba_topk=2, moba_full_last_layers=1)
    masks = model.layer_masks(MaskSpec())
    assert [m.moba for m in masks] == [MobaSpec(8, 2), MobaSpec(8, 2), None]
    assert all(m.sliding_window == 6 for m in llama(sliding_window=6).layer_masks(MaskSpec()))
    # a pattern set by the batch's spec wins over the config
    assert llama(moba_block_size=8).layer_masks(MaskSpec(sliding_window=3))[0].moba is None


@pytest.mark.parametrize("over,key,expected", [
    (["--model.moba_block_size", "8", "--model.sliding_window", "4"], "moba_block_size",
     "cannot be combined with sliding_window (4)"),
    (["--model.moba_block_size", "0"], "moba_block_size", "must be > 0 or unset, got 0"),
    (["--model.sliding_window", "-1"], "sliding_window", "must be > 0 or unset, got -1"),
    (["--model.moba_block_size", "8", "--model.moba_full_last_layers", "3"], "moba_full_last_layers",
     "must be <= n_layers (2), got 3"),
    (["--model.moba_topk", "0"], "moba_topk", "> 0"),
    (["--model.attn_backend", "flash"], "attn_backend", "'flex', 'block'"),
])
def test_llama_config_errors_name_the_key(over, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, ROOT / "configs" / "llama3" / "debug.toml", over)
    assert f"config key 'model.{key}'" in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("pattern", [{"moba_block_size": 8, "moba_topk": 2}, {"sliding_window": 7}])
def test_llama_block_backend_equals_math_backend_with_grads(pattern):
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    docs = torch.zeros(2, 40, dtype=torch.long)
    docs[:, 25:] = 1
    batch = {"input_ids": ids, "mask": MaskSpec(document_ids=docs)}
    losses, grads = [], []
    for backend in ("math", "block"):
        model = llama(attn_backend=backend, **pattern)
        loss = model.logits(model(batch).hidden).logsumexp(-1).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.layers[0].attention.wq.weight.grad)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    # and the pattern changes the function (it is not silently full attention)
    plain = llama(attn_backend="math")
    assert (plain.logits(plain(batch).hidden).logsumexp(-1).mean() - losses[0]).abs() > 1e-6
