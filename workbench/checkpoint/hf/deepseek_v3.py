"""Hugging Face `DeepseekV3ForCausalLM` <-> workbench `deepseek_v3`: config and state-dict adapter.

Names (ours  <->  HF; the official checkpoint's names in models/deepseek_v3.py's notes)
    tok_embeddings.weight                         model.embed_tokens.weight
    layers.{i}.attention_norm.weight              model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.wq_a | q_norm | wq_b     model.layers.{i}.self_attn.q_a_proj | q_a_layernorm | q_b_proj
    layers.{i}.attention.wq   (q_lora_rank 0)     model.layers.{i}.self_attn.q_proj
    layers.{i}.attention.wkv_a | kv_norm | wkv_b  model.layers.{i}.self_attn.kv_a_proj_with_mqa | kv_a_layernorm | kv_b_proj
    layers.{i}.attention.wo                       model.layers.{i}.self_attn.o_proj
    layers.{i}.ffn_norm.weight                    model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.feed_forward.w1 | w3 | w2          model.layers.{i}.mlp.gate_proj | up_proj | down_proj   (dense layers)
    layers.{i}.moe.router.gate.weight             model.layers.{i}.mlp.gate.weight
    layers.{i}.moe.router.bias                    model.layers.{i}.mlp.gate.e_score_correction_bias   (float32)
    layers.{i}.moe.experts.gate_up_proj           model.layers.{i}.mlp.experts.gate_up_proj  (E, 2F, D)
    layers.{i}.moe.experts.down_proj              model.layers.{i}.mlp.experts.down_proj     (E, D, F)
    layers.{i}.moe.shared_experts.w1 | w3 | w2    model.layers.{i}.mlp.shared_experts.gate_proj | up_proj | down_proj
    norm.weight, output.weight                    model.norm.weight, lm_head.weight
    mtp.{d}.enorm | hnorm | eh_proj               model.layers.{L+d}.enorm | hnorm | eh_proj          (L = n_layers)
    mtp.{d}.norm                                  model.layers.{L+d}.shared_head.norm
    mtp.{d}.block.<as a layer>                    model.layers.{L+d}.<as a layer>

The hub checkpoints and transformers' own `save_pretrained` store the experts one by one
(`mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`); import accepts both, export writes the stacked
names by default or the per-expert ones with `per_expert=True`. The official MTP layer also stores copies of
the embedding and the head (`model.layers.{L+d}.embed_tokens`, `shared_head.head`): import drops them
(they are the main model's), export writes them back so the layout stays the official one.
transformers' class has no MTP module and ignores `model.layers.{L+d}.*`; a directory without those
tensors imports with `mtp_layers = 0` whatever `num_nextn_predict_layers` says (`fit_config`).

Kimi K2 directories (config.json: architectures DeepseekV3ForCausalLM, model_type "kimi_k2", its own remote
code that reuses the DeepSeek-V3 classes) import through this adapter unchanged: K2 is a flavor of the same
model. Export always writes model_type "deepseek_v3", which transformers loads without remote code.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from workbench.checkpoint.hf import llama3 as _llama
from workbench.checkpoint.hf.rope import rope_from_hf, rope_to_hf
from workbench.errors import CheckpointError
from workbench.models.deepseek_v3 import Config

ARCHITECTURES = ("DeepseekV3ForCausalLM",)
MODEL_TYPES = ("deepseek_v3", "kimi_k2")  # K2 reuses the DeepSeek-V3 classes (models/deepseek_v3.py, flavor kimi-k2)

_LAYER_MAP = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq_a.weight": "self_attn.q_a_proj.weight",
    "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.wq_b.weight": "self_attn.q_b_proj.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "moe.router.bias": "mlp.gate.e_score_correction_bias",
    "moe.experts.gate_up_proj": "mlp.experts.gate_up_proj",
    "moe.experts.down_proj": "mlp.experts.down_proj",
    "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_MTP_MAP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "norm.weight": "shared_head.norm.weight"}
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # the main model's, stored again
_TOP_MAP = _llama._TOP_MAP
_HF_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_HF_MTP = {v: k for k, v in _MTP_MAP.items()}
_HF_TOP = {v: k for k, v in _TOP_MAP.items()}
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_OURS_MTP_RE = re.compile(r"^mtp\.(\d+)\.(.+)$")

_HF_CONFIG_NAMES = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_dense_layers": "first_k_dense_replace",
    "ffn_dim": "intermediate_size", "moe_ffn_dim": "moe_intermediate_size", "n_experts": "n_routed_experts",
    "top_k": "num_experts_per_tok", "n_groups": "n_group", "topk_groups": "topk_group",
    "routed_scaling": "routed_scaling_factor", "n_heads": "num_attention_heads", "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range", "mtp_layers": "num_nextn_predict_layers",
}


def config_from_hf(hf: dict, where: str = "config.json") -> Config:
    """Our Config from a parsed HF config.json (transformers 4.x or 5.x)."""
    try:
        if hf.get("model_type", "deepseek_v3") not in MODEL_TYPES:
            raise CheckpointError(f"{where}: field 'model_type': {hf['model_type']!r} is not a DeepSeek-V3 model "
                                  f"(expected one of {', '.join(MODEL_TYPES)})")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
        if hf.get("attention_bias"):
            raise CheckpointError(f"{where}: attention_bias = true is not supported (DeepSeek-V3 has none)")
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise CheckpointError(f"{where}: scoring_func {hf['scoring_func']!r} is not supported (sigmoid)")
        n_heads = hf["num_attention_heads"]
        kv = hf.get("num_key_value_heads") or n_heads
        if kv != n_heads:
            raise CheckpointError(f"{where}: field 'num_key_value_heads': MLA has one key/value per head, so it "
                                  f"must equal num_attention_heads ({n_heads}), got {kv}")
        mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0
        data = {
            "dim": hf["hidden_size"],
            "n_layers": hf["num_hidden_layers"],
            "n_dense_layers": hf.get("first_k_dense_replace", 3),  # transformers' DeepseekV3Config defaults
            "ffn_dim": hf["intermediate_size"],
            "moe_ffn_dim": hf["moe_intermediate_size"],
            "n_experts": hf["n_routed_experts"],
            "n_shared_experts": hf.get("n_shared_experts", 1) or 0,
            "top_k": hf["num_experts_per_tok"],
            "n_groups": hf.get("n_group", 8) or 1,
            "topk_groups": hf.get("topk_group", 4) or 1,
            "routed_scaling": float(hf.get("routed_scaling_factor", 2.5)),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
            "n_heads": n_heads,
            "q_lora_rank": hf.get("q_lora_rank", 1536) or 0,
            "kv_lora_rank": hf["kv_lora_rank"],
            "qk_nope_head_dim": hf["qk_nope_head_dim"],
            "qk_rope_head_dim": hf["qk_rope_head_dim"],
            "v_head_dim": hf["v_head_dim"],
            "vocab_size": hf["vocab_size"],
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "rope": rope_from_hf(hf, where, "deepseek_v3"),
            "rope_interleave": bool(hf.get("rope_interleave", True)),
            "max_seq_len": hf.get("max_position_embeddings", 4096),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "init_std": float(hf.get("initializer_range", 0.02)),
            "mtp_layers": int(mtp),
        }
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r} for a DeepSeek-V3 config") from None
    return _llama.config_in_hf_terms(Config, data, where, _HF_CONFIG_NAMES)


def fit_config(cfg: Config, hf_sd: dict[str, torch.Tensor]) -> Config:
    """The config the weights can fill: MTP modules only if their tensors are there (HF saves none)."""
    have = {int(m.group(1)) for name in hf_sd if (m := _LAYER_RE.match(name))}
    n = 0
    while cfg.n_layers + n in have:
        n += 1
    return cfg if n == cfg.mtp_layers else dataclasses.replace(cfg, mtp_layers=n)


def config_to_hf(cfg: Config, bos_id: int | None = None, eos_id: int | list[int] | None = None,
                 pad_id: int | None = None) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "first_k_dense_replace": cfg.n_dense_layers,
        "hidden_act": "silu",
        "hidden_size": cfg.dim,
        "initializer_range": cfg.init_std,
        "intermediate_size": cfg.ffn_dim,
        "kv_lora_rank": cfg.kv_lora_rank,
        "max_position_embeddings": cfg.max_seq_len,
        "moe_intermediate_size": cfg.moe_ffn_dim,
        "n_group": cfg.n_groups,
        "n_routed_experts": cfg.n_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "norm_topk_prob": cfg.norm_topk_prob,
        "num_attention_heads": cfg.n_heads,
        "num_experts_per_tok": cfg.top_k,
        "num_hidden_layers": cfg.n_layers,
        "num_key_value_heads": cfg.n_heads,
        "num_nextn_predict_layers": cfg.mtp_layers,
        "q_lora_rank": cfg.q_lora_rank or None,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_interleave": cfg.rope_interleave,
        "rope_parameters": rope_to_hf(cfg.rope),
        "routed_scaling_factor": cfg.routed_scaling,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": cfg.tie_embeddings,
        "topk_group": cfg.topk_groups,
        "topk_method": "noaux_tc",
        "use_cache": True,
        "v_head_dim": cfg.v_head_dim,
        "vocab_size": cfg.vocab_size,
    }


def _layer_from_hf(rest: str, where: str, name: str) -> str:
    if rest in _HF_LAYER:
        return _HF_LAYER[rest]
    raise CheckpointError(f"{where}: unexpected tensor {name!r} for a DeepSeek-V3 model")


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: Config, where: str = "weights") -> dict[str, torch.Tensor]:
    out = {}
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (our prefix, proj) -> {expert: tensor}
    for name, t in hf_sd.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = t
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        m = _LAYER_RE.match(name)
        if not m:
            raise CheckpointError(f"{where}: unexpected tensor {name!r} for a DeepSeek-V3 model")
        i, rest = int(m.group(1)), m.group(2)
        if i >= cfg.n_layers:  # an MTP module, stored after the decoder layers
            d = i - cfg.n_layers
            if d >= cfg.mtp_layers or rest in _MTP_COPIES:
                continue  # more MTP depths than the config asks for, or the copies of the embedding and head
            prefix = f"mtp.{d}."
            if rest in _HF_MTP:
                out[prefix + _HF_MTP[rest]] = t
                continue
            prefix += "block."
        else:
            prefix = f"layers.{i}."
        e = _EXPERT_RE.match(rest)
        if e:
            per_expert.setdefault((prefix, e.group(2)), {})[int(e.group(1))] = t
            continue
        out[prefix + _layer_from_hf(rest, where, name)] = t
    for prefix in sorted({p for p, _ in per_expert}):
        mats = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = per_expert.get((prefix, proj), {})
            if sorted(got) != list(range(cfg.n_experts)):
                raise CheckpointError(f"{where}: {prefix.rstrip('.')} has {proj} for experts {sorted(got)}, "
                                      f"expected 0..{cfg.n_experts - 1}")
            mats[proj] = [got[k] for k in range(cfg.n_experts)]
        # gate_up[e] = [gate_e; up_e]  (E, 2F, D);  down[e] (E, D, F)
        out[prefix + "moe.experts.gate_up_proj"] = torch.stack(
            [torch.cat([g, u], 0) for g, u in zip(mats["gate_proj"], mats["up_proj"])])
        out[prefix + "moe.experts.down_proj"] = torch.stack(mats["down_proj"])
    if cfg.tie_embeddings:
        out.pop("output.weight", None)
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], per_expert: bool = False) -> dict[str, torch.Tensor]:
    """HF names for our state dict (the stacked transformers 5 layout, or the hub's per-expert one)."""
    n_layers = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"^layers\.(\d+)\.", k))), default=-1)
    out = {}
    for name, t in sd.items():
        if name in _TOP_MAP:
            out[_TOP_MAP[name]] = t
            continue
        m = _OURS_MTP_RE.match(name)
        if m:
            i, rest = n_layers + int(m.group(1)), m.group(2)
            if rest in _MTP_MAP:
                out[f"model.layers.{i}.{_MTP_MAP[rest]}"] = t
                continue
            if not rest.startswith("block."):
                raise KeyError(f"no Hugging Face name for {name!r}")
            ours = rest.removeprefix("block.")
        else:
            m = _LAYER_RE.match(name)
            if not m or m.group(2) not in _LAYER_MAP:
                raise KeyError(f"no Hugging Face name for {name!r}")
            i, ours = int(m.group(1)), m.group(2)
        if ours not in _LAYER_MAP:
            raise KeyError(f"no Hugging Face name for {name!r}")
        prefix = f"model.layers.{i}"
        if per_expert and ours in ("moe.experts.gate_up_proj", "moe.experts.down_proj"):
            for e in range(t.shape[0]):
                if ours == "moe.experts.down_proj":
                    out[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = t[e].contiguous()
                else:
                    F_ = t.shape[1] // 2
                    out[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = t[e, :F_].contiguous()
                    out[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = t[e, F_:].contiguous()
            continue
        out[f"{prefix}.{_LAYER_MAP[ours]}"] = t
    # the official MTP layers also hold the embedding and the head
    n_mtp = len({m.group(1) for k in sd if (m := _OURS_MTP_RE.match(k))})
    head = sd.get("output.weight", sd.get("tok_embeddings.weight"))
    for d in range(n_mtp):
        out[f"model.layers.{n_layers + d}.embed_tokens.weight"] = sd["tok_embeddings.weight"].clone()
        out[f"model.layers.{n_layers + d}.shared_head.head.weight"] = head.clone()
    return out
