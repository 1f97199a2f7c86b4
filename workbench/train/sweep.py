"""Ray Tune sweeps over workbench runs: `workbench sweep configs/sweeps/NAME.toml [--resume]`.

A sweep file names a base experiment (any `workbench train` config, or a task config of `workbench
fundamentals | diffusion | nerf | video`), a search space over its dotted config paths, and how to search:

    [sweep]
    name = "llama3-lr"                        # the sweep folder is out_dir/name
    base = "configs/llama3/debug.toml"
    metric = "val_loss"                       # a validation metric the run logs (mode = "min" | "max")
    scheduler = "asha"                        # asha | median | fifo; grace_period, reduction_factor, max_t
    num_samples = 2                           # draws of the random fields (each grid point num_samples times)

    [space]                                   # dotted paths, as on the command line
    "optim.lr" = { loguniform = [1e-3, 1e-2] }
    "model.dim" = { choice = [32, 64] }       # also: grid = [...], uniform = [lo, hi]

    [overrides]                               # fixed for every trial
    "train.steps" = 40

What a trial is. Each trial is a real run in its own run folder, SWEEP/trials/trial-NNN (config.toml,
metrics.jsonl, checkpoints/, loss.png, report.md), started with the base config plus `[overrides]` plus its
sampled values. Every validation record the run writes is reported to Tune at its optimizer step
(`workbench.train.metrics.validation_listener`), so ASHA and the median rule compare trials at equal steps;
the run's last validation is held back for the final report, so that no scheduler stops a trial that is
saving its last checkpoint. A trial that runs to its end then runs `sweep.eval_tasks` on its checkpoint
(results as TASK/METRIC; a failing eval is recorded, the training kept) and reports once more. With
`sweep.workers > 1` a trial is a Ray Train `TorchTrainer` of that many processes on gloo (CPU) or nccl (GPU),
inside which the config's `[parallel]` section (fsdp2, zero2, ...) applies as it does under a launcher: Ray
sets RANK / WORLD_SIZE / MASTER_ADDR (`loopback_torch_config`) and the trainer joins the process group on a
store bound to 127.0.0.1. (Ray 2.60 refuses a TorchTrainer handed to `tune.Tuner` directly, so the trial
function builds one and calls `fit()`; platform-notes.md.)

Nothing is lost on a crash. A trial restarts with `--resume` semantics, from its own newest checkpoint:
a crashed trial is retried `sweep.max_failures` times (default once) and continues where its checkpoint
left it; an interrupted sweep (Ctrl-C, SIGTERM, a killed terminal) continues with `--resume`, which restores
Tune's experiment state (`Tuner.restore`) so that finished trials are not run again and unfinished ones
continue, and failed trials are tried again. Each start of a trial is logged to SWEEP/attempts.jsonl with
the step it resumed from.

Safe by default. Ray starts a private local instance (`address="local"`) on 127.0.0.1 with its dashboard
off (`sweep.dashboard = true` starts it, on 127.0.0.1 too). Ray 2.60 replaces a loopback node address by the
machine's external one and then listens on every interface; the driver keeps the loopback address and then
checks what the Ray processes listen on, refusing to run if anything is reachable from outside.

Results (workbench.train.sweep_results): results.md / results.csv (one row per trial: its values, status,
steps, metric, eval metrics, attempts), sweep.png (the metric against each swept field), curves.png (the
metric against step for every trial: the scheduler's stops), best.toml (the best trial's resolved config,
renamed, ready for `workbench train`), and report.md gathering them. The files are rewritten from the trial
folders, so `--resume` of a finished sweep just redraws them (after trying its failed trials again).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ray import tune

from workbench.config import ConfigError, dumps_toml, fail, field_, flatten, from_dict, load_toml, to_dict
from workbench.errors import WorkbenchError
from workbench.train.sweep_results import (
    ATTEMPTS_FILE,
    BASE_COPY,
    RESULT_FILE,
    SWEEP_FILE,
    TRIAL_FILE,
    TRIALS_DIR,
    write_results,
)

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")
RAY_DIR = "ray"  # Tune's experiment state (Tuner.restore reads it)
TRAIN_DIR = "ray-train"  # Ray Train's run state of multi-process trials
TRIAL_SLIVER = 0.01  # the CPU share of a multi-process trial's own (waiting) process


# ----------------------------------------------------------------------------------------------------
# The sweep file


@dataclass
class SweepSection:
    name: str = "sweep"
    out_dir: str = field_("runs/sweeps", doc="the sweep folder is out_dir/name")
    base: str = field_("", doc="the experiment every trial starts from: a `workbench train` config or a task "
                              "config (fundamentals, diffusion, nerf, video); relative to the working folder, "
                              "else to the sweep file's folder or one above it")
    metric: str = field_("val_loss", doc="the validation metric trials are compared on, as the run logs it "
                                         "(val_loss, val_acc, ...)")
    mode: Literal["min", "max"] = "min"
    num_samples: int = field_(1, ge=1, doc="draws of the random fields; each grid point runs num_samples times")
    scheduler: Literal["asha", "median", "fifo"] = field_(
        "asha", doc="asha: successive halving at rungs grace_period * reduction_factor^k steps; median: stop a "
                    "trial whose best is worse than the median of the others' running means at the same step; "
                    "fifo: run every trial to its end")
    grace_period: int = field_(1, ge=1, doc="optimizer steps every trial runs before it may be stopped")
    reduction_factor: float = field_(2.0, gt=1, doc="ASHA keeps 1 / reduction_factor of the trials per rung")
    max_t: int = field_(0, ge=0, doc="ASHA's last rung in steps; 0 = the largest train.steps of the trials "
                                     "(task configs: no cap)")
    seed: int = field_(0, ge=0, doc="seed of the random draws (the same seed draws the same trials)")
    max_concurrent: int = field_(0, ge=0, doc="trials at once; 0 = as many as the CPUs hold")
    workers: int = field_(1, ge=1, doc="processes per trial; > 1 runs each trial through Ray Train's TorchTrainer "
                                       "(train configs; their [parallel] section applies inside)")
    cpus_per_worker: int = field_(1, ge=1, doc="CPUs (and torch threads) per trial process")
    gpus_per_worker: float = field_(0.0, ge=0, doc="GPUs per trial process (Ray hides the others from it; "
                                                   "0 = none, so a trial on a GPU machine runs on the CPU)")
    num_cpus: int = field_(0, ge=0, doc="logical CPUs Ray schedules on; 0 = this machine's, at least one trial's")
    max_failures: int = field_(1, ge=0, doc="a crashed trial is retried this many times, from its checkpoint")
    eval_tasks: list[str] = field_([], doc="eval tasks (`workbench eval --list`) run on each finished trial; "
                                           "their metrics join the results as TASK/METRIC")
    dashboard: bool = field_(False, doc="start Ray's dashboard, on 127.0.0.1:dashboard_port")
    dashboard_port: int = field_(8265, ge=1, le=65535)

    def validate(self) -> None:
        if not self.base:
            fail("base", "expected the path of the experiment config the trials start from")
        if self.max_t and self.scheduler != "asha":
            fail("max_t", f"is ASHA's last rung; scheduler {self.scheduler!r} has none (leave it 0)")
        if not self.name or Path(self.name).name != self.name or self.name in (".", ".."):
            fail("name", f"expected a plain folder name, got {self.name!r}")
        if self.workers > 1 and 0 < self.gpus_per_worker != int(self.gpus_per_worker):
            fail("gpus_per_worker", f"{self.gpus_per_worker:g} would put several nccl ranks of one trial on one GPU, "
                                    f"which NCCL refuses; give each process whole GPUs")


@dataclass(frozen=True)
class Dim:
    """One swept config path: `grid` and `choice` list values, `uniform` and `loguniform` give [lo, hi]."""

    key: str
    kind: str
    values: tuple

    def to_ray(self):
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return (tune.uniform if self.kind == "uniform" else tune.loguniform)(*self.values)


@dataclass
class Sweep:
    """A loaded sweep file: its settings, the swept dimensions and the fixed overrides (dotted keys)."""

    sweep: SweepSection
    space: list[Dim]
    overrides: dict[str, Any]
    base: Path  # resolved
    kind: Literal["train", "task"]

    @property
    def dir(self) -> Path:
        return (Path(self.sweep.out_dir) / self.sweep.name).absolute()

    def n_trials(self) -> int:
        grid = math.prod(len(d.values) for d in self.space if d.kind == "grid")
        return grid * self.sweep.num_samples

    def resolved(self) -> dict:
        """The sweep as written to SWEEP/sweep.toml (and compared on --resume)."""
        return {"sweep": to_dict(self.sweep), "space": {d.key: {d.kind: list(d.values)} for d in self.space},
                "overrides": dict(self.overrides)}


def _parse_space(raw: Any) -> list[Dim]:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key 'space': expected a table of dotted config paths, got {raw!r}")
    dims: list[Dim] = []

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, str) and v.lstrip().startswith("{"):  # from the command line: --space.KEY '{ ... }'
                v = _inline_table(key, v)
            if isinstance(v, dict) and any(kind in v for kind in SPACE_KINDS):
                dims.append(_parse_dim(key, v))
            elif isinstance(v, dict) and v and not any(isinstance(x, dict) or isinstance(x, str) and
                                                       x.lstrip().startswith("{") for x in v.values()):
                raise ConfigError(f"config key 'space.{key}': unknown kind {', '.join(map(repr, v))} (expected one "
                                  f"of {', '.join(SPACE_KINDS)})")
            elif isinstance(v, dict):
                walk(v, key)
            else:
                raise ConfigError(f"config key 'space.{key}': expected a table such as {{ choice = [1, 2] }} "
                                  f"(one of {', '.join(SPACE_KINDS)}), got {v!r}")

    walk(raw, "")
    dims = list({d.key: d for d in dims}.values())  # "a.b" written both ways (e.g. a command-line override): the later
    for d in dims:
        if "." not in d.key:
            raise ConfigError(f"config key 'space.{d.key}': expected a dotted config path such as optim.lr")
        if d.key in ("run.out_dir", "run.name"):
            raise ConfigError(f"config key 'space.{d.key}': the sweep names the trials' run folders itself")
    return dims


def _inline_table(key: str, text: str) -> dict:
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config key 'space.{key}': {text!r} is not a TOML inline table ({e})") from None


def _parse_dim(key: str, spec: dict) -> Dim:
    where = f"config key 'space.{key}'"
    if len(spec) != 1:
        raise ConfigError(f"{where}: expected exactly one of {', '.join(SPACE_KINDS)}, got {sorted(spec)}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} expects a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform"):
        nums = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not nums or not values[0] < values[1]:
            raise ConfigError(f"{where}: {kind} expects [low, high] with low < high, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{where}: loguniform expects [low, high] with 0 < low, got {values!r}")
        values = [float(v) for v in values]
    elif len(set(map(json.dumps, values))) != len(values):
        raise ConfigError(f"{where}: {kind} lists a value twice: {values!r}")
    return Dim(key, kind, tuple(values))


def _resolve_base(base: str, source: Path | None) -> Path:
    p = Path(base)
    folders = [Path.cwd()] + ([source.absolute().parent, *source.absolute().parent.parents] if source else [])
    for candidate in [p] if p.is_absolute() else [f / p for f in folders]:
        if candidate.is_file():
            return candidate.absolute()
    raise ConfigError(f"config key 'sweep.base': {base} not found (relative paths are tried from the working "
                      f"folder, then from the sweep file's folder and the folders above it)")


def load_sweep(path: str | Path | dict, overrides: list[str] | dict | None = None) -> Sweep:
    """A sweep from a TOML file (or a dict of its tables) with `--sweep.key value` overrides, checked: every
    swept and fixed path is tried against the base config's schema before anything runs."""
    from workbench.config import apply_overrides, parse_overrides

    source = None
    if isinstance(path, dict):
        raw = json.loads(json.dumps(path))
    else:
        source = Path(path)
        raw = load_toml(source)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    raw = apply_overrides(raw, dict(overrides or {}))
    unknown = set(raw) - {"sweep", "space", "overrides"}
    if unknown:
        raise ConfigError(f"config key '{sorted(unknown)[0]}': unknown table (a sweep file has [sweep], [space] "
                          f"and [overrides])")
    section = from_dict(SweepSection, raw.get("sweep", {}), "sweep")
    space = _parse_space(raw.get("space", {}))
    if not space:
        raise ConfigError("config key 'space': nothing to sweep (give at least one path, e.g. "
                          "\"optim.lr\" = { loguniform = [1e-4, 1e-2] })")
    fixed = raw.get("overrides", {})
    if not isinstance(fixed, dict):
        raise ConfigError(f"config key 'overrides': expected a table of dotted config paths, got {fixed!r}")
    fixed = flatten(fixed)
    clash = sorted(set(fixed) & {d.key for d in space})
    if clash:
        raise ConfigError(f"config key 'overrides.{clash[0]}': also swept in [space]; keep one of the two")
    base = _resolve_base(section.base, source)
    kind = "task" if "task" in load_toml(base) else "train"
    sweep = Sweep(section, space, fixed, base, kind)
    if sweep.kind == "task" and section.workers > 1:
        raise ConfigError(f"config key 'sweep.workers': {section.workers} processes per trial need a `workbench "
                          f"train` config; {base} is a task config (one process)")
    if section.eval_tasks:
        from evals.runner import model_kind, parse_tasks

        try:
            needs = model_kind(parse_tasks(",".join(section.eval_tasks)))
        except WorkbenchError as e:
            raise ConfigError(f"config key 'sweep.eval_tasks': {e}") from None
        task = load_toml(base)["task"].get("name") if kind == "task" else None
        wanted = {"train": "lm", "diffusion": "diffusion", "nerf": "nerf", "video": "video"}.get(task or "train")
        if needs != wanted:
            what = f"{task} runs" if task else "language models"
            hint = (f"they take tasks of model kind {wanted}" if wanted else
                    "no eval task takes them; their results.json figures join the table as result/KEY")
            raise ConfigError(f"config key 'sweep.eval_tasks': {section.eval_tasks} evaluate {needs} models; the "
                              f"trials of {section.base} are {what} ({hint})")
    _check_space(sweep)
    return sweep


