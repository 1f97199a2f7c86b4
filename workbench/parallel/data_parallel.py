"""Data-parallel engines: DDP (replicas) and FSDP2 (parameters, gradients and optimizer state sharded).

Both are the single-process engine plus communication, so everything the trainer sees stays the same:

    ddp     DistributedDataParallel over the world: every rank holds the whole model; backward all-reduces
            (averages) gradients bucket by bucket while it runs; `no_sync` skips that for all but the last
            micro-batch of a step.
    fsdp2   tensor + sequence parallel first when parallel.tp > 1 (tensor_parallel.py), then expert parallel
            when parallel.ep > 1 (ep.py: each ep rank holds E / ep experts, tokens travel by all-to-all; the
            experts get their own FSDP unit over the ranks that hold the same experts, see below), then
            context parallel when parallel.cp > 1 (cp.py: the attention cores become ring / Ulysses cores, each
            rank holding a zig-zag slice of every sequence), then activation checkpointing, then (when there are data ranks to shard over) `fully_shard` on every block of the
            plan and then on the root (embedding, final norm and the head, tied or not, stay in the root unit): each rank keeps 1/N of every parameter as a DTensor
            shard; a block's forward all-gathers its parameters and frees them after
            (`reshard_after_forward`), backward reduce-scatters the gradients. `logits` is registered as a
            forward method so it gathers the head too. Under bf16, parameters are gathered and compute in bf16
            and gradients reduce in fp32 (`MixedPrecisionPolicy`; parallel.fsdp_mixed_precision = "params"), or
            with "autocast" fp32 parameters are gathered and every op autocasts as in one process (the same
            numbers as single); `cpu_offload` keeps shards and optimizer state on the host.

Loss scale. Both average gradients over the data-parallel ranks (and the cp ranks, which hold slices of the
same samples), while the trainer's loss is already divided by the global token count of the step (summed over
ranks); the engine multiplies the loss by dp x cp before backward, so the gradient is the global sum / global
count exactly as on one process.
Expert parameters under ep > 1 are Shard(0) DTensors over the ep ranks, and their backward already sums every
token of the ep group (the all-to-all carries the gradients home); FSDP2 reduces them over the ranks holding the
same experts only (`ParallelDims.expert_fsdp_mesh`), dividing by the dense parameters' data-parallel size rather
than that smaller mesh's (`set_gradient_divide_factor`), so they also end as the global sum / global count. The
gradient norm adds the squared norms of the two meshes' gradients.

State. `model_state_dict` gives full tensors (under fsdp2 only rank 0 holds them, others get an empty dict); the
optimizer state goes through torch.distributed.checkpoint (SingleEngine.save_state: each rank writes its own
shards), which reshards on load, so a run saved on N ranks resumes on M.

Generation: every rank runs the same greedy decode in lockstep under fsdp2 (each block all-gathers as in
training); ddp decodes on its local replica; with tensor parallel every rank decodes a gathered whole copy
(heads, and so the KV cache, are split across tp ranks), and so does every fsdp2 rank when it decodes prompts of
its own (`gather_for_generation(independent=True)`: RL rollouts, which stop at different tokens on each rank). The
copy is built once per engine and refilled from the full state dict at each call (`whole_copy`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from workbench.errors import ConfigError
from workbench.models.base import DecoderOutput
from workbench.parallel.checkpointing import apply_activation_checkpointing, apply_compile
from workbench.parallel.cp import apply_context_parallel, context_parallel_disabled
from workbench.parallel.dims import ParallelDims
from workbench.parallel.ep import apply_expert_parallel
from workbench.parallel.plans import Plan, block_modules
from workbench.parallel.rendezvous import bound_store
from workbench.parallel.single import FULL, SingleEngine
from workbench.parallel.tensor_parallel import apply_tensor_parallel, tp_logits

_monitor: dict = {}  # the gloo group that finds unresponsive ranks after a timeout


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group the launcher described (torchrun, deepspeed, accelerate all set RANK,
    WORLD_SIZE, MASTER_ADDR/PORT); (0, 1) when started as a plain process. gloo on CPU, nccl on GPU.
    A collective that waits longer than `timeout_s` raises on the ranks that wait."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one store across restarts; without a per-attempt prefix the restarted
            # workers read the dead ones' addresses and gloo fails to connect (pytorch issue 167288)
            base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                 is_master=False, timeout=timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"workbench/attempt-{attempt}", base)
            dist.init_process_group(backend, timeout=timeout, store=store, rank=int(os.environ["RANK"]),
                                    world_size=world)
        else:  # rank 0 serves the store itself (deepspeed launcher, plain env): on MASTER_ADDR's address only
            rank = int(os.environ["RANK"])
            store = bound_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, rank == 0,
                                timeout=timeout)
            dist.init_process_group(backend, timeout=timeout, store=store, rank=rank, world_size=world)
    if "group" not in _monitor:
        _monitor["group"] = dist.new_group(backend="gloo")  # a side channel, untouched by a failed collective
    return dist.get_rank(), dist.get_world_size()


def unresponsive_ranks(wait_s: float = 5.0) -> str:
    """After a collective timed out: which ranks do not answer a barrier within `wait_s` (from rank 0's
    view; other ranks only learn that some rank is missing). An empty string if everyone answers."""
    if "group" not in _monitor:
        return ""
    try:
        dist.monitored_barrier(group=_monitor["group"], timeout=datetime.timedelta(seconds=wait_s),
                               wait_all_ranks=True)
    except RuntimeError as e:
        found = re.search(r"[Rr]anks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        return f"rank {found.group(1).strip()} did not answer" if found else str(e).splitlines()[0]
    return ""


def is_timeout(e: BaseException) -> bool:
    """A collective's timeout, as gloo or nccl report it."""
    return isinstance(e, dist.DistBackendError) or "Timed out" in str(e) or "timeout" in str(e).lower()


