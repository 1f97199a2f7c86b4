"""Hugging Face `PaliGemmaForConditionalGeneration` (Gemma 2 text config) <-> workbench `paligemma2`.

Names (ours  <->  HF as transformers 5.25 saves them)
    vision_tower.patch_embedding.*               vision_tower.embeddings.patch_embedding.*
    vision_tower.position_embedding.weight       vision_tower.embeddings.position_embedding.weight
    vision_tower.layers.{i}.norm1/norm2.*        vision_tower.encoder.layers.{i}.layer_norm1/layer_norm2.*
    vision_tower.layers.{i}.attention.w{q,k,v,o}.*   ...self_attn.{q,k,v,out}_proj.*
    vision_tower.layers.{i}.mlp.fc1/fc2.*        vision_tower.encoder.layers.{i}.mlp.fc1/fc2.*
    vision_tower.post_norm.*                     vision_tower.post_layernorm.*
    multi_modal_projector.{weight,bias}          multi_modal_projector.linear.{weight,bias}
    language_model.embed_tokens.weight           language_model.model.embed_tokens.weight
    language_model.layers.{i}.attention_norm     ...layers.{i}.input_layernorm
    language_model.layers.{i}.post_attention_norm ...layers.{i}.post_attention_layernorm
    language_model.layers.{i}.ffn_norm           ...layers.{i}.pre_feedforward_layernorm
    language_model.layers.{i}.post_ffn_norm      ...layers.{i}.post_feedforward_layernorm
    language_model.layers.{i}.attention.w{q,k,v,o}   ...self_attn.{q,k,v,o}_proj
    language_model.layers.{i}.feed_forward.w1/w3/w2  ...mlp.gate_proj/up_proj/down_proj
    language_model.norm.weight                   language_model.model.norm.weight
Import also reads the hub's older layout (`vision_tower.vision_model.*`) and transformers' in-memory one
(`model.language_model.*`, `model.vision_tower.*`, ...); the tied `lm_head.weight`, when a file has it, is
dropped (it is the embedding matrix). No tensor is permuted or rescaled: the Gemma norms store w of (1 + w)
in both, and RoPE is half-split in both.

Config: the text config's missing fields take Gemma 2's defaults and the vision config's SigLIP's (hub
configs spell out only what differs). `layer_types` is followed when given (transformers 5 writes it);
otherwise layers alternate, sliding on even indices, as transformers does.
"""

from __future__ import annotations

import re

import torch

from workbench.checkpoint.hf.llama3 import config_in_hf_terms
from workbench.checkpoint.hf.rope import rope_from_hf, rope_to_hf
from workbench.errors import CheckpointError
from workbench.models.paligemma2 import Config

ARCHITECTURES = ("PaliGemmaForConditionalGeneration",)

# transformers' defaults for fields a hub config leaves out
_GEMMA2_DEFAULTS = {"head_dim": 256, "intermediate_size": 9216, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                    "initializer_range": 0.02, "hidden_activation": "gelu_pytorch_tanh", "vocab_size": 256000,
                    "hidden_size": 2304, "num_hidden_layers": 26}
_SIGLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "num_channels": 3, "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6,
                    "hidden_act": "gelu_pytorch_tanh"}

