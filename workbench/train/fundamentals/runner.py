"""The fundamentals runner: `workbench fundamentals CONFIG.toml`, one small single-process experiment per config.

The language-model trainer (workbench/train/trainer.py) is built around token streams, a tokenizer and the
parallel engines. The fundamentals (an autograd engine, CNNs, RNNs, a VAE: workbench/models/fundamentals/) train
whole in-memory arrays on one process, so they get this smaller loop instead, with the same run folder:

    RUN_DIR = run.out_dir / run.name
      config.toml      the resolved config (reloads to an equal job)
      metrics.jsonl    train records every train.log_every steps (loss, lr, grad_norm, items_per_s, ...) and
      tb/, loss.png    validation records "val_*" at the start and after every epoch (workbench.train.metrics)
      checkpoints/     step-N/ with model.safetensors, train_state.json, optimizer.safetensors, manifest,
                       COMPLETE (workbench.checkpoint.run): each train.ckpt_every epochs, at the end, and on
                       Ctrl-C / SIGTERM
      results.json     the headline figures (`Context.result`) and the pictures (`Context.figure`)
      *.png            the task's pictures: confusion matrices, sample grids, predictions
      report.md        everything above on one page (workbench.train.report)

A config names a task and sets three sections:

    [run]    name, out_dir, seed, device
    [task]   name = one of TASKS, then that task's own options (its Config dataclass)
    [train]  the loop: epochs, batch, optimizer (sgd with momentum or adamw), schedule, clipping, cadence

Tasks live one per module (workbench/train/fundamentals/<module>.py). Each exports
`TASKS = {name: Task(config=ConfigClass, run=fn)}` and `fn(ctx: Context, cfg: ConfigClass)` builds its data
and model, trains through `ctx.fit` (or, for the NumPy autograd engine, a loop of its own that logs through
`ctx.runlog` and saves through `ctx.checkpoint`), then records results and pictures.

Design choices
- Determinism: the model is initialised after `torch.manual_seed(run.seed)`; epoch e's batch order is a
  permutation drawn from a generator seeded with (seed, e), so a resumed run replays exactly the batches the
  interrupted one would have seen. A checkpoint holds the model, the optimizer, the step, the position inside
  the epoch and the torch RNG states (CPU, and CUDA on a GPU: dropout, augmentation), so resuming the same
  config continues the same run bit for bit on the same machine (tested on the CPU).
- Resume: `--resume` continues the newest complete checkpoint. The saved [task], run.seed and
  train.batch_size must equal the new ones (a different task in the same folder would mix two experiments;
  the position inside an epoch is counted in batches); the rest of [train] may change, e.g. more epochs.
  Without --resume, a folder that already has checkpoints is refused.
- Validation is evaluated under `torch.no_grad()` in eval mode (batch norm uses its running statistics).
- Loss normalisation: the loss is the task's mean over the mini-batch; the last, smaller batch of an epoch is
  kept (not dropped), so every example is seen once per epoch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from workbench.checkpoint.run import (
    flatten_state,
    latest_checkpoint,
    load_for_resume,
    save_checkpoint,
    unflatten_state,
)
from workbench.checkpoint.safetensors_io import read_file
from workbench.config import dumps_toml, fail, field_, from_dict, load_config, load_toml, to_dict
from workbench.errors import ConfigError, WorkbenchError
from workbench.train.metrics import RunLog, atomic_write_text
from workbench.train.optim import lr_multiplier
from workbench.train.report import RESULTS_FILE, write_run_report

CONFIG_FILE = "config.toml"
OPTIM_FILE = "optimizer.safetensors"

# task name -> the module that defines it (imported on first use)
TASK_MODULES = {
    "autograd": "workbench.train.fundamentals.autograd",
    "cnn": "workbench.train.fundamentals.vision",
    "sequence": "workbench.train.fundamentals.sequence",
    "sentiment": "workbench.train.fundamentals.sequence",
    "vae": "workbench.train.fundamentals.vae",
    "diffusion": "workbench.train.diffusion",
    "video_vae": "workbench.train.video",
    "video": "workbench.train.video",
    "nerf": "workbench.train.nerf",
}


@dataclass(frozen=True)
class Task:
    config: type  # the dataclass of the [task] section's options (without `name`)
    run: Callable  # run(ctx: Context, cfg) -> None


def get_task(name: str, key: str = "task.name") -> Task:
    if name not in TASK_MODULES:
        fail(key, f"unknown task {name!r} (known: {', '.join(TASK_MODULES)})")
    return importlib.import_module(TASK_MODULES[name]).TASKS[name]


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class RunSection:
    name: str = "fundamentals"
    out_dir: str = field_("runs", doc="run folders are created as out_dir/name")
    seed: int = field_(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = field_(0, ge=0, doc="CPU threads for torch and NumPy's BLAS; 0 = the libraries' defaults. Small "
                                      "models run best on 1 (and a machine other jobs share can make 2 threads "
                                      "many times slower than 1: idle workers wait for a core)")


@dataclass
class FitSection:
    epochs: int = field_(10, gt=0, lt=100_003, doc="epoch e of seed s is shuffled from seed s x 100003 + e, so "
                                                    "below 100003 epochs no two (seed, epoch) share an order")
    batch_size: int = field_(64, gt=0)
    optimizer: Literal["sgd", "adamw"] = field_("adamw", doc="sgd: with momentum (PyTorch's form); adamw: decoupled decay")
    lr: float = field_(1e-3, gt=0)
    momentum: float = field_(0.9, ge=0, lt=1, doc="sgd only")
    nesterov: bool = field_(False, doc="sgd only")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = field_(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = field_(0, ge=0)
    min_lr_ratio: float = field_(0.0, ge=0, le=1, doc="cosine: the final lr as a fraction of lr")
    grad_clip: float = field_(0.0, ge=0, doc="max global grad norm; 0 = off")
    max_steps: int = field_(0, ge=0, doc="0 = the epochs decide; > 0 stops after this many steps (quick runs)")
    log_every: int = field_(20, gt=0, doc="train records every N steps")
    ckpt_every: int = field_(1, ge=0, doc="checkpoint every N epochs (and always at the end); 0 = end only")
    keep_last: int = field_(2, gt=0)

    def validate(self) -> None:
        for i, b in enumerate(self.betas):
            if not 0 <= b < 1:
                fail(f"betas[{i}]", f"expected a number in [0, 1), got {b}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            fail("nesterov", "needs optimizer = 'sgd' with momentum > 0")


@dataclass
class TaskSection:
    """[task]: `name` picks the task; the other keys are that task's Config fields."""
    name: str = "cnn"
    config: Any = None

    @classmethod
    def from_config_dict(cls, data: Any, path: str = "task") -> TaskSection:
        if not isinstance(data, dict):
            fail(path, "expected a table with name and the task's options")
        data = dict(data)
        name = data.pop("name", None)
        if not isinstance(name, str):
            fail(f"{path}.name", f"required, one of {', '.join(TASK_MODULES)}")
        name = str(name)
        return cls(name=name, config=from_dict(get_task(name, f"{path}.name").config, data, path))

    def to_config_dict(self) -> dict:
        return {"name": self.name, **to_dict(self.config)}


