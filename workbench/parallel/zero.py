"""DeepSpeed ZeRO stages 1, 2 and 3 behind the Engine protocol.

    zero1   optimizer state partitioned over the data-parallel ranks
    zero2   + gradients partitioned (reduce-scattered instead of all-reduced)
    zero3   + parameters partitioned, gathered module by module in forward and backward

The DeepSpeed config is generated from ours (`deepspeed_config`): the micro-batch and accumulation of
[train], the optimizer of [optim] (`torch.optim.AdamW` or `SGD` through DeepSpeed's torch fallback, over
the same parameter groups as the other engines, so weight decay skips norms and embeddings here too),
`gradient_clipping`, bf16 autocast when the run computes in bf16 (DeepSpeed's `torch_autocast`: fp32
weights, as the other engines keep them), and the learning-rate schedule passed in as our own LambdaLR. A
user JSON (`parallel.deepspeed_config`) is merged on top for what ours leaves open: `zero_optimization`
details (offload, bucket sizes, ...) and any key ours does not set. Keys ours sets from the run's config
(batch sizes, accumulation, optimizer, schedule, clipping, precision) are refused by name, pointing at the
field to change instead, so the DeepSpeed JSON cannot make a run differ from its config or its resume check. The data-parallel group DeepSpeed reduces over comes from
ParallelDims through a small `mpu` object. On CPU `DS_ACCELERATOR=cpu` is set before DeepSpeed is imported
and DeepSpeed's shared-memory communication op is built (once: `.ci/run` prebuilds it into a fixed
TORCH_EXTENSIONS_DIR).

Accumulation and the step. The trainer owns accumulation (`managed_gradient_accumulation = false`): every
micro-batch's backward accumulates locally and `optimizer_step` is the boundary, where DeepSpeed reduces,
measures the global gradient norm, skips the step on every rank if that norm is not finite (no rank applies
a step alone), clips, steps and advances the schedule. The trainer's loss is already normalized by the
step's global token count and DeepSpeed averages gradients over the data ranks, so backward multiplies the
loss by the data-parallel size, as the DDP and FSDP2 engines do.

ZeRO-3 and the head. `logits` is a method, not a forward, and ZeRO-3 gathers a module's parameters only in
its forward. The model therefore runs inside `_Dispatch`, whose forward is either the model's forward or
its `logits`, with the head weight (the embedding when tied) registered as an external parameter of it.

State. `model_state_dict` gathers full weights (ZeRO-3: `GatheredParameters`, a collective) and copies them
on rank 0. The resume
state is DeepSpeed's own checkpoint (per-rank optimizer partitions and the schedule), written under the
checkpoint's `engine/` folder and loaded only after the run folder's manifest has been verified (DeepSpeed
unpickles its files). It resumes with the same stage and the same number of ranks; the trainer refuses other
layouts by name. Generation gathers the parameters (ZeRO-3) and decodes a whole model on every rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from workbench.errors import ConfigError
from workbench.models.base import DecoderOutput
from workbench.parallel.data_parallel import _DataParallelEngine
from workbench.parallel.dims import ParallelDims
from workbench.parallel.plans import Plan

# keys a user DeepSpeed JSON may not set: ours come from these fields of the run's config
_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size x train.grad_accum x the data-parallel ranks",
    "managed_gradient_accumulation": "nothing (the trainer owns accumulation)",
    "optimizer": "the [optim] section", "scheduler": "optim.schedule", "gradient_clipping": "optim.grad_clip",
    "zero_allow_untested_optimizer": "optim.name", "bf16": "run.precision", "fp16": "run.precision",
    "torch_autocast": "run.precision",
}
MIN_VERSION = (0, 19, 8)  # the first release whose ZeRO 1-3 honour managed_gradient_accumulation = false


def deepspeed_config(job, stage: int, dims: ParallelDims, bf16: bool) -> dict:
    """The DeepSpeed config for `job` at ZeRO `stage`, a user JSON (parallel.deepspeed_config) merged on top."""
    from workbench.train.optim import TORCH_NAMES, optimizer_kwargs

    ours = {
        "train_micro_batch_size_per_gpu": job.train.micro_batch_size,
        "gradient_accumulation_steps": job.train.grad_accum,
        "train_batch_size": job.train.micro_batch_size * job.train.grad_accum * dims.dp_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": job.optim.grad_clip,
        "optimizer": {"type": TORCH_NAMES[job.optim.name],
                      "params": {**optimizer_kwargs(job.optim), **({"torch_adam": True} if job.optim.name == "adamw"
                                                                     else {})}},
        "zero_optimization": {"stage": stage, "overlap_comm": False},
        # DeepSpeed vets its own optimizers for ZeRO; torch.optim.SGD (through its torch fallback) is plain
        "zero_allow_untested_optimizer": job.optim.name == "sgd",
        "steps_per_print": 2**31 - 1,  # the trainer reports progress
        "wall_clock_breakdown": False,
    }
    if bf16:
        ours["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    path = job.parallel.deepspeed_config
    if not path:
        return ours
    try:
        user = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"config key 'parallel.deepspeed_config': cannot read {path} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key 'parallel.deepspeed_config': {path} is not JSON ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"config key 'parallel.deepspeed_config': {path} must hold a JSON object")
    for key, field in _OWNED.items():
        if key in user:
            raise ConfigError(f"config key 'parallel.deepspeed_config': {path} sets {key!r}, which the run's config "
                              f"decides (set {field} instead)")
    stage_in_user = user.get("zero_optimization", {}).get("stage", stage)
    if stage_in_user != stage:
        raise ConfigError(f"config key 'parallel.deepspeed_config': {path} asks for ZeRO stage {stage_in_user} "
                          f"but parallel.backend is 'zero{stage}'; choose the stage with parallel.backend")
    return _merge(ours, user)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


class _Mpu:
    """The groups DeepSpeed asks a model-parallel unit for, from ParallelDims' mesh."""

    def __init__(self, dims: ParallelDims):
        self.dp, self.tp = dims.mesh["dp"], dims.mesh["tp"]

    def get_data_parallel_group(self):
        return self.dp.get_group()

    def get_data_parallel_rank(self) -> int:
        return self.dp.get_local_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.dp.size()

    def get_model_parallel_group(self):
        return self.tp.get_group()

    def get_model_parallel_rank(self) -> int:
        return self.tp.get_local_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.tp.size()


