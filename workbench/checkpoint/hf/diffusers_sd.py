"""A diffusers Stable Diffusion directory in: UNet, VAE, CLIP text encoder, tokenizer and scheduler.

The layout `StableDiffusionPipeline.save_pretrained` writes (and the Hub's SD 1.x/2.x repositories):

    model_index.json                         {"_class_name": "StableDiffusionPipeline", "unet": [...], ...}
    unet/config.json + diffusion_pytorch_model.safetensors (or shards + .safetensors.index.json)
    vae/config.json  + diffusion_pytorch_model.safetensors
    text_encoder/config.json + model.safetensors      (transformers' CLIPTextModel)
    tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/scheduler_config.json

Each `*_config_from_diffusers` turns a component's config into the workbench `Config`, refusing options the
from-scratch models do not implement by name; each `*_state_from_diffusers` renames the few keys that
differ (the models keep diffusers' / transformers' module names otherwise). Only safetensors are read:
a `.bin` or `.ckpt` pickle is refused, naming the file. This is not a decoder family, so it is not in
`workbench.checkpoint.hf.ADAPTERS`; `load_sd_dir` is its one entry point.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from workbench.checkpoint.hf import _read_json  # the one JSON reader of Hugging Face folders
from workbench.checkpoint.safetensors_io import read_file
from workbench.errors import CheckpointError
from workbench.models.diffusion import autoencoder as vae_mod
from workbench.models.diffusion import text_encoder as clip_mod
from workbench.models.diffusion import unet as unet_mod
from workbench.models.diffusion.schedulers import ScheduleConfig


def _refuse(hf: dict, where: str, key: str, allowed) -> None:
    """A config option the from-scratch component does not implement is an error naming it."""
    value = hf.get(key, allowed[0] if isinstance(allowed, tuple) else allowed)
    ok = value in allowed if isinstance(allowed, tuple) else value == allowed
    if not ok:
        raise CheckpointError(f"{where}: {key}={value!r} is not supported (supported: {allowed!r})")


def _per_block(hf: dict, key: str, n: int, where: str, default) -> list:
    value = hf.get(key, default)
    if value is None:
        value = default
    if isinstance(value, (int, float)):
        return [value] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise CheckpointError(f"{where}: {key} must be a number or a list of {n}, got {value!r}")
    return list(value)


# ------------------------------------------------------------------------------------------------ UNet


def unet_config_from_diffusers(hf: dict, where: str = "unet/config.json") -> unet_mod.Config:
    for key, allowed in (("class_embed_type", None), ("addition_embed_type", None), ("time_cond_proj_dim", None),
                         ("encoder_hid_dim", None), ("num_attention_heads", None), ("dual_cross_attention", False),
                         ("only_cross_attention", False), ("center_input_sample", False), ("act_fn", ("silu", "swish")),
                         ("resnet_time_scale_shift", "default"), ("time_embedding_type", "positional"),
                         ("conv_in_kernel", 3), ("conv_out_kernel", 3), ("attention_type", "default"),
                         ("timestep_post_act", None), ("time_embedding_dim", None), ("cross_attention_norm", None),
                         ("class_embeddings_concat", False), ("mid_block_only_cross_attention", (None, False)),
                         ("time_embedding_act_fn", None), ("addition_time_embed_dim", None),
                         ("resnet_out_scale_factor", 1.0), ("resnet_skip_time_act", False),
                         ("num_class_embeds", None), ("encoder_hid_dim_type", None)):
        _refuse(hf, where, key, allowed)
    down = list(hf.get("down_block_types", unet_mod.Config().down_block_types))
    n = len(down)
    for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
        if len(set(_per_block(hf, key, n, where, {"layers_per_block": 2, "transformer_layers_per_block": 1,
                                                  "cross_attention_dim": 1280}[key]))) > 1:
            raise CheckpointError(f"{where}: a per-block {key} is not supported (got {hf[key]!r})")
    if hf.get("reverse_transformer_layers_per_block") is not None:
        raise CheckpointError(f"{where}: reverse_transformer_layers_per_block is not supported")
    channels = list(hf.get("block_out_channels", [320, 640, 1280, 1280]))
    heads = [int(h) if h is not None else c for h, c in zip(_per_block(hf, "attention_head_dim", n, where, 8), channels)]
    mid_type = hf.get("mid_block_type", "UNetMidBlock2DCrossAttn") or "none"
    if hf.get("norm_num_groups", 32) is None:
        raise CheckpointError(f"{where}: norm_num_groups=None (no output norm) is not supported")
    cfg = unet_mod.Config(
        in_channels=hf.get("in_channels", 4), out_channels=hf.get("out_channels", 4),
        sample_size=hf.get("sample_size") or 64, block_out_channels=channels, down_block_types=down,
        up_block_types=list(hf.get("up_block_types", unet_mod.Config().up_block_types)), mid_block_type=mid_type,
        layers_per_block=_per_block(hf, "layers_per_block", n, where, 2)[0],
        transformer_layers_per_block=_per_block(hf, "transformer_layers_per_block", n, where, 1)[0],
        attention_heads=heads,
        cross_attention_dim=_per_block(hf, "cross_attention_dim", n, where, 1280)[0],
        use_linear_projection=bool(hf.get("use_linear_projection", False)),
        norm_num_groups=hf.get("norm_num_groups", 32), norm_eps=hf.get("norm_eps", 1e-5),
        flip_sin_to_cos=bool(hf.get("flip_sin_to_cos", True)), freq_shift=float(hf.get("freq_shift", 0)),
        downsample_padding=hf.get("downsample_padding", 1),
        mid_block_scale_factor=float(hf.get("mid_block_scale_factor", 1.0)),
        dropout=float(hf.get("dropout", 0.0)),
    )
    try:
        cfg.validate()
    except Exception as e:  # a ConfigError names our key; say which file it came from
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


# diffusers' name -> ours; applied in order to every key
_RENAMES = [
    (re.compile(r"\.to_out\.0\."), ".to_out."),
    (re.compile(r"\.ff\.net\.0\.proj\."), ".ff.proj."),
    (re.compile(r"\.ff\.net\.2\."), ".ff.out."),
    # the spatio-temporal transformer's (SVD / VideoLDM) temporal blocks have a second GEGLU, `ff_in`
    (re.compile(r"\.ff_in\.net\.0\.proj\."), ".ff_in.proj."),
    (re.compile(r"\.ff_in\.net\.2\."), ".ff_in.out."),
    # VAE / plain mid-block attention: diffusers' flat Attention holds group_norm and the projections;
    # ours nests the projections in `.attn` (the part shared with the transformer's attention)
    (re.compile(r"(mid_block\.attentions\.0)\.(to_q|to_k|to_v|to_out)\."), r"\1.attn.\2."),
    # checkpoints written before diffusers 0.14 name the VAE attention query/key/value/proj_attn
    (re.compile(r"(mid_block\.attentions\.0)\.query\."), r"\1.attn.to_q."),
    (re.compile(r"(mid_block\.attentions\.0)\.key\."), r"\1.attn.to_k."),
    (re.compile(r"(mid_block\.attentions\.0)\.value\."), r"\1.attn.to_v."),
    (re.compile(r"(mid_block\.attentions\.0)\.proj_attn\."), r"\1.attn.to_out."),
]


def rename_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' state-dict names -> the workbench models' (UNet and VAE; the patterns are anchored so that
    a cross-attention mid block's `mid_block.attentions.0.transformer_blocks...` is left alone)."""
    out = {}
    for name, t in sd.items():
        for pat, rep in _RENAMES:
            name = pat.sub(rep, name)
        out[name] = t
    return out