@dataclass
class FundamentalsJob:
    run: RunSection = field(default_factory=RunSection)
    task: TaskSection = field(default_factory=lambda: TaskSection.from_config_dict({"name": "cnn"}))
    train: FitSection = field(default_factory=FitSection)


def load_job(config: str | Path | dict, overrides: Sequence[str] | dict = ()) -> FundamentalsJob:
    """A job from a TOML file (or a dict of its sections) with `--section.key value` overrides, validated."""
    if isinstance(config, dict):
        from workbench.config import apply_overrides, parse_overrides

        raw = apply_overrides(json.loads(json.dumps(config)),
                              parse_overrides(list(overrides)) if not isinstance(overrides, dict) else overrides)
        return from_dict(FundamentalsJob, raw)
    raw = load_toml(config)
    if "task" not in raw:
        raise ConfigError(f"{config}: no [task] section (a fundamentals config names its task: "
                          f"[task] name = {' | '.join(repr(n) for n in TASK_MODULES)})")
    return load_config(FundamentalsJob, config, list(overrides) if not isinstance(overrides, dict) else overrides)


def is_task_run(path: str | Path, names: Sequence[str]) -> bool:
    """Whether `path` (a run folder or one of its checkpoints) holds a run of one of the tasks `names`."""
    from workbench.checkpoint.load import run_dir_of

    try:
        raw = load_toml(run_dir_of(Path(path)) / CONFIG_FILE)
    except Exception:  # not a run folder, unreadable: not ours to judge
        return False
    return isinstance(raw.get("task"), dict) and raw["task"].get("name") in names