class _DataParallelEngine(SingleEngine):
    """What DDP and FSDP2 share: the rank, the loss scale, reductions over the data-parallel ranks."""

    def __init__(self, model: nn.Module, dims: ParallelDims, optimizer=None, scheduler=None, autocast_dtype=None,
                 frozen: bool | None = None):
        super().__init__(model, optimizer, scheduler, autocast_dtype, frozen)
        self.dims = dims
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def backward(self, loss: torch.Tensor) -> None:
        # the wrappers average gradients over the data-parallel ranks, cp ranks included (each holds a slice of
        # the same samples, so its gradient is a share of theirs); the loss is normalized globally
        (loss * self.dims.dp_size * self.dims.cp).backward()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Over the ranks that hold different data (tensor-parallel ranks share one loss: counted once)."""
        out = tensor.detach().clone()
        group = self.dims.mesh["dp_cp"].get_group() if self.dims.tp > 1 else None
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
        return out

    @property
    def cp_size(self) -> int:
        return self.dims.cp

    def all_reduce_cp(self, tensor: torch.Tensor) -> torch.Tensor:
        """A sum over the cp group: the ranks holding slices of the same sequences (per-sequence statistics,
        e.g. DeepSeek-V3's sequence-wise balance loss); the tensor itself without context parallel."""
        if self.dims.cp == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.dims.mesh["cp"].get_group())
        return out

    def unwrap(self) -> nn.Module:
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model

    @contextlib.contextmanager
    def gather_for_generation(self, independent: bool = False):
        # context parallel cores run as plain cores: every rank decodes the whole sequence (cp.py)
        with context_parallel_disabled(self.unwrap()), super().gather_for_generation() as model:
            yield model

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        with self._autocast():
            return self.unwrap().logits(hidden, positions=positions)


def whole_copy(engine, full: dict[str, torch.Tensor]) -> nn.Module:
    """A plain model of the engine's family on its device, holding the consolidated weights `full` (a value head's
    keys, PPO's, are left out: generation needs none); built once per engine and refilled after."""
    model = engine.unwrap()
    copy = getattr(engine, "_whole_copy", None)
    if copy is None:
        copy = type(model)(model.cfg).to(engine.device)
        engine._whole_copy = copy
    copy.load_state_dict({k: v for k, v in full.items() if not k.startswith("value_head.")})
    return copy


class DDPEngine(_DataParallelEngine):
    def __init__(self, model: nn.Module, dims: ParallelDims, make_optimizer=None, autocast_dtype=None):
        device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        optimizer, scheduler = make_optimizer(model) if make_optimizer else (None, None)
        super().__init__(wrapped, dims, optimizer, scheduler, autocast_dtype)

    def forward(self, batch: dict) -> DecoderOutput:
        with self._autocast():
            return self.model(batch)

    def no_sync(self):
        return self.model.no_sync()