def trial_job(sweep: Sweep, values: dict[str, Any], run_dir: Path | None = None):
    """The config of the trial with swept `values`: base < [overrides] < values < its run folder."""
    overrides = {**sweep.overrides, **values}
    if run_dir is not None:
        overrides |= {"run.out_dir": str(run_dir.parent), "run.name": run_dir.name}
    if sweep.kind == "task":
        from workbench.train.fundamentals.runner import load_job

        return load_job(sweep.base, overrides)
    from workbench.config import load_config
    from workbench.job import JobConfig
    from workbench.parallel.dims import ParallelDims

    job = load_config(JobConfig, sweep.base, overrides)
    try:  # the layout must fit the trial's processes
        ParallelDims.from_config(job.parallel, sweep.sweep.workers, job.model.config)
    except ConfigError as e:
        raise ConfigError(f"{e} (config key 'sweep.workers': {sweep.sweep.workers} processes per trial)") from None
    return job


def first_values(sweep: Sweep) -> dict[str, Any]:
    """The first listed value (or the low end) of every swept path: a trial config to check things on."""
    return {d.key: d.values[0] for d in sweep.space}


def _check_space(sweep: Sweep) -> None:
    """Every listed value (and each end of every range) must make a valid config, tried one path at a time
    with the others at their first values; an error names the swept path and its value."""
    first = first_values(sweep)
    for d in sweep.space:
        for v in d.values:
            try:
                trial_job(sweep, {**first, d.key: v})
            except ConfigError as e:
                if v != d.values[0]:  # the first values passed: this one is the culprit
                    named = [d.key]
                else:  # the first values: the path the error names, or the one that fails alone on the base
                    named = [o.key for o in sweep.space if f"'{o.key}'" in str(e)]
                    if not named and _fits(sweep, {}):
                        named = [o.key for o in sweep.space if not _fits(sweep, {o.key: first[o.key]})]
                if named:
                    key = named[0]
                    value = v if key == d.key else first[key]
                    raise ConfigError(f"config key 'space.{key}': the value {value!r} does not fit "
                                      f"{sweep.sweep.base}: {e}") from None
                raise ConfigError(f"{sweep.sweep.base} with the sweep's [overrides] and the first value of each "
                                  f"swept path: {e}") from None


