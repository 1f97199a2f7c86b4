"""The trainer: one loop for every pipeline, talking only to Engines and an Objective.

One step
    1. read grad_accum micro-batches for this rank at the global data cursor (under context parallelism the
       cp ranks read the same samples and each keeps its zig-zag slice: workbench.parallel.cp.shard_batch)
    2. micro_batches = objective.experience(step, engines, data)
    3. N = all_reduce(sum of objective.units(mb))           the step's global count of loss terms
    4. for each micro-batch: loss = objective.loss(engines, mb, N); engine.backward(loss)
       (inside engine.no_sync() for all but the last, so data-parallel engines reduce once)
    5. engine.optimizer_step(grad_clip, loss): grad norm (clipped), then the update unless the loss or the
       norm is not finite (the log says which step); zero_grad
    6. post-step hooks, outside the gradient: the model's `post_step` (DeepSeek-V3's router-bias update)
       and, with optim.qk_clip_tau > 0, QK-Clip from the heads' max logits MAX-reduced over the ranks

Objectives. `objective.name` picks the pipeline (workbench.train.objectives: lm, sft, dpo, distill). Each
declares its roles: the policy gets the engine of `parallel.backend` with the optimizer; a frozen role (DPO's
reference, distillation's teacher) gets an engine without one (`build_frozen_engine`: FSDP2-sharded under
fsdp2, a replica on every rank otherwise), loaded from a run folder whose tokenizer must be the dataset's. The
objective computes everything else: its experience phase, its loss and its held-out metrics
(`validation_sums` / `validation_metrics`), so a new pipeline is a new objective file, not a new loop.
Per-unit quantities an objective reports as sums (`LossOutput.sums`: DPO's reward accuracy, a divergence)
are added over micro-batches and ranks and divided by the step's unit count, like the loss.

Data. The dataset folder `data.dir` (webdataset shards + manifest, see data_pipelines.shards) is built
on first use when it does not exist, and always gives the tokenizer. Language modelling (and distillation
without `data.train_file`) streams the train split through `ShardStream` at the global cursor, and the first
`eval_tokens` of the validation split are the fixed validation set; sft, dpo and distill on examples read
`data.train_file` / `data.val_file` through `workbench.data.examples.ExampleSet` at the same global cursor; vlm
reads (image, question, answer) rows of the vision folder `data.dir` (`workbench.data.vqa.VQASet`) the same way.

LoRA (`[lora]`, workbench.nn.lora): adapters are injected into the policy after its starting weights
(`train.init_from`, needed) are loaded, and only they train. A checkpoint's `model.safetensors` holds the
merged weights (what every consumer reads), `adapter/` the adapters alone; resume reloads the base from
`train.init_from` and the adapters from the checkpoint, so it stays bit-identical.

Measured along the way
    loss (language modelling, the mean over the steps since the previous record; `loss_step` is the last
    step's alone), for a mixture of experts the weighted auxiliary loss that was optimized beside it, the
    balance loss and the expert load (max / mean tokens per expert), lr, grad norm, tokens/s, and the model's achieved GFLOP/s (CPU) or MFU (CUDA), where the FLOPs
    per token follow the MFU convention (model.flops_per_token: 6 N + 12 L H Q T)
    validation loss (nats/token) and bits per byte = sum of -log p over the targets that are text /
    (ln 2 * their bytes), computed in eval mode, at the start, every `eval_every` steps and at the end, beside the unigram
    baseline: the validation loss of a model that knows only the train split's token frequencies

The run folder (out_dir/name) holds config.toml (the resolved config), tokenizer.json, metrics.jsonl, tb/
(TensorBoard), loss.png, checkpoints/step-N (see workbench.checkpoint.run) and report.md (with lr.png and
run_info.json; see workbench.train.report), rewritten from those files after each checkpoint and at the
end. A checkpoint is written every `ckpt_every` steps, at the end, and when SIGINT or SIGTERM arrives
(after the step in flight; a second SIGINT stops at once). `resume=True` continues from the newest
complete checkpoint (weights, optimizer and schedule state, the data cursor and stream position) and
gives the same per-step losses as a run that was never stopped (a metrics record's mean starts again at
the resume); it refuses config changes that would make it a different run (see RESUMABLE_CHANGES; the
LAYOUT_CHANGES are allowed while the global batch stays the same) and a dataset that is not the one the
run was reading. `train.init_from` instead starts a new run from another run's weights alone, under a model
config that may differ where the shapes allow (context extension: `load_init_weights`). A step whose loss
or gradient is not finite is not applied and does not advance the
learning-rate schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from workbench.checkpoint.run import latest_checkpoint, load_for_resume, save_checkpoint, sha256_file
from workbench.checkpoint.safetensors_io import read_file
from workbench.config import dumps_toml, flatten, load_config, to_dict
from workbench.data.cursor import DataCursor
from workbench.data.examples import build_example_sets
from workbench.data.packed import IGNORE_INDEX, collate
from workbench.data.shards import Manifest, ShardStream, unigram_loss
from workbench.data.tokenizer import Tokenizer, check_fits
from workbench.errors import CheckpointError, ConfigError, DataError, WorkbenchError
from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.job import JobConfig
from workbench.models.base import build_model, count_params
from workbench.parallel.checkpointing import apply_activation_checkpointing, apply_compile
from workbench.parallel.cp import apply_context_parallel, cp_all_reduce, shard_batch
from workbench.parallel.data_parallel import (
    DDPEngine,
    FSDP2Engine,
    init_distributed,
    is_timeout,
    unresponsive_ranks,
)
from workbench.parallel.dims import ParallelDims
from workbench.parallel.plans import plan_for
from workbench.parallel.single import SingleEngine, eval_mode
from workbench.parallel.zero import ZeroEngine
from workbench.train.metrics import NullRunLog, RunLog
from workbench.train.objectives import build_objective
from workbench.train.optim import build_optimizer, build_scheduler
from workbench.train.optim.muon import qk_clip_
from workbench.train.report import REPORT_FILE, write_run_report

ADAPTER_DIR = "adapter"  # LoRA adapters inside a checkpoint folder (workbench.nn.lora.save_adapter)
VALUE_HEAD_FILE = "value_head.safetensors"  # PPO's critic head inside a checkpoint folder (not in model.safetensors)

# what a mixture of experts (and DeepSeek-V3's multi-token prediction) adds to a train record
AUX_METRICS = ("aux_loss", "balance_loss", "expert_load", "expert_load_max", "mtp_loss")

# Dense bf16 peak FLOP/s by CUDA device name (performance.md: the MFU convention); unknown cards show no MFU.
PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors moved to `device`; anything else (an RL batch's Example objects) as it is."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def describe_validation(rec: dict, baseline: float | None = None) -> str:
    """One line of held-out metrics: the loss (with bits per byte and the unigram baseline when known), then
    the objective's other val_ metrics."""
    parts = [f"val loss {rec['val_loss']:.3f}"] if "val_loss" in rec else []  # RL scores rewards, not a loss
    if "val_bpb" in rec:
        parts[0] += f" nats/token, {rec['val_bpb']:.3f} bits/byte"
    if baseline is not None:
        parts.append(f"unigram baseline on these tokens {baseline:.3f} nats/token")
    parts += [f"{k[4:]} {v:.4g}" for k, v in rec.items() if k.startswith("val_") and k not in ("val_loss", "val_bpb")]
    return "; ".join(parts)


