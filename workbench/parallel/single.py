"""The single-process engine: one device, no communication. The reference every other engine matches."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from workbench.models.base import DecoderOutput

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Whole tensors keyed by parameter name (on rank 0 only, under a sharding engine)."""


class SingleEngine:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.rank, self.world_size = 0, 1
        if optimizer is None:
            model.requires_grad_(False)

    @property
    def is_main(self) -> bool:
        return True

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def forward(self, batch: dict) -> DecoderOutput:
        with self._autocast():
            return self.model(batch)

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        with self._autocast():
            return self.model.logits(hidden, positions=positions)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self):
        return contextlib.nullcontext()  # nothing to synchronize

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    def step(self) -> None:
        if self.optimizer is None:
            raise RuntimeError("this engine wraps a frozen model: it has no optimizer to step")
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor  # one rank: the sum and the max are the value itself

    def unwrap(self) -> nn.Module:
        return self.model

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.unwrap().state_dict().items()}

    def state_dict(self) -> dict:
        """The resume state in the layout-free form every engine shares: optimizer moments keyed by
        parameter name, as full tensors, so a run saved by one engine or world size resumes on another."""
        return {
            "optimizer": (get_optimizer_state_dict(self.model, self.optimizer, options=FULL)
                          if self.optimizer is not None else None),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None and state.get("optimizer") is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=FULL)
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    @contextlib.contextmanager
    def gather_for_generation(self):
        model = self.unwrap()
        was_training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)
