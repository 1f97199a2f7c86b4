"""Shared primitives: RMSNorm, RoPE, the attention core and its mask spec, SwiGLU, the KV cache."""

import math

import pytest
import torch

from workbench.nn.attention import AttentionCore, MaskSpec, attention_math, attention_sdpa
from workbench.nn.kv_cache import StaticKVCache
from workbench.nn.norm import RMSNorm
from workbench.nn.rope import (
    RopeConfig,
    RotaryEmbedding,
    apply_rope,
    apply_rope_tables,
    permute_meta_to_half_split,
    rope_frequencies,
    rope_tables,
)
from workbench.nn.swiglu import SwiGLU

g = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def test_rmsnorm_formula_and_dtype_order():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(randn(8))
    x = randn(3, 8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    # bf16 input: normalized in fp32, cast to bf16, *then* scaled by the weight (HF and Meta order)
    xb = x.bfloat16()
    normed = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(norm.bfloat16()(xb), norm.weight.bfloat16() * normed)


def test_rope_rotation_preserves_norm_and_depends_on_relative_position():
    rope = RotaryEmbedding(16, RopeConfig(theta=10000.0))
    rope.init_weights()
    q, k = randn(1, 1, 1, 16), randn(1, 1, 1, 16)

    def rotated(x, p):
        cos, sin = rope(torch.tensor([[p]]), torch.float32)
        return apply_rope(x, cos, sin)

    assert torch.allclose(rotated(q, 37).norm(), q.norm(), atol=1e-5)
    s1 = (rotated(q, 10) * rotated(k, 3)).sum()
    s2 = (rotated(q, 107) * rotated(k, 100)).sum()
    assert torch.allclose(s1, s2, atol=1e-4)  # <R(p)q, R(s)k> depends on p - s only
    assert not torch.allclose(s1, (rotated(q, 10) * rotated(k, 9)).sum(), atol=1e-3)


def test_half_split_layout_equals_meta_interleaved_after_permutation():
    H, D, dim = 2, 8, 16
    wq = randn(H * D, dim)
    x = randn(1, 5, dim)
    pos = torch.arange(5)
    inv = rope_frequencies(D, RopeConfig(theta=500000.0))
    # Meta: pairs (2i, 2i+1) as complex numbers times e^{i p w_i}
    q_meta = (x @ wq.T).view(1, 5, H, D // 2, 2)
    rot = torch.polar(torch.ones(5, D // 2), pos[:, None].float() * inv)
    q_meta = torch.view_as_real(torch.view_as_complex(q_meta) * rot[None, :, None, :]).flatten(3)
    # ours: half-split on the permuted weights
    rope = RotaryEmbedding(D, RopeConfig(theta=500000.0))
    rope.init_weights()
    cos, sin = rope(pos[None], torch.float32)
    q_ours = apply_rope((x @ permute_meta_to_half_split(wq, H).T).view(1, 5, H, D), cos, sin)
    # same rotation: the coordinates are the same numbers, reordered per head
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    torch.testing.assert_close(q_ours, q_meta[..., perm], atol=1e-5, rtol=1e-5)


def test_llama3_scaling_bands():
    base = rope_frequencies(64, RopeConfig(theta=500000.0))
    cfg = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_seq_len=8192)
    scaled = rope_frequencies(64, cfg)
    wavelen = 2 * math.pi / base
    assert torch.equal(scaled[wavelen < 8192 / 4], base[wavelen < 8192 / 4])  # high frequencies kept
    torch.testing.assert_close(scaled[wavelen > 8192], base[wavelen > 8192] / 8)  # low ones interpolated
    mid = (wavelen >= 2048) & (wavelen <= 8192)
    assert mid.any() and ((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8)).all()


def _qkv(B=2, H=4, KV=2, T=10, D=8):
    return randn(B, H, T, D), randn(B, KV, T, D), randn(B, KV, T, D)


MASKS = {
    "causal": lambda B, T: MaskSpec(),
    "full": lambda B, T: MaskSpec(causal=False),
    "sliding": lambda B, T: MaskSpec(sliding_window=3),
    "documents": lambda B, T: MaskSpec(document_ids=torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])),
    "padding": lambda B, T: MaskSpec(key_padding=torch.arange(T)[None].expand(B, T) >= torch.tensor([[0], [3]])),
    "prefix": lambda B, T: MaskSpec(prefix_len=torch.tensor([4, 6])),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_sdpa_equals_math_reference(name):
    q, k, v = _qkv()
    spec = MASKS[name](2, 10)
    torch.testing.assert_close(attention_sdpa(q, k, v, spec, 0, 0.3), attention_math(q, k, v, spec, 0, 0.3),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(6, 2), (4, 1)], ids=["6/2", "4/1"])
@pytest.mark.parametrize("name", ["padding", "sliding", "documents", "prefix"])
def test_sdpa_single_query_gqa_fold_equals_math_reference(name, heads):
    """A decoding step (one query per row after a cache) under a mask with grouped-query heads takes the folded
    path (each KV head's query group as queries of one head): the same values as the reference, also with a value
    width other than the key width."""
    H, KV = heads
    q, k, v = _qkv(B=2, H=H, KV=KV, T=10)
    v = torch.cat([v, v[..., :3]], dim=-1)  # Dv = D + 3
    spec = MASKS[name](2, 10)
    q1 = q[:, :, -1:]  # the last slot's query: q_offset 9, every key cached
    out = attention_sdpa(q1, k, v, spec, 9, 0.3)
    assert out.shape == (2, H, 1, v.shape[-1])
    torch.testing.assert_close(out, attention_math(q1, k, v, spec, 9, 0.3), atol=1e-5, rtol=1e-5)


def test_math_reference_against_explicit_loops():
    """The reference itself, checked against a per-query loop with GQA group mapping j -> j // (H/KV)."""
    q, k, v = _qkv(B=1, H=4, KV=2, T=6)
    spec = MaskSpec(document_ids=torch.tensor([[0, 0, 0, 1, 1, 1]]))
    out = attention_math(q, k, v, spec, 0, 0.5)
    for h in range(4):
        kv = h // 2
        for i in range(6):
            keys = [j for j in range(6) if j <= i and (j < 3) == (i < 3)]
            s = torch.stack([(q[0, h, i] * k[0, kv, j]).sum() * 0.5 for j in keys])
            expected = (torch.softmax(s, 0)[:, None] * v[0, kv, keys]).sum(0)
            torch.testing.assert_close(out[0, h, i], expected, atol=1e-6, rtol=1e-5)


def test_dense_mask_semantics():
    m = MaskSpec(sliding_window=2).dense(4, 4)[0, 0]
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    p = MaskSpec(prefix_len=torch.tensor([2])).dense(4, 4)[0, 0]
    assert p.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    # with a query offset (decoding at slot 5 of 6), only the causal limit applies
    assert MaskSpec().dense(1, 6, q_offset=5).all()
    assert MaskSpec().dense(2, 6, q_offset=3)[0, 0].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    # padded keys are hidden; a pad query still sees itself (no NaN rows)
    pad = MaskSpec(key_padding=torch.tensor([[False, True, True]])).dense(3, 3)[0, 0]
    assert pad.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_soft_cap_goes_through_math_and_caps_scores():
    q, k, v = _qkv()
    core = AttentionCore(scale=1.0, backend="sdpa")
    capped = core(q * 50, k, v, MaskSpec(soft_cap=1.0))
    # with |scores| <= 1 the attention weights stay within e^2 of each other: close to a plain average
    s = (q * 50) @ k.repeat_interleave(2, 1).transpose(2, 3)
    expected = torch.softmax((torch.tanh(s)).masked_fill(~MaskSpec().dense(10, 10), float("-inf")), -1)
    torch.testing.assert_close(capped, expected @ v.repeat_interleave(2, 1), atol=1e-5, rtol=1e-5)


def test_swiglu_formula():
    ffn = SwiGLU(6, 10)
    ffn.init_weights(0.5, 0.5)
    x = randn(2, 6)
    expected = (torch.nn.functional.silu(x @ ffn.w1.weight.T) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), expected)


