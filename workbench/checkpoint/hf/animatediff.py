"""A diffusers AnimateDiff `MotionAdapter` folder in: the motion modules of a `temporal.VideoUNet`.

The layout `MotionAdapter.save_pretrained` writes (and the Hub's guoyww/animatediff-motion-adapter-* repositories):

    config.json                               {"_class_name": "MotionAdapter", "block_out_channels": [...], ...}
    diffusion_pytorch_model.safetensors       (or shards + .safetensors.index.json)

Its tensors are named as the motion modules of diffusers' `UNetMotionModel` and so of `VideoUNet`
(`down_blocks.i.motion_modules.j...`), up to the SD adapter's renames (`to_out.0`, `ff.net.0.proj`, `ff.net.2`).
The image half comes from a Stable Diffusion UNet (`diffusers_sd`), as `UNetMotionModel.from_unet2d(unet,
adapter)` does. Options the from-scratch model does not implement are refused by name: PIA's `conv_in_channels`,
a mid block with more than one motion layer, per-block lists of temporal transformer layers that differ. Like
diffusers' `UNetMotionModel`, the motion modules' GroupNorm takes the image UNet's `norm_num_groups`
(the adapter's `motion_norm_num_groups` only shapes nothing: GroupNorm weights are per channel).
"""

from __future__ import annotations

from pathlib import Path

from workbench.checkpoint.hf import _read_json
from workbench.checkpoint.hf.diffusers_sd import _per_block, _refuse, read_weights, rename_from_diffusers
from workbench.errors import CheckpointError
from workbench.models.diffusion import temporal
from workbench.models.diffusion import unet as unet_mod


def motion_config_from_diffusers(hf: dict, image: unet_mod.Config | None = None,
                                 where: str = "config.json") -> temporal.Config:
    """A MotionAdapter config -> `temporal.Config`; with the image UNet's config, also checks they fit."""
    _refuse(hf, where, "conv_in_channels", (None, 0))
    _refuse(hf, where, "motion_mid_block_layers_per_block", 1)
    n = len(hf.get("block_out_channels", ()))
    if n == 0:
        raise CheckpointError(f"{where}: block_out_channels is missing or empty")
    layers = _per_block(hf, "motion_transformer_layers_per_block", n, where, 1)
    mid_layers = hf.get("motion_transformer_layers_per_mid_block", 1)
    mid_layers = mid_layers[0] if isinstance(mid_layers, (list, tuple)) and len(mid_layers) == 1 else mid_layers
    if any(isinstance(v, (list, tuple)) for v in layers) or len(set(layers)) != 1 or not isinstance(mid_layers, int):
        raise CheckpointError(f"{where}: motion_transformer_layers_per_block={hf.get('motion_transformer_layers_per_block')!r}"
                              f" / motion_transformer_layers_per_mid_block={hf.get('motion_transformer_layers_per_mid_block')!r}:"
                              f" only one count for all blocks is supported")
    heads = _per_block(hf, "motion_num_attention_heads", n, where, 8)
    cfg = temporal.Config(motion_num_attention_heads=[int(h) for h in heads],
                          motion_transformer_layers_per_block=int(layers[0]),
                          motion_transformer_layers_per_mid_block=int(mid_layers),
                          motion_max_seq_length=int(hf.get("motion_max_seq_length", 32)),
                          use_motion_mid_block=bool(hf.get("use_motion_mid_block", True)))
    if image is not None:
        if list(hf["block_out_channels"]) != list(image.block_out_channels):
            raise CheckpointError(f"{where}: block_out_channels {list(hf['block_out_channels'])} do not match the "
                                  f"image UNet's {image.block_out_channels}")
        per = _per_block(hf, "motion_layers_per_block", n, where, 2)
        if any(p != image.layers_per_block for p in per):
            raise CheckpointError(f"{where}: motion_layers_per_block={hf.get('motion_layers_per_block')!r} must equal "
                                  f"the image UNet's layers_per_block ({image.layers_per_block})")
        try:
            cfg.validate(image)
        except Exception as e:  # a ConfigError names our key; say which file it came from
            raise CheckpointError(f"{where}: {e}") from None
    return cfg


def load_motion_adapter(directory: str | Path, image: unet_mod.UNet) -> temporal.VideoUNet:
    """`image` (a loaded SD UNet) inflated with the motion modules of a MotionAdapter folder, in eval mode; errors
    name the file."""
    root = Path(directory)
    cfg = motion_config_from_diffusers(_read_json(root / "config.json"), image.cfg, str(root / "config.json"))
    video = temporal.VideoUNet.from_image_unet(image, cfg)
    sd = rename_from_diffusers(read_weights(root, "diffusion_pytorch_model"))
    try:
        video.load_motion_state_dict({k: v.to(next(image.parameters()).dtype) for k, v in sd.items()})
    except ValueError as e:
        raise CheckpointError(f"{root}: {e}") from None
    return video.eval()
