"""Parallelism plans: per model family, which module paths take which parallel treatment (DESIGN.md rule 3).

A plan only names modules; the engines apply it in the fixed order TP/SP -> EP -> CP -> activation
checkpointing -> compile -> FSDP2 or ZeRO. Paths use `*` for every index of a ModuleList.

    blocks    the ModuleList whose entries are the units of FSDP2 wrapping, ZeRO-3 and checkpointing
    more_blocks  further ModuleLists of such units (a second tower: a vision-language model's image encoder)
    tensor    path -> "colwise" | "rowwise" | "sequence" (DTensor styles for tensor + sequence parallel)
    expert    the MoE experts modules (`workbench.models.moe.Experts`; sharded over the ep group and dispatched
              with all-to-all by parallel/ep.py), or None
    context   the attention core swapped for ring attention / Ulysses over the cp group, or None
    head      the output projection (its weight may be tied to the embedding: kept in the root unit)
    embedding the token embedding (the head's weight when tied; split by vocabulary under tensor parallel)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Plan:
    blocks: str
    more_blocks: tuple[str, ...] = ()
    tensor: dict[str, str] = field(default_factory=dict)
    expert: str | None = None
    context: str | None = None
    head: str | None = None
    embedding: str | None = None


def block_modules(model, plan: Plan) -> list:
    """Every unit block of the plan, in order: the entries of `blocks`, then those of each of `more_blocks`."""
    return [block for path in (plan.blocks, *plan.more_blocks) for block in model.get_submodule(path)]


def plan_for(family: str) -> Plan:
    """The plan of a model family: `workbench/parallel/plans/<family>.py` defines PLAN."""
    try:
        module = importlib.import_module(f"workbench.parallel.plans.{family}")
    except ModuleNotFoundError as e:
        raise NotImplementedError(f"model family {family!r} has no parallel plan "
                                  f"(workbench/parallel/plans/{family}.py)") from e
    return module.PLAN
