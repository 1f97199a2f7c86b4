"""Hugging Face `LlamaForCausalLM` <-> workbench `llama3`: config and state-dict adapter.

Names (ours, Meta's naming  <->  HF)
    tok_embeddings.weight                    model.embed_tokens.weight
    layers.{i}.attention_norm.weight         model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.w{q,k,v,o}.weight   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.ffn_norm.weight               model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.feed_forward.w1/w3/w2.weight  model.layers.{i}.mlp.gate_proj/up_proj/down_proj.weight
    norm.weight                              model.norm.weight
    output.weight                            lm_head.weight   (absent when embeddings are tied)

No tensor is permuted: HF stores q/k rows in the half-split RoPE layout that this project uses too.
Both the transformers 5 config (`rope_parameters`) and the 4.x one (`rope_theta` + `rope_scaling`) are
read (rope types default, linear, dynamic, llama3, yarn and longrope: `hf/rope.py`); export writes the transformers 5 form.
"""

from __future__ import annotations

import re

import torch

from workbench.checkpoint.hf.rope import rope_from_hf, rope_to_hf
from workbench.config import from_dict
from workbench.errors import CheckpointError, ConfigError
from workbench.models.llama3 import Config

ARCHITECTURES = ("LlamaForCausalLM",)

_LAYER_MAP = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_HF_TOP = {v: k for k, v in _TOP_MAP.items()}
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")


def config_from_hf(hf: dict, where: str = "config.json") -> Config:
    """Our Config from a parsed HF config.json (transformers 4.x or 5.x)."""
    try:
        rope = rope_from_hf(hf, where, "llama3")
        n_heads = hf["num_attention_heads"]
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise CheckpointError(f"{where}: attention_bias/mlp_bias models are not Llama 3 (no biases)")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
        data = {
            "dim": hf["hidden_size"],
            "n_layers": hf["num_hidden_layers"],
            "n_heads": n_heads,
            "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // n_heads,
            "ffn_dim": hf["intermediate_size"],
            "vocab_size": hf["vocab_size"],
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "rope": rope,
            "max_seq_len": hf.get("max_position_embeddings", 2048),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "init_std": float(hf.get("initializer_range", 0.02)),
        }
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r} for a Llama config") from None
    return config_in_hf_terms(Config, data, where, _HF_CONFIG_NAMES)


def config_in_hf_terms(cls, data: dict, where: str, names: dict[str, str]):
    """`cls` from `data`, a checked config; a ConfigError is reported as a CheckpointError naming the
    config.json field (`names`: our field -> theirs; `rope.x` -> `rope_parameters.x`). Shared by the adapters."""
    try:
        return from_dict(cls, data, "hf")
    except ConfigError as e:
        m = re.match(r"config key 'hf\.([\w.]+)': (.*)", str(e))
        if not m:
            raise
        ours, rest = m.group(1), m.group(2)
        name = names.get(ours, ours.replace("rope.", "rope_parameters."))
        for our_name, hf_name in names.items():
            rest = re.sub(rf"\b{our_name}\b", hf_name, rest)
        raise CheckpointError(f"{where}: field '{name}': {rest}") from None


# our Config field -> the config.json field it comes from
_HF_CONFIG_NAMES = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}


def config_to_hf(cfg: Config, bos_id: int | None = None, eos_id: int | list[int] | None = None,
                 pad_id: int | None = None) -> dict:
    rope_parameters = rope_to_hf(cfg.rope)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "head_dim": cfg.hd,
        "hidden_act": "silu",
        "hidden_size": cfg.dim,
        "initializer_range": cfg.init_std,
        "intermediate_size": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "mlp_bias": False,
        "num_attention_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers,
        "num_key_value_heads": cfg.n_kv_heads,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: Config, where: str = "weights") -> dict[str, torch.Tensor]:
    out = {}
    for name, t in hf_sd.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = t
            continue
        m = _LAYER_RE.match(name)
        if m and m.group(2) in _HF_LAYER:
            out[f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"] = t
            continue
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; recomputed here
            continue
        raise CheckpointError(f"{where}: unexpected tensor {name!r} for a Llama model")
    if cfg.tie_embeddings:
        out.pop("output.weight", None)  # some exporters save the tied head anyway; it equals the embeddings
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        if name in _TOP_MAP:
            out[_TOP_MAP[name]] = t
            continue
        m = _LAYER_RE.match(name)
        if not m or m.group(2) not in _LAYER_MAP:
            raise KeyError(f"no Hugging Face name for {name!r}")
        out[f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"] = t
    return out
