"""ParallelDims: the parallel degrees of a run, checked against the world and the model before any work.

    world_size = dp_replicate * dp_shard * cp * tp        (ep is not a factor: it borrows ranks)

The device mesh has the dimensions (dp_replicate, dp_shard, cp, tp), outermost first, so tensor-parallel
ranks are neighbours (on a GPU node they share the fastest links) and replicas are farthest apart.
Later code asks for the sub-meshes it needs by name:

    "dp"            dp_replicate x dp_shard   ranks that read different data (the data cursor's W)
    "dp_shard_cp"   dp_shard x cp             the ranks FSDP2 shards parameters over (cp ranks hold the
                                              same weights, so they shard them too)
    "dp_cp"         dp_replicate x dp_shard x cp   the ranks loss sums and token counts are reduced over
    "tp", "cp", "dp_replicate", "dp_shard"    the single dimensions

Expert parallelism takes its ep ranks out of dp_shard x cp (experts are sharded over ranks that would
otherwise hold the same expert weights), so ep must divide dp_shard * cp. `expert_mesh` splits those ranks
(torchtitan's layout) into

    "dp_shard_mod_ep"  dp_shard x cp / ep     ranks holding the same experts: FSDP2 shards the experts here
    "ep"               ep (innermost)         ranks holding different experts: the all-to-all group

with dp_replicate kept outermost, so `ep_mesh` is expert_mesh["ep"] and the experts' FSDP mesh is
"dp_shard_mod_ep" (with "dp_replicate" in front under HSDP). Both share the world mesh's root, so FSDP2 can
stack its shard dimension on the ep one.

Which backend takes which degrees
    single   every degree 1
    ddp      dp_replicate = world size (plain data parallel: replicas, nothing sharded)
    fsdp2    dp_shard (and dp_replicate > 1 for HSDP), composes with tp, with ep (workbench/parallel/ep.py) and
             with cp (workbench/parallel/cp.py: FSDP2 shards over dp_shard x cp)
    ddp      also with cp: dp_replicate x cp = world size (gradients are averaged over all of them)
    zero1-3  DeepSpeed's data-parallel group is dp_shard (or dp_replicate): tp, cp and ep are refused
    `one_rank(backend)` is fsdp2 or zero1-3 on a 1-rank group (the overhead of the wrapper on one device); a
    config cannot ask for it (one process trains with "single").
Context parallel (cp > 1) composes with a mixture of experts (and with ep, which borrows cp ranks): token-level
router sums reduce over dp x cp like data parallel, and DeepSeek-V3's sequence-wise balance loss sums its
per-sequence counts over the cp group (workbench/models/moe.py). It is refused with multi-token prediction
(model.config.mtp_layers > 0: the MTP modules shift tokens along the sequence, across the zig-zag slices), and
Ulysses needs cp to divide model.config.n_heads.
Validation names the config field and what was expected, so a bad layout stops before a process group
exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from workbench.errors import ConfigError

DIMS = ("dp_replicate", "dp_shard", "cp", "tp")  # mesh order, outermost first

# what each backend supports: degrees that must stay 1
_REFUSED = {
    "single": ("dp_replicate", "dp_shard", "tp", "cp", "ep"),
    "ddp": ("dp_shard", "tp", "ep"),
    "fsdp2": (),
    "zero1": ("tp", "cp", "ep"),
    "zero2": ("tp", "cp", "ep"),
    "zero3": ("tp", "cp", "ep"),
}


@dataclass(frozen=True)
class ParallelDims:
    backend: str
    dp_replicate: int
    dp_shard: int
    tp: int
    cp: int
    ep: int
    world_size: int
    cp_method: str = "ring"

    @classmethod
    def from_config(cls, parallel, world_size: int, model_cfg=None) -> ParallelDims:
        """Checked degrees from a `ParallelSection`; `model_cfg` adds the head and expert divisibility checks."""
        dims = cls(parallel.backend, parallel.dp_replicate, parallel.dp_shard, parallel.tp, parallel.cp,
                   parallel.ep, world_size, getattr(parallel, "cp_method", "ring"))
        dims.validate(model_cfg)
        return dims

    @classmethod
    def one_rank(cls, backend: str) -> ParallelDims:
        """A sharding backend (fsdp2, zero1-3) on a 1-rank process group: what it costs over `single` on one
        device, with nothing to shard over (benchmarks/gpu_suite.py measures FSDP2 and ZeRO-2 this way). Not
        reachable from a config (`validate` asks for a launcher there); the caller starts the 1-rank group."""
        if backend not in ("fsdp2", "zero1", "zero2", "zero3"):
            raise ConfigError(f"config key 'parallel.backend': a one-rank layout is for fsdp2 and zero1-3, "
                              f"got {backend!r}")
        return cls(backend, 1, 1, 1, 1, 1, 1)

    def validate(self, model_cfg=None) -> None:
        degrees = {d: getattr(self, d) for d in (*DIMS, "ep")}
        for name, value in degrees.items():
            if value < 1:
                raise ConfigError(f"config key 'parallel.{name}': must be >= 1, got {value}")
        product = self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != self.world_size:
            raise ConfigError(
                f"config keys 'parallel.dp_replicate' x 'dp_shard' x 'cp' x 'tp' = {self.dp_replicate} x "
                f"{self.dp_shard} x {self.cp} x {self.tp} = {product}, but the world size is {self.world_size} "
                f"(processes started by the launcher); make the product equal it")
        if self.backend not in _REFUSED:
            raise ConfigError(f"config key 'parallel.backend': unknown {self.backend!r} "
                              f"(expected one of {', '.join(_REFUSED)})")
        if self.backend != "single" and self.world_size == 1:
            raise ConfigError(f"config key 'parallel.backend': {self.backend!r} needs several processes started by a "
                              f"launcher (launch/torchrun.sh, docs/parallelism.md); one process trains with 'single'")
        for name in _REFUSED[self.backend]:
            if name == "ep" and self.ep != 1:  # the all-to-all dispatch is wired into fsdp2 only (ep.py)
                why = {"single": "one process has no ranks to split the experts over",
                       "ddp": "DDP averages every gradient over all ranks, which would mix different experts"}.get(
                    self.backend, "DeepSpeed-MoE's expert groups are not wired into the ZeRO engine")
                raise ConfigError(f"config key 'parallel.ep': {self.ep} asks for expert parallelism, which is not "
                                  f"built yet for backend {self.backend!r} ({why}), only for 'fsdp2'; use "
                                  f"parallel.backend = 'fsdp2' with parallel.dp_shard a multiple of ep, or set "
                                  f"parallel.ep = 1 (MoE experts then stay whole on every rank)")
            if name == "cp" and self.cp != 1 and self.backend.startswith("zero"):
                raise ConfigError(f"config key 'parallel.cp': {self.cp} asks for context parallel, which does not "
                                  f"compose with backend {self.backend!r} yet (DeepSpeed's data-parallel group would "
                                  f"have to leave out the cp ranks while its loss reduction includes them); use "
                                  f"parallel.backend = 'fsdp2' (or 'ddp') with parallel.cp, or set parallel.cp = 1")
            if degrees[name] != 1:
                raise ConfigError(
                    f"config key 'parallel.{name}': {degrees[name]} does not compose with backend "
                    f"{self.backend!r} (it needs parallel.{name} = 1; docs/parallelism.md lists what composes)")
        if self.backend == "ddp" and self.dp_replicate * self.cp != self.world_size:
            raise ConfigError(f"config key 'parallel.dp_replicate': backend 'ddp' replicates the model on every "
                              f"rank, so dp_replicate x cp must equal the world size {self.world_size}")
        if self.cp > 1 and self.tp > 1:
            raise ConfigError(f"config keys 'parallel.cp' and 'parallel.tp': context parallel ({self.cp}) with tensor "
                              f"parallel ({self.tp}) is not built or tested yet; set one of them to 1")
        if self.cp_method not in ("ring", "ulysses"):
            raise ConfigError(f"config key 'parallel.cp_method': {self.cp_method!r} (expected 'ring' or 'ulysses')")
        if self.backend.startswith("zero") and self.dp_replicate > 1 and self.dp_shard > 1:
            raise ConfigError("config keys 'parallel.dp_replicate' and 'parallel.dp_shard': ZeRO has one "
                              "data-parallel group; set one of them to the world size and the other to 1")
        if self.ep > 1 and (self.dp_shard * self.cp) % self.ep:
            raise ConfigError(f"config key 'parallel.ep': {self.ep} must divide parallel.dp_shard x parallel.cp "
                              f"= {self.dp_shard * self.cp} (expert ranks are borrowed from them)")
        if model_cfg is not None:
            for attr in ("n_heads", "n_kv_heads"):
                n = getattr(model_cfg, attr, None)
                if n is not None and n % self.tp:
                    raise ConfigError(f"config key 'parallel.tp': {self.tp} must divide model.config.{attr} = {n} "
                                      f"(each tensor-parallel rank holds whole heads)")
            n_experts = getattr(model_cfg, "n_experts", None)  # routed experts per MoE layer (every MoE family)
            if self.ep > 1 and n_experts is None:
                raise ConfigError(f"config key 'parallel.ep': {self.ep} asks for expert parallelism, but the model "
                                  f"has no routed experts (model.config.n_experts); set parallel.ep = 1")
            if self.ep > 1 and n_experts % self.ep:
                raise ConfigError(f"config key 'parallel.ep': {self.ep} must divide model.config.n_experts "
                                  f"= {n_experts}")
            mtp_layers = getattr(model_cfg, "mtp_layers", 0)  # DeepSeek-V3's multi-token prediction modules
            if self.cp > 1 and mtp_layers:
                raise ConfigError(f"config keys 'parallel.cp' and 'model.config.mtp_layers': context parallel "
                                  f"({self.cp}) with multi-token prediction (model.config.mtp_layers = "
                                  f"{mtp_layers}) is not built: the MTP modules read token t + d beside token t, "
                                  f"which lives on another cp rank's zig-zag slice; set model.mtp_layers = 0 "
                                  f"(Kimi K2's flavors have none) or parallel.cp = 1")
            n_heads = getattr(model_cfg, "n_heads", None)
            if self.cp > 1 and self.cp_method == "ulysses" and n_heads is not None and n_heads % self.cp:
                raise ConfigError(f"config key 'parallel.cp': Ulysses splits the heads over the cp ranks, so "
                                  f"parallel.cp = {self.cp} must divide model.config.n_heads "
                                  f"= {n_heads}; use parallel.cp_method = 'ring' or another cp")
        # data.seq_len must be divisible by 2 x cp: checked by JobConfig.validate (workbench.parallel.cp)

    # ------------------------------------------------------------------------------------------------ sizes

    @property
    def dp_size(self) -> int:
        """How many ranks read different data: the data cursor's world size."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """This global rank's index among the data-parallel ranks (mesh order: tp and cp are innermost)."""
        return rank // (self.cp * self.tp)

    def cp_rank(self, rank: int) -> int:
        """This global rank's index in its cp group (which slice of each sequence it holds)."""
        return rank // self.tp % self.cp

    # ------------------------------------------------------------------------------------------------ meshes

    @cached_property
    def mesh(self):
        """The world's DeviceMesh (dp_replicate, dp_shard, cp, tp) with the flattened sub-meshes named above."""
        import torch
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, tuple(getattr(self, d) for d in DIMS), mesh_dim_names=DIMS)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        return mesh

    @cached_property
    def expert_mesh(self):
        """(dp_replicate, dp_shard_mod_ep, ep, tp): the world's ranks arranged for the experts (module notes).

        Built from the world mesh by splitting dp_shard x cp, so every sub-mesh shares the world's root."""
        mesh = self.mesh
        return mesh["dp_replicate", "dp_shard_cp", "tp"]._unflatten(
            1, (self.dp_shard * self.cp // self.ep, self.ep), ("dp_shard_mod_ep", "ep"))

    @property
    def ep_mesh(self):
        """The ep ranks (neighbours in the mesh): the all-to-all group of expert parallelism."""
        return self.expert_mesh["ep"]

    @property
    def expert_fsdp_mesh(self):
        """The ranks that hold the same experts: FSDP2 shards the expert parameters over them (HSDP: 2-D)."""
        em = self.expert_mesh
        return em["dp_shard_mod_ep"] if self.dp_replicate == 1 else em["dp_replicate", "dp_shard_mod_ep"]

    def describe(self) -> str:
        active = [f"{d}={getattr(self, d)}" for d in (*DIMS, "ep") if getattr(self, d) > 1]
        return f"{self.backend} on {self.world_size} rank{'s' if self.world_size > 1 else ''}" + (
            f" ({', '.join(active)})" if active else "")