def _fits(sweep: Sweep, values: dict) -> bool:
    try:
        trial_job(sweep, values)
    except ConfigError:
        return False
    return True


def _max_steps(sweep: Sweep) -> int:
    """ASHA's max_t: sweep.max_t, else the largest train.steps (task configs: none; the rungs past a run's end
    are simply never reached). A max_t below a trial's end stops the trial there, never finished."""
    if sweep.kind == "task":
        return sweep.sweep.max_t or 10**9
    steps = [trial_job(sweep, first_values(sweep)).train.steps]
    steps += [int(v) for d in sweep.space if d.key == "train.steps" for v in d.values]
    if 0 < sweep.sweep.max_t < max(steps):
        raise ConfigError(f"config key 'sweep.max_t': {sweep.sweep.max_t} is below train.steps ({max(steps)}): ASHA "
                          f"would stop every surviving trial there, unfinished and unevaluated (leave it 0)")
    return sweep.sweep.max_t or max(steps)


# ----------------------------------------------------------------------------------------------------
# Inside a trial (a Ray worker process)


def trial_name(trial_id: str) -> str:
    """Tune's "abc12_00003" -> "trial-003" (the id's counter is kept by Tuner.restore)."""
    return f"trial-{int(trial_id.rsplit('_', 1)[-1]):03d}"


