"""A diffusers `MochiTransformer3DModel` directory in and out (the AsymmDiT of workbench.models.video.mochi).

The layout `MochiTransformer3DModel.save_pretrained` writes (and the Hub's genmo/mochi-1-preview `transformer/`):

    config.json                                   {"_class_name": "MochiTransformer3DModel", ...}
    diffusion_pytorch_model.safetensors           (or shards + diffusion_pytorch_model.safetensors.index.json)

Names (diffusers -> workbench), per block i:
    norm1.linear                          -> blocks.i.mod_x
    norm1_context.linear | .linear_1      -> blocks.i.mod_y          (.linear_1: the last block, scale only)
    attn1.to_q, to_k, to_v                -> blocks.i.attn.qkv_x     (stacked along the output axis)
    attn1.add_q_proj, add_k_proj, add_v_proj -> blocks.i.attn.qkv_y
    attn1.norm_q, norm_k, norm_added_q, norm_added_k -> attn.q_norm_x, k_norm_x, q_norm_y, k_norm_y
    attn1.to_out.0, attn1.to_add_out      -> attn.proj_x, attn.proj_y
    ff.net.0.proj = [up; gate], ff.net.2  -> mlp_x.w3 (up), mlp_x.w1 (gate), mlp_x.w2   (ff_context -> mlp_y)
and patch_embed.proj -> patch_embed, time_embed.timestep_embedder.linear_1/2 -> t_embed.mlp_1/2,
time_embed.pooler -> text_pool, time_embed.caption_proj -> text_proj, norm_out.linear -> final.mod,
proj_out -> final.proj, pos_frequencies unchanged. Every move is a split or a concatenation, so import
followed by export reproduces each tensor bit for bit (tested). Only safetensors are read.

Config options the from-scratch model does not implement (qk_norm other than rms_norm, activation_fn other
than swiglu, out_channels != in_channels) are refused by name. `pool_heads` is 8 in diffusers (fixed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from workbench.checkpoint.hf import _read_json, publish_dir, staging_dir
from workbench.checkpoint.hf.diffusers_sd import load_into, read_weights
from workbench.errors import CheckpointError
from workbench.models.video import mochi

CLASS_NAME = "MochiTransformer3DModel"
WEIGHTS = "diffusion_pytorch_model"


def config_from_diffusers(hf: dict, where: str = "config.json") -> mochi.Config:
    if hf.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise CheckpointError(f"{where}: _class_name {hf.get('_class_name')!r} is not {CLASS_NAME}")
    for key, allowed in (("qk_norm", "rms_norm"), ("activation_fn", "swiglu")):
        if hf.get(key, allowed) != allowed:
            raise CheckpointError(f"{where}: {key}={hf[key]!r} is not supported (supported: {allowed!r})")
    cin = int(hf.get("in_channels", 12))
    if hf.get("out_channels") not in (None, cin):
        raise CheckpointError(f"{where}: out_channels={hf['out_channels']!r} != in_channels={cin} is not supported")
    heads, hd = int(hf.get("num_attention_heads", 24)), int(hf.get("attention_head_dim", 128))
    return mochi.Config(
        in_channels=cin, patch_size=int(hf.get("patch_size", 2)), dim=heads * hd,
        text_width=int(hf.get("pooled_projection_dim", 1536)), n_layers=int(hf.get("num_layers", 48)),
        n_heads=heads, head_dim=hd, text_dim=int(hf.get("text_embed_dim", 4096)), pool_heads=8,
        time_embed_dim=int(hf.get("time_embed_dim", 256)), max_text_len=int(hf.get("max_sequence_length", 256)),
        mlp_ratio_x=4.0, mlp_ratio_y=4.0, multiple_of=1)


def config_to_diffusers(cfg: mochi.Config) -> dict:
    if cfg.pool_heads != 8:
        raise CheckpointError(f"model config pool_heads={cfg.pool_heads}: diffusers' MochiTransformer3DModel fixes 8")
    for key, want in (("mlp_ratio_x", 4.0), ("mlp_ratio_y", 4.0), ("target_area", 36864), ("timestep_scale", 1000.0)):
        if getattr(cfg, key) != want:
            raise CheckpointError(f"model config {key}={getattr(cfg, key)!r}: diffusers fixes {want}")
    if cfg.hidden_x != (4 * cfg.dim * 2) // 3 or cfg.hidden_y != (4 * cfg.text_width * 2) // 3:
        raise CheckpointError(f"model config multiple_of={cfg.multiple_of} changes the MLP widths diffusers computes")
    return {"_class_name": CLASS_NAME, "patch_size": cfg.patch_size, "num_attention_heads": cfg.n_heads,
            "attention_head_dim": cfg.head_dim, "num_layers": cfg.n_layers, "pooled_projection_dim": cfg.text_width,
            "in_channels": cfg.in_channels, "out_channels": None, "qk_norm": "rms_norm",
            "text_embed_dim": cfg.text_dim, "time_embed_dim": cfg.time_embed_dim, "activation_fn": "swiglu",
            "max_sequence_length": cfg.max_text_len}


_TOP = {  # diffusers prefix -> workbench prefix (outside the blocks)
    "patch_embed.proj.": "patch_embed.",
    "time_embed.timestep_embedder.linear_1.": "t_embed.mlp_1.",
    "time_embed.timestep_embedder.linear_2.": "t_embed.mlp_2.",
    "time_embed.pooler.": "text_pool.",
    "time_embed.caption_proj.": "text_proj.",
    "norm_out.linear.": "final.mod.",
    "proj_out.": "final.proj.",
    "pos_frequencies": "pos_frequencies",
}
_BLOCK = {  # renames inside block i
    "norm1.linear.": "mod_x.",
    "norm1_context.linear.": "mod_y.",
    "norm1_context.linear_1.": "mod_y.",
    "attn1.norm_q.": "attn.q_norm_x.",
    "attn1.norm_k.": "attn.k_norm_x.",
    "attn1.norm_added_q.": "attn.q_norm_y.",
    "attn1.norm_added_k.": "attn.k_norm_y.",
    "attn1.to_out.0.": "attn.proj_x.",
    "attn1.to_add_out.": "attn.proj_y.",
    "ff.net.2.": "mlp_x.w2.",
    "ff_context.net.2.": "mlp_y.w2.",
}
_QKV = {"attn1.to_": "attn.qkv_x", "attn1.add_": "attn.qkv_y"}  # + q/k/v (_proj)


def state_dict_from_diffusers(sd: dict[str, torch.Tensor], cfg: mochi.Config,
                              where: str = "state dict") -> dict[str, torch.Tensor]:
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for name in list(sd):
        for src, dst in _TOP.items():
            if name.startswith(src):
                out[dst + name[len(src):]] = sd.pop(name)
                break
    for i in range(cfg.n_layers):
        pre, new = f"transformer_blocks.{i}.", f"blocks.{i}."
        for src, dst in _BLOCK.items():
            for key in [k for k in sd if k.startswith(pre + src)]:
                out[new + dst + key[len(pre + src):]] = sd.pop(key)
        for src, dst in _QKV.items():
            suffix = "" if src == "attn1.to_" else "_proj"
            names = [f"{pre}{src}{c}{suffix}.weight" for c in "qkv"]
            if all(n in sd for n in names):
                out[f"{new}{dst}.weight"] = torch.cat([sd.pop(n) for n in names], dim=0)
        for src, dst in (("ff.", "mlp_x"), ("ff_context.", "mlp_y")):
            key = f"{pre}{src}net.0.proj.weight"
            if key in sd:
                up, gate = sd.pop(key).chunk(2, dim=0)  # diffusers' SwiGLU: hidden, gate = proj(x).chunk(2)
                out[f"{new}{dst}.w3.weight"], out[f"{new}{dst}.w1.weight"] = up, gate
    if sd:
        raise CheckpointError(f"{where}: tensors the AsymmDiT has no place for: {sorted(sd)[:4]}")
    return out


def state_dict_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(n_layers):
        pre, new = f"blocks.{i}.", f"transformer_blocks.{i}."
        last = i == n_layers - 1
        for src, dst in _BLOCK.items():
            if dst == "mod_y." and (src == "norm1_context.linear_1.") != last:
                continue
            for key in [k for k in sd if k.startswith(pre + dst)]:
                out[new + src + key[len(pre + dst):]] = sd.pop(key)
        for src, dst in _QKV.items():
            suffix = "" if src == "attn1.to_" else "_proj"
            for c, t in zip("qkv", sd.pop(f"{pre}{dst}.weight").chunk(3, dim=0), strict=True):
                out[f"{new}{src}{c}{suffix}.weight"] = t.clone()
        for src, dst in (("ff.", "mlp_x"), ("ff_context.", "mlp_y")):
            if f"{pre}{dst}.w3.weight" in sd:
                out[f"{new}{src}net.0.proj.weight"] = torch.cat([sd.pop(f"{pre}{dst}.w3.weight"),
                                                                 sd.pop(f"{pre}{dst}.w1.weight")], dim=0)
    for src, dst in _TOP.items():
        for key in [k for k in sd if k.startswith(dst)]:
            out[src + key[len(dst):]] = sd.pop(key)
    if sd:
        raise CheckpointError(f"AsymmDiT state dict: tensors with no diffusers name: {sorted(sd)[:4]}")
    return out


def load_mochi_dir(directory: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[mochi.AsymmDiT, mochi.Config]:
    """(model in eval mode, config) from a `MochiTransformer3DModel.save_pretrained` folder (or a pipeline
    folder, whose `transformer/` subfolder is read). dtype None keeps the stored dtype."""
    directory = Path(directory)
    if (directory / "transformer" / "config.json").is_file():
        directory = directory / "transformer"
    cfg = config_from_diffusers(_read_json(directory / "config.json"), str(directory / "config.json"))
    sd = state_dict_from_diffusers(read_weights(directory, WEIGHTS), cfg, str(directory))
    with torch.device("meta"):
        model = mochi.AsymmDiT(cfg)
    model.to_empty(device=device)
    stored = next(iter(sd.values())).dtype
    model.to(dtype or stored)
    load_into(model, {k: v.to(dtype or v.dtype) for k, v in sd.items()}, str(directory))
    return model.eval(), cfg


def export_mochi_dir(model: mochi.AsymmDiT, out_dir: str | Path) -> Path:
    """Write `config.json` + `diffusion_pytorch_model.safetensors` that diffusers' `from_pretrained` loads.
    Never overwrites: `out_dir` must not exist or be empty."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = staging_dir(out)
    hf = state_dict_to_diffusers({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp / f"{WEIGHTS}.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config_to_diffusers(model.cfg), indent=2) + "\n")
    return publish_dir(tmp, out)
