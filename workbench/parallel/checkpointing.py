"""Per-block wrappers: activation checkpointing (keep less of the forward, recompute it in backward) and
torch.compile (apply_compile, at the end).

    none        every activation a block's backward needs is kept (fastest, most memory)
    full        only each block's input is kept; backward reruns the block's forward first
                (memory per block ~ one (B, T, dim) tensor; about one extra forward of compute)
    selective   like full, but the matmul outputs are kept and only the cheap ops between them (norms,
                activations, RoPE, softmax) are recomputed: most of the memory saving of `full` at a
                fraction of its recompute cost (torch's selective-checkpoint policy)

Applied to the plan's blocks after tensor parallel and before FSDP (DESIGN.md rule 2) by replacing each
block's `forward` with a checkpointed call of the original: module names, state dicts and hooks stay as
they are. Recomputation on CPU and CUDA is deterministic, so losses and gradients equal the run without it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from workbench.parallel.plans import Plan, block_modules

MODES = ("none", "full", "selective")
_SAVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
         torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
         torch.ops.aten._scaled_dot_product_efficient_attention.default,
         torch.ops.aten._scaled_dot_product_flash_attention.default}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, plan: Plan, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "none":
        return
    context_fn = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls) if mode == "selective" else None
    for block in block_modules(model, plan):
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation and generation: nothing to recompute
                return _inner(*args, **kwargs)
            extra = {"context_fn": context_fn} if context_fn is not None else {}
            return checkpoint(_inner, *args, use_reentrant=False, **extra, **kwargs)

        block.forward = forward


def apply_compile(model: nn.Module, plan: Plan, enabled: bool) -> None:
    """torch.compile every block of the plan, in place (`Module.compile`: parameter names and the module
    tree stay as they are, so checkpoints, FSDP2 and ZeRO wrap the same blocks). Per block, not the whole
    model: the blocks share one code path, so the graph compiles once and is reused for all of them, and a
    graph break stays local to one block. Applied after activation checkpointing and
    before FSDP2 or ZeRO (DESIGN.md rule 2). Meant for CUDA; on CPU it works but the compile takes minutes."""
    if not enabled:
        return
    for block in block_modules(model, plan):
        block.compile()