def pick_device(name: str, what: str = "config key 'run.device'") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError(f"{what}: 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def build_engine(model: torch.nn.Module, job: JobConfig, dims: ParallelDims, autocast: torch.dtype | None):
    """The engine of `parallel.backend` around `model`, with the optimizer and the schedule built over the
    parameters the engine trains (FSDP2's are sharded DTensors, so the optimizer comes after wrapping;
    DeepSpeed builds its own from the generated config). The plan's per-block treatments come in the order of
    DESIGN.md rule 2: tensor parallel, activation checkpointing, compile, then FSDP2 or ZeRO."""

    def make_optimizer(m: torch.nn.Module):
        optimizer = build_optimizer(m, job.optim)
        return optimizer, build_scheduler(optimizer, job.optim, job.train.steps * job.objective.updates_per_step())

    backend, plan, par = job.parallel.backend, plan_for(job.model.family), job.parallel
    if plan.expert is not None and par.tp > 1:
        # the routers would count each tensor-parallel rank's sequence slice alone, and the experts are not split
        raise ConfigError(f"config key 'parallel.tp': {par.tp} with model family {job.model.family!r}: tensor "
                          f"parallelism for a mixture of experts is not built yet; use data parallelism "
                          f"(fsdp2, ddp, zero) with parallel.tp = 1")
    if backend == "fsdp2":
        return FSDP2Engine(model, dims, plan, make_optimizer, autocast_dtype=autocast,
                           reshard_after_forward=par.reshard_after_forward, cpu_offload=par.cpu_offload,
                           activation_checkpointing=par.activation_checkpointing, compile=par.compile,
                           loss_parallel=par.loss_parallel, mixed_precision=par.fsdp_mixed_precision)
    if dims.cp > 1:  # ddp (zero refuses cp in ParallelDims): the attention cores become ring / Ulysses cores
        apply_context_parallel(model, plan, dims.mesh["cp"].get_group(), dims.cp_method)
    apply_activation_checkpointing(model, plan, par.activation_checkpointing)
    apply_compile(model, plan, par.compile)
    if backend == "single":
        return SingleEngine(model, *make_optimizer(model), autocast_dtype=autocast)
    if backend == "ddp":
        return DDPEngine(model, dims, make_optimizer, autocast_dtype=autocast)
    return ZeroEngine(model, dims, plan, job, autocast_dtype=autocast)


def build_frozen_engine(model: torch.nn.Module, family: str, job: JobConfig, dims: ParallelDims,
                        autocast: torch.dtype | None):
    """An engine without an optimizer for a frozen role (a DPO reference, a distillation teacher): under fsdp2
    the model is sharded like the policy (its forward gathers block by block); under the other backends every
    rank holds a replica (DeepSpeed engines own an optimizer, and a replica needs no communication)."""
    if job.parallel.backend == "fsdp2" and dims.dp_replicate * dims.dp_shard > 1:
        return FSDP2Engine(model, dims, plan_for(family), None, autocast_dtype=autocast,
                           mixed_precision=job.parallel.fsdp_mixed_precision)
    return SingleEngine(model, autocast_dtype=autocast)


def check_run_tokenizer(ckpt: Path, tokenizer_sha256: str, key: str) -> None:
    """The run that wrote checkpoint `ckpt` (named by config key `key`) must have used this dataset's tokenizer:
    token ids would mean other things."""
    from workbench.checkpoint.load import run_dir_of

    tokenizer = run_dir_of(ckpt) / "tokenizer.json"
    if tokenizer.is_file() and sha256_file(tokenizer) != tokenizer_sha256:
        raise DataError(f"config key '{key}': {tokenizer} is not the tokenizer of this run's dataset (data.dir); "
                        f"token ids would mean other things (models trained together share one tokenizer)")


def weights_sha256(ckpt: Path) -> str:
    """The sha256 of a checkpoint's model.safetensors: as its manifest records it, else hashed here."""
    from workbench.checkpoint.run import MANIFEST

    try:
        return json.loads((ckpt / MANIFEST).read_text())["model.safetensors"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return sha256_file(ckpt / "model.safetensors")


def load_frozen_model(path: str, key: str, tokenizer_sha256: str, device: torch.device):
    """(model, family, checkpoint folder) of a run folder or checkpoint named by config key `key`, in eval mode,
    after checking it shares this run's tokenizer."""
    from workbench.checkpoint.load import load_run
    from workbench.checkpoint.run import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(path)
        check_run_tokenizer(ckpt, tokenizer_sha256, key)
        model, _, section = load_run(ckpt, device)
    except WorkbenchError as e:
        message = str(e) if str(e).startswith(f"config key '{key}'") else f"config key '{key}': {e}"
        raise type(e)(message) from e
    return model, section.family, ckpt


@contextlib.contextmanager
def main_first(is_main: bool, world: int):
    """Rank 0 runs the block first; the other ranks run it after rank 0 has finished it, or stop with an
    error pointing at rank 0's if it failed (rather than redo its work or wait for the timeout)."""
    if world == 1:
        yield
        return
    ok = torch.ones(1, device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    if is_main:
        try:
            yield
        except BaseException:
            ok.zero_()
            raise
        finally:
            torch.distributed.broadcast(ok, src=0)
    else:
        torch.distributed.broadcast(ok, src=0)
        if not ok.item():
            raise WorkbenchError("rank 0 failed while preparing the run (its error is above); stopping too")
        yield


def prepare_data(job: JobConfig, log=print) -> Manifest:
    """The dataset folder of `job.data`: built on first use, checked against the config when it exists (a vision
    folder for objective vlm: it must exist, its tokenizer is trained on first use)."""
    from data_pipelines.shards import build_dataset

    if job.objective.name == "vlm":
        from workbench.data.vqa import prepare_vision_data

        return prepare_vision_data(job, log=log)
    return build_dataset(job.data, log=log)


def load_init_weights(model: torch.nn.Module, init_from: str, tokenizer_sha256: str, check: bool = True,
                      log=print) -> Path:
    """`train.init_from`: the model weights (not the optimizer, schedule or step) of a run folder's newest
    complete checkpoint, or of a checkpoint folder, loaded into `model`, whose config may differ from the
    one that trained them in anything that keeps every tensor's name and shape (a RoPE scaling, max_seq_len:
    what context extension changes). The checkpoint's manifest is verified first (`check`); the run that
    wrote it must have used this dataset's tokenizer. Returns the checkpoint folder."""
    from workbench.checkpoint.run import load_model_state, resolve_checkpoint
    from workbench.models.base import load_state_strict

    try:
        ckpt = resolve_checkpoint(init_from)
    except WorkbenchError as e:
        raise ConfigError(f"config key 'train.init_from': {e}") from e
    check_run_tokenizer(ckpt, tokenizer_sha256, "train.init_from")
    state = load_model_state(ckpt) if check else read_file(ckpt / "model.safetensors")
    load_state_strict(model, state, f"config key 'train.init_from' ({ckpt / 'model.safetensors'})")
    log(f"init_from: model weights of {ckpt} (a new run: step 0, fresh optimizer)")
    return ckpt


# What a resumed run may change: nothing that shapes the model, the data order or the optimizer's state.
RESUMABLE_CHANGES = frozenset({
    "run.name", "run.out_dir", "run.device", "data.strict",
    "train.log_every", "train.ckpt_every", "train.keep_last", "train.sample_prompt", "train.sample_tokens",
    "train.eval_every", "train.eval_tokens",
})


# What may change with the layout, as long as the global batch (micro_batch_size x grad_accum x the
# data-parallel ranks) stays the same: the checkpoint is layout-free and the data cursor is global.
LAYOUT_CHANGES = frozenset({
    "parallel.backend", "parallel.dp_replicate", "parallel.dp_shard", "parallel.tp", "parallel.cp",
    "parallel.ep", "parallel.timeout_s", "parallel.reshard_after_forward", "parallel.cpu_offload",
    "parallel.fsdp_mixed_precision",
    "parallel.activation_checkpointing", "parallel.loss_parallel", "parallel.compile", "parallel.deepspeed_config",
    "train.micro_batch_size", "train.grad_accum",
    "objective.loss_chunk",  # a memory knob like checkpointing: the same loss and gradients
})


def global_batch(cfg: dict) -> int:
    """Samples per optimizer step from a flattened config."""
    return (cfg["train.micro_batch_size"] * cfg["train.grad_accum"] * cfg["parallel.dp_replicate"]
            * cfg["parallel.dp_shard"])


def check_resumable(saved: JobConfig, job: JobConfig, where: Path) -> None:
    old, new = flatten(to_dict(saved)), flatten(to_dict(job))
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES | LAYOUT_CHANGES and old.get(key) != new.get(key):
            raise ConfigError(
                f"config key '{key}': --resume keeps the run's settings, and {where} has {old.get(key)!r} "
                f"where this config has {new.get(key)!r}")
    old_world, new_world = (c["parallel.dp_replicate"] * c["parallel.dp_shard"] * c["parallel.tp"] * c["parallel.cp"]
                            for c in (old, new))
    old_backend, new_backend = old["parallel.backend"], new["parallel.backend"]
    zero = old_backend.startswith("zero") or new_backend.startswith("zero")
    if zero and (old_backend, old_world) != (new_backend, new_world):
        key = "parallel.backend" if old_backend != new_backend else "parallel.dp_shard' / 'parallel.dp_replicate"
        raise ConfigError(
            f"config key '{key}': {where} was trained with {old_backend} on {old_world} rank(s), this "
            f"config asks for {new_backend} on {new_world}; a ZeRO run's optimizer state is DeepSpeed's, partitioned "
            f"by rank, so it resumes only under the same backend and world size (the other engines share one "
            f"resharding DCP format among themselves)")
    if global_batch(old) != global_batch(new):
        raise ConfigError(
            f"config keys 'train.micro_batch_size' x 'train.grad_accum' x 'parallel.dp_replicate' x "
            f"'parallel.dp_shard': the run was trained with a global batch of {global_batch(old)} samples "
            f"({where}), this config gives {global_batch(new)}; a resume on another layout keeps the global batch")


class Trainer:
    def __init__(self, job: JobConfig, run_dir: str | Path | None = None, resume: bool = False, log=print):
        """`resume`: continue the run folder's newest complete checkpoint if it has one, else start it.

        Under a launcher (torchrun, deepspeed, accelerate) every rank builds a Trainer; rank 0 alone logs,
        writes the run folder and builds a missing dataset while the others wait for it."""
        self.rank, world = init_distributed(job.parallel.timeout_s)
        self.dims = ParallelDims.from_config(job.parallel, world, job.model.config)
        self.is_main = self.rank == 0
        self.job, self.log = job, log if self.is_main else (lambda *a, **k: None)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(job.run.out_dir) / job.run.name
        self.report_path = self.run_dir / REPORT_FILE
        self.device = pick_device(job.run.device)
        if self.device.type == "cuda" and world > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(job.run.seed)  # the same initial weights on every rank
        self.resume_from = latest_checkpoint(self.run_dir)
        if self.resume_from is not None and not resume:
            raise WorkbenchError(
                f"run folder {self.run_dir} already has checkpoints: pass --resume to continue it, "
                f"or choose another --run.name")
        if self.resume_from is not None:
            check_resumable(load_config(JobConfig, self.run_dir / "config.toml"), job, self.run_dir / "config.toml")

        with main_first(self.is_main, world):  # one rank builds a missing dataset, the others then read it
            self.manifest = prepare_data(job, self.log)
        run_tokenizer = self.run_dir / "tokenizer.json"
        if self.resume_from is not None and sha256_file(run_tokenizer) != self.manifest.tokenizer_sha256:
            raise DataError(f"{run_tokenizer}: the run was trained with another tokenizer than {job.data.dir} "
                            f"holds; resume it with the dataset it was trained on")
        train_tokens = self.manifest.tokens("train") + self.manifest.documents("train")  # + one eos each
        if train_tokens < job.data.seq_len + 1:
            raise DataError(f"config key 'data.seq_len': {job.data.seq_len} is longer than the whole train split "
                            f"({train_tokens} tokens); lower it or give more data (data.source, data.max_bytes)")
        self.tokenizer = Tokenizer.from_file(self.manifest.tokenizer_path)
        check_fits(self.tokenizer, job.model.config.vocab_size)
        self.objective = build_objective(job.objective)
        self.objective.setup(job, self.tokenizer)
        self._build_data()  # a validation set too small for one sample stops here, before any file is written
        bf16 = job.run.precision == "bf16" or (job.run.precision == "auto" and self.device.type == "cuda")
        autocast = torch.bfloat16 if bf16 else None
        self.model = build_model(job.model, self.device)
        lora = job.lora.enabled
        # the starting weights: a new run's, and under LoRA also a resumed run's base (only adapters are saved apart)
        # the sha256 of every model.safetensors this run reads besides its own (the starting weights, a frozen
        # teacher or reference): a resume must find the same ones, or it would continue another run
        self.weights_read: dict[str, str] = {}
        if job.train.init_from and (self.resume_from is None or lora):
            with main_first(self.is_main, world):  # rank 0 verifies the manifest before anyone reads a file
                init_ckpt = load_init_weights(self.model, job.train.init_from, self.manifest.tokenizer_sha256,
                                              check=self.is_main, log=self.log)
            self.weights_read["train.init_from"] = weights_sha256(init_ckpt)
        self.n_params, self.flops_per_token = count_params(self.model), self.model.flops_per_token(job.data.seq_len)
        self.lora_report = None
        if lora:
            from workbench.nn.lora import format_report, inject_lora, trainable_report

            inject_lora(self.model, job.lora)  # the adapters' init draws from the RNG seeded alike on every rank
            self.lora_report = trainable_report(self.model)
            self.log(format_report(self.lora_report))
        self.cursor = DataCursor()
        self.step = 0
        train_state = engine_dir = None
        if self.resume_from is not None:  # weights go into the plain model, before any wrapper shards it
            with main_first(self.is_main, world):  # rank 0 verifies the manifest before anyone reads a file
                model_state, train_state, engine_dir = load_for_resume(self.resume_from, check=self.is_main)
            if lora:  # the base was loaded from train.init_from above (checked against the run's below)
                from workbench.nn.lora import load_lora_state

                adapter = self.resume_from / ADAPTER_DIR / "adapter.safetensors"
                load_lora_state(self.model, read_file(adapter), str(adapter))
            else:
                self.model.load_state_dict(model_state)
        if getattr(self.objective, "value_head", False):  # PPO's critic, on the policy's trunk
            self._attach_value_head()
        if hasattr(self.objective, "freeze"):  # e.g. vlm's projector warm-up: frozen towers get no optimizer state
            self.log(self.objective.freeze(self.model))
        self.engine = build_engine(self.model, job, self.dims, autocast)
        self.autocast = autocast
        self.engines = {"policy": self.engine, **self._frozen_engines()}
        if self.resume_from is not None:
            for key, sha in train_state.get("weights_read", {}).items():
                if key in self.weights_read and self.weights_read[key] != sha:
                    raise CheckpointError(f"config key '{key}': {flatten(to_dict(job))[key]} no longer holds the "
                                          f"weights {self.resume_from} was trained with (its model.safetensors "
                                          f"changed, e.g. that run went on training); resuming would mix two runs")
            self.weights_read = {**train_state.get("weights_read", {}), **self.weights_read}
            self.engine.load_state(engine_dir)
            self.cursor.load_state_dict(train_state["cursor"])
            self.data.load_state_dict(train_state["data"])
            self.step = train_state["step"]
            self.log(f"resumed from {self.resume_from} at step {self.step} ({self.dims.describe()})")
        elif self.is_main:  # the run folder describes itself before the first checkpoint
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(run_tokenizer)
        if self.is_main:
            (self.run_dir / "config.toml").write_text(dumps_toml(job))
        for role in self.objective.prepare(self.engines, self.data, self._val_batches, log=self.log):
            self.engines.pop(role)  # done with: e.g. DPO's reference after its log-probs were precomputed
        self.saved_step = self.step
        self.last_val: dict | None = None
        self.stop_signal: int | None = None  # set when every rank has agreed to stop (see _agree_on_stop)
        self._pending_signal: int | None = None  # set by the signal handler on this rank

    def _attach_value_head(self) -> None:
        """`model.value_head` (objectives.ppo), zero-initialised, or on resume the checkpoint's."""
        from workbench.train.objectives.ppo import VALUE_HEAD_PREFIX, attach_value_head

        attach_value_head(self.model)
        if self.resume_from is not None:
            path = self.resume_from / VALUE_HEAD_FILE
            if not path.is_file():
                raise CheckpointError(f"{self.resume_from}: no {VALUE_HEAD_FILE} (the critic of a PPO run); it was "
                                      f"not written by objective.name = 'ppo'")
            self.model.value_head.load_state_dict({k.removeprefix(VALUE_HEAD_PREFIX): v for k, v in read_file(path).items()})

    # ------------------------------------------------------------------------------------------------ data

    def _build_data(self) -> None:
        """The training data (`self.data`, read at the global cursor, and `self.collate`) and the fixed validation
        micro-batches, as the objective asks: the dataset's packed windows, or examples files."""
        job = self.job
        mbs = job.train.micro_batch_size
        self.baseline = None  # the unigram model's validation loss (windows only)
        if self.objective.data == "windows":
            self.data = ShardStream(job.data.dir, "train", job.data.seq_len, eos_id=self.tokenizer.eos_id,
                                    seed=job.run.seed, shuffle_windows=job.data.shuffle_windows,
                                    strict=job.data.strict, log=self.log, manifest=self.manifest)
            self.collate = collate
            stream = ShardStream(job.data.dir, "val", job.data.seq_len, eos_id=self.tokenizer.eos_id,
                                 shuffle=False, strict=job.data.strict, log=self.log, manifest=self.manifest)
            windows = stream.windows(max(1, job.train.eval_tokens // job.data.seq_len))
            if not windows:
                raise DataError(f"the validation split of {job.data.dir} has fewer than data.seq_len + 1 = "
                                f"{job.data.seq_len + 1} tokens; lower data.seq_len or raise data.val_fraction")
            val = [collate(windows[i : i + mbs]) for i in range(0, len(windows), mbs)]
            labels = torch.cat([b["labels"].flatten() for b in val])
            self.baseline = unigram_loss(self.manifest.unigram_counts, labels[labels != IGNORE_INDEX].numpy())
        elif self.objective.data == "vision":  # objective vlm: (image, question, answer) rows of a vision folder
            self.data, val_set = self.objective.build_data(job, self.tokenizer, log=self.log)
            self.collate = self.data.collate
            val = val_set.batches(mbs)
        else:
            self.data, val_set = build_example_sets(job, self.objective.data, self.tokenizer, log=self.log)
            self.collate = self.data.collate
            val = val_set.batches(mbs) if val_set is not None else []
        # context parallel: each cp rank scores its slice of the same windows
        self._val_batches = [to_device(shard_batch(b, self.dims.cp, self.dims.cp_rank(self.rank)), self.device)
                             for b in val]

    def _frozen_engines(self) -> dict:
        """Engines of the objective's frozen roles (`objective.frozen_models`: distillation's teacher, DPO's
        reference), each checked to share the dataset's tokenizer and recorded in `weights_read`."""
        engines = {}
        for role, (path, key) in self.objective.frozen_models(self.job).items():
            model, family, ckpt = load_frozen_model(path, key, self.manifest.tokenizer_sha256, self.device)
            check_fits(self.tokenizer, model.cfg.vocab_size, f"{role} ({key})")
            engines[role] = build_frozen_engine(model, family, self.job, self.dims, self.autocast)
            self.weights_read[key] = weights_sha256(ckpt)
            self.log(f"{role}: {path} ({family}, {count_params(model):,} parameters, frozen)")
        return engines

    def next_micro_batches(self) -> list[dict]:
        out = []
        for _ in range(self.job.train.grad_accum):
            idx = self.cursor.take(self.job.train.micro_batch_size, self.dims.dp_rank(self.rank), self.dims.dp_size)
            batch = self.collate([self.data.sample(i) for i in idx])
            # context parallel: the cp ranks read the same samples, each keeps its zig-zag slice of them
            batch = shard_batch(batch, self.dims.cp, self.dims.cp_rank(self.rank))
            out.append(to_device(batch, self.device))
        return out

    def val_batches(self) -> list[dict]:
        """The fixed validation micro-batches (on the device): the first eval_tokens of the val split, or every
        example of data.val_file; empty when there is no validation set."""
        return self._val_batches

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The objective's held-out metrics over the fixed validation set (`val_loss` in its own units: nats per
        target token for lm, sft and distill, with bits per byte; the DPO loss per pair, with reward accuracy
        and margin). Every rank scores every batch (a sharded model runs in lockstep)."""
        sums: dict[str, float] = {}
        with eval_mode(self.engine.unwrap()):  # held-out batches feed no training-only record (QK-Clip)
            for batch in self.val_batches():
                for k, v in self.objective.validation_sums(self.engines, batch).items():
                    sums[k] = sums.get(k, 0.0) + v
        if self.dims.cp > 1:  # each cp rank scored its slice of the same windows
            sums = dict(zip(sums, cp_all_reduce(list(sums.values()), self.dims.mesh["cp"].get_group())))
        return {"step": self.step, **self.objective.validation_metrics(sums)}

    # ------------------------------------------------------------------------------------------------ steps

    def train_step(self) -> dict:
        """One batch of experience and its optimizer updates: one for every objective but PPO and GRPO with
        `objective.epochs` > 1, which update that many times over the same experience (the PPO epochs)."""
        engines = self.engines
        micro_batches = self.objective.experience(self.step, engines, self.next_micro_batches())
        total = self.engine.all_reduce(
            torch.tensor(sum(self.objective.units(mb) for mb in micro_batches), device=self.device))
        total_units = int(total)
        updates = self.job.objective.updates_per_step()
        losses, sums, skipped = [], {}, False
        for _ in range(updates):
            loss, tokens, aux, update_sums, grad_norm, applied, lr = self._update(micro_batches, total_units)
            losses.append(loss)
            skipped |= not applied
            for k, v in update_sums.items():  # the mean over the updates
                sums[k] = sums.get(k, 0.0) + v / updates
        self.step += 1
        rec = {"step": self.step, "loss": sum(losses) / updates, "grad_norm": grad_norm, "lr": lr,
               "tokens": tokens * self.dims.dp_size * self.dims.cp, "skipped": skipped, **aux, **sums}
        if updates > 1:
            rec["loss_first_update"] = losses[0]
        return {**rec, **getattr(self.objective, "step_metrics", {})}  # e.g. RL's mean reward of the rollouts

    def _update(self, micro_batches: list[dict], total_units: int):
        """Forward and backward over the micro-batches, then one optimizer step and the post-step hooks."""
        engines = self.engines
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        aux: dict[str, float] = {}  # a mixture of experts' terms, summed over the micro-batches
        sums: dict[str, float] = {}  # the objective's per-unit quantities, summed over the micro-batches
        for i, mb in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else self.engine.no_sync(), self.engine.loss_context():
                out = self.objective.loss(engines, mb, total_units)
                self.engine.backward(out.loss)
            loss = out.metrics.get("lm_loss", out.loss.detach())  # the logged loss: language modelling alone
            loss_sum += loss.to_local() if isinstance(loss, DTensor) else loss  # loss parallel: replicated
            tokens += out.units.get("tokens", 0)
            for key in AUX_METRICS:
                if key in out.metrics:
                    aux[key] = aux.get(key, 0.0) + out.metrics[key]
            for key, value in out.sums.items():
                sums[key] = sums.get(key, 0.0) + value
        loss = float(self.engine.all_reduce(loss_sum))
        per_unit = {}
        if sums:  # over the ranks, then per unit of the step (a pair, a target token)
            reduced = self.engine.all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device))
            per_unit = {k: float(v) / max(total_units, 1) for k, v in zip(sums, reduced)}
        if aux:
            # aux_loss: this rank's share of each micro-batch's weighted term -> summed over ranks; balance
            # loss and expert load: already whole-batch values per micro-batch -> their mean
            # (the MTP loss, like the LM loss, is each micro-batch's share of the step: summed the same way)
            shares = ["aux_loss", *(["mtp_loss"] if "mtp_loss" in aux else [])]
            for k in shares:
                aux[k] = float(self.engine.all_reduce(torch.tensor(aux.get(k, 0.0), device=self.device)))
            aux.update({k: v / len(micro_batches) for k, v in aux.items() if k not in shares})
        lr = self.engine.lr
        grad_norm, applied = self.engine.optimizer_step(self.job.optim.grad_clip, loss)
        post_step = getattr(self.engine.unwrap(), "post_step", None)
        if post_step is not None:  # e.g. DeepSeek-V3's router bias update, from the step's reduced expert counts
            aux.update(post_step(applied))
        if self.job.optim.qk_clip_tau > 0:  # QK-Clip (MuonClip): the heads' max logits, MAX-reduced over the ranks
            aux.update(qk_clip_(self.engine.unwrap(), self.job.optim.qk_clip_tau, applied,
                                reduce=lambda t: self.engine.all_reduce(t, op="max")))
        if not applied:
            self.log(f"step {self.step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                     f"the update is not applied")
        return loss, tokens, aux, per_unit, grad_norm, applied, lr

    def save(self) -> Path:
        """Every rank gathers (a sharding engine's state is spread over them) and writes its shards of the engine
        state; rank 0 writes the rest and renames the folder into place; all wait for it."""
        train_state = {"step": self.step, "cursor": self.cursor.state_dict(), "data": self.data.state_dict(),
                       "layout": self.dims.describe(), "weights_read": self.weights_read}
        multi = self.dims.world_size > 1
        state, extras = self.engine.model_state_dict(), []
        from workbench.train.objectives.ppo import VALUE_HEAD_PREFIX

        value_head = {k: state.pop(k) for k in [k for k in state if k.startswith(VALUE_HEAD_PREFIX)]}
        if value_head and self.is_main:  # PPO's critic: beside the weights, so model.safetensors stays a plain model
            from safetensors.torch import save_file

            extras.append(lambda folder: save_file({k: v.detach().cpu().contiguous() for k, v in value_head.items()},
                                                   str(folder / VALUE_HEAD_FILE)))
        if self.job.lora.enabled and self.is_main:
            # model.safetensors: the merged weights every consumer reads; adapter/: the adapters alone
            from workbench.nn.lora import save_adapter, split_state

            state, adapter = split_state(state, self.job.lora)
            meta = {"family": self.job.model.family, "flavor": self.job.model.flavor,
                    "base": self.job.train.init_from, "tokenizer_sha256": self.manifest.tokenizer_sha256}

            extras.append(lambda folder: save_adapter(self.engine.unwrap(), folder / ADAPTER_DIR, self.job.lora, meta,
                                                      state=adapter))

        def write_extra(folder: Path) -> None:
            for write in extras:
                write(folder)
        path = save_checkpoint(self.run_dir, self.step, state, train_state,
                               self.engine.save_state, keep_last=self.job.train.keep_last, is_main=self.is_main,
                               barrier=torch.distributed.barrier if multi else lambda: None,
                               write_extra=write_extra if extras else None)
        if multi:
            torch.distributed.barrier()  # nobody runs ahead of a checkpoint that is still being written
        self.saved_step = self.step
        self.write_report()
        return path

    def write_report(self) -> None:
        """Rewrite report.md from the run folder (main rank). The report is derived and can be regenerated,
        so a failure to write it is logged rather than allowed to end the run."""
        if not self.is_main:
            return
        info = {"parameters": self.n_params, "flops_per_token": self.flops_per_token, "device": str(self.device),
                "layout": self.dims.describe(), "objective": self.job.objective.name}
        if self.lora_report is not None:
            info["lora"] = self.lora_report
        try:
            write_run_report(self.run_dir, info)
        except Exception as e:
            self.log(f"{self.report_path}: not written ({type(e).__name__}: {e})")

    # ------------------------------------------------------------------------------------------------ the loop

    def _on_signal(self, signum, frame) -> None:
        # only set the flag: printing from a handler can collide with the progress bar's own writes
        self._pending_signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        if self.dims.world_size > 1 and hasattr(signal, "alarm"):
            # a rank hung outside any collective would never reach the save: end it after the same grace
            # the collectives get (a launcher tearing down after another rank failed sends SIGTERM)
            signal.alarm(max(1, math.ceil(self.job.parallel.timeout_s)))

    def _collective(self, fn):
        """fn(), turning a collective's timeout into an error that names the step and the missing rank."""
        try:
            return fn()
        except RuntimeError as e:
            if self.dims.world_size == 1 or not is_timeout(e):
                raise
            missing = unresponsive_ranks(min(5.0, self.job.parallel.timeout_s))
            raise WorkbenchError(
                f"step {self.step + 1}: a collective waited longer than parallel.timeout_s = "
                f"{self.job.parallel.timeout_s:g} s{f' ({missing})' if missing else ''}; stopping this rank "
                f"(the last complete checkpoint is intact: rerun with --resume)") from e

    def _agree_on_stop(self) -> None:
        """After each step: stop when any rank got a signal, every rank at the same step (a launcher may
        deliver it to some ranks first)."""
        flag = torch.tensor([self._pending_signal or 0], device=self.device)
        if self.dims.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            self.stop_signal = int(flag.item())

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM set stop_signal instead of killing the run mid-step (main thread only)."""
        try:
            old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            if hasattr(signal, "alarm"):
                signal.alarm(0)  # the grace a signal armed (see _on_signal) ends with the loop
            for s, handler in old.items():
                signal.signal(s, handler)

    def fit(self) -> list[dict]:
        job = self.job
        self.peak = peak_flops(self.device)
        self.log(f"model: {job.model.family} {job.model.flavor}, {self.n_params:,} parameters, "
                 f"{self.flops_per_token / 1e6:.1f} MFLOP/token, on {self.device}; objective {job.objective.name}")
        self.log(f"run folder: {self.run_dir}")
        history: list[dict] = []
        fresh = self.resume_from is None
        runlog = RunLog(self.run_dir, resume_step=None if fresh else self.step,
                        baselines={"unigram (val)": self.baseline} if self.baseline is not None else {}
                        ) if self.is_main else NullRunLog()
        bar = tqdm(total=job.train.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not self.engine.is_main)
        try:
            with self._signals():
                if fresh:
                    self._validate(runlog)
                window: list[dict] = []  # the steps since the last record
                train_time = 0.0  # seconds spent in train_step since the last record
                while self.step < job.train.steps and self.stop_signal is None:
                    t0 = time.perf_counter()
                    rec = self._collective(self.train_step)
                    self._collective(self._agree_on_stop)
                    train_time += time.perf_counter() - t0
                    window.append(rec)
                    history.append(rec)
                    bar.update(1)
                    last = self.step == job.train.steps
                    if self.step % job.train.log_every == 0 or last or self.stop_signal is not None:
                        self._record(runlog, bar, window, train_time)
                        window, train_time = [], 0.0
                    if (job.train.eval_every and self.step % job.train.eval_every == 0) or last:
                        self._validate(runlog)
                    if job.train.ckpt_every and self.step % job.train.ckpt_every == 0 and not last:
                        self.save()
                if self.stop_signal is not None:
                    with tqdm.external_write_mode():
                        self.log(f"{signal.Signals(self.stop_signal).name} received: saving a checkpoint")
                if self.step > self.saved_step:
                    path = self.save()
                    self.log(f"checkpoint: {path}")
                if self.stop_signal is not None:
                    self.log(f"stopped by {signal.Signals(self.stop_signal).name} at step {self.step}; "
                             f"continue with --resume")
        finally:
            bar.close()
            runlog.close()
        self.write_report()
        return history

    def _record(self, runlog: RunLog, bar, window: list[dict], train_time: float) -> None:
        """One metrics record for the steps in `window`: their mean loss (one batch alone is noisy; the last
        step's own is `loss_step`), and throughput over the time spent training them (validation and
        checkpoint time excluded)."""
        rec = dict(window[-1], loss=sum(r["loss"] for r in window) / len(window), loss_step=window[-1]["loss"])
        rec["tokens_per_s"] = sum(r["tokens"] for r in window) / max(train_time, 1e-9)
        achieved = rec["tokens_per_s"] * self.flops_per_token
        if self.peak:
            rec["mfu"] = achieved / self.peak
        else:
            rec["gflops"] = achieved / 1e9
        runlog.write(rec)
        speed = f"{100 * rec['mfu']:.1f}%" if self.peak else f"{rec['gflops']:.1f}"
        bar.set_postfix({"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}",
                         "MFU" if self.peak else "GFLOP/s": speed})

    def _validate(self, runlog: RunLog) -> dict | None:
        if not self.val_batches():  # examples without data.val_file: nothing held out
            return None
        rec = self.evaluate()
        self.last_val = rec
        runlog.write(rec)
        runlog.plot()
        with tqdm.external_write_mode():
            self.log(f"step {self.step}: {describe_validation(rec, self.baseline)}")
        return rec

    def close(self) -> None:
        """Leave the process group (a no-op in a single process)."""
        if self.dims.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def sample(self, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
        """Every rank calls this (a sharded model decodes in lockstep); each gets the same text."""
        if hasattr(self.objective, "closing_sample"):  # vlm: the prompt is a question about a held-out image
            with eval_mode(self.engine.unwrap()):
                return self.objective.closing_sample(self.engines, prompt, max_new_tokens)
        ids, stop_ids = self.objective.sample_prompt(prompt)  # chat objectives: a user turn, stopped at <|end|>
        with self.engine.gather_for_generation() as model:
            gen = KVCacheGenerator(model, self.tokenizer)
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed,
                                    stop_token_ids=stop_ids or [])
            return gen.generate([ids], params)[0].text