def test_static_kv_cache_contract():
    cache = StaticKVCache(n_layers=2, batch_size=1, max_len=5, entry_shapes=[(2, 3), (4,)])
    a1, b1 = cache.update(0, torch.ones(1, 2, 2, 3), torch.ones(1, 2, 4))
    assert a1.shape == (1, 2, 2, 3) and b1.shape == (1, 2, 4)
    cache.update(1, torch.ones(1, 2, 2, 3), torch.ones(1, 2, 4))
    cache.advance(2)
    a2, _ = cache.update(0, 2 * torch.ones(1, 1, 2, 3), torch.zeros(1, 1, 4))
    assert a2.shape == (1, 3, 2, 3) and a2[0, :2].eq(1).all() and a2[0, 2].eq(2).all()
    with pytest.raises(ValueError, match="stores 2 tensors"):
        cache.update(0, torch.ones(1, 1, 2, 3))
    cache.advance(1)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.update(0, torch.ones(1, 3, 2, 3), torch.ones(1, 3, 4))
    cache.reset()
    assert cache.seen == 0


def test_rope_tables_equal_the_reference_rotation_bit_for_bit():
    rope = RotaryEmbedding(16, RopeConfig(theta=10000.0))
    rope.init_weights()
    x = randn(2, 5, 3, 16)
    cos, sin = rope(torch.arange(5).expand(2, 5) + 7, torch.float32)
    assert torch.equal(apply_rope_tables(x, *rope_tables(cos, sin)), apply_rope(x, cos, sin))


