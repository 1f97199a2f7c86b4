"""Temporal attention (workbench.models.diffusion.temporal) vs diffusers on tiny random configs, fp32.

The references are built with random weights (proj_out included, so the temporal paths are exercised), their
state dicts go through the SD checkpoint adapter's renames (`diffusers_sd.rename_from_diffusers`) and outputs
are compared at atol 1e-5."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.models.resnet import AlphaBlender as RefBlender  # noqa: E402
from diffusers.models.resnet import SpatioTemporalResBlock as RefResBlock  # noqa: E402
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel  # noqa: E402
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D  # noqa: E402

from workbench.checkpoint.hf import animatediff  # noqa: E402
from workbench.checkpoint.hf import diffusers_sd as sd_io  # noqa: E402
from workbench.errors import CheckpointError  # noqa: E402
from workbench.models.diffusion import temporal  # noqa: E402
from workbench.models.diffusion import unet as unet_mod  # noqa: E402

ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.1))


def _load(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    sd_io.load_into(ours, sd_io.rename_from_diffusers(ref.state_dict()), type(ref).__name__)


def test_motion_module_matches_animatediff_transformer3d():
    torch.manual_seed(0)
    ref = AnimateDiffTransformer3D(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=2,
                                   norm_num_groups=8, attention_bias=False, activation_fn="geglu",
                                   positional_embeddings="sinusoidal", num_positional_embeddings=12,
                                   double_self_attention=True).eval()
    _randomize(ref, 1)
    ours = temporal.MotionModule(32, heads=2, layers=2, groups=8, max_len=12).eval()
    _load(ours, ref)
    g = torch.Generator().manual_seed(2)
    for B, T, H, W in ((2, 5, 4, 3), (1, 12, 2, 2), (3, 1, 3, 3)):
        x = torch.randn(B * T, 32, H, W, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, T), ref(x, num_frames=T), atol=ATOL, rtol=0)
    # more frames than the positions cover is an error naming the setting
    with pytest.raises(ValueError, match="motion_max_seq_length"):
        ours(torch.randn(13, 32, 2, 2), 13)


MOTION_CASES = {
    # models.md's tiny SD UNet (a plain and a CrossAttn block) + a tiny MotionAdapter with a mid-block module
    "tiny-mid": (dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                      attention_head_dim=2, norm_num_groups=8),
                 dict(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=2,
                      motion_max_seq_length=8, use_motion_mid_block=True)),
    # v1-style adapter (no mid-block module), per-block motion heads, two temporal layers, linear projections
    "v1-linear": (dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=3, out_channels=3,
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                       attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8),
                  dict(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=(1, 2),
                       motion_transformer_layers_per_block=2, motion_max_seq_length=32, use_motion_mid_block=False)),
}


@pytest.mark.parametrize("case", list(MOTION_CASES))
def test_video_unet_matches_unet_motion_model(case, tmp_path):
    """The realistic path: a saved MotionAdapter folder loaded onto our image UNet (from the SD UNet's weights)
    vs diffusers' UNetMotionModel.from_unet2d(unet, adapter)."""
    unet_kw, adapter_kw = MOTION_CASES[case]
    torch.manual_seed(0)
    image = diffusers.UNet2DConditionModel(**unet_kw).eval()
    adapter = diffusers.MotionAdapter(motion_norm_num_groups=unet_kw["norm_num_groups"], **adapter_kw)
    _randomize(image, 1), _randomize(adapter, 3)  # proj_out included: the temporal paths matter
    ref = diffusers.UNetMotionModel.from_unet2d(image, adapter).eval()
    adapter.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    ours_image = unet_mod.UNet(sd_io.unet_config_from_diffusers(dict(image.config)))
    sd_io.load_into(ours_image, sd_io.unet_state_from_diffusers(image.state_dict()), "unet")
    ours = animatediff.load_motion_adapter(tmp_path / "adapter", ours_image).eval()
    # the same weights, key for key, as diffusers' assembled model
    ref_sd = sd_io.rename_from_diffusers(ref.state_dict())
    assert set(ref_sd) == set(ours.state_dict())
    assert all(torch.equal(v, ref_sd[k]) for k, v in ours.state_dict().items())
    g = torch.Generator().manual_seed(2)
    C, D = unet_kw["in_channels"], unet_kw["cross_attention_dim"]
    for B, T, H, W in ((1, 4, 16, 16), (2, 3, 8, 12)):
        x = torch.randn(B, C, T, H, W, generator=g)
        t = torch.tensor([7, 901][:B])
        ctx = torch.randn(B, 5, D, generator=g)
        with torch.no_grad():
            # diffusers' UNetMotionModel takes one context per frame (its pipeline repeats the prompt's)
            want = ref(x, t, encoder_hidden_states=ctx.repeat_interleave(T, dim=0)).sample
            got = ours(x, t, ctx)
            per_frame = ours(x, t, ctx.repeat_interleave(T, dim=0))
        assert got.shape == want.shape == (B, unet_kw["out_channels"], T, H, W)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert torch.equal(per_frame, got)


def test_motion_adapter_options_we_do_not_implement_are_refused():
    image = sd_io.unet_config_from_diffusers(MOTION_CASES["tiny-mid"][0])
    ok = dict(block_out_channels=[32, 64], motion_layers_per_block=2, motion_num_attention_heads=2)
    assert animatediff.motion_config_from_diffusers(ok, image).motion_num_attention_heads == [2, 2]
    for bad, match in ((dict(conv_in_channels=9), "conv_in_channels"),
                       (dict(motion_layers_per_block=1), "motion_layers_per_block"),
                       (dict(motion_transformer_layers_per_block=[1, 2]), "only one count"),
                       (dict(block_out_channels=[32, 32]), "block_out_channels"),
                       (dict(motion_num_attention_heads=3), "motion_num_attention_heads")):
        with pytest.raises(CheckpointError, match=match):
            animatediff.motion_config_from_diffusers({**ok, **bad}, image, "adapter/config.json")


@pytest.mark.parametrize("strategy", temporal.MERGE_STRATEGIES)
@pytest.mark.parametrize("switch", [False, True])
def test_alpha_blender_matches_diffusers(strategy, switch):
    ref = RefBlender(alpha=0.3, merge_strategy=strategy, switch_spatial_to_temporal_mix=switch)
    ours = temporal.AlphaBlender(0.3, strategy, switch)
    if strategy != "fixed":
        with torch.no_grad():
            ref.mix_factor.fill_(-0.7), ours.mix_factor.fill_(-0.7)
    assert set(ours.state_dict()) == set(ref.state_dict()) == {"mix_factor"}
    g = torch.Generator().manual_seed(0)
    B, T = 2, 3
    ind = torch.tensor([[0, 1, 0], [1, 1, 0]])
    for shape in ((B, 4, T, 2, 2), (B * T, 5, 4)):
        xs, xt = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        torch.testing.assert_close(ours(xs, xt, ind), ref(xs, xt, ind), atol=0, rtol=0)
    if strategy == "learned_with_images":
        # an image-only frame keeps exactly the spatial value (alpha = 1; switched: the temporal one)
        xs, xt = torch.randn(B * T, 5, 4, generator=g), torch.randn(B * T, 5, 4, generator=g)
        out = ours(xs, xt, ind)
        keep = (xt if switch else xs)[ind.reshape(-1).bool()]
        assert torch.equal(out[ind.reshape(-1).bool()], keep)
        with pytest.raises(ValueError, match="image_only_indicator"):
            ours(xs, xt)


def test_spatio_temporal_transformer_matches_diffusers():
    torch.manual_seed(0)
    ref = TransformerSpatioTemporalModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=2,
                                         cross_attention_dim=24).eval()
    _randomize(ref, 1)
    ours = temporal.SpatioTemporalTransformer(32, heads=2, context_dim=24, layers=2).eval()
    _load(ours, ref)
    g = torch.Generator().manual_seed(2)
    B, T, H, W = 2, 3, 3, 4
    x = torch.randn(B * T, 32, H, W, generator=g)
    ctx = torch.randn(B * T, 6, 24, generator=g)
    for ind in (torch.zeros(B, T), torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])):
        with torch.no_grad():
            want = ref(x, encoder_hidden_states=ctx, image_only_indicator=ind).sample
            got = ours(x, ctx, ind)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cin,cout,switch", [(32, 64, False), (32, 32, True)])
def test_spatio_temporal_resblock_matches_diffusers(cin, cout, switch):
    torch.manual_seed(0)
    ref = RefResBlock(cin, cout, temb_channels=16, eps=1e-5, temporal_eps=1e-6,
                      switch_spatial_to_temporal_mix=switch).eval()
    _randomize(ref, 1)
    ours = temporal.SpatioTemporalResBlock(cin, cout, 16, eps=1e-5, temporal_eps=1e-6,
                                           switch_spatial_to_temporal_mix=switch).eval()
    _load(ours, ref)
    g = torch.Generator().manual_seed(2)
    B, T = 2, 4
    x, temb = torch.randn(B * T, cin, 3, 5, generator=g), torch.randn(B * T, 16, generator=g)
    for ind in (torch.zeros(B, T), torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])):
        with torch.no_grad():
            torch.testing.assert_close(ours(x, temb, ind), ref(x, temb, ind), atol=ATOL, rtol=0)
