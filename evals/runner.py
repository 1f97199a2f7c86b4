"""The runner behind `workbench eval`: load a model once, run the asked tasks, write results and a report.

    workbench eval --task perplexity,exact_match --ckpt runs/NAME [--out DIR] [--TASK.key value ...]

Where results go: `--out DIR`, else `RUN_DIR/evals/step-N/` for a run's checkpoint (so the run's
report.md lists them), else `runs/evals/<hf dir name>/`. The folder holds
    results.json      {"format", "source", "updated", "tasks": {name: summary}}; a task run again replaces
                      its entry, other tasks' entries stay, so tasks can be run one at a time
    report.md         a table of every task's headline metric against its baselines, then per task its
                      metrics, plots and a few scored examples
    samples/TASK.jsonl   every scored item (what the task scored and how: e.g. prompt, answer, output, correct)
    *.png             the tasks' plots
results.json and report.md are rewritten after each task, so a task that fails keeps the earlier ones; for
a run's checkpoint evaluated into RUN_DIR/evals/, the run's report.md is regenerated at the end (also after
a failure). A folder holding results of another model is refused rather than mixed. Task names, options
and the data files named in options are checked before the model is loaded; a checkpoint without its
COMPLETE marker, or whose files differ from its manifest, is refused by the loader.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from evals import registry
from evals.report import write_eval_report
from workbench.config import from_dict, parse_overrides, to_dict
from workbench.errors import ConfigError, WorkbenchError
from workbench.train.metrics import atomic_write_text
from workbench.train.report import EVAL_FORMAT, write_run_report

FORMAT = EVAL_FORMAT + "1"
RESULTS = "results.json"  # workbench.train.report reads it by this name
HF_MAX_LENGTH = 2048  # the default scoring window for a Hugging Face model (its own limit may be 128K)


def parse_tasks(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise WorkbenchError("--task: give one or more task names separated by commas (`workbench eval --list`)")
    for name in names:
        registry.get(name)  # an unknown name lists the known ones
    return list(dict.fromkeys(names))


def task_configs(names: list[str], options: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Each task's Config from the `--TASK.key value` options; an option for a task not asked for is an error."""
    if isinstance(options, list):
        stray = next((a for a in options if a.startswith("--") and "." not in a.split("=")[0]), None)
        if stray is not None:
            raise ConfigError(f"eval: unknown option {stray!r} (eval's own: --task, --ckpt, --hf-dir, --out, "
                              f"--batch-size, --max-length, --device, --dtype, --quant; a task's: --TASK.key value)")
    flat = parse_overrides(options) if isinstance(options, list) else dict(options or {})
    raw: dict[str, dict] = {n: {} for n in names}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head not in raw:
            if head not in registry.tasks():
                registry.get(head)
            raise ConfigError(f"option '--{key}': task {head!r} is not among those asked for ({', '.join(names)})")
        node = raw[head]
        parts = rest.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return {n: from_dict(registry.get(n).Config, raw[n], path=n) for n in names}


def model_kind(names: list[str]) -> str:
    """What the tasks need loaded: "lm" (a language model, the default) or a task's `model_kind` (e.g.
    "diffusion": a `workbench diffusion` run); tasks that need different models cannot share one eval."""
    kinds = {n: getattr(registry.get(n), "model_kind", "lm") for n in names}
    if len(set(kinds.values())) > 1:
        raise WorkbenchError(f"--task: these tasks need different models ({', '.join(f'{n}: {k}' for n, k in kinds.items())}); "
                             f"run them in separate evals")
    return next(iter(kinds.values()))


def load_source(ckpt: str | None, hf_dir: str | None, device: torch.device, dtype: torch.dtype | None,
                quant: str | None = None):
    """(model, tokenizer, source, job): job is the run's JobConfig for --ckpt, None for --hf-dir; `quant`
    (int8 | llm-int8) quantizes the model's linear layers (workbench.inference.quant), None / none leaves it."""
    from workbench.checkpoint.hf import load_hf_dir
    from workbench.checkpoint.load import load_run, run_dir_of
    from workbench.checkpoint.run import resolve_checkpoint, step_of
    from workbench.config import load_config
    from workbench.inference.quant import apply_quant
    from workbench.job import JobConfig

    if (ckpt is None) == (hf_dir is None):
        raise WorkbenchError("give exactly one of --ckpt RUN_DIR or --hf-dir DIR")
    if hf_dir is not None:
        model, tokenizer, _ = load_hf_dir(hf_dir, device, dtype)
        source, job = {"hf_dir": str(Path(hf_dir))}, None
    else:
        path = resolve_checkpoint(ckpt)
        run_dir = run_dir_of(path)
        model, tokenizer, _ = load_run(path, device, dtype)  # verifies the marker and the manifest
        job = load_config(JobConfig, run_dir / "config.toml")
        source = {"ckpt": str(path), "run_dir": str(run_dir), "step": step_of(path)}
    apply_quant(model, quant)
    if getattr(model, "quantization", None):  # --quant, or a directory exported quantized
        source["quant"] = model.quantization["method"]
    return model, tokenizer, source, job


def default_max_length(job, model: torch.nn.Module) -> int:
    """The scoring window: a run's training window (data.seq_len); for a Hugging Face model, its own limit
    (max_position_embeddings) up to HF_MAX_LENGTH."""
    if job is not None:
        return job.data.seq_len
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    return min(HF_MAX_LENGTH, limit) if limit else HF_MAX_LENGTH


