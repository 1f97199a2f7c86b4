"""A diffusers `AutoencoderKLMochi` folder in and out of `workbench.models.video.vae.CausalVideoVAE`.

The layout `AutoencoderKLMochi.save_pretrained` writes (and the `vae/` folder of a Mochi pipeline):

    config.json                              {"_class_name": "AutoencoderKLMochi", "latents_mean": [...], ...}
    diffusion_pytorch_model.safetensors      (or shards + diffusion_pytorch_model.safetensors.index.json)

The module structure is diffusers' block for block, so the state dict only renames three things:

    diffusers                                      workbench
    ...norm1.norm_layer.weight                     ...norm1.weight           (per-frame GroupNorm subclass)
    ...norms.{i}.norm_layer.weight                 ...attentions.{i}.norm.weight   (the attention owns its norm)
    ...attentions.{i}.to_out.0.weight              ...attentions.{i}.to_out.weight

The per-channel latent statistics live in diffusers' config (`latents_mean`, `latents_std`) and in our
buffers of the same names. diffusers fixes the GroupNorm groups and the attention head size at 32 and the
Fourier features at 2^6, 2^7 (`in_channels` = 3 (1 + 2 * 2) = 15); a config that differs is refused by
name, both ways. This is not a decoder family, so it is not in `workbench.checkpoint.hf.ADAPTERS`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from workbench.checkpoint.hf import _read_json
from workbench.checkpoint.hf.diffusers_sd import _refuse, load_into, read_weights
from workbench.errors import CheckpointError
from workbench.models.video.vae import CausalVideoVAE, Config

CLASS_NAME = "AutoencoderKLMochi"
WEIGHTS_STEM = "diffusion_pytorch_model"
FIXED = {"norm_num_groups": 32, "attention_head_dim": 32, "fourier_start": 6, "fourier_stop": 8}


def config_from_diffusers(hf: dict, where: str = "config.json") -> Config:
    """diffusers' config dict -> Config; options the from-scratch model does not implement are errors."""
    if hf.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise CheckpointError(f"{where}: _class_name={hf['_class_name']!r}, expected {CLASS_NAME!r}")
    _refuse(hf, where, "act_fn", ("silu", "swish"))
    _refuse(hf, where, "scaling_factor", (1.0, None))
    d = Config()  # diffusers' defaults are the "mochi" flavor
    in_ch = hf.get("in_channels", 15)
    fourier = 1 + 2 * (FIXED["fourier_stop"] - FIXED["fourier_start"])
    if in_ch % fourier:
        raise CheckpointError(f"{where}: in_channels={in_ch} is not image channels x {fourier} (the Fourier features)")
    cfg = Config(
        in_channels=in_ch // fourier, out_channels=hf.get("out_channels", 3),
        latent_channels=hf.get("latent_channels", 12),
        encoder_channels=list(hf.get("encoder_block_out_channels", d.encoder_channels)),
        decoder_channels=list(hf.get("decoder_block_out_channels", d.decoder_channels)),
        layers_per_block=list(hf.get("layers_per_block", d.layers_per_block)),
        temporal_expansions=list(hf.get("temporal_expansions", d.temporal_expansions)),
        spatial_expansions=list(hf.get("spatial_expansions", d.spatial_expansions)),
        encoder_attention=[bool(a) for a in hf.get("add_attention_block", d.encoder_attention)],
        **FIXED,
    )
    try:
        cfg.validate()
    except Exception as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


