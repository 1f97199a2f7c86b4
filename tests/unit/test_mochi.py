"""The Mochi AsymmDiT's pieces (workbench.models.video.mochi): sizes on the meta device, the learned 3D RoPE,
initialization, patches, padded text and input errors. Parity with diffusers is tests/parity/test_mochi_hf.py."""

import math

import pytest
import torch

from workbench.config import from_dict
from workbench.errors import ConfigError
from workbench.models.video import mochi

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(flavor="debug", seed=0, perturb=0.0):
    model = mochi.AsymmDiT(mochi.FLAVORS[flavor])
    model.init_weights(torch.Generator().manual_seed(seed))
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return model.eval()


def test_10b_flavor_on_meta():
    cfg = mochi.FLAVORS["10B"]
    n = mochi.param_count(cfg)
    assert 9.9e9 < n < 10.1e9, n  # "Mochi 1: 10B parameters"
    assert (cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.dim, cfg.text_width) == (48, 24, 128, 3072, 1536)
    assert (cfg.hidden_x, cfg.hidden_y) == (8192, 4096)  # SwiGLU widths of the released weights
    assert n == 10_027_677_744  # diffusers' MochiTransformer3DModel() on meta (tests/parity/test_mochi_hf.py)
    with torch.device("meta"):
        model = mochi.AsymmDiT(cfg)
    assert all(p.is_meta for p in model.parameters())


def test_meta_build_then_init_is_adaln_zero():
    with torch.device("meta"):
        model = mochi.AsymmDiT(mochi.FLAVORS["debug"])
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    x = torch.randn(2, 4, 2, 4, 4)
    out = model(x, torch.tensor([0.2, 0.9]), torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(x))  # zero output layer; every residual gate tanh(0) = 0
    speeds = model.pos_frequencies.norm(dim=0)  # (H, Dh/2): 1 / 10000^(f / F) along unit directions
    F_ = speeds.shape[1]
    torch.testing.assert_close(speeds[0], 10000.0 ** (-torch.arange(F_) / F_))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'dim'"):
        mochi.Config(dim=100, n_heads=3, head_dim=32)
    with pytest.raises(ConfigError, match="'text_dim'"):
        mochi.Config(text_dim=30, pool_heads=8)
    with pytest.raises(ConfigError, match="'head_dim'"):
        mochi.Config(dim=15, n_heads=3, head_dim=5)
    with pytest.raises(ConfigError, match="n_layers"):
        from_dict(mochi.Config, {"n_layers": 0})


def test_rope_positions_are_bin_centres_rescaled_to_the_target_area():
    pos = mochi.rope_positions(2, 3, 4, target_area=48.0)  # scale sqrt(48 / 12) = 2
    assert pos.shape == (2 * 3 * 4, 3)
    assert pos[:, 0].tolist() == [0.0] * 12 + [1.0] * 12  # t slowest
    torch.testing.assert_close(pos[:12:4, 1], torch.tensor([-2.0, 0.0, 2.0]))  # h: bins of width 2 on [-3, 3]
    torch.testing.assert_close(pos[:4, 2], torch.tensor([-3.0, -1.0, 1.0, 3.0]))  # w: on [-4, 4]
    # any grid covers the same area: the extent of h times w is ~ target_area
    big = mochi.rope_positions(1, 30, 53, target_area=36864.0)
    extent = (big[:, 1].max() - big[:, 1].min()) * (big[:, 2].max() - big[:, 2].min())
    assert 0.9 * 36864 < extent < 36864


