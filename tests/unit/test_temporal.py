"""Temporal attention (workbench.models.diffusion.temporal): the zero-initialised motion modules make an inflated
image UNet compute exactly the image model per frame; one step on the motion parameters changes that and leaves
the image weights alone; temporal layers really mix frames (and never videos); VideoLDM's blend; config errors."""

import pytest
import torch

from workbench.config import ConfigError
from workbench.models.diffusion import temporal
from workbench.models.diffusion import unet as unet_mod

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

IMAGE = unet_mod.Config(in_channels=4, out_channels=4, sample_size=8, block_out_channels=[32, 64],
                        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_heads=[2, 2],
                        cross_attention_dim=16, layers_per_block=1, norm_num_groups=8)
MOTION = temporal.Config(motion_num_attention_heads=[2], motion_max_seq_length=8)


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (scale if p.ndim > 1 else 0.1))


def _trained_image_unet() -> unet_mod.UNet:
    """An image UNet with non-trivial weights everywhere (LDM's init zeroes the output conv: output 0)."""
    torch.manual_seed(0)
    image = unet_mod.UNet(IMAGE).eval()
    _randomize(image, 1)
    return image


def _inputs(B=2, T=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, T, 8, 8, generator=g), torch.tensor([10, 700][:B]), torch.randn(B, 3, 16, generator=g))