def _file_log(path: Path) -> Callable[[str], None]:
    def log(msg: str) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
    return log


def _numbers(record: dict) -> dict:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def final_marks(plan: dict, overrides: dict) -> dict:
    """Where a trial's run ends: at train.steps (train configs), or at task configs' last epoch or max_steps."""
    if plan["kind"] == "task":
        from workbench.train.fundamentals.runner import load_job

        t = load_job(plan["base"], overrides).train
        return {"step": t.max_steps or None, "epoch": t.epochs}
    from workbench.config import load_config
    from workbench.job import JobConfig

    return {"step": load_config(JobConfig, plan["base"], overrides).train.steps, "epoch": None}


def _reporter(report: Callable[[dict], None], plan: dict, marks: dict) -> Callable[[dict], None]:
    """A validation listener that forwards the record to Tune (or Ray Train) at its step. The run's last
    validation (at `marks`, see final_marks) is left for the trial's final report: a scheduler deciding on it
    could stop the trial before it saves its last checkpoint and evaluates."""
    def on_validation(record: dict) -> None:
        values = _numbers(record)
        if plan["metric"] not in values:
            raise WorkbenchError(f"config key 'sweep.metric': {plan['metric']!r} is not among the validation "
                                 f"metrics this run logs ({', '.join(sorted(values))})")
        step, epoch = int(record["step"]), record.get("epoch")
        last = ((marks["step"] is not None and step >= marks["step"])
                or (marks["epoch"] is not None and epoch is not None and epoch >= marks["epoch"]))
        if not last:
            report({**values, "step": step})
    return on_validation


def _latest_step(run_dir: Path) -> int:
    from workbench.checkpoint.run import latest_checkpoint, step_of

    ckpt = latest_checkpoint(run_dir)
    return 0 if ckpt is None else step_of(ckpt)