def default_out(source: dict) -> Path:
    tail = f"-{source['quant']}" if source.get("quant") else ""  # a quantized model's results apart (--quant)
    if "run_dir" in source:
        return Path(source["run_dir"]) / "evals" / f"step-{source['step']}{tail}"
    return Path("runs") / "evals" / (Path(source["hf_dir"]).resolve().name + tail)


def _same_source(a: dict, b: dict) -> bool:
    key = "ckpt" if "ckpt" in a else "hf_dir"
    return (key in b and Path(a[key]).resolve() == Path(b[key]).resolve()
            and a.get("quant") == b.get("quant"))


def read_results(out: Path) -> dict | None:
    path = out / RESULTS
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WorkbenchError(f"{path}: unreadable ({e}); move it away to start the folder afresh") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise WorkbenchError(f"{path}: not a workbench eval results file (format {FORMAT})")
    return results


def run_eval(
    task_spec: str, ckpt: str | None = None, hf_dir: str | None = None, out: str | None = None,
    options: list[str] | dict | None = None, batch_size: int = 16, max_length: int | None = None,
    device: str = "auto", dtype: torch.dtype | None = None, log: Callable[[str], None] = print,
    quant: str | None = None,
) -> Path:
    """Run the tasks of `task_spec` ("a,b") on one model; returns the eval folder (see the module notes)."""
    from workbench.inference.generator import KVCacheGenerator
    from workbench.train.trainer import pick_device

    names = parse_tasks(task_spec)
    configs = task_configs(names, options)
    if batch_size < 1:
        raise WorkbenchError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    if max_length is not None and max_length < 2:
        raise WorkbenchError(f"--max-length: expected an integer >= 2, got {max_length}")
    kind = model_kind(names)
    if kind == "diffusion":  # ctx.model is a workbench.train.diffusion.DiffusionRun (its EMA net, data, sampler)
        from workbench.train.diffusion import load_run

        if ckpt is None or hf_dir is not None:
            raise WorkbenchError(f"--task {task_spec}: needs --ckpt RUN_DIR of a `workbench diffusion` run")
        model, tokenizer = load_run(ckpt, pick_device(device, "--device")), None
        source, job = model.source, model.job
    elif kind == "nerf":  # ctx.model is a workbench.train.nerf.NerfRun (its model, scene and renderer)
        from workbench.train.nerf import load_run as load_nerf_run

        if ckpt is None or hf_dir is not None:
            raise WorkbenchError(f"--task {task_spec}: needs --ckpt RUN_DIR of a `workbench nerf` run")
        model, tokenizer = load_nerf_run(ckpt, pick_device(device, "--device")), None
        source, job = model.source, model.job
    elif kind == "video":  # ctx.model is a workbench.train.video.VideoRun (data_settings, generate)
        from workbench.train.video import load_run as load_video_run

        if ckpt is None or hf_dir is not None:
            raise WorkbenchError(f"--task {task_spec}: needs --ckpt RUN_DIR of a `workbench video` run")
        model, tokenizer = load_video_run(ckpt, pick_device(device, "--device")), None
        source, job = model.source, None  # source: the video checkpoint, with the VAE run it was trained on
    else:
        model, tokenizer, source, job = load_source(ckpt, hf_dir, pick_device(device, "--device"), dtype, quant)
    out_dir = Path(out) if out else default_out(source)
    previous = read_results(out_dir)
    if previous is not None and not _same_source(source, previous.get("source", {})):
        raise WorkbenchError(f"--out {out_dir}: holds the results of another model ({previous.get('source')}); "
                             f"choose another folder")
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    if max_length is None:
        max_length = default_max_length(job, model) if kind == "lm" else 0
    generator = KVCacheGenerator(model, tokenizer) if kind == "lm" else None
    ctx = registry.EvalContext(model=model, tokenizer=tokenizer, generator=generator,
                               out_dir=out_dir, source=source, job=job, batch_size=batch_size,
                               max_length=max_length, log=log)
    results = previous or {"format": FORMAT, "source": source, "tasks": {}}
    try:
        for name in names:
            task = registry.get(name)
            log(f"eval {name}: {task.description}")
            t0 = time.perf_counter()
            result = task.run(ctx, configs[name])
            summary = dict(result.summary(), elapsed_s=round(time.perf_counter() - t0, 2),
                           config=to_dict(configs[name]))
            with open(out_dir / "samples" / f"{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(s, default=str) + "\n" for s in result.samples)
            results["tasks"][name] = summary
            results["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            # after each task, so a task that fails later leaves the measured ones written and reported
            atomic_write_text(out_dir / RESULTS, json.dumps(results, indent=1) + "\n")
            write_eval_report(out_dir, results)
            base = ", ".join(f"{k} {v:.4g}" for k, v in result.baselines.items())
            log(f"eval {name}: {result.primary} = {result.metrics[result.primary]:.4g}"
                f"{f' (baselines: {base})' if base else ''} over {result.n} items in {summary['elapsed_s']:.1f} s")
        log(f"eval report: {out_dir / 'report.md'}")
    finally:
        run_dir = source.get("run_dir")
        if run_dir is not None and out_dir.resolve().is_relative_to((Path(run_dir) / "evals").resolve()):
            log(f"run report: {write_run_report(run_dir)}")  # the run's report lists its evals folders
    return out_dir


