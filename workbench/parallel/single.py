"""The single-process engine: one device, no communication. The reference every other engine matches."""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from workbench.checkpoint.run import read_json_state, write_json_state
from workbench.models.base import DecoderOutput

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Whole tensors keyed by parameter name (on rank 0 only, under a sharding engine)."""


@contextlib.contextmanager
def _one_process_is_meant():
    """DCP warns when it runs without a process group; in a single-process run that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield



@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`model.eval()` inside the block (generation, validation), its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

class SingleEngine:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        autocast_dtype: torch.dtype | None = None,
        frozen: bool | None = None,
    ):
        """`frozen` (default: no optimizer given) turns off the model's gradients; an engine whose optimizer
        lives elsewhere (DeepSpeed's) passes False."""
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.rank, self.world_size = 0, 1
        if optimizer is None if frozen is None else frozen:
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

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.unwrap().values(hidden)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self):
        return contextlib.nullcontext()  # nothing to synchronize

    def loss_context(self):
        """Where the objective's loss and its backward run (tensor parallel's loss_parallel); nothing here."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    def optimizer_step(self, max_norm: float, loss: float) -> tuple[float, bool]:
        """End of a step: the gradient norm (clipped to max_norm when > 0), then the optimizer and schedule
        step unless the loss or the norm is not finite, then zero_grad. Both numbers are global (reduced
        over the ranks), so every rank makes the same decision. Returns (norm before clipping, applied)."""
        norm = float(self.clip_grad_norm(max_norm))
        applied = math.isfinite(loss) and math.isfinite(norm)
        if applied:
            self.step()
        self.zero_grad()
        return norm, applied

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

    cp_size = 1  # ranks holding slices of the same sequences (context parallel): one process holds them whole

    def all_reduce_cp(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # no context parallel: every sequence is whole here

    def unwrap(self) -> nn.Module:
        return self.model

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.unwrap().state_dict().items()}

    def save_state(self, folder: Path) -> None:
        """The resume state, written by every rank (a collective): the optimizer's tensors through
        torch.distributed.checkpoint (each rank its shards; DCP reshards them on load, so a run saved on N
        ranks or under another engine resumes on M), its hyperparameters and the schedule as JSON."""
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}
        if self.optimizer is not None:
            osd = get_optimizer_state_dict(self.model, self.optimizer)
            with _one_process_is_meant():
                dcp.save({"optimizer": osd["state"]}, checkpoint_id=str(folder / "dcp"), no_dist=not dist.is_initialized())
            meta["param_groups"] = osd["param_groups"]
        if self.is_main:
            write_json_state(folder / "state.json", meta)

    def load_state(self, folder: Path) -> None:
        """Read what save_state wrote (the caller has verified the checkpoint's manifest: DCP unpickles
        its metadata)."""
        meta = read_json_state(folder / "state.json")
        if self.optimizer is not None:
            # the optimizer's state laid out as this engine holds it (sharded under fsdp2 and tp), filled in place
            target = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)["state"]}
            with _one_process_is_meant():
                dcp.load(target, checkpoint_id=str(folder / "dcp"), no_dist=not dist.is_initialized())
            set_optimizer_state_dict(self.model, self.optimizer,
                                     {"state": target["optimizer"], "param_groups": meta["param_groups"]})
        if self.scheduler is not None and meta.get("scheduler") is not None:
            self.scheduler.load_state_dict(meta["scheduler"])

    @contextlib.contextmanager
    def gather_for_generation(self, independent: bool = False):
        with eval_mode(self.unwrap()) as model:  # whole on this process: independent either way
            yield model