def _kernel_or_skip():
    """The compiled CPU decode kernel; a skip names the missing compiler, a failed build with one fails."""
    import shutil

    from workbench.nn.linear import skinny_linear_error, skinny_linear_op

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the CPU decode kernel cannot be built here")
    op = skinny_linear_op()
    assert op is not None, f"the CPU decode kernel did not build: {skinny_linear_error()}"
    return op


@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("in_features, out_features", [(48, 80), (37, 300), (16, 5), (384, 1152)])
def test_skinny_linear_kernel_matches_f_linear(rows, in_features, out_features):
    op = _kernel_or_skip()
    x, w = randn(rows, in_features), randn(out_features, in_features)  # odd sizes exercise the tails
    y = op(x, w)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-4)  # sums of K products: a different order
    with pytest.raises(RuntimeError, match="columns"):
        op(x, randn(out_features, in_features + 1))
    with pytest.raises(RuntimeError, match="fp32"):
        op(x.double(), w.double())


def test_linear_takes_the_kernel_only_when_decoding_on_cpu_in_fp32(monkeypatch):
    import workbench.nn.linear as lin

    real = _kernel_or_skip()
    calls = []
    monkeypatch.setitem(lin._state, "op", lambda x, w: calls.append(x.shape) or real(x, w))
    ours = lin.Linear(48, 80, bias=True)
    ref = torch.nn.Linear(48, 80, bias=True)
    ref.load_state_dict(ours.state_dict())  # the same parameters under the same names
    assert isinstance(ours, torch.nn.Linear) and list(ours.state_dict()) == list(ref.state_dict())

    x = randn(2, 2, 48)  # 4 rows: the kernel, bias added after
    with torch.inference_mode():
        y = ours(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
        assert y.shape == (2, 2, 80) and calls == [(4, 48)]
    calls.clear()
    x5 = randn(1, 5, 48)
    with torch.no_grad():
        assert torch.equal(ours(x5), ref(x5)) and calls == []  # 5 rows: F.linear itself
        xd, wd, bd = x.double(), ref.weight.double(), ref.bias.double()
        assert torch.equal(lin.linear(xd, wd, bd), torch.nn.functional.linear(xd, wd, bd))  # not fp32
        assert calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ours(x).dtype == torch.bfloat16 and calls == []  # autocast decides the dtype: F.linear
    xg = x.clone().requires_grad_()
    assert torch.equal(ours(xg), ref(xg)) and calls == []  # gradients on (training): F.linear
    ours(xg).sum().backward()
    assert xg.grad is not None


def test_linear_falls_back_when_the_kernel_is_turned_off(monkeypatch):
    import workbench.nn.linear as lin

    monkeypatch.setenv("WORKBENCH_CPU_KERNELS", "0")
    monkeypatch.setattr(lin, "_state", {})
    assert lin.skinny_linear_op() is None and "WORKBENCH_CPU_KERNELS=0" in lin.skinny_linear_error()
    layer = lin.Linear(8, 3)
    x = randn(1, 8)
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
