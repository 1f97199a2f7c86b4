"""Temporal attention against diffusers on the same random weights: max |ours - reference|, and the real sizes.

    python benchmarks/temporal_parity.py        # the parity table of docs/temporal-attention.md, about a minute

For each component (AnimateDiffTransformer3D, UNetMotionModel from a tiny UNet2DConditionModel + MotionAdapter,
AlphaBlender, TransformerSpatioTemporalModel, SpatioTemporalResBlock) the diffusers module gets random weights (proj_out included), its
state dict goes through `diffusers_sd.rename_from_diffusers` into ours, and the max absolute output
difference is printed in float32 and float64. Then the SD 1.5 motion adapter's size: our `VideoUNet(unet
"sd15", temporal "sd15")` and diffusers' default `MotionAdapter()` are built on the meta device and their
motion parameters counted and compared name by name.
"""

from __future__ import annotations

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.resnet import AlphaBlender as RefBlender
from diffusers.models.resnet import SpatioTemporalResBlock as RefResBlock
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from diffusers.utils import logging as diffusers_logging

from workbench.checkpoint.hf import diffusers_sd as sd_io
from workbench.models.diffusion import temporal
from workbench.models.diffusion import unet as unet_mod


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * (0.2 if p.ndim > 1 else 0.1))


def _pair(ref: torch.nn.Module, ours: torch.nn.Module, dtype: torch.dtype):
    ref = ref.to(dtype).eval()
    _randomize(ref, 1)
    ours = ours.to(dtype).eval()
    sd_io.load_into(ours, sd_io.rename_from_diffusers(ref.state_dict()), type(ref).__name__)
    return ref, ours


def cases(dtype: torch.dtype) -> dict[str, float]:
    out = {}
    g = torch.Generator().manual_seed(2)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    torch.manual_seed(0)
    ref, ours = _pair(AnimateDiffTransformer3D(num_attention_heads=8, attention_head_dim=40, in_channels=320, num_layers=1,
                                               norm_num_groups=32, positional_embeddings="sinusoidal",
                                               num_positional_embeddings=32, double_self_attention=True),
                      temporal.MotionModule(320, heads=8, layers=1, groups=32, max_len=32), dtype)
    x = rnd(2 * 16, 320, 8, 8)  # 2 videos of 16 frames, SD 1.5's first-level width at 8x8 latent pixels
    with torch.no_grad():
        out["motion module (SD 1.5 level-1 size, 16 frames)"] = (ours(x, 16) - ref(x, num_frames=16)).abs().max().item()

    torch.manual_seed(0)
    image = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
                                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=2, norm_num_groups=8)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=16, use_motion_mid_block=True)
    ref = UNetMotionModel.from_unet2d(image, adapter)
    motion = temporal.Config(motion_num_attention_heads=[2], motion_max_seq_length=16)
    ref, ours = _pair(ref, temporal.VideoUNet(sd_io.unet_config_from_diffusers(dict(image.config)), motion), dtype)
    x, t, ctx = rnd(2, 4, 8, 16, 16), torch.tensor([7, 901]), rnd(2, 5, 32)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx.repeat_interleave(8, dim=0)).sample
        out["VideoUNet vs UNetMotionModel (tiny, 2 x 8 frames)"] = (ours(x, t, ctx) - want).abs().max().item()

    worst = 0.0
    ind = torch.tensor([[0, 1, 0], [1, 1, 0]])
    for strategy in temporal.MERGE_STRATEGIES:
        for switch in (False, True):
            ref, ours = RefBlender(0.3, strategy, switch).to(dtype), temporal.AlphaBlender(0.3, strategy, switch).to(dtype)
            xs, xt = rnd(2, 4, 3, 2, 2), rnd(2, 4, 3, 2, 2)
            with torch.no_grad():
                worst = max(worst, (ours(xs, xt, ind) - ref(xs, xt, ind)).abs().max().item())
    out["AlphaBlender (3 strategies x switch)"] = worst

    torch.manual_seed(0)
    ref, ours = _pair(TransformerSpatioTemporalModel(num_attention_heads=2, attention_head_dim=16, in_channels=32,
                                                     num_layers=2, cross_attention_dim=24),
                      temporal.SpatioTemporalTransformer(32, heads=2, context_dim=24, layers=2), dtype)
    x, ctx = rnd(2 * 3, 32, 4, 4), rnd(2 * 3, 6, 24)
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx, image_only_indicator=ind.to(dtype)).sample
        out["SpatioTemporalTransformer (2 x 3 frames)"] = (ours(x, ctx, ind.to(dtype)) - want).abs().max().item()

    torch.manual_seed(0)
    ref, ours = _pair(RefResBlock(32, 64, temb_channels=16), temporal.SpatioTemporalResBlock(32, 64, 16), dtype)
    x, temb = rnd(2 * 3, 32, 4, 4), rnd(2 * 3, 16)
    with torch.no_grad():
        want = ref(x, temb, image_only_indicator=ind.to(dtype))
        out["SpatioTemporalResBlock (32 -> 64 channels, 2 x 3 frames)"] = (ours(x, temb, ind.to(dtype)) - want).abs().max().item()
    return out


def main() -> None:
    torch.set_num_threads(1)
    diffusers_logging.set_verbosity_error()  # its note about casting a freshly built UNetMotionModel with .to()
    r32, r64 = cases(torch.float32), cases(torch.float64)
    print("| component | max abs diff fp32 | max abs diff fp64 |")
    print("|---|---|---|")
    for k in r32:
        print(f"| {k} | {r32[k]:.2e} | {r64[k]:.2e} |")

    with torch.device("meta"):
        ours = temporal.VideoUNet(unet_mod.FLAVORS["sd15"], temporal.FLAVORS["sd15"])
        ref = MotionAdapter()
    mine = {k: tuple(v.shape) for k, v in ours.named_parameters() if ".motion_modules." in k}
    theirs = {k: tuple(v.shape) for k, v in sd_io.rename_from_diffusers(dict(ref.named_parameters())).items()}
    n_image = sum(p.numel() for k, p in ours.named_parameters() if ".motion_modules." not in k)
    print(f"\nSD 1.5 motion adapter: ours {sum(map(_numel, mine.values())):,} motion parameters "
          f"(+ {n_image:,} image UNet), diffusers MotionAdapter() {sum(map(_numel, theirs.values())):,}; "
          f"same names and shapes: {mine == theirs}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
