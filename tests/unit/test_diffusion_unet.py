"""The from-scratch UNet and schedules beyond parity: meta-device build, init, config errors, class context."""

import pytest
import torch

from workbench.config import from_dict
from workbench.errors import ConfigError
from workbench.models.diffusion import schedulers as sch
from workbench.models.diffusion.unet import FLAVORS, ClassContext, Config, UNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_meta_build_then_init_matches_a_direct_build():
    cfg = FLAVORS["debug"]
    with torch.device("meta"):
        meta = UNet(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    direct = UNet(cfg)
    torch.manual_seed(0)
    direct.init_weights()  # the constructor's own draws came first; re-init from the same seed
    for (n, a), (_, b) in zip(meta.state_dict().items(), direct.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    # LDM init: the output conv is zero, so the fresh network predicts 0
    x = torch.randn(2, 4, 16, 16)
    assert direct(x, torch.tensor([1, 999]), torch.randn(2, 3, 32)).abs().max() == 0


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="attention_heads"):
        from_dict(Config, {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D"] * 2,
                           "up_block_types": ["UpBlock2D"] * 2, "attention_heads": [3, 3]})
    with pytest.raises(ConfigError, match="down_block_types"):
        UNet(Config(block_out_channels=[32], down_block_types=["AttnDownBlock2D"], up_block_types=["UpBlock2D"],
                    attention_heads=[2]))
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        UNet(Config(block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"], up_block_types=["UpBlock2D"],
                    attention_heads=[2], cross_attention_dim=0))
    with pytest.raises(ValueError, match="context"):
        UNet(FLAVORS["debug"])(torch.randn(1, 4, 8, 8), 3)


def test_class_conditioned_pixel_unet_learns_its_labels():
    """Part D's shape: a pixel-space UNet conditioned on a class through cross-attention. A few steps of the
    epsilon objective must lower the loss, and the class must change the prediction."""
    torch.manual_seed(0)
    cfg = Config(in_channels=3, out_channels=3, sample_size=8, block_out_channels=[16, 32],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                 attention_heads=[2, 2], cross_attention_dim=16, layers_per_block=1, norm_num_groups=8)
    unet, ctx = UNet(cfg), ClassContext(2, 16)
    ctx.init_weights()
    sched = sch.NoiseSchedule(sch.FLAVORS["ddpm"])
    opt = torch.optim.Adam([*unet.parameters(), *ctx.parameters()], lr=2e-3)
    labels = torch.tensor([0, 1] * 4)
    x0 = torch.where(labels.view(-1, 1, 1, 1) == 0, 1.0, -1.0).expand(8, 3, 8, 8)  # class 0 white, 1 black
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(30):
        noise = torch.randn(x0.shape, generator=g)
        t = sched.sample_timesteps(8, g)
        loss = sch.diffusion_loss(unet(sched.add_noise(x0, noise, t), t, ctx(labels)), x0, noise, t, "epsilon")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    with torch.no_grad():
        xt = torch.randn(2, 3, 8, 8, generator=g)
        a = unet(xt, 500, ctx(torch.tensor([0, 0])))
        b = unet(xt, 500, ctx(torch.tensor([1, 1])))
    assert (a - b).abs().mean() > 1e-3


def test_full_mask_spec_runs_sdpa_without_a_mask_and_equals_the_math_path():
    """The UNet's attention (MaskSpec(causal=False)): self (Tq = Tk) and cross (Tq != Tk) shapes."""
    from workbench.nn.attention import AttentionCore, MaskSpec

    spec = MaskSpec(causal=False)
    assert spec.is_full and not MaskSpec().is_full and not MaskSpec(causal=False, key_padding=torch.ones(1, 3)).is_full
    g = torch.Generator().manual_seed(0)
    for tq, tk in ((64, 64), (64, 7)):
        q, k, v = (torch.randn(2, 4, t, 8, generator=g) for t in (tq, tk, tk))
        want = AttentionCore(0.3, "math")(q, k, v, spec)
        torch.testing.assert_close(AttentionCore(0.3, "sdpa")(q, k, v, spec), want, atol=1e-6, rtol=1e-5)
