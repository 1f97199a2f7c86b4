"""Hugging Face `MixtralForCausalLM` <-> workbench `mixtral`: config and state-dict adapter.

Names (ours  <->  HF, transformers 5 layout)
    tok_embeddings.weight                    model.embed_tokens.weight
    layers.{i}.attention_norm.weight         model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.w{q,k,v,o}.weight   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.ffn_norm.weight               model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.moe.router.gate.weight        model.layers.{i}.mlp.gate.weight                 (E, D)
    layers.{i}.moe.experts.gate_up_proj      model.layers.{i}.mlp.experts.gate_up_proj        (E, 2F, D)
    layers.{i}.moe.experts.down_proj         model.layers.{i}.mlp.experts.down_proj           (E, D, F)
    norm.weight                              model.norm.weight
    output.weight                            lm_head.weight

The hub checkpoints (and transformers 5's own `save_pretrained`, which converts back) store the 4.x
per-expert names instead:
    model.layers.{i}.block_sparse_moe.gate.weight
    model.layers.{i}.block_sparse_moe.experts.{e}.w1/w3/w2.weight   (gate (F, D), up (F, D), down (D, F))
Import accepts both: gate_up_proj[e] = cat([w1_e, w3_e], 0), down_proj[e] = w2_e (exact copies).
Export writes the 5.x names by default, or the per-expert ones with `per_expert=True`.

Shared experts (`model.config.n_shared_experts` > 0, `layers.{i}.moe.shared_experts.*`) have no place in
transformers' Mixtral: export and import refuse such a config (and such weights) by name rather than drop them.
"""

from __future__ import annotations

import re

import torch

from workbench.checkpoint.hf import llama3 as _llama
from workbench.checkpoint.hf.rope import rope_from_hf, rope_to_hf
from workbench.errors import CheckpointError
from workbench.models.mixtral import Config

ARCHITECTURES = ("MixtralForCausalLM",)

_LAYER_MAP = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "moe.experts.gate_up_proj": "mlp.experts.gate_up_proj",
    "moe.experts.down_proj": "mlp.experts.down_proj",
}
_TOP_MAP = _llama._TOP_MAP
_HF_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_HF_LAYER["block_sparse_moe.gate.weight"] = "moe.router.gate.weight"  # 4.x name of the router
_HF_TOP = {v: k for k, v in _TOP_MAP.items()}
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_V4_EXPERT_RE = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")

_HF_CONFIG_NAMES = {**_llama._HF_CONFIG_NAMES, "n_experts": "num_local_experts", "top_k": "num_experts_per_tok"}


def config_from_hf(hf: dict, where: str = "config.json") -> Config:
    """Our Config from a parsed HF config.json (transformers 4.x or 5.x)."""
    try:
        rope = rope_from_hf(hf, where, "mixtral", default_theta=1000000.0)
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
        n_heads = hf["num_attention_heads"]
        data = {
            "dim": hf["hidden_size"],
            "n_layers": hf["num_hidden_layers"],
            "n_heads": n_heads,
            "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // n_heads,
            "ffn_dim": hf["intermediate_size"],
            "n_experts": hf["num_local_experts"],
            "top_k": hf["num_experts_per_tok"],
            "vocab_size": hf["vocab_size"],
            "norm_eps": float(hf.get("rms_norm_eps", 1e-5)),
            "rope": rope,
            "max_seq_len": hf.get("max_position_embeddings", 32768),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "init_std": float(hf.get("initializer_range", 0.02)),
            "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
            "sliding_window": hf.get("sliding_window"),
        }
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r} for a Mixtral config") from None
    return _llama.config_in_hf_terms(Config, data, where, _HF_CONFIG_NAMES)


def _refuse_shared(cfg: Config, doing: str, where: str | None = None) -> None:
    if cfg.n_shared_experts:
        at = f"{where}: " if where else ""
        raise CheckpointError(f"{at}cannot {doing} a Mixtral with model.config.n_shared_experts = "
                              f"{cfg.n_shared_experts}: Hugging Face's MixtralForCausalLM has no shared experts "
                              f"(set it to 0, or keep the workbench checkpoint)")


