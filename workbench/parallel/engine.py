"""The Engine protocol: the only way the trainer touches a model, its gradients and its optimizer.

One protocol over single-process, DDP, FSDP2 and DeepSpeed ZeRO, so a pipeline written once runs on any
of them. Who owns what differs (DeepSpeed owns the optimizer step and accumulation; FSDP2 shards
parameters and gathers them per block), and those differences stay inside the engine.

    forward(batch) -> DecoderOutput      the wrapped model's forward
    logits(hidden, positions)            the vocabulary projection (the lm head may be sharded)
    backward(loss)                       accumulate gradients of a (normalized) micro-batch loss
    no_sync()                            context: skip gradient communication for all but the last micro-batch
    clip_grad_norm(max_norm) -> norm     the global gradient norm before clipping (max_norm 0: measure only)
    step()                               optimizer step, then the learning-rate schedule
    zero_grad()
    all_reduce(tensor, op)               sum/max over the data-parallel ranks (loss normalization, metrics)
    unwrap() -> nn.Module                the plain model (for reading config and non-forward methods)
    model_state_dict()                   consolidated full weights (what model.safetensors holds)
    state_dict() / load_state_dict()     the resume state: optimizer moments and schedule
    gather_for_generation()              context yielding a module with full parameters for decoding
    rank, world_size, is_main, device, lr

Frozen models (a DPO reference, a distillation teacher) get an engine without an optimizer; `step`
on one raises.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from workbench.models.base import DecoderOutput


@runtime_checkable
class Engine(Protocol):
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool: ...

    @property
    def lr(self) -> float: ...

    def forward(self, batch: dict) -> DecoderOutput: ...

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def no_sync(self) -> AbstractContextManager: ...

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor: ...

    def step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...

    def unwrap(self) -> nn.Module: ...

    def model_state_dict(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def gather_for_generation(self) -> AbstractContextManager[nn.Module]: ...