def test_rope_is_interleaved_norm_preserving_and_relative():
    g = torch.Generator().manual_seed(0)
    H, Dh = 2, 8
    freqs = torch.randn(3, H, Dh // 2, generator=g)
    q, k = torch.randn(1, 1, H, Dh, generator=g), torch.randn(1, 1, H, Dh, generator=g)
    p1, p2, d = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[3.0, 1.0, -1.5]]), torch.tensor([[2.0, 0.7, -3.0]])

    def dot(a, b):
        ca, sa = mochi.rope_tables(freqs, a)
        cb, sb = mochi.rope_tables(freqs, b)
        return (mochi.apply_rope_interleaved(q, ca, sa) * mochi.apply_rope_interleaved(k, cb, sb)).sum(-1)

    torch.testing.assert_close(dot(p1, p2), dot(p1 + d, p2 + d))  # depends on p1 - p2 only
    cos, sin = mochi.rope_tables(freqs, p1)
    rq = mochi.apply_rope_interleaved(q, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # pair (0, 1) of head 0 turns by theta = p . freqs[:, 0, 0]
    theta = float((p1[0] * freqs[:, 0, 0]).sum())
    c, s = math.cos(theta), math.sin(theta)
    a, b = q[0, 0, 0, 0].item(), q[0, 0, 0, 1].item()
    torch.testing.assert_close(rq[0, 0, 0, :2], torch.tensor([a * c - b * s, a * s + b * c]))


def test_patchify_inverts_and_matches_the_output_layout():
    model = _model()
    x = torch.randn(2, 4, 3, 6, 4)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 3 * 3 * 2, 2 * 2 * 4)
    assert torch.equal(model.unpatchify(tokens, 3, 6, 4), x)
    # token (t=1, h=2, w=0) holds pixel rows 4-5, columns 0-1 of frame 1, features (row, col, channel)
    n = 1 * 6 + 2 * 2 + 0
    torch.testing.assert_close(tokens[0, n].view(2, 2, 4), x[0, :, 1, 4:6, 0:2].permute(1, 2, 0))


def test_padded_text_is_excluded_and_rows_are_independent():
    model = _model(perturb=0.2)
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    sigma = torch.tensor([0.4, 0.7])
    with torch.no_grad():
        out = model(x, sigma, text, mask)
        # row 0 alone, with its padding cut off, gives the same output
        alone = model(x[:1], sigma[:1], text[:1, :2], mask[:1, :2])
        torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=0)
        # sigma and text reach the output
        assert (model(x, sigma.flip(0), text, mask) - out).abs().max() > 1e-3
    # a token with no valid text at all (an empty caption) still works
    with torch.no_grad():
        empty = model(x, sigma, text, torch.zeros_like(mask))
    assert torch.isfinite(empty).all()


def test_bad_inputs_are_named():
    model = _model()
    text, mask = torch.randn(1, 3, 16), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 3, 2, 4, 4), torch.tensor([0.5]), text, mask)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(torch.randn(1, 4, 2, 5, 4), torch.tensor([0.5]), text, mask)
    with pytest.raises(ValueError, match="text_dim"):
        model(torch.randn(1, 4, 2, 4, 4), torch.tensor([0.5]), torch.randn(1, 3, 8), mask)
    with pytest.raises(ValueError, match="text_mask"):
        model(torch.randn(1, 4, 2, 4, 4), torch.tensor([0.5]), text, mask[:, :2])
    with pytest.raises(ValueError, match="token_range"):
        model(torch.randn(1, 4, 2, 4, 4), torch.tensor([0.5]), text, mask, token_range=(3, 100))


def test_small_flavor_trains_a_step():
    """The CPU flavor runs forward and backward and one SGD step lowers the loss on its batch."""
    from workbench.models.video import flow

    model = _model("small").train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 2, 8, 8, generator=g)
    text, mask = torch.randn(2, 4, 64, generator=g), torch.ones(2, 4, dtype=torch.bool)
    sigma, eps = torch.tensor([0.3, 0.6]), torch.randn(x0.shape, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = flow.flow_loss(model, x0, text, mask, sigma=sigma, eps=eps)
    before.backward()
    opt.step()
    after = flow.flow_loss(model, x0, text, mask, sigma=sigma, eps=eps)
    assert after < before


def test_cp_plan_names_every_joint_core_and_refuses_others():
    """The plan's context path matches each block's joint core (what apply_context_parallel swaps); the video
    cp core refuses a decoder's plain AttentionCore; the token split covers the video in rank order."""
    import re

    from workbench.nn.attention import AttentionCore
    from workbench.parallel.cp import JointVideoAttention, video_token_range
    from workbench.parallel.plans import plan_for

    plan = plan_for("mochi")
    model = _model()
    pattern = re.compile(re.escape(plan.context).replace(r"\*", r"\d+") + "$")
    cores = [m for name, m in model.named_modules() if pattern.match(name)]
    assert len(cores) == model.cfg.n_layers and all(isinstance(c, mochi.JointAttentionCore) for c in cores)
    assert len(model.get_submodule(plan.blocks)) == model.cfg.n_layers
    with pytest.raises(ConfigError, match="joint"):
        JointVideoAttention(AttentionCore(0.5), group=None)
    assert [video_token_range(24, 3, r) for r in range(3)] == [(0, 8), (8, 16), (16, 24)]
    with pytest.raises(ConfigError, match="divide evenly"):
        video_token_range(25, 2, 0)