@dataclass
class TaskCheckpoint:
    """A run's checkpoint, read for a task's `load_run`: its job, the checkpoint path and run folder, the
    model tensors, and `source` ({"ckpt", "run_dir", "step"}, what evals record)."""
    job: FundamentalsJob
    path: Path
    run_dir: Path
    tensors: dict
    source: dict

    def load_into(self, module: torch.nn.Module, state: dict | None = None) -> None:
        """Load `state` (default: all the tensors) into `module`; an error naming the checkpoint when the
        names do not match exactly."""
        missing, unexpected = module.load_state_dict(self.tensors if state is None else state, strict=False)
        if missing or unexpected:
            raise WorkbenchError(f"{self.path}: the checkpoint does not fit the model of its config.toml (missing "
                                 f"{missing[:3]}, unexpected {unexpected[:3]})")


def load_task_checkpoint(ckpt: str | Path, names: Sequence[str]) -> TaskCheckpoint:
    """The checkpoint of a run folder (its newest complete one) or a checkpoint path, whose config.toml must
    name one of the tasks `names` (an error naming the run and its task otherwise)."""
    from workbench.checkpoint.load import run_dir_of
    from workbench.checkpoint.run import load_model_state, resolve_checkpoint, step_of

    path = resolve_checkpoint(ckpt)
    run_dir = run_dir_of(path)
    job = load_job(run_dir / CONFIG_FILE)
    if job.task.name not in names:
        raise WorkbenchError(f"{run_dir}: a {job.task.name!r} run, not a {' or '.join(names)} run")
    return TaskCheckpoint(job=job, path=path, run_dir=run_dir, tensors=load_model_state(path),
                          source={"ckpt": str(path), "run_dir": str(run_dir), "step": step_of(path)})


# ----------------------------------------------------------------------------------------------------
# The run context