def unet_state_from_diffusers(sd: dict[str, torch.Tensor], cfg: unet_mod.Config | None = None) -> dict[str, torch.Tensor]:
    return rename_from_diffusers(sd)


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Copy `sd` into `model` exactly: a missing, unexpected or misshapen tensor is an error naming it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else ""]
        raise CheckpointError(f"{where}: weights do not fit the config ({'; '.join(p for p in parts if p)})")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=True)


def read_weights(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """`<stem>.safetensors` or its shards (index `<stem>.safetensors.index.json`); pickles are refused by name."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: component folder not found")
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_file(folder / shard))
        return tensors
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return read_file(single)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    if pickles:
        raise CheckpointError(f"{folder / pickles[0]}: a pickle checkpoint; only safetensors are loaded "
                              f"(convert it with safetensors first)")
    raise CheckpointError(f"{folder}: no {single.name} (or its shard index)")


# ------------------------------------------------------------------------------------------------ VAE


def vae_config_from_diffusers(hf: dict, where: str = "vae/config.json") -> vae_mod.Config:
    for key, allowed in (("act_fn", ("silu", "swish")), ("latents_mean", None), ("latents_std", None),
                         ("norm_type", (None, "group"))):
        _refuse(hf, where, key, allowed)
    n = len(hf.get("block_out_channels", [64]))
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        kinds = hf.get(key, [want] * n)
        if len(kinds) != n or any(k != want for k in kinds):
            raise CheckpointError(f"{where}: {key}={kinds!r} is not supported (expected {n} x {want})")
    shift = hf.get("shift_factor")
    cfg = vae_mod.Config(
        in_channels=hf.get("in_channels", 3), out_channels=hf.get("out_channels", 3),
        block_out_channels=list(hf.get("block_out_channels", [64])), layers_per_block=hf.get("layers_per_block", 1),
        latent_channels=hf.get("latent_channels", 4), norm_num_groups=hf.get("norm_num_groups", 32),
        sample_size=hf.get("sample_size", 32), scaling_factor=float(hf.get("scaling_factor", 0.18215)),
        shift_factor=float(shift) if shift is not None else 0.0,
        mid_block_add_attention=bool(hf.get("mid_block_add_attention", True)),
        use_quant_conv=bool(hf.get("use_quant_conv", True)), use_post_quant_conv=bool(hf.get("use_post_quant_conv", True)),
    )
    try:
        cfg.validate()
    except Exception as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


def vae_state_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = rename_from_diffusers(sd)
    # pre-0.14 files store the attention projections as 1x1 convs (C, C, 1, 1); ours are Linear
    return {k: v[:, :, 0, 0] if v.ndim == 4 and ".attn.to_" in k else v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ text encoder


def text_config_from_hf(hf: dict, where: str = "text_encoder/config.json") -> clip_mod.Config:
    """transformers' CLIPTextConfig (or a full CLIPConfig's text_config) -> the text encoder's Config."""
    if "text_config" in hf and "hidden_size" not in hf:
        hf = hf["text_config"] or {}
    archs = hf.get("architectures") or ["CLIPTextModel"]
    if not any(a in ("CLIPTextModel", "CLIPTextModelWithProjection") for a in archs):
        raise CheckpointError(f"{where}: architectures {archs} is not a CLIP text model")
    act = hf.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{where}: hidden_act={act!r} is not supported (supported: quick_gelu, gelu)")
    cfg = clip_mod.Config(
        vocab_size=hf.get("vocab_size", 49408), dim=hf.get("hidden_size", 512), n_layers=hf.get("num_hidden_layers", 12),
        n_heads=hf.get("num_attention_heads", 8), ffn_dim=hf.get("intermediate_size", 2048),
        max_positions=hf.get("max_position_embeddings", 77), norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        activation=act, eos_token_id=hf.get("eos_token_id", 49407) if hf.get("eos_token_id") is not None else 49407,
    )
    try:
        cfg.validate()
    except Exception as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