def test_fresh_motion_unet_is_the_image_unet_per_frame_then_one_step_changes_only_motion():
    image = _trained_image_unet()
    video = temporal.VideoUNet.from_image_unet(image, MOTION).eval()
    assert all(torch.count_nonzero(m.proj_out.weight) == 0 for m in video.modules() if isinstance(m, temporal.MotionModule))
    x, t, ctx = _inputs()
    B, C, T, H, W = x.shape
    with torch.no_grad():
        got = video(x, t, ctx)  # (B, C, T, H, W)
        # the image model on the same frames folded into the batch (b T + f): bitwise the same, because each
        # motion module adds proj_out(u) = 0 u + 0 = exactly 0 and every image layer sees the same tensors
        folded = image(x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W), t.repeat_interleave(T),
                       ctx.repeat_interleave(T, dim=0)).reshape(B, T, C, H, W).permute(0, 2, 1, 3, 4)
        assert torch.equal(got, folded)
        # and frame by frame, one image-model call per frame: a batch of B instead of B T rounds differently in
        # the matmul / conv kernels (5e-7 measured on outputs of mean magnitude 0.23), hence a tolerance
        for f in range(T):
            torch.testing.assert_close(got[:, :, f], image(x[:, :, f], t, ctx), atol=1e-5, rtol=0)
    assert got.abs().mean() > 0.1  # a real output, not a zero that would match trivially

    # one optimizer step on the motion parameters only
    before = {k: v.clone() for k, v in video.image_state_dict().items()}
    video.freeze_image_layers()
    opt = torch.optim.Adam(video.motion_parameters(), lr=1e-2)
    assert sum(p.numel() for p in video.motion_parameters()) > 0
    video.train()
    loss = (video(x, t, ctx) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    assert all(p.grad is None for n, p in video.named_parameters() if ".motion_modules." not in n)
    opt.step()
    video.eval()
    with torch.no_grad():
        after = video(x, t, ctx)
    assert (after - got).abs().max() > 1e-4
    for k, v in video.image_state_dict().items():
        assert torch.equal(v, before[k]), k
    # the image weights still load into, and reproduce, the image model
    copy = unet_mod.UNet(IMAGE).eval()
    copy.load_state_dict(video.image_state_dict())
    with torch.no_grad():
        assert torch.equal(copy(x[:, :, 0], t, ctx), image(x[:, :, 0], t, ctx))


@pytest.mark.parametrize("trained", [False, True])
def test_motion_module_mixes_frames_only_once_proj_out_is_nonzero(trained):
    torch.manual_seed(0)
    mm = temporal.MotionModule(16, heads=2, layers=1, groups=4, max_len=8).eval()
    if trained:
        _randomize(mm, 5)
    B, T, C, H, W = 2, 4, 16, 3, 3
    x = torch.randn(B * T, C, H, W)
    x2 = x.clone()
    x2[0] += torch.randn(C, H, W)  # perturb video 0, frame 0
    with torch.no_grad():
        y, y2 = mm(x, T), mm(x2, T)
    frame3 = slice(3, 4)  # video 0, frame 3 (index b T + f)
    if trained:
        assert (y2[frame3] - y[frame3]).abs().max() > 1e-3  # frame 3 read frame 0
    else:
        assert torch.equal(y2[frame3], y[frame3]) and torch.equal(y, x)  # the identity, exactly
    # another video never sees the change (the group norm's statistics are per video too)
    assert torch.equal(y2[T:], y[T:])


def test_trained_video_unet_mixes_frames_and_keeps_videos_apart():
    image = _trained_image_unet()
    video = temporal.VideoUNet.from_image_unet(image, MOTION).eval()
    x, t, ctx = _inputs()
    x2 = x.clone()
    x2[0, :, 0] += 1.0  # video 0, frame 0
    with torch.no_grad():
        y, y2 = video(x, t, ctx), video(x2, t, ctx)
        assert torch.equal(y2[0, :, 3], y[0, :, 3])  # fresh: frames are independent
        for m in video.modules():
            if isinstance(m, temporal.MotionModule):
                _randomize(m.proj_out, 7, scale=0.05)
        y, y2 = video(x, t, ctx), video(x2, t, ctx)
    assert (y2[0, :, 3] - y[0, :, 3]).abs().max() > 1e-4  # now frame 3 depends on frame 0
    assert torch.equal(y2[1], y[1])  # video 1 does not


def test_meta_device_build_then_init_weights():
    with torch.device("meta"):
        video = temporal.VideoUNet(IMAGE, MOTION)
    assert all(p.is_meta for p in video.parameters())
    video.to_empty(device="cpu")
    video.init_weights()
    mms = [m for m in video.modules() if isinstance(m, temporal.MotionModule)]
    # a motion module after every ResBlock: down 1 + 1, mid 1, up 2 + 2
    assert len(mms) == 7
    for m in mms:
        assert torch.count_nonzero(m.proj_out.weight) == 0 and torch.count_nonzero(m.proj_out.bias) == 0
        pe = m.transformer_blocks[0].pos_embed.pe
        torch.testing.assert_close(pe, temporal.sinusoidal_table(8, pe.shape[-1]), atol=0, rtol=0)
    x, t, ctx = _inputs(B=1, T=3)
    with torch.no_grad():
        assert torch.isfinite(video(x, t, ctx)).all()
    names = set(video.state_dict())
    assert "down_blocks.1.motion_modules.0.transformer_blocks.0.attn2.to_out.weight" in names
    assert "mid_block.motion_modules.0.transformer_blocks.0.pos_embed.pe" in names


def test_config_and_input_errors_name_what_is_wrong():
    with pytest.raises(ConfigError, match="motion_num_attention_heads"):
        temporal.VideoUNet(IMAGE, temporal.Config(motion_num_attention_heads=[3]))
    with pytest.raises(ConfigError, match="motion_num_attention_heads"):
        temporal.VideoUNet(IMAGE, temporal.Config(motion_num_attention_heads=[2, 2, 2]))
    plain_mid = unet_mod.Config(**{**IMAGE.__dict__, "mid_block_type": "UNetMidBlock2D"})
    with pytest.raises(ConfigError, match="use_motion_mid_block"):
        temporal.VideoUNet(plain_mid, MOTION)
    # without the mid-block module that image UNet is fine, and still the image model when fresh
    temporal.VideoUNet(plain_mid, temporal.Config(motion_num_attention_heads=[2], use_motion_mid_block=False))
    video = temporal.VideoUNet(IMAGE, MOTION).eval()
    x, t, ctx = _inputs(B=2, T=3)
    with pytest.raises(ValueError, match="context has batch 3"):
        video(x, t, torch.randn(3, 3, 16))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        video(x[:, :, 0], t, ctx)
    with pytest.raises(ValueError, match="motion_max_seq_length = 8"):
        video(torch.randn(1, 4, 9, 8, 8), 5, ctx[:1])
    image = unet_mod.UNet(IMAGE)
    image.cfg = unet_mod.Config(**{**IMAGE.__dict__, "layers_per_block": 2})  # a config that is not its weights'
    with pytest.raises(ValueError, match="image UNet's weights do not fit its cfg"):
        temporal.VideoUNet.from_image_unet(image, MOTION)
    with pytest.raises(ValueError, match="missing"):
        video.load_motion_state_dict({})
    with pytest.raises(ValueError, match="merge_strategy"):
        temporal.AlphaBlender(0.5, "average")


def test_spatio_temporal_block_starts_as_identity_and_image_frames_skip_the_temporal_branch():
    torch.manual_seed(0)
    block = temporal.SpatioTemporalTransformer(16, heads=2, context_dim=8, layers=1, groups=4).eval()
    B, T = 2, 3
    x, ctx = torch.randn(B * T, 16, 3, 3), torch.randn(B * T, 5, 8)
    videos, images = torch.zeros(B, T), torch.ones(B, T)
    with torch.no_grad():
        assert torch.equal(block(x, ctx, videos), x)  # proj_out = 0: a new block adds nothing
        _randomize(block, 1)
        y_img, y_vid = block(x, ctx, images), block(x, ctx, videos)
        # image-only frames take alpha = 1: the temporal branch's weights cannot matter to them
        _randomize(block.temporal_transformer_blocks, 2)
        assert torch.equal(block(x, ctx, images), y_img)
        assert (block(x, ctx, videos) - y_vid).abs().max() > 1e-3
        # alpha = sigmoid(mix_factor) = 1 at mix_factor = +inf: the spatial branch alone, as for image frames
        block.time_mixer.mix_factor.fill_(float("inf"))
        torch.testing.assert_close(block(x, ctx, videos), y_img, atol=0, rtol=0)


def test_spatio_temporal_resblock_starts_as_the_spatial_resblock_then_mixes_frames():
    torch.manual_seed(0)
    block = temporal.SpatioTemporalResBlock(8, 16, temb_dim=12, groups=4).eval()
    B, T = 2, 5
    x, temb, videos = torch.randn(B * T, 8, 3, 3), torch.randn(B * T, 12), torch.zeros(B, T)
    x2 = x.clone()
    x2[0] += 1.0  # video 0, frame 0

    def change() -> torch.Tensor:  # max |output change| per frame (B T,)
        with torch.no_grad():
            return (block(x2, temb, videos) - block(x, temb, videos)).abs().amax(dim=(1, 2, 3))

    with torch.no_grad():
        # temporal conv2 = 0: the temporal branch returns z_s, and the blend of z_s with itself is z_s
        torch.testing.assert_close(block(x, temb, videos), block.spatial_res_block(x, temb), atol=1e-6, rtol=0)
    d = change()
    assert d[0] > 0.1 and d[1:].max() == 0  # fresh: frames are independent
    _randomize(block.temporal_res_block, 3)
    d = change()
    assert d[1:T].min() > 1e-4  # the (3, 1, 1) convolutions (and the group norm over T) carry frame 0 to the others
    assert d[T:].max() == 0  # never to another video