class Context:
    """What a task's `run` gets: the job, the run folder, and the loop (see the module doc)."""

    def __init__(self, job: FundamentalsJob, run_dir: Path, resume: bool, log: Callable[[str], None]):
        self.job, self.run_dir, self.log = job, run_dir, log
        from workbench.train.trainer import pick_device  # the trainer's: the same rule and message

        self.device = pick_device(job.run.device)
        self._ckpt = latest_checkpoint(run_dir)
        if self._ckpt is not None and not resume:
            raise WorkbenchError(f"run folder {run_dir} already has checkpoints: pass --resume to continue it, "
                                 f"or choose another --run.name")
        if self._ckpt is not None:
            saved = load_job(run_dir / CONFIG_FILE)
            for what, a, b in (("task", to_dict(saved.task), to_dict(job.task)), ("run.seed", saved.run.seed, job.run.seed),
                               ("train.batch_size", saved.train.batch_size, job.train.batch_size)):
                if a != b:
                    raise WorkbenchError(f"--resume: {run_dir / CONFIG_FILE} was written with {what} = {a}, this "
                                         f"config has {b}; continue with the same {what} or choose another --run.name")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, dumps_toml(job))
        # the step only (JSON, nothing unpickled); resume_state() verifies the checkpoint and reads it whole, once
        self.step = 0 if self._ckpt is None else json.loads((self._ckpt / "train_state.json").read_text())["step"]
        self.runlog = RunLog(run_dir, resume_step=None if self._ckpt is None else self.step, ylabel="loss")
        self.results: dict[str, dict] = {}
        self.figures: list[dict] = []
        if self._ckpt is not None:  # the figures of a finished run stay listed when it is resumed
            old = _read_results(run_dir)
            self.results, self.figures = old.get("results", {}), old.get("figures", [])
        self.stop_signal: int | None = None

    # -- results and pictures ------------------------------------------------------------------------

    def result(self, key: str, value: Any, note: str = "") -> None:
        """A headline figure of the run (written to results.json and the report at once)."""
        if isinstance(value, torch.Tensor):
            value = value.item()
        self.results[key] = {"value": value, "note": note}
        self._write_results()

    def figure(self, filename: str, caption: str) -> Path:
        """The path to write picture `filename` to (inside the run folder); the report shows it with `caption`."""
        if Path(filename).name != filename or not filename.endswith(".png"):
            raise ValueError(f"figure {filename!r}: expected a plain file name ending in .png")
        self.figures = [f for f in self.figures if f["file"] != filename] + [{"file": filename, "caption": caption}]
        self._write_results()
        return self.run_dir / filename

    def _write_results(self) -> None:
        atomic_write_text(self.run_dir / RESULTS_FILE, json.dumps(
            {"task": self.job.task.name, "results": self.results, "figures": self.figures}, indent=1) + "\n")

    # -- checkpoints -----------------------------------------------------------------------------------

    def checkpoint(self, step: int, tensors: dict[str, torch.Tensor], train_state: dict,
                   extra: dict[str, torch.Tensor] | None = None) -> Path:
        """Save checkpoint `step`: `tensors` as model.safetensors, `train_state` (JSON) and `extra` tensors
        (optimizer state, RNG) as optimizer.safetensors; atomically, with a manifest (workbench.checkpoint.run)."""
        from safetensors.torch import save_file

        def write_extra(folder: Path) -> None:
            if extra:
                save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(folder / OPTIM_FILE))

        out = save_checkpoint(self.run_dir, step, tensors, {"step": step, **train_state},
                              keep_last=self.job.train.keep_last, write_extra=write_extra)
        self.log(f"checkpoint: {out}")
        return out

    def resume_state(self) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]] | None:
        """(model tensors, train_state, extra tensors) of the checkpoint being resumed, verified; None if new."""
        if self._ckpt is None:
            return None
        tensors, state, _ = load_for_resume(self._ckpt)
        extra = read_file(self._ckpt / OPTIM_FILE) if (self._ckpt / OPTIM_FILE).is_file() else {}
        self.log(f"resuming from {self._ckpt} (step {state['step']})")
        return tensors, state, extra

    # -- signals ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def signals(self):
        """Ctrl-C / SIGTERM set `stop_signal` (the loop saves and stops at the next step) instead of killing it."""
        def on_signal(signum, frame):
            self.stop_signal = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

        try:
            old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -- the torch loop --------------------------------------------------------------------------------

    def progress_bar(self, total: int, initial: int = 0):
        """The run's progress bar on stderr (steps); `update(k)` / `set_postfix` / `close` as tqdm's."""
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=self.job.run.name, unit="step", file=sys.stderr,
                    dynamic_ncols=True, leave=False)

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        t = self.job.train
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
        return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)

    def total_steps(self, n: int) -> int:
        """Optimizer steps of the run over `n` training examples: epochs x batches, capped by max_steps."""
        t = self.job.train
        steps = t.epochs * math.ceil(n / t.batch_size)
        return min(steps, t.max_steps) if t.max_steps else steps

    def lr_at(self, step: int, total: int) -> float:
        t = self.job.train
        return t.lr * lr_multiplier(step, total, t.warmup_steps, t.schedule, t.min_lr_ratio)

    def fit(self, model: torch.nn.Module, train: tuple[torch.Tensor, ...],
            loss_fn: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor, dict]],
            evaluate: Callable[[torch.nn.Module], dict[str, float]],
            after_step: Callable[[int], None] | None = None) -> None:
        """Train `model` on the tensors of `train` (first dimension = examples); see the module doc.
        `after_step(step)` runs after each optimizer step (e.g. an EMA update of weights kept in `model`)."""
        t = self.job.train
        n = len(train[0])
        if any(len(x) != n for x in train):
            raise ValueError(f"fit: the training tensors have different lengths {[len(x) for x in train]}")
        if n == 0:
            raise WorkbenchError("fit: the training set is empty")
        model.to(self.device)
        optimizer = self.build_optimizer([p for p in model.parameters() if p.requires_grad])
        batches_per_epoch = math.ceil(n / t.batch_size)
        total = self.total_steps(n)
        step, epoch, pos = 0, 0, 0
        resumed = self.resume_state()
        if resumed is not None:
            tensors, state, extra = resumed
            model.load_state_dict(tensors)
            skeleton = state["optimizer"]
            optimizer.load_state_dict(unflatten_state({k[4:]: v for k, v in extra.items() if k.startswith("opt.")},
                                                      skeleton))
            if "rng" in extra:
                torch.set_rng_state(extra["rng"])
            if "cuda_rng" in extra and self.device.type == "cuda":  # dropout, augmentation drawn on the GPU
                torch.cuda.set_rng_state(extra["cuda_rng"], self.device)
            step, epoch, pos = state["step"], state["epoch"], state["batch"]
        saved_at = step if resumed is not None else -1
        params = sum(p.numel() for p in model.parameters())
        self.log(f"task {self.job.task.name}: {params:,} parameters, {n:,} training examples, "
                 f"{batches_per_epoch} batches of {t.batch_size} per epoch, {total} steps, on {self.device}")

        def save() -> None:
            nonlocal saved_at
            if saved_at == step:  # e.g. resuming a finished run: nothing new to save
                return
            saved_at = step
            opt_tensors, skeleton = flatten_state(optimizer.state_dict())
            extra = {f"opt.{k}": v for k, v in opt_tensors.items()} | {"rng": torch.get_rng_state()}
            if self.device.type == "cuda":
                extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            self.checkpoint(step, model.state_dict(), {"epoch": epoch, "batch": pos, "optimizer": skeleton}, extra)

        def validate() -> None:
            model.eval()
            with torch.no_grad():
                metrics = evaluate(model)
            model.train()
            self.runlog.write({"step": step, "epoch": epoch, **{f"val_{k}": float(v) for k, v in metrics.items()}})
            self.log(f"step {step} (epoch {epoch}): " + ", ".join(f"val {k} {v:.4g}" for k, v in metrics.items()))

        if step == 0:
            validate()
        model.train()
        window: list[dict] = []
        t0 = time.perf_counter()
        bar = self.progress_bar(total, step)
        with self.signals():
            while step < total and self.stop_signal is None:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.job.run.seed * 100_003 + epoch))
                while pos < batches_per_epoch and step < total:
                    idx = order[pos * t.batch_size:(pos + 1) * t.batch_size]
                    batch = tuple(x[idx].to(self.device) for x in train)
                    lr = self.lr_at(step, total)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    loss, metrics = loss_fn(model, batch)
                    if not torch.isfinite(loss):
                        raise WorkbenchError(f"step {step}: the loss is {loss.item()} (try a lower train.lr or "
                                             f"train.grad_clip > 0); the last checkpoint is kept")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
                    optimizer.step()
                    step, pos = step + 1, pos + 1
                    if after_step is not None:
                        after_step(step)
                    bar.update(1)
                    window.append({"loss": loss.item(), "grad_norm": norm.item(), "items": len(idx), **metrics})
                    if step % t.log_every == 0 or step == total:
                        dt = time.perf_counter() - t0
                        rec = {k: sum(w[k] for w in window) / len(window) for k in window[0] if k != "items"}
                        rec |= {"items_per_s": sum(w["items"] for w in window) / max(dt, 1e-9), "lr": lr}
                        self.runlog.write({"step": step, "epoch": epoch, **rec})
                        bar.set_postfix(loss=f"{rec['loss']:.4f}")
                        window, t0 = [], time.perf_counter()
                    if self.stop_signal is not None:
                        break
                if pos >= batches_per_epoch:  # an epoch ended (a signal on its last batch too): validate, maybe save
                    epoch, pos = epoch + 1, 0
                    validate()
                    if t.ckpt_every and epoch % t.ckpt_every == 0 and step < total:
                        save()
            bar.close()
            if pos and saved_at != step:  # stopped mid-epoch (max_steps or a signal): validate at this step
                validate()
            save()
            self.runlog.plot()
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal, step)