def text_state_from_hf(sd: dict[str, torch.Tensor], where: str = "text_encoder") -> dict[str, torch.Tensor]:
    """`text_model.X` (transformers 4 files, the Hub's SD repositories) or `X` (transformers 5) -> `X`; the
    position_ids buffer and a projection head (unused by SD) are dropped."""
    out = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.startswith("text_projection.")}
    if "embeddings.token_embedding.weight" not in out:
        raise CheckpointError(f"{where}: no embeddings.token_embedding.weight: not a CLIPTextModel checkpoint")
    out.pop("embeddings.position_ids", None)
    return out


# ------------------------------------------------------------------------------------------------ scheduler

# diffusers' defaults for keys a scheduler_config.json may leave out (the same for DDPM and DDIM)
_SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                           prediction_type="epsilon", rescale_betas_zero_snr=False, timestep_spacing="leading",
                           steps_offset=0, set_alpha_to_one=True, clip_sample=True, clip_sample_range=1.0,
                           variance_type="fixed_small")


def schedule_config_from_diffusers(hf: dict, where: str = "scheduler/scheduler_config.json") -> ScheduleConfig:
    """Any diffusers scheduler config (SD ships PNDM's) as a ScheduleConfig: the betas, the prediction type
    and the spacing carry over; the sampler is chosen separately (`--scheduler ddim|ddpm`)."""
    if hf.get("trained_betas") is not None:
        raise CheckpointError(f"{where}: trained_betas is not supported")
    if hf.get("thresholding"):
        raise CheckpointError(f"{where}: thresholding=true is not supported")
    values = {k: hf.get(k, d) if hf.get(k) is not None else d for k, d in _SCHEDULER_DEFAULTS.items()}
    if values["variance_type"] not in ("fixed_small", "fixed_large"):
        raise CheckpointError(f"{where}: variance_type={values['variance_type']!r} is not supported "
                              f"(supported: fixed_small, fixed_large)")
    for key, allowed in (("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2")),
                         ("prediction_type", ("epsilon", "v_prediction", "sample")),
                         ("timestep_spacing", ("leading", "trailing", "linspace"))):
        if values[key] not in allowed:
            raise CheckpointError(f"{where}: {key}={values[key]!r} is not supported (supported: {', '.join(allowed)})")
    return ScheduleConfig(**values)