_VISION_LAYER = {  # ours -> HF, under layers.{i}.
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.out_proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_TEXT_LAYER = {
    "attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffn_norm": "post_feedforward_layernorm",
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}
_TOP = {  # ours -> HF (the save layout), without the .weight / .bias suffix
    "vision_tower.patch_embedding": "vision_tower.embeddings.patch_embedding",
    "vision_tower.position_embedding": "vision_tower.embeddings.position_embedding",
    "vision_tower.post_norm": "vision_tower.post_layernorm",
    "multi_modal_projector": "multi_modal_projector.linear",
    "language_model.embed_tokens": "language_model.model.embed_tokens",
    "language_model.norm": "language_model.model.norm",
}
_HF_VISION_LAYER = {v: k for k, v in _VISION_LAYER.items()}
_HF_TEXT_LAYER = {v: k for k, v in _TEXT_LAYER.items()}
_HF_TOP = {v: k for k, v in _TOP.items()}
_OURS_RE = re.compile(r"^(vision_tower|language_model)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_VISION_RE = re.compile(r"^vision_tower\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_TEXT_RE = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TIED_HEAD = ("lm_head.weight", "language_model.lm_head.weight")


def _get(section: dict, key: str, defaults: dict):
    value = section.get(key)
    return defaults[key] if value is None else value


def config_from_hf(hf: dict, where: str = "config.json") -> Config:
    """Our Config from a parsed PaliGemma config.json (Gemma 2 text config)."""
    text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
    if text.get("model_type", "gemma2") != "gemma2":
        raise CheckpointError(f"{where}: text_config.model_type {text.get('model_type')!r} is not supported "
                              "(PaliGemma 2 = gemma2; PaliGemma 1's gemma is not)")
    if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise CheckpointError(f"{where}: vision_config.model_type {vision.get('model_type')!r} is not supported "
                              "(siglip_vision_model)")
    if vision.get("vision_use_head"):
        raise CheckpointError(f"{where}: vision_config.vision_use_head = true is not supported (PaliGemma has no head)")
    for section, defaults, key, name in ((text, _GEMMA2_DEFAULTS, "hidden_activation", "text_config"),
                                         (vision, _SIGLIP_DEFAULTS, "hidden_act", "vision_config")):
        act = section.get(key) or section.get("hidden_act") or defaults[key]
        if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):  # all three are the tanh GELU here
            raise CheckpointError(f"{where}: {name}.{key} {act!r} is not supported (gelu_pytorch_tanh)")
    if text.get("attention_bias"):
        raise CheckpointError(f"{where}: text_config.attention_bias = true is not supported (Gemma 2 has none)")
    if text.get("tie_word_embeddings", hf.get("tie_word_embeddings", True)) is False:
        raise CheckpointError(f"{where}: tie_word_embeddings = false is not supported (PaliGemma ties the head)")
    image_token = hf.get("image_token_index", hf.get("image_token_id"))
    if image_token is None:
        raise CheckpointError(f"{where}: missing field 'image_token_index'")
    g = lambda k: _get(text, k, _GEMMA2_DEFAULTS)  # noqa: E731
    s = lambda k: _get(vision, k, _SIGLIP_DEFAULTS)  # noqa: E731
    n_heads = g("num_attention_heads")
    data = {
        "dim": g("hidden_size"), "n_layers": g("num_hidden_layers"), "n_heads": n_heads,
        "n_kv_heads": g("num_key_value_heads"), "head_dim": g("head_dim"), "ffn_dim": g("intermediate_size"),
        "vocab_size": g("vocab_size"), "norm_eps": float(g("rms_norm_eps")),
        "rope": rope_from_hf(text, where, "paligemma2", supported=("default",)),
        "max_seq_len": g("max_position_embeddings"), "query_pre_attn_scalar": float(g("query_pre_attn_scalar")),
        "sliding_window": text.get("sliding_window", 4096) or 0, "layer_types": list(text.get("layer_types") or []),
        "attn_softcap": float(text.get("attn_logit_softcapping", 50.0) or 0.0),
        "final_softcap": float(text.get("final_logit_softcapping", 30.0) or 0.0),
        "init_std": float(g("initializer_range")),
        "image_token_id": image_token,
        "vision": {"image_size": s("image_size"), "patch_size": s("patch_size"), "channels": s("num_channels"),
                   "dim": s("hidden_size"), "n_layers": s("num_hidden_layers"), "n_heads": s("num_attention_heads"),
                   "mlp_dim": s("intermediate_size"), "norm_eps": float(s("layer_norm_eps"))},
    }
    proj = hf.get("projection_dim", vision.get("projection_dim"))
    if proj is not None and proj != data["dim"]:
        raise CheckpointError(f"{where}: field 'projection_dim': must equal text_config.hidden_size "
                              f"({data['dim']}), got {proj}")
    return config_in_hf_terms(Config, data, where, _HF_CONFIG_NAMES)


_HF_CONFIG_NAMES = {
    "dim": "text_config.hidden_size", "n_layers": "text_config.num_hidden_layers",
    "n_heads": "text_config.num_attention_heads", "n_kv_heads": "text_config.num_key_value_heads",
    "head_dim": "text_config.head_dim", "ffn_dim": "text_config.intermediate_size",
    "vocab_size": "text_config.vocab_size", "norm_eps": "text_config.rms_norm_eps",
    "max_seq_len": "text_config.max_position_embeddings", "sliding_window": "text_config.sliding_window",
    "layer_types": "text_config.layer_types", "attn_softcap": "text_config.attn_logit_softcapping",
    "final_softcap": "text_config.final_logit_softcapping", "image_token_id": "image_token_index",
    "vision.image_size": "vision_config.image_size", "vision.patch_size": "vision_config.patch_size",
    "vision.dim": "vision_config.hidden_size", "vision.n_heads": "vision_config.num_attention_heads",
    "vision.n_layers": "vision_config.num_hidden_layers", "vision.mlp_dim": "vision_config.intermediate_size",
}


def _int_if_whole(x: float) -> int | float:
    """transformers types query_pre_attn_scalar as an int (and refuses 16.0); keep a fractional one as is."""
    return int(x) if float(x).is_integer() else x


def config_to_hf(cfg: Config, bos_id: int | None = None, eos_id: int | list[int] | None = None,
                 pad_id: int | None = None) -> dict:
    v = cfg.vision
    layer_types = list(cfg.layer_types) or [
        "sliding_attention" if cfg.sliding(i) else "full_attention" for i in range(cfg.n_layers)]
    text = {
        "model_type": "gemma2", "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": cfg.attn_softcap or None, "final_logit_softcapping": cfg.final_softcap or None,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "head_dim": cfg.head_dim, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": cfg.dim,
        "initializer_range": cfg.init_std, "intermediate_size": cfg.ffn_dim, "layer_types": layer_types,
        "max_position_embeddings": cfg.max_seq_len, "num_attention_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers, "num_image_tokens": cfg.num_image_tokens,
        "num_key_value_heads": cfg.n_kv_heads, "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar),
        "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope_to_hf(cfg.rope),
        "sliding_window": cfg.sliding_window or None, "tie_word_embeddings": True, "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }
    vision = {
        "model_type": "siglip_vision_model", "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": v.dim, "image_size": v.image_size, "intermediate_size": v.mlp_dim,
        "layer_norm_eps": v.norm_eps, "num_attention_heads": v.n_heads, "num_channels": v.channels,
        "num_hidden_layers": v.n_layers, "patch_size": v.patch_size, "projection_dim": cfg.dim,
        "vision_use_head": False,
    }
    return {
        "architectures": list(ARCHITECTURES), "model_type": "paligemma", "bos_token_id": bos_id,
        "eos_token_id": eos_id, "pad_token_id": pad_id, "image_token_index": cfg.image_token_id,
        "projection_dim": cfg.dim, "hidden_size": cfg.dim, "tie_word_embeddings": True,
        "text_config": text, "vision_config": vision,
    }


def _normalise(name: str) -> str:
    """Any of the layouts transformers reads -> the save layout (`vision_tower.encoder...`, `language_model.model...`)."""
    if name.startswith("model."):  # transformers' in-memory names
        name = name[len("model."):]
        if name.startswith("language_model.") and not name.startswith("language_model.model."):
            name = "language_model.model." + name[len("language_model."):]
    if name.startswith("vision_tower.vision_model."):  # the hub's older layout
        name = "vision_tower." + name[len("vision_tower.vision_model."):]
    return name


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: Config, where: str = "weights") -> dict[str, torch.Tensor]:
    out = {}
    for raw, t in hf_sd.items():
        if raw in _TIED_HEAD:
            continue  # the tied head is the embedding matrix
        name = _normalise(raw)
        stem, _, suffix = name.rpartition(".")
        if stem in _HF_TOP:
            out[f"{_HF_TOP[stem]}.{suffix}"] = t
            continue
        m = _HF_VISION_RE.match(name)
        if m and m.group(2) in _HF_VISION_LAYER:
            out[f"vision_tower.layers.{m.group(1)}.{_HF_VISION_LAYER[m.group(2)]}.{m.group(3)}"] = t
            continue
        m = _HF_TEXT_RE.match(name)
        if m and m.group(2) in _HF_TEXT_LAYER:
            out[f"language_model.layers.{m.group(1)}.{_HF_TEXT_LAYER[m.group(2)]}.{m.group(3)}"] = t
            continue
        raise CheckpointError(f"{where}: unexpected tensor {raw!r} for a PaliGemma 2 model")
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        stem, _, suffix = name.rpartition(".")
        if stem in _TOP:
            out[f"{_TOP[stem]}.{suffix}"] = t
            continue
        m = _OURS_RE.match(name)
        table = _VISION_LAYER if m and m.group(1) == "vision_tower" else _TEXT_LAYER
        if not m or m.group(3) not in table:
            raise KeyError(f"no Hugging Face name for {name!r}")
        prefix = "vision_tower.encoder" if m.group(1) == "vision_tower" else "language_model.model"
        out[f"{prefix}.layers.{m.group(2)}.{table[m.group(3)]}.{m.group(4)}"] = t
    return out