class _Dispatch(nn.Module):
    """model.forward(batch) or model.logits(hidden, positions), both as this module's forward. The forward's
    DecoderOutput travels as a dict, a container ZeRO-3 looks into for the tensors its backward hooks need."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch=None, hidden=None, positions=None, values=None):
        if values is not None:  # PPO's critic (the value head is a submodule: ZeRO-3 gathers it on call)
            return self.model.values(values)
        if hidden is not None:
            return self.model.logits(hidden, positions=positions)
        return vars(self.model(batch))


def head_weight(model: nn.Module, plan: Plan) -> torch.Tensor:
    """The vocabulary projection's weight: the plan's head module, or the embedding it is tied to."""
    head = getattr(model, plan.head, None) if plan.head else None
    return head.weight if head is not None else model.get_submodule(plan.embedding).weight


class ZeroEngine(_DataParallelEngine):
    STATE_TAG = "deepspeed"  # DeepSpeed's checkpoint tag (its subfolder of engine/)

    def __init__(self, model: nn.Module, dims: ParallelDims, plan: Plan, job,
                 autocast_dtype: torch.dtype | None = None):
        if next(model.parameters()).device.type == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"  # read when DeepSpeed is first imported
        import deepspeed

        from workbench.train.optim import build_scheduler, param_groups

        version = tuple(int(x) for x in deepspeed.__version__.split("+")[0].split(".")[:3])
        if version < MIN_VERSION:
            raise ConfigError(f"config key 'parallel.backend': {job.parallel.backend} needs deepspeed >= "
                              f"{'.'.join(map(str, MIN_VERSION))} (found {deepspeed.__version__}): older releases "
                              f"ignore managed_gradient_accumulation and would step twice per accumulated step")
        self.stage = int(job.parallel.backend[-1])
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        wrapper = _Dispatch(model)
        if self.stage == 3:
            deepspeed.zero.register_external_parameter(wrapper, head_weight(model, plan))
        self.ds, _, _, _ = deepspeed.initialize(
            model=wrapper, model_parameters=param_groups(model, job.optim.weight_decay),
            config=deepspeed_config(job, self.stage, dims, bf16=autocast_dtype == torch.bfloat16),
            lr_scheduler=lambda opt: build_scheduler(opt, job.optim, job.train.steps * job.objective.updates_per_step()), mpu=_Mpu(dims))
        assert not self.ds.managed_gradient_accumulation()  # the version check above guarantees it
        self.max_norm = job.optim.grad_clip
        super().__init__(model, dims, optimizer=None, scheduler=None, frozen=False)  # DeepSpeed owns the optimizer

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def forward(self, batch: dict) -> DecoderOutput:
        return DecoderOutput(**self.ds(batch))

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.ds(hidden=hidden, positions=positions)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ds(values=hidden)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.dims.dp_size, scale_wrt_gas=False)

    def optimizer_step(self, max_norm: float, loss: float) -> tuple[float, bool]:
        """DeepSpeed's boundary: reduce, measure the norm, skip a non-finite one on every rank, clip (at the
        config's gradient_clipping, which is optim.grad_clip), step, advance the schedule. The decision
        comes from the gradient norm alone (a non-finite loss gives non-finite gradients)."""
        if max_norm != self.max_norm:
            raise ValueError(f"ZeRO clips at optim.grad_clip = {self.max_norm} (set when DeepSpeed was configured), "
                             f"not at {max_norm}")
        self.ds.step()
        applied = bool(self.ds.was_step_applied())
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if applied and norm is not None else math.nan
        return norm, applied

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    @contextlib.contextmanager
    def _gathered(self):
        """Full parameters on every rank for the duration (ZeRO-3 partitions them; 1 and 2 do not)."""
        if self.stage < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            yield

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole fp32 tensors on rank 0 (the gather is a collective under ZeRO-3; other ranks get {})."""
        with self._gathered():
            if not self.is_main:
                return {}
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    @contextlib.contextmanager
    def gather_for_generation(self, independent: bool = False):
        if independent and self.stage == 3:
            # ZeRO-3's hooks would gather (a collective) at every forward of the live model: decode a whole copy
            from workbench.parallel.data_parallel import whole_copy

            with self._gathered():
                full = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            yield whole_copy(self, full).eval()
            return
        with self._gathered(), super().gather_for_generation() as model:
            yield model

    def save_state(self, folder: Path) -> None:
        self.ds.save_checkpoint(str(folder), tag=self.STATE_TAG, save_latest=False)

    def load_state(self, folder: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(folder), tag=self.STATE_TAG, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise ConfigError(f"checkpoint {folder}: no DeepSpeed state under tag {self.STATE_TAG!r}")