class FSDP2Engine(_DataParallelEngine):
    def __init__(self, model: nn.Module, dims: ParallelDims, plan: Plan, make_optimizer=None,
                 autocast_dtype=None, reshard_after_forward: bool = True, cpu_offload: bool = False,
                 activation_checkpointing: str = "none", compile: bool = False, loss_parallel: bool = False,
                 mixed_precision: str = "params"):
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        self.tp_mesh = dims.mesh["tp"] if dims.tp > 1 else None
        self.loss_parallel = loss_parallel and self.tp_mesh is not None
        self._in_loss = False  # inside loss_context: logits stay split along the vocabulary
        if self.tp_mesh is not None:  # TP/SP first, then FSDP over the data ranks (DESIGN.md rule 2)
            apply_tensor_parallel(model, plan, self.tp_mesh)
        # EP next: the experts become Shard(0) DTensors over the ep ranks, dispatched by all-to-all
        experts = apply_expert_parallel(model, plan, dims.ep_mesh) if dims.ep > 1 else []
        if dims.cp > 1:  # CP next: the attention cores become ring / Ulysses cores over the cp ranks
            apply_context_parallel(model, plan, dims.mesh["cp"].get_group(), dims.cp_method)
        apply_activation_checkpointing(model, plan, activation_checkpointing)
        apply_compile(model, plan, compile)
        # tp alone: nothing to shard over; no tp: always (a 1-rank mesh too: ParallelDims.one_rank)
        self.fsdp = self.tp_mesh is None or dims.dp_replicate * dims.dp_shard * dims.cp > 1
        if self.fsdp:
            mesh = dims.mesh["dp_shard_cp"] if dims.dp_replicate == 1 else dims.mesh["dp_replicate", "dp_shard_cp"]
            kw: dict = {"mesh": mesh}
            if mixed_precision not in ("params", "autocast"):
                raise ValueError(f"FSDP2 mixed_precision {mixed_precision!r}: expected 'params' or 'autocast'")
            if autocast_dtype is not None and mixed_precision == "params":
                # compute in bf16, reduce gradients in fp32 (replaces autocast)
                kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)
            elif autocast_dtype is not None:  # fp32 parameters under autocast, as one process computes
                kw["mp_policy"] = MixedPrecisionPolicy(reduce_dtype=torch.float32)
            if cpu_offload:
                kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())  # pinning needs CUDA
            for module in experts:  # their own unit, sharded over the ranks that hold the same experts
                fully_shard(module, reshard_after_forward=reshard_after_forward,
                            **{**kw, "mesh": dims.expert_fsdp_mesh})
                # the loss carries the dense mesh's size (backward), so divide by that, not the smaller mesh's
                module.set_gradient_divide_factor(float(mesh.size()))
                # a custom factor is NCCL's PREMUL_SUM in the reduce-scatter; gloo has none, so there: SUM, then
                # divide. Not with a 1-rank shard group: torch 2.13 skips the reduce-scatter there, divides while
                # copying and would divide again after a forced sum
                if dist.get_backend() != "nccl" and dims.expert_fsdp_mesh.size(-1) > 1:
                    module.set_force_sum_reduction_for_comms(True)
            for block in block_modules(model, plan):
                fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
            # the root unit: embedding, final norm and head (a tied head shares the embedding's parameter)
            fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
            register_fsdp_forward_method(model, "logits")
            if hasattr(model, "value_head"):  # PPO's critic lives in the root unit beside the head
                register_fsdp_forward_method(model, "values")
        elif autocast_dtype is not None:  # bf16 comes from FSDP2's mixed-precision policy
            raise ConfigError("config key 'run.precision': bf16 with tensor parallel alone is not supported; "
                              "set run.precision = 'fp32' or add parallel.dp_shard > 1")
        optimizer, scheduler = make_optimizer(model) if make_optimizer else (None, None)
        autocast = autocast_dtype if self.fsdp and mixed_precision == "autocast" else None
        super().__init__(model, dims, optimizer, scheduler, autocast_dtype=autocast)

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.tp_mesh is None:
            with self._autocast():  # fsdp_mixed_precision = "autocast"; otherwise a no-op
                return self.model.logits(hidden, positions=positions)
        with self._autocast():
            return tp_logits(self.model, hidden, positions, self.tp_mesh, keep_split=self._in_loss)

    @contextlib.contextmanager
    def loss_context(self):
        if not self.loss_parallel:
            yield
            return
        from torch.distributed.tensor.parallel import loss_parallel

        self._in_loss = True
        try:
            with loss_parallel():
                yield
        finally:
            self._in_loss = False

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.values(hidden)  # an FSDP forward method of the root unit (gathers the value head)

    @contextlib.contextmanager
    def gather_for_generation(self, independent: bool = False):
        if self.tp_mesh is None and not (independent and self.fsdp):
            # every rank decodes in lockstep, each block gathering as in training
            with super().gather_for_generation() as model:
                yield model
            return
        # heads split across tp ranks (a KV cache is per head), or ranks decoding their own prompts: a whole copy
        # on every rank, kept between calls (only the weights are gathered again)
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        yield whole_copy(self, full).eval()

    @contextlib.contextmanager
    def no_sync(self):
        # gradients of the earlier micro-batches accumulate unsharded; the last one reduce-scatters them
        if not self.fsdp:
            yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        # DTensors of one mesh at a time (expert parameters live on the expert mesh): ||g||^2 = sum of the parts
        by_mesh: dict = {}
        for p in params:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
        norms = []
        for group in by_mesh.values():
            norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)  # a DTensor: over the shards
            norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        norm = norms[0] if len(norms) == 1 else torch.stack(norms).square().sum().sqrt()
        if max_norm > 0:
            for group in by_mesh.values():
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=True)
        return norm

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(self.model, options=FULL)
