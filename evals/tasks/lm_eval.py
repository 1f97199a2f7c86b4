"""lm-evaluation-harness tasks on the model under evaluation, through `evals.lm_eval_adapter.WorkbenchLM`.

    workbench eval --task lm_eval --ckpt runs/NAME --lm_eval.tasks hellaswag,arc_easy [--lm_eval.limit 100]
    workbench eval --task lm_eval --ckpt runs/NAME --lm_eval.tasks my_task --lm_eval.include_path DIR

`tasks` names lm-eval tasks, groups or tags (`lm-eval ls tasks` lists them), given as `a,b`; `include_path` is a folder of extra task YAMLs. Scoring uses the eval's batch size
and max_length (by default a run's data.seq_len), so lm-eval's numbers are those of our own tasks:
loglikelihood, rolling perplexity and greedy generation all go through evals.scoring. Standard errors are
not computed (bootstrap_iters 0).

Results: every numeric metric of every task lm-eval reports (groups included), as "TASK/METRIC", or
"TASK/METRIC,FILTER" for a filter other than lm-eval's default "none"; the primary metric is the first
one of the first task asked for. Every logged sample (document id, target, filtered response, its metric
values) goes to samples/lm_eval.jsonl. The plot (lm_eval.png) shows every metric but the perplexities,
whose scale (easily 1e6 for a small model) would hide the others; bits_per_byte carries the same news.

Indexing lm-eval's ~15K built-in task YAMLs takes about 20 s, so when every asked task is found in
`include_path` alone the built-in ones are not indexed.

lm-eval sets Python's, numpy's and torch's global seeds inside `simple_evaluate` (its fewshot sampling
and any sampling of its own depend on them).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.plots import bars
from evals.registry import EvalContext, TaskResult
from workbench.config import fail, field_
from workbench.errors import DataError, WorkbenchError


@dataclass
class Config:
    tasks: list[str] = field_([], doc="lm-eval task/group names, required: --lm_eval.tasks a,b")
    include_path: str | None = field_(None, doc="a folder of extra lm-eval task YAMLs")
    num_fewshot: int | None = field_(None, ge=0, doc="default: each task's own")
    limit: int | None = field_(None, gt=0, doc="at most this many documents per task; default: all")
    max_gen_toks: int | None = field_(None, gt=0, doc="generation budget when a task sets none; "
                                                     "default: min(256, half the scoring window)")

    def validate(self) -> None:
        if not self.tasks:
            fail("tasks", "required: one or more lm-eval task names, e.g. --lm_eval.tasks hellaswag,arc_easy")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            state = "is a file, not a folder" if Path(self.include_path).exists() else "does not exist"
            raise DataError(f"lm_eval.include_path: the folder of task YAMLs {self.include_path} {state}")


def flatten_results(results: dict[str, dict]) -> dict[str, float]:
    """{"TASK/METRIC[,FILTER]": value} of lm-eval's results: numbers only, standard errors left out."""
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key:
                continue  # "alias", "samples", ...
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metrics[f"{task}/{metric}" + ("" if filt == "none" else f",{filt}")] = float(value)
    return metrics


def _plain(value: Any) -> Any:
    """A logged response as JSON: tuples to lists, floats kept, anything else as text."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def flatten_samples(samples: dict[str, list[dict]]) -> list[dict]:
    out = []
    for task, items in samples.items():
        for s in items:
            row = {"task": task, "doc_id": s.get("doc_id"), "target": _plain(s.get("target")),
                   "response": _plain(s.get("filtered_resps")), "filter": s.get("filter")}
            for m in s.get("metrics", []):
                if m in s:
                    row[m] = _plain(s[m])
            out.append(row)
    return out


class LmEval:
    name = "lm_eval"
    description = "lm-evaluation-harness tasks (--lm_eval.tasks a,b; --lm_eval.include_path DIR: local YAMLs)"
    Config = Config

    @staticmethod
    def task_manager(cfg: Config):
        from lm_eval.tasks import TaskManager

        if cfg.include_path is not None:
            local = TaskManager(include_path=cfg.include_path, include_defaults=False)
            if all(name in local.all_tasks for name in cfg.tasks):
                return local
        return TaskManager(include_path=cfg.include_path)

    @staticmethod
    def check_names(manager, names: list[str]) -> None:
        known = set(manager.all_tasks)
        unknown = [n for n in names if n not in known and not Path(n).is_file()]
        if unknown:
            hints = {n: difflib.get_close_matches(n, known, n=3) for n in unknown}
            text = "; ".join(f"{n!r}" + (f" (did you mean {', '.join(h)}?)" if h else "")
                             for n, h in hints.items())
            raise WorkbenchError(f"lm_eval: unknown lm-eval task {text}: not among lm-eval's {len(known)} "
                                 f"tasks, groups and tags or the YAMLs of --lm_eval.include_path")

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        try:
            import lm_eval
        except ImportError:
            message = "lm_eval: the lm-eval package is not installed (pip install lm-eval)"
            raise WorkbenchError(message) from None
        from evals.lm_eval_adapter import WorkbenchLM

        manager = self.task_manager(cfg)
        self.check_names(manager, cfg.tasks)
        budget = cfg.max_gen_toks or min(256, ctx.max_length // 2)
        lm = WorkbenchLM(ctx.model, ctx.tokenizer, ctx.batch_size, ctx.max_length, max_gen_toks=budget)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=manager,
                                          num_fewshot=cfg.num_fewshot, limit=cfg.limit, bootstrap_iters=0,
                                          log_samples=True)
        except ValueError as e:  # the adapter's: sampling asked of a greedy-only model, bad gen_kwargs
            raise WorkbenchError(f"lm_eval: {e}") from None
        except KeyError as e:  # lm-eval's own "not a registered task/group/tag name" (names of subtasks)
            if "registered" not in str(e):
                raise
            raise WorkbenchError(f"lm_eval: unknown lm-eval task ({e.args[0]})") from None
        metrics = flatten_results(out["results"])
        if not metrics:
            raise WorkbenchError(f"lm_eval: lm-eval reported no numeric metric for {', '.join(cfg.tasks)}")
        first = next((t for t in cfg.tasks if any(k.startswith(f"{t}/") for k in metrics)), None)
        primary = next(k for k in metrics if first is None or k.startswith(f"{first}/"))
        task_of_primary, metric_of_primary = primary.split("/", 1)
        better = {f"{t}/{m}": bool(v)
                  for t, ms in out.get("higher_is_better", {}).items() for m, v in ms.items()}
        n_samples = out.get("n-samples", {})
        n = sum(int(v.get("effective", 0)) for v in n_samples.values())
        plot = "lm_eval.png"
        shown = {k: v for k, v in metrics.items() if math.isfinite(v) and "perplexity" not in k} or metrics
        bars(ctx.out_dir / plot, list(shown), list(shown.values()),
             title=f"lm-eval: {', '.join(cfg.tasks)} ({n} documents)", ylabel="value")
        return TaskResult(
            task=self.name, primary=primary, metrics=metrics,
            higher_is_better=better.get(f"{task_of_primary}/{metric_of_primary.split(',')[0]}", True),
            n=n, samples=flatten_samples(out.get("samples", {})), plots=[plot],
            details={"lm_eval_version": getattr(lm_eval, "__version__", "?"), "tasks": list(cfg.tasks),
                     "include_path": cfg.include_path, "num_fewshot": cfg.num_fewshot, "limit": cfg.limit,
                     "higher_is_better": better, "n_samples": n_samples,
                     "versions": out.get("versions", {}), "n_shot": out.get("n-shot", {})})


TASK = LmEval()
