"""RoPE settings in a Hugging Face config.json <-> our `RopeConfig`, shared by every family's adapter.

transformers 5 writes `rope_parameters` ({"rope_type", "rope_theta", ...}); 4.x wrote `rope_theta` beside a
`rope_scaling` dict whose kind is under "rope_type" or the older "type". Both are read; `rope_parameters` is
written. Field names (theirs -> ours):

    rope_theta -> theta        factor -> factor        original_max_position_embeddings -> original_max_seq_len
    low_freq_factor, high_freq_factor (llama3)          beta_fast, beta_slow, mscale, mscale_all_dim,
                                                        attention_factor (yarn)
    short_factor, long_factor, attention_factor (longrope; without `factor`: max / original positions)
dynamic takes `max_position_embeddings` as its original context (transformers' rule), so our
original_max_seq_len is that field there.
A yarn config without `factor` takes max_position_embeddings / original_max_position_embeddings, as
transformers does. Kinds a family does not support are refused naming the kind and what is supported.
"""

from __future__ import annotations

from workbench.errors import CheckpointError
from workbench.nn.rope import RopeConfig

_YARN_OPTIONAL = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")
KINDS = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def rope_from_hf(hf: dict, where: str, family: str, supported: tuple[str, ...] = KINDS,
                 default_theta: float = 10000.0) -> dict:
    """The `rope` table of our Config (a dict, so config validation names bad fields) from a config.json."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    src = params if params.get("rope_type", "default") != "default" else legacy
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    if kind not in supported:
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported by {family} ({', '.join(supported)})")
    rope = {"theta": float(theta), "scaling": kind}
    try:
        if kind == "linear":
            rope["factor"] = float(src["factor"])
        elif kind == "dynamic":  # transformers scales against max_position_embeddings itself
            rope.update(factor=float(src["factor"]), original_max_seq_len=int(hf["max_position_embeddings"]))
        elif kind == "longrope":
            original = int(src.get("original_max_position_embeddings") or hf["original_max_position_embeddings"])
            factor = src.get("factor") or hf["max_position_embeddings"] / original
            rope.update(factor=max(float(factor), 1.0), original_max_seq_len=original,
                        short_factor=[float(x) for x in src["short_factor"]],
                        long_factor=[float(x) for x in src["long_factor"]])
            if src.get("attention_factor") is not None:
                rope["attention_factor"] = float(src["attention_factor"])
        elif kind == "llama3":
            rope.update(factor=float(src["factor"]), low_freq_factor=float(src["low_freq_factor"]),
                        high_freq_factor=float(src["high_freq_factor"]),
                        original_max_seq_len=int(src["original_max_position_embeddings"]))
        elif kind == "yarn":
            original = int(src["original_max_position_embeddings"])
            factor = src.get("factor") or hf["max_position_embeddings"] / original
            rope.update(factor=float(factor), original_max_seq_len=original)
            rope.update({k: float(src[k]) for k in _YARN_OPTIONAL if src.get(k) is not None})
    except KeyError as e:
        raise CheckpointError(f"{where}: rope type {kind!r} needs the field {e.args[0]!r}") from None
    return rope


def rope_to_hf(rope: RopeConfig) -> dict:
    """`rope_parameters` for a config.json (transformers 5)."""
    out = {"rope_type": rope.scaling, "rope_theta": rope.theta}
    if rope.scaling in ("linear", "dynamic"):  # dynamic's original context is max_position_embeddings
        out["factor"] = rope.factor
    elif rope.scaling == "longrope":
        out.update(factor=rope.factor, original_max_position_embeddings=rope.original_max_seq_len,
                   short_factor=list(rope.short_factor), long_factor=list(rope.long_factor))
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
    elif rope.scaling == "llama3":
        out.update(factor=rope.factor, low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_seq_len)
    elif rope.scaling == "yarn":
        out.update(factor=rope.factor, original_max_position_embeddings=rope.original_max_seq_len,
                   beta_fast=rope.beta_fast, beta_slow=rope.beta_slow)
        out.update({k: getattr(rope, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                    if getattr(rope, k)})  # 0 / None: unset
    return out