class Interrupted(Exception):
    """Raised out of `fit` after a signal: the checkpoint is written; the command exits 128 + signal."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint saved (--resume continues)")
        self.signum, self.step = signum, step


def _read_results(run_dir: Path) -> dict:
    path = run_dir / RESULTS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------------
# Entry


@contextlib.contextmanager
def cpu_threads(n: int):
    """Limit torch's intra-op pool and NumPy's BLAS to `n` threads inside the block (0: leave them)."""
    if n <= 0:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def run_job(config: str | Path | dict, overrides: Sequence[str] | dict = (), resume: bool = False,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Run one fundamentals config end to end; returns {key: value} of its results plus "run_dir".

    Raises `Interrupted` after Ctrl-C / SIGTERM (with the checkpoint written)."""
    job = load_job(config, overrides)
    run_dir = Path(job.run.out_dir) / job.run.name
    torch.manual_seed(job.run.seed)
    ctx = Context(job, run_dir, resume, log)
    log(f"run folder: {run_dir}")
    try:
        with cpu_threads(job.run.threads):
            get_task(job.task.name).run(ctx, job.task.config)
    finally:
        ctx.runlog.plot()
        ctx.runlog.close()
        write_run_report(run_dir, {"task": job.task.name, "device": str(ctx.device)})
    log(f"report: {run_dir / 'report.md'}")
    return {k: v["value"] for k, v in ctx.results.items()} | {"run_dir": str(run_dir)}
