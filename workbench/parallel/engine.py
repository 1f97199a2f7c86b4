"""The Engine protocol: the only way the trainer touches a model, its gradients and its optimizer.

One protocol over single-process, DDP, FSDP2 and DeepSpeed ZeRO, so a pipeline written once runs on any
of them. Who owns what differs (DeepSpeed owns the optimizer step and accumulation; FSDP2 shards
parameters and gathers them per block), and those differences stay inside the engine.

    forward(batch) -> DecoderOutput      the wrapped model's forward
    logits(hidden, positions)            the vocabulary projection (the lm head may be sharded)
    values(hidden)                       PPO's critic: the model's value head (`objectives.ppo.attach_value_head`),
                                         reached like the head (root unit under FSDP2, gathered under ZeRO-3)
    backward(loss)                       accumulate gradients of a (normalized) micro-batch loss
    no_sync()                            context: skip gradient communication for all but the last micro-batch
    loss_context()                       context the loss and its backward run in (loss parallel under tp: the
                                         logits stay split by vocabulary and the loss may be a DTensor)
    optimizer_step(max_norm, loss) -> (norm, applied)
                                         end of a step: the global gradient norm before clipping (clipped to
                                         max_norm when > 0), the optimizer and schedule step unless the loss or
                                         norm is not finite (the same decision on every rank), zero_grad
    zero_grad()
    all_reduce(tensor, op)               sum/max over the data-parallel ranks (loss normalization, metrics)
    all_reduce_cp(tensor), cp_size       sum over the cp group (the ranks holding slices of the same
                                         sequences: per-sequence statistics) and its size; identity and 1
                                         without context parallel
    unwrap() -> nn.Module                the plain model (for reading config and non-forward methods)
    model_state_dict()                   consolidated full weights (what model.safetensors holds)
    save_state(folder) / load_state(folder)
                                         the resume state (optimizer moments, schedule), written and read by
                                         every rank: DCP for single/ddp/fsdp2/tp, DeepSpeed's own for ZeRO
    gather_for_generation(independent)   context yielding a module with full parameters for decoding. By
                                         default a sharded model may decode in lockstep (every rank the same
                                         prompt and tokens: a sample); `independent=True` gives every rank a
                                         model it can decode its own prompts with, stopping when they do (RL
                                         rollouts: FSDP2 and ZeRO-3 gather a whole copy)
    rank, world_size, is_main, device, lr

Frozen models (a DPO reference, a distillation teacher) get an engine without an optimizer;
`optimizer_step` on one raises.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
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

    def values(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def no_sync(self) -> AbstractContextManager: ...

    def loss_context(self) -> AbstractContextManager: ...

    def optimizer_step(self, max_norm: float, loss: float) -> tuple[float, bool]: ...

    def zero_grad(self) -> None: ...

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...

    @property
    def cp_size(self) -> int: ...

    def all_reduce_cp(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def unwrap(self) -> nn.Module: ...

    def model_state_dict(self) -> dict[str, torch.Tensor]: ...

    def save_state(self, folder: Path) -> None: ...

    def load_state(self, folder: Path) -> None: ...

    def gather_for_generation(self, independent: bool = False) -> AbstractContextManager[nn.Module]: ...