# ------------------------------------------------------------------------------------------------ the directory

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_sd_dir(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A diffusers Stable Diffusion directory -> `SDComponents` (models in eval mode on `device`). Every
    problem (a missing component folder or file, an unsupported option, a pickle) is a CheckpointError or
    DataError naming the file."""
    from workbench.models.diffusion.clip_tokenizer import CLIPTokenizer
    from workbench.models.diffusion.pipeline import SDComponents

    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    index = _read_json(root / "model_index.json")
    for name in COMPONENTS:
        if not (root / name).is_dir():
            listed = "listed in model_index.json" if name in index else "not in model_index.json either"
            raise CheckpointError(f"{root}: component folder {name}/ is missing ({listed}); a Stable Diffusion "
                                  f"directory needs {', '.join(c + '/' for c in COMPONENTS)}")
    unet_cfg = unet_config_from_diffusers(_read_json(root / "unet" / "config.json"), str(root / "unet" / "config.json"))
    vae_cfg = vae_config_from_diffusers(_read_json(root / "vae" / "config.json"), str(root / "vae" / "config.json"))
    text_hf = _read_json(root / "text_encoder" / "config.json")
    text_cfg = text_config_from_hf(text_hf, str(root / "text_encoder" / "config.json"))
    sched_cfg = schedule_config_from_diffusers(_read_json(root / "scheduler" / "scheduler_config.json"),
                                               str(root / "scheduler" / "scheduler_config.json"))
    if unet_cfg.cross_attention_dim != text_cfg.dim:
        raise CheckpointError(f"{root}: unet cross_attention_dim {unet_cfg.cross_attention_dim} != text_encoder "
                              f"hidden_size {text_cfg.dim}")
    if unet_cfg.in_channels != vae_cfg.latent_channels:
        raise CheckpointError(f"{root}: unet in_channels {unet_cfg.in_channels} != vae latent_channels "
                              f"{vae_cfg.latent_channels}")
    with torch.device("meta"):
        unet, vae, text = unet_mod.UNet(unet_cfg), vae_mod.AutoencoderKL(vae_cfg), clip_mod.CLIPTextModel(text_cfg)
    parts = ((unet, unet_state_from_diffusers(read_weights(root / "unet", "diffusion_pytorch_model")), "unet"),
             (vae, vae_state_from_diffusers(read_weights(root / "vae", "diffusion_pytorch_model")), "vae"),
             (text, text_state_from_hf(read_weights(root / "text_encoder", "model"), str(root / "text_encoder")),
              "text_encoder"))
    vae_hf = _read_json(root / "vae" / "config.json")
    for model, sd, name in parts:
        model.to_empty(device="cpu")
        load_into(model, sd, str(root / name))
        # diffusers' force_upcast: SD's VAE overflows in float16, so it decodes in float32 (the pipeline casts)
        keep_fp32 = name == "vae" and dtype == torch.float16 and vae_hf.get("force_upcast", True)
        model.to(device=device, dtype=torch.float32 if keep_fp32 else dtype).eval()
    tokenizer = CLIPTokenizer.from_dir(root / "tokenizer")
    if max(tokenizer.vocab.values()) >= text_cfg.vocab_size:
        raise CheckpointError(f"{root / 'tokenizer'}: token ids up to {max(tokenizer.vocab.values())}, the text "
                              f"encoder has {text_cfg.vocab_size} embeddings")
    return SDComponents(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, schedule=sched_cfg,
                        use_attention_mask=bool(text_hf.get("use_attention_mask", False)))