def _train_once(plan: dict, overrides: dict, log: Callable[[str], None]) -> dict:
    """The run itself, exactly as `workbench train|fundamentals ... --resume` would do it; a task's headline
    results (its results.json: test metrics, baselines) as {"result/KEY": value}."""
    if plan["kind"] == "task":
        from workbench.train.fundamentals.runner import run_job

        results = run_job(plan["base"], overrides, resume=True, log=log)
        return {f"result/{k}": float(v) for k, v in results.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    from workbench.config import load_config
    from workbench.job import JobConfig
    from workbench.train.trainer import Trainer

    trainer = Trainer(load_config(JobConfig, plan["base"], overrides), resume=True, log=log)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return {}


def _worker_loop(config: dict) -> None:
    """One process of a multi-process trial (Ray Train runs it `workers` times, the process group joined)."""
    import ray.train
    import torch

    plan = config["plan"]
    os.chdir(plan["cwd"])
    torch.set_num_threads(plan["cpus_per_worker"])
    rank = ray.train.get_context().get_world_rank()
    log = _file_log(Path(config["log"])) if rank == 0 else (lambda *_: None)
    from workbench.train.metrics import validation_listener

    with validation_listener(_reporter(ray.train.report, plan, config["marks"])):
        _train_once(plan, config["overrides"], log)
    if rank == 0:  # the evals run here, with the workers' CPUs and GPU (the trial's own process has a sliver)
        finish_trial(plan, Path(config["run_dir"]), {}, log)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


def loopback_torch_config(backend: str):
    """Ray Train's TorchConfig, except that the trainer joins the process group itself.

    Ray's own backend joins it through a TCPStore that listens on every interface. This one only sets the
    environment torchrun would (MASTER_ADDR = the node address, 127.0.0.1 here; MASTER_PORT; RANK, WORLD_SIZE,
    LOCAL_RANK), and `workbench.parallel.data_parallel.init_distributed` then builds the group on a store
    bound to MASTER_ADDR alone, as it does under the deepspeed launcher. (Ray's backend class is private API,
    pinned by tests/distributed/test_sweep.py, which watches what the trials listen on.)"""
    from ray.train._internal.utils import get_address_and_port
    from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

    class EnvOnlyBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            addr, port = worker_group.execute_single(0, get_address_and_port)
            worker_group.execute(_set_master, addr=addr, port=port)
            worker_group.execute(_set_torch_distributed_env_vars)

    @dataclass
    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return EnvOnlyBackend

    return LoopbackTorchConfig(backend=backend)


def _fit_torch_trainer(plan: dict, overrides: dict, name: str, attempt: int, log_path: Path) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    # the GPUs were checked when Ray started; this process itself is given none (Ray hides them from it)
    backend = "nccl" if plan["gpus_per_worker"] > 0 else "gloo"
    trainer = TorchTrainer(
        _worker_loop, train_loop_config={"plan": plan, "overrides": overrides, "log": str(log_path),
                                         "marks": final_marks(plan, overrides), "run_dir": str(log_path.parent)},
        scaling_config=ScalingConfig(num_workers=plan["workers"], use_gpu=backend == "nccl",
                                     resources_per_worker={"CPU": plan["cpus_per_worker"]} | (
                                         {"GPU": plan["gpus_per_worker"]} if backend == "nccl" else {})),
        torch_config=loopback_torch_config(backend),
        run_config=RunConfig(name=f"{name}-attempt-{attempt}", storage_path=str(Path(plan["dir"]) / TRAIN_DIR),
                             callbacks=[TuneReportCallback()], failure_config=FailureConfig(max_failures=0)))
    trainer.fit()  # a worker that fails raises here: the Tune trial fails, and Tune retries it


def _eval_metrics(plan: dict, run_dir: Path, log: Callable[[str], None]) -> dict:
    if not plan["eval_tasks"]:
        return {}
    from evals.runner import run_eval

    out = run_eval(",".join(plan["eval_tasks"]), ckpt=str(run_dir), log=log)
    tasks = json.loads((out / "results.json").read_text())["tasks"]
    return {f"{task}/{k}": float(v) for task, s in tasks.items() for k, v in s["metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_trial(values: dict, plan: dict) -> None:
    """Tune's function trainable: one trial = one run folder, trained (or continued) to its end."""
    from workbench.train.metrics import read_metrics, validation_listener

    os.chdir(plan["cwd"])  # the base config's relative paths (data.dir, ...) mean what they mean to the user
    sweep_dir = Path(plan["dir"])
    name = trial_name(tune.get_context().get_trial_id())
    run_dir = sweep_dir / TRIALS_DIR / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / TRIAL_FILE).write_text(json.dumps({"trial": name, "trial_id": tune.get_context().get_trial_id(),
                                                  "params": values}, indent=1) + "\n")
    result = run_dir / RESULT_FILE
    done = json.loads(result.read_text()) if result.is_file() else None
    attempts = sweep_dir / ATTEMPTS_FILE  # read_metrics: a line torn by a killed sweep is dropped, not fatal
    attempt = sum(rec["trial"] == name for rec in read_metrics(attempts)) + 1
    with open(attempts, "a", encoding="utf-8") as f:  # one short line per append: whole lines, even concurrently
        # `trains`: false when a restored experiment state had missed that the trial finished (killed sweep)
        f.write(json.dumps({"trial": name, "attempt": attempt, "pid": os.getpid(), "time": time.time(),
                            "resumed_from_step": _latest_step(run_dir), "trains": done is None}) + "\n")
    overrides = {**plan["overrides"], **values, "run.out_dir": str(run_dir.parent), "run.name": name}
    log = _file_log(run_dir / "train.log")
    log(f"{name} attempt {attempt}: {json.dumps(values)}")
    if done is None:
        if plan["workers"] > 1:
            _fit_torch_trainer(plan, overrides, name, attempt, run_dir / "train.log")  # rank 0 finishes it
        else:
            import torch

            torch.set_num_threads(plan["cpus_per_worker"])
            with validation_listener(_reporter(tune.report, plan, final_marks(plan, overrides))):
                task_results = _train_once(plan, overrides, log)
            finish_trial(plan, run_dir, task_results, log)
    elif done.get("eval_error") and plan["eval_tasks"]:
        finish_trial(plan, run_dir, done["metrics"], log)  # its eval, once more
    final = json.loads(result.read_text())["metrics"]
    tune.report({**final, "finished": 1})


def finish_trial(plan: dict, run_dir: Path, known: dict, log: Callable[[str], None]) -> None:
    """A trained trial's sweep_result.json: its last validation, `known` results (a task's), and its evals.
    A failing eval does not undo the training: its error is recorded (the table shows it) and `--resume`
    tries the eval again."""
    from workbench.train.metrics import atomic_write_text, read_metrics

    val = [r for r in read_metrics(run_dir / "metrics.jsonl") if plan["metric"] in r]
    if not val:
        raise WorkbenchError(f"{run_dir}: the run logged no {plan['metric']!r} (config key 'sweep.metric')")
    record = {"trial": run_dir.name, "finished": True}
    try:
        evals = _eval_metrics(plan, run_dir, log)
    except Exception as e:  # noqa: BLE001 - any eval failure is recorded, not raised
        evals, record["eval_error"] = {}, f"{type(e).__name__}: {e}"
        log(f"eval failed: {record['eval_error']}")
    record["metrics"] = {**known, **_numbers(val[-1]), **evals, "step": int(val[-1]["step"])}
    atomic_write_text(run_dir / RESULT_FILE, json.dumps(record, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------
# Ray, safely


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, address) of every TCP socket the processes `pids` listen on (Linux /proc; [] elsewhere)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            addr = cols[1].split(":")[0]
            out.append((inodes[cols[9]], _ip(addr, width)))
    return out


def _ip(hex_addr: str, width: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints each 32-bit word little-endian
    ip = ipaddress.ip_address(raw)
    return str(ip.ipv4_mapped or ip) if width == 32 else str(ip)


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it (Linux /proc/PID/task/*/children)."""
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
    return found


def exposed_listeners() -> list[tuple[int, str]]:
    """The sockets this process and its descendants listen on that another machine could reach."""
    import ipaddress

    return [(pid, ip) for pid, ip in _listening(descendants(os.getpid())) if not ipaddress.ip_address(ip).is_loopback]


def start_ray(sweep: SweepSection, num_cpus: int, log: Callable[[str], None]) -> None:
    """A private Ray instance on 127.0.0.1 (module doc): refuses to go on if anything listens wider."""
    import logging

    import ray
    import ray._private.services as services

    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    try:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed (zero1-3 trials) reads it at import
    except ImportError:
        pass
    # a trial given no GPU must not see one (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for it by default)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console tables off (verbose=0): the bar speaks
    logging.getLogger("ray").setLevel(logging.ERROR)  # e.g. the notice that token authentication is on
    # Ray 2.60 turns a loopback node address into the machine's external one (resolve_ip_for_localhost) and
    # its servers then bind every interface; keeping 127.0.0.1 keeps all of them on loopback
    resolve = getattr(services, "resolve_ip_for_localhost", None)
    if resolve is not None:
        services.resolve_ip_for_localhost = lambda host: host
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=sweep.dashboard,
                 dashboard_host="127.0.0.1", dashboard_port=sweep.dashboard_port, _node_ip_address="127.0.0.1",
                 log_to_driver=False, logging_level=logging.ERROR, runtime_env={"env_vars": env})
    except Exception as e:
        if sweep.dashboard and "dashboard" in str(e):
            raise WorkbenchError(f"config key 'sweep.dashboard': Ray could not start its dashboard ({e}); it "
                                 f"needs Ray's dashboard packages: pip install 'ray[default]'") from None
        raise
    finally:
        if resolve is not None:
            services.resolve_ip_for_localhost = resolve
    gpus = ray.cluster_resources().get("GPU", 0)
    if sweep.gpus_per_worker * sweep.workers > gpus:
        ray.shutdown()
        raise ConfigError(f"config key 'sweep.gpus_per_worker': a trial needs {sweep.gpus_per_worker * sweep.workers:g} "
                          f"GPUs ({sweep.workers} x {sweep.gpus_per_worker:g}); Ray finds {gpus:g} on this machine")
    exposed = exposed_listeners()
    if exposed:
        ray.shutdown()
        raise WorkbenchError("Ray listens beyond this machine (" + ", ".join(f"pid {p} on {a}" for p, a in exposed)
                             + "); refusing to run the sweep (this Ray version does not keep to 127.0.0.1)")
    where = f"dashboard http://127.0.0.1:{sweep.dashboard_port}" if sweep.dashboard else "dashboard off"
    log(f"ray: a private local instance on 127.0.0.1, {num_cpus} CPUs, {where}")


# ----------------------------------------------------------------------------------------------------
# The driver


def _say(msg: str) -> None:
    """A line on stderr that leaves the progress bar intact."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        print(msg, file=sys.stderr, flush=True)


class Progress(tune.Callback):
    """A Tune callback: a bar over the trials and one line per trial that ends or is retried. It is pickled
    with Tune's experiment state, so it keeps only plain settings; the bar is made on first use."""

    def __init__(self, total: int, metric: str):
        self.total, self.metric, self.bar = total, metric, None

    def __getstate__(self):
        return {"total": self.total, "metric": self.metric, "bar": None}

    def _bar(self, trials, current=None):
        if self.bar is None:  # on resume, the trials that ended before (not the one being counted now)
            from tqdm import tqdm

            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not current)
            self.bar = tqdm(total=self.total, initial=done, desc="trials", dynamic_ncols=True, file=sys.stderr)
        return self.bar

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric in result:
            self._bar(trials).set_postfix_str(f"{trial_name(trial.trial_id)} {self.metric} "
                                              f"{result[self.metric]:.4g} at step {result.get('step', '?')}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._bar(trials, trial).update(1)
        last = trial.last_result or {}
        how = "finished" if last.get("finished") else f"stopped by the scheduler at step {last.get('step')}"
        value = f"{self.metric} {last[self.metric]:.4g}" if self.metric in last else "no result"
        _say(f"{trial_name(trial.trial_id)} {how}: {value}  {json.dumps(trial.config)}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        _say(f"{trial_name(trial.trial_id)} crashed; retrying it from its newest checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._bar(trials, trial).update(1)
        _say(f"{trial_name(trial.trial_id)} failed after its retries: see {trial.path}/error.txt and "
             f"{TRIALS_DIR}/{trial_name(trial.trial_id)}/train.log")

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()


def _trial_resources(sweep: SweepSection) -> dict:
    # a multi-process trial's own process only waits on its TorchTrainer, whose workers hold the CPUs (Ray
    # wants some resource for it: a sliver of a CPU, which start_ray's count makes room for)
    if sweep.workers > 1:
        return {"cpu": TRIAL_SLIVER}
    return {"cpu": sweep.cpus_per_worker, "gpu": sweep.gpus_per_worker}


def run_sweep(path: str | Path, overrides: list[str] | dict | None = None, resume: bool = False,
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Run (or with `resume`, continue) the sweep of file `path`; returns its summary (sweep_results.write_results,
    plus "interrupted" and the "signal" that stopped it)."""
    sweep = load_sweep(path, overrides)
    sdir = sweep.dir
    state = sdir / RAY_DIR
    holds = (sdir / SWEEP_FILE).is_file() or (sdir / TRIALS_DIR).is_dir()
    if holds and not resume:
        raise WorkbenchError(f"sweep folder {Path(sweep.sweep.out_dir) / sweep.sweep.name} already holds a sweep: "
                             f"pass --resume to continue it, or choose another --sweep.name")
    if holds:
        _check_resumable(sweep, sdir)
    started = holds and state.is_dir() and tune.Tuner.can_restore(str(state))
    if holds and not started:  # killed before Tune first saved its state: the same seeded draws start again,
        log(f"{state}: no saved Tune state to restore (the sweep was stopped before Tune first saved it); "
            f"starting the trials again, each continuing from its own checkpoints")  # into the same folders
    if not started:  # nothing to restore: a leftover state folder would mix into the new Tuner's
        shutil.rmtree(state, ignore_errors=True)
    _prepare_data(sweep, log)
    sdir.mkdir(parents=True, exist_ok=True)
    if not holds:
        shutil.copyfile(sweep.base, sdir / BASE_COPY)
        (sdir / SWEEP_FILE).write_text(dumps_toml(sweep.resolved()), encoding="utf-8")
    s = sweep.sweep
    per_trial = s.workers * s.cpus_per_worker + (TRIAL_SLIVER if s.workers > 1 else 0)
    num_cpus = s.num_cpus or max(os.cpu_count() or 1, math.ceil(per_trial))
    if num_cpus < per_trial:
        raise ConfigError(f"config key 'sweep.num_cpus': {num_cpus} CPUs cannot hold one trial of "
                          f"{s.workers} workers x {s.cpus_per_worker} CPUs")
    # Tune would start every trial whose own process fits, multi-process ones then waiting for their workers
    concurrent = s.max_concurrent or max(1, int(num_cpus // per_trial))
    log(f"sweep {s.name}: {sweep.n_trials()} trials of {sweep.base} ({sweep.kind}), {s.scheduler} on "
        f"{s.metric} ({s.mode}), {s.workers} process(es) per trial, {concurrent} at a time; folder {sdir}")
    plan = {"cwd": os.getcwd(), "dir": str(sdir), "base": str(sdir / BASE_COPY), "kind": sweep.kind,
            "overrides": sweep.overrides, "metric": s.metric, "workers": s.workers,
            "cpus_per_worker": s.cpus_per_worker, "gpus_per_worker": s.gpus_per_worker,
            "eval_tasks": list(s.eval_tasks)}
    import ray

    interrupted, errors = False, {}
    signals = _Interrupts(lambda: write_results(sdir, log=lambda *_: None, interrupted=True))
    try:
        with signals:
            start_ray(s, num_cpus, log)
        trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), _trial_resources(s))
        if started:
            log(f"resuming the sweep from {state} ({_finished_trials(sdir)} trials finished)")
            tuner = tune.Tuner.restore(str(state), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            run_config = tune.RunConfig(name=RAY_DIR, storage_path=str(sdir), verbose=0,
                                        callbacks=[Progress(sweep.n_trials(), s.metric)],
                                        failure_config=tune.FailureConfig(max_failures=s.max_failures))
            tuner = tune.Tuner(trainable, param_space={d.key: d.to_ray() for d in sweep.space},
                               tune_config=_tune_config(sweep, concurrent), run_config=run_config)
        with signals:
            grid = tuner.fit()
        errors = {_name_of_result(r): str(r.error) for r in grid if r.error is not None}
        interrupted = signals.signum is not None
    except KeyboardInterrupt:
        interrupted = True
    finally:
        ray.shutdown()
    summary = write_results(sdir, errors=errors, log=log, interrupted=interrupted)
    summary["interrupted"] = interrupted
    summary["signal"] = signals.signum or (signal.SIGINT if interrupted else None)
    if interrupted:
        again = " ".join(overrides) + " " if isinstance(overrides, list) and overrides else ""
        log(f"sweep interrupted: continue it with `workbench sweep {path} {again}--resume`")
    return summary


def _name_of_result(result) -> str:
    """A Ray result's trial name, from its folder (run_trial_<experiment>_<counter>_...)."""
    import re

    found = re.search(r"_[0-9a-f]{5}_(\d{5})", Path(result.path).name)
    return trial_name(f"x_{found.group(1)}") if found else Path(result.path).name


def _tune_config(sweep: Sweep, max_concurrent: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = sweep.sweep
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=_max_steps(sweep), grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    elif s.scheduler == "median":
        scheduler = MedianStoppingRule(time_attr="step", grace_period=s.grace_period, min_samples_required=2)
    else:
        scheduler = FIFOScheduler()
    # the limit goes to the generator itself: Tune ignores max_concurrent_trials next to a given generator
    return tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler, num_samples=s.num_samples,
                           search_alg=BasicVariantGenerator(random_state=s.seed, max_concurrent=max_concurrent))


class _Interrupts:
    """Ctrl-C and SIGTERM stop the sweep gracefully: Tune saves its state, the trials keep their checkpoints.

    Tune's own SIGINT handler would swallow the signal without saying so, so it is turned off
    (TUNE_DISABLE_SIGINT_HANDLER) and the first SIGINT / SIGTERM is passed on as SIGUSR1, which Tune treats as
    "stop gracefully" once its loop runs (before that, the signal stops the sweep at once); `self.signum`
    remembers it, and `on_stop` runs first (it writes the results: a SIGTERM sent to the whole process group
    ends Ray's own processes too, and the driver may then never get further). A second signal raises
    KeyboardInterrupt at once."""

    def __init__(self, on_stop: Callable[[], None]):
        self.on_stop = on_stop
        self.signum: int | None = None

    def __enter__(self):
        watched = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
        self.old = {s: signal.getsignal(s) for s in watched}
        self.old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # Tune installs its own when its loop starts

        def on_signal(signum, frame):
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum
            _say(f"{signal.Signals(signum).name}: stopping the sweep (its state is saved; again to stop at once)")
            try:
                self.on_stop()
            except Exception as e:  # noqa: BLE001 - the stop must go on; the results are written again at the end
                _say(f"could not write the results yet ({type(e).__name__}: {e})")
            if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):  # Tune's loop is not running yet
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGUSR1)

        for s in watched[:2]:
            signal.signal(s, on_signal)
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        if self.old_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self.old_env


def _finished_trials(sdir: Path) -> int:
    return sum(1 for _ in (sdir / TRIALS_DIR).glob(f"*/{RESULT_FILE}")) if (sdir / TRIALS_DIR).is_dir() else 0


def _check_resumable(sweep: Sweep, sdir: Path) -> None:
    """--resume continues the same sweep: the same space, fixed values, base and search settings."""
    saved_path = sdir / SWEEP_FILE
    if not saved_path.is_file():
        raise WorkbenchError(f"{sdir}: no {SWEEP_FILE}; not a sweep folder this version wrote")
    saved, now = flatten(load_toml(saved_path)), flatten(json.loads(json.dumps(sweep.resolved())))
    free = {"sweep.num_cpus", "sweep.dashboard", "sweep.dashboard_port", "sweep.base"}
    for key in sorted(set(saved) | set(now)):
        if key not in free and saved.get(key) != now.get(key):
            raise WorkbenchError(f"--resume: {saved_path} was written with {key} = {saved.get(key)!r}, this sweep "
                                 f"has {now.get(key)!r}; resume with the same settings or choose another --sweep.name")
    if (sdir / BASE_COPY).read_bytes() != sweep.base.read_bytes():
        raise WorkbenchError(f"--resume: {sweep.base} changed since the sweep began (its copy: {sdir / BASE_COPY}); "
                             f"the finished trials ran the copy. Resume with it (--sweep.base {sdir / BASE_COPY}) "
                             f"or choose another --sweep.name")


def _prepare_data(sweep: Sweep, log: Callable[[str], None]) -> None:
    """Build each dataset the trials read once, here, before trials start at once and race to build it."""
    if sweep.kind != "train":
        return
    from data_pipelines.shards import build_settings
    from workbench.train.trainer import prepare_data

    data_dims = [d for d in sweep.space if d.key.startswith("data.")]
    ranged = [d.key for d in data_dims if d.kind in ("uniform", "loguniform")]
    if ranged:
        raise ConfigError(f"config key 'space.{ranged[0]}': a data field drawn from a range would build a dataset "
                          f"per trial; list its values with choice or grid instead")
    built: dict[str, tuple[dict, Any]] = {}  # data.dir -> (what builds it, a trial config reading it)
    for combo in itertools.product(*[d.values for d in data_dims]):
        job = trial_job(sweep, {**first_values(sweep), **dict(zip([d.key for d in data_dims], combo))})
        settings = build_settings(job.data)
        other = built.setdefault(job.data.dir, (settings, job))[0]
        if other != settings:
            differ = {k for k in settings.keys() | other.keys() if settings.get(k) != other.get(k)}
            first_job = built[job.data.dir][1]
            key = next((d.key for d in data_dims if d.key[5:] in differ), data_dims[0].key)
            raise ConfigError(f"config key 'space.{key}': trials with {key} = {getattr(first_job.data, key[5:])!r} "
                              f"and {getattr(job.data, key[5:])!r} would share data.dir {job.data.dir}; give each its "
                              f"own folder (sweep data.dir with it, or build them with `workbench data` and sweep "
                              f"data.dir)")
    for _, job in built.values():
        prepare_data(job, log)
