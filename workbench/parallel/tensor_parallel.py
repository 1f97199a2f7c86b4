"""Tensor parallel with sequence parallel (Megatron-style, on DTensor), applied from a model's plan.

Inside a block every tensor-parallel rank holds a slice of each projection:

    colwise  (wq, wk, wv, w1, w3)   W split by output rows: rank r computes its heads / hidden units
    rowwise  (wo, w2)               W split by input columns: partial sums, reduced across the tp ranks

so attention and the feed-forward cost one all-gather in and one reduce-scatter out per block. Between
those, sequence parallel keeps the residual stream split along the sequence (Shard(1)): the norms run on
each rank's slice of the tokens (`sequence` in the plan), and the all-gather before wq/wk/wv (and w1/w3)
restores the whole sequence the attention needs. The embedding is split by vocabulary rows and writes the
sequence-split stream; the head (tied or not) is split by vocabulary rows too, and the engine gathers the
logits, or with `parallel.loss_parallel` keeps them split: the cross-entropy then runs on each rank's
vocabulary slice (torch's loss_parallel: a max and a sum of exponentials reduced over the tp ranks), so no
rank holds the whole (B, T, V) tensor in a training step (validation and generation still gather it).

Model code does not change: heads per rank follow from the projection widths (`view(B, T, -1, D)`), and
DTensor's autograd inserts the matching reductions in backward. Composes with FSDP2 as 2-D parallelism
(TP inside a node, FSDP across), applied in that order (DESIGN.md rule 2).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from workbench.models.base import select_positions
from workbench.parallel.plans import Plan


def _styles() -> dict:
    return {
        "colwise": ColwiseParallel(),
        "rowwise": RowwiseParallel(output_layouts=Shard(1)),  # reduce-scatter into the sequence-split stream
        "sequence": SequenceParallel(),
    }


def apply_tensor_parallel(model: nn.Module, plan: Plan, tp_mesh) -> None:
    """Shard `model` in place over `tp_mesh` following `plan.tensor` (paths with `*` per block)."""
    styles = _styles()
    blocks = model.get_submodule(plan.blocks)
    # root: the embedding writes the sequence-split stream; the final norm runs on it; the head's weight
    # is split by vocabulary (the engine's `logits` uses it; a tied head is the embedding itself)
    root = {plan.embedding: RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel()}
    if plan.head and getattr(model, plan.head, None) is not None:
        root[plan.head] = ColwiseParallel()
    parallelize_module(model, tp_mesh, root)
    prefix = re.escape(plan.blocks) + r"\.\*\."
    per_block = {re.sub("^" + prefix, "", path): style for path, style in plan.tensor.items()}
    for block in blocks:
        layout = {path: styles[style] for path, style in per_block.items()}
        # the modules whose first input is the sequence-split stream gather it once (not per projection)
        for path in {p.rsplit(".", 1)[0] for p, st in per_block.items() if st == "colwise"}:
            n_args = 6 if path == "attention" else 1  # attention(x, cos, sin, mask, kv_cache, layer_idx)
            layout[path] = PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * (n_args - 1),
                                              desired_input_layouts=(Replicate(),) + (None,) * (n_args - 1))
        parallelize_module(block, tp_mesh, layout)


def tp_logits(model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor | None, tp_mesh,
              keep_split: bool = False) -> torch.Tensor:
    """model.logits for a tensor-parallel model: the whole sequence gathered, the vocabulary-split head
    applied, the logits gathered (or, `keep_split`, left as a DTensor split along the vocabulary for a
    loss-parallel cross-entropy). Gradients reach every rank's hidden slice and head slice correctly
    because every step is a DTensor op (the head's partial sums are reduced in backward)."""
    if isinstance(hidden, DTensor):
        hidden = hidden.redistribute(placements=[Replicate()]).to_local()  # (B, T, dim) on every rank
    hidden = select_positions(hidden, positions)  # (B, T|K, dim)
    logits = model.logits(DTensor.from_local(hidden, tp_mesh, [Replicate()]))  # (B, T|K, V), vocab-split
    if keep_split or not isinstance(logits, DTensor):
        return logits
    return logits.full_tensor()