def config_to_diffusers(cfg: Config, latents_mean: torch.Tensor, latents_std: torch.Tensor) -> dict:
    """Config (+ the latent statistics) -> the config.json diffusers' AutoencoderKLMochi reads."""
    for key, want in FIXED.items():
        if getattr(cfg, key) != want:
            raise CheckpointError(f"config key '{key}': diffusers' AutoencoderKLMochi fixes it at {want}, "
                                  f"got {getattr(cfg, key)}")
    return {
        "_class_name": CLASS_NAME,
        "in_channels": cfg.in_channels * (1 + 2 * (cfg.fourier_stop - cfg.fourier_start)),
        "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
        "encoder_block_out_channels": list(cfg.encoder_channels),
        "decoder_block_out_channels": list(cfg.decoder_channels),
        "layers_per_block": list(cfg.layers_per_block), "act_fn": "silu",
        "temporal_expansions": list(cfg.temporal_expansions), "spatial_expansions": list(cfg.spatial_expansions),
        "add_attention_block": list(cfg.encoder_attention),
        "latents_mean": [float(v) for v in latents_mean], "latents_std": [float(v) for v in latents_std],
        "scaling_factor": 1.0,
    }


_FROM = [(re.compile(r"\.norm_layer\."), "."),
         (re.compile(r"\.norms\.(\d+)\."), r".attentions.\1.norm."),
         (re.compile(r"\.to_out\.0\."), ".to_out.")]
_TO = [(re.compile(r"\.attentions\.(\d+)\.norm\."), r".norms.\1.norm_layer."),
       (re.compile(r"\.(norm1|norm2|norm_out)\."), r".\1.norm_layer."),
       (re.compile(r"\.to_out\."), ".to_out.0.")]


def _stats(hf: dict, key: str, n: int, default: float, where: str) -> torch.Tensor:
    value = hf.get(key)
    if value is None:
        return torch.full((n,), default)
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise CheckpointError(f"{where}: {key} must list latent_channels = {n} numbers, got {value!r}")
    return torch.tensor([float(v) for v in value])


def state_dict_from_diffusers(sd: dict[str, torch.Tensor], hf: dict, where: str = "config.json") -> dict[str, torch.Tensor]:
    """diffusers' tensors (and config, for the latent statistics) -> CausalVideoVAE's state dict."""
    out = {}
    for name, t in sd.items():
        for pat, rep in _FROM:
            name = pat.sub(rep, name)
        out[name] = t
    n = hf.get("latent_channels", 12)
    out["latents_mean"] = _stats(hf, "latents_mean", n, 0.0, where)
    out["latents_std"] = _stats(hf, "latents_std", n, 1.0, where)
    return out


def state_dict_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CausalVideoVAE's state dict -> diffusers' names (the latent statistics go to the config instead)."""
    out = {}
    for name, t in sd.items():
        if name in ("latents_mean", "latents_std"):
            continue
        for pat, rep in _TO:
            name = pat.sub(rep, name)
        out[name] = t.contiguous()
    return out


def load_mochi_vae_dir(directory: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> CausalVideoVAE:
    """A diffusers AutoencoderKLMochi folder (or a pipeline folder with `vae/`) -> CausalVideoVAE in eval mode.
    Built on the meta device and materialized once; every problem is a CheckpointError naming the file."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    if not (root / "config.json").is_file() and (root / "vae" / "config.json").is_file():
        root = root / "vae"
    hf = _read_json(root / "config.json")
    cfg = config_from_diffusers(hf, str(root / "config.json"))
    sd = state_dict_from_diffusers(read_weights(root, WEIGHTS_STEM), hf, str(root / "config.json"))
    with torch.device("meta"):
        model = CausalVideoVAE(cfg)
    model.to_empty(device="cpu")
    load_into(model, sd, str(root))
    return model.to(device=device, dtype=dtype).eval()


def save_mochi_vae_dir(model: CausalVideoVAE, directory: str | Path) -> Path:
    """Write `config.json` + `diffusion_pytorch_model.safetensors` that diffusers' AutoencoderKLMochi loads."""
    from safetensors.torch import save_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    hf = config_to_diffusers(model.cfg, model.latents_mean.cpu(), model.latents_std.cpu())
    tensors = {k: v.detach().cpu() for k, v in state_dict_to_diffusers(model.state_dict()).items()}
    save_file(tensors, str(root / f"{WEIGHTS_STEM}.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    return root