def config_to_hf(cfg: Config, bos_id: int | None = None, eos_id: int | list[int] | None = None,
                 pad_id: int | None = None) -> dict:
    _refuse_shared(cfg, "export")
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
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
        "num_attention_heads": cfg.n_heads,
        "num_experts_per_tok": cfg.top_k,
        "num_hidden_layers": cfg.n_layers,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_local_experts": cfg.n_experts,
        "output_router_logits": False,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_to_hf(cfg.rope),
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_jitter_noise": 0.0,
        "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: Config, where: str = "weights") -> dict[str, torch.Tensor]:
    _refuse_shared(cfg, "import Hugging Face weights into", where)
    out = {}
    per_expert: dict[tuple[int, str], dict[int, torch.Tensor]] = {}  # (layer, w1|w2|w3) -> {expert: tensor}
    for name, t in hf_sd.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = t
            continue
        m = _LAYER_RE.match(name)
        if m and m.group(2) in _HF_LAYER:
            out[f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"] = t
            continue
        e = _V4_EXPERT_RE.match(m.group(2)) if m else None
        if e:
            per_expert.setdefault((int(m.group(1)), e.group(2)), {})[int(e.group(1))] = t
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        raise CheckpointError(f"{where}: unexpected tensor {name!r} for a Mixtral model")
    layers = sorted({layer for layer, _ in per_expert})
    for layer in layers:
        mats = {}
        for w in ("w1", "w2", "w3"):
            got = per_expert.get((layer, w), {})
            if sorted(got) != list(range(cfg.n_experts)):
                raise CheckpointError(f"{where}: layer {layer} has {w} for experts {sorted(got)}, "
                                      f"expected 0..{cfg.n_experts - 1}")
            mats[w] = [got[i] for i in range(cfg.n_experts)]
        # gate_up[e] = [w1_e; w3_e]  (E, 2F, D);  down[e] = w2_e  (E, D, F)
        out[f"layers.{layer}.moe.experts.gate_up_proj"] = torch.stack(
            [torch.cat([g, u], 0) for g, u in zip(mats["w1"], mats["w3"])])
        out[f"layers.{layer}.moe.experts.down_proj"] = torch.stack(mats["w2"])
    if cfg.tie_embeddings:
        out.pop("output.weight", None)
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], per_expert: bool = False) -> dict[str, torch.Tensor]:
    """HF names for our state dict: the transformers 5 stacked layout, or the hub's per-expert one."""
    out = {}
    for name, t in sd.items():
        if name in _TOP_MAP:
            out[_TOP_MAP[name]] = t
            continue
        m = _LAYER_RE.match(name)
        if m and m.group(2).startswith("moe.shared_experts."):
            raise CheckpointError(f"cannot export {name!r}: a Mixtral with model.config.n_shared_experts > 0 has no "
                                  f"Hugging Face equivalent (MixtralForCausalLM has no shared experts)")
        if not m or m.group(2) not in _LAYER_MAP:
            raise KeyError(f"no Hugging Face name for {name!r}")
        i, ours = m.group(1), m.group(2)
        if per_expert and ours.startswith("moe."):
            prefix = f"model.layers.{i}.block_sparse_moe"
            if ours == "moe.router.gate.weight":
                out[f"{prefix}.gate.weight"] = t
            elif ours == "moe.experts.gate_up_proj":
                F_ = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{prefix}.experts.{e}.w1.weight"] = t[e, :F_].contiguous()
                    out[f"{prefix}.experts.{e}.w3.weight"] = t[e, F_:].contiguous()
            else:
                for e in range(t.shape[0]):
                    out[f"{prefix}.experts.{e}.w2.weight"] = t[e].contiguous()
            continue
        out[f"model.layers.{i}.{_LAYER_MAP[ours]}"] = t
    return out
