"""What every model family shares: the decoder interface, the family registry and model building.

The decoder interface (every family implements it; docs/architecture.md shows where it sits)

    out = model(batch)                     batch: dict with
                                             input_ids (B, T) long   or  inputs_embeds (B, T, D)
                                             positions (B, T) long   RoPE positions (default: the slots)
                                             mask      MaskSpec      (default: plain causal)
                                             kv_cache  KVCache       (optional; from model.make_kv_cache)
                                             output_hidden_states bool
    out.hidden    (B, T, D)  final hidden states, after the last norm
    out.aux       dict of auxiliary terms as *sums and counts* (MoE token counts, router probability sums),
                  never finished means, so data/context parallelism and accumulation reduce them exactly
    out.hidden_states  tuple of (B, T, D): the embeddings and each block's output (if asked)
    out.mtp_hidden     tuple of (B, T - d, D), d = 1..D: multi-token-prediction modules' final hidden states,
                  row i predicting token i + d + 1 (DeepSeek-V3; only when the batch sets `mtp`)
    logits = model.logits(out.hidden, positions=idx)   only the rows an objective needs

There is no loss inside a model: objectives own losses, and labels are shifted by the collator, which
stays correct when a sequence is split across context-parallel ranks.

Families register here by module name; each module defines `Config` (a dataclass), `FLAVORS`
(name -> Config) and `Model`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from workbench.config import fail, from_dict, to_dict
from workbench.errors import CheckpointError

FAMILIES: dict[str, str] = {
    "llama3": "workbench.models.llama3",
    "mixtral": "workbench.models.mixtral",
    "deepseek_v3": "workbench.models.deepseek_v3",
    "paligemma2": "workbench.models.paligemma2",
}


@dataclass
class DecoderOutput:
    hidden: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden_states: tuple[torch.Tensor, ...] | None = None
    mtp_hidden: tuple[torch.Tensor, ...] | None = None


def select_positions(hidden: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """hidden (B, T, dim) at `positions` along T: None (all), a 1-D index (the same K positions in every
    row) or a (B, K) index (per-row positions). Returns (B, T|K, dim). Shared by every family's `logits`."""
    if positions is None:
        return hidden
    if positions.dim() == 1:
        return hidden[:, positions]  # (B, K, dim)
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, K, dim)


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        fail("model.family", f"unknown family {name!r} (known: {', '.join(sorted(FAMILIES))})")
    return importlib.import_module(FAMILIES[name])


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class ModelSection:
    """The `[model]` table: `family`, `flavor`, and any field of the family's Config as an override.

        [model]
        family = "llama3"
        flavor = "2M"
        n_layers = 6          # overrides the flavor

    `flavor = "custom"` starts from the family's Config defaults instead of a named size (models
    imported from a Hugging Face directory are written this way, with every field spelled out).
    """

    family: str = "llama3"
    flavor: str = "debug"
    config: Any = None  # the family's Config, resolved from the flavor and the overrides

    @classmethod
    def from_config_dict(cls, data: Any, path: str = "model") -> ModelSection:
        if not isinstance(data, dict):
            fail(path, "expected a table with family, flavor and model fields")
        data = dict(data)
        family = data.pop("family", cls.family)
        flavor = data.pop("flavor", cls.flavor)
        if not isinstance(family, str):
            fail(f"{path}.family", f"expected a string, got {family!r}")
        if not isinstance(flavor, str):
            fail(f"{path}.flavor", f"expected a string, got {flavor!r}")
        family, flavor = str(family), str(flavor)  # plain str, not the CLIValue of an override
        module = get_family(family)
        if flavor != "custom" and flavor not in module.FLAVORS:
            known = ", ".join([*module.FLAVORS, "custom"])
            fail(f"{path}.flavor", f"unknown {family} flavor {flavor!r} (known: {known})")
        base = dataclasses.asdict(module.FLAVORS[flavor] if flavor != "custom" else module.Config())
        config = from_dict(module.Config, _deep_merge(base, data), path)
        return cls(family=family, flavor=flavor, config=config)

    def to_config_dict(self) -> dict:
        return {"family": self.family, "flavor": self.flavor, **to_dict(self.config)}

    @classmethod
    def of(cls, family: str, flavor: str, **overrides) -> ModelSection:
        return cls.from_config_dict({"family": family, "flavor": flavor, **overrides})


def build_model(
    section: ModelSection,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    state: dict[str, torch.Tensor] | None = None,
    where: str = "state dict",
) -> nn.Module:
    """Build on the meta device (no memory), materialize on `device`, run `init_weights()` once.

    dtype casts the parameters only: buffers such as RoPE frequencies stay float32. With `state`, the
    weights are then loaded strictly; a missing, unexpected or mis-shaped tensor raises CheckpointError
    naming `where`.
    """
    module = get_family(section.family)
    with torch.device("meta"):
        model = module.Model(section.config)
    model.to_empty(device=device)
    model.init_weights()
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    if state is not None:
        load_state_strict(model, state, f"{where} (model family {section.family})")
    return model


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"weights in {where} do not fit this model config: {what}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(f"weights in {where}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"the model config needs {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (exclude_embeddings and "embed" in name):
            continue
        seen.add(id(p))
        n += p.numel()
    return n
