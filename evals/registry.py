"""The task registry: one task per file under `evals/tasks/`, found by name.

A task file defines `TASK`, an object with
    name          what `--task` calls it (the file's stem)
    description   one line, shown by `workbench eval --list`
    Config        a dataclass of the task's options, set from the command line as `--NAME.key value` and
                  validated like every other config (unknown keys and bad values name the key)
    run(ctx, cfg) -> TaskResult

and nothing else is needed: the registry imports every module of the package, so a later issue adds a
task by adding a file. A task that scores something other than a language model names it in an optional
`model_kind` ("diffusion": `EvalContext.model` is then a `workbench.train.diffusion.DiffusionRun`, and
tokenizer and generator are None); evals/runner.py loads it. `EvalContext` is what a task gets: the model and tokenizer, a Generator, the
scoring defaults, where the model came from, the run's config when it came from a run folder, and the
folder to write plots into.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from evals import scoring
from workbench.errors import DataError, WorkbenchError
from workbench.inference.generator import Completion, Generator, SamplingParams


@dataclass
class TaskResult:
    """What a task measured. `metrics[primary]` is the headline; `baselines` are what it is compared with
    (chance, a uniform or unigram model), in the primary metric's units; `samples` are every scored item
    (written to samples/<task>.jsonl); `plots` are file names the task wrote into `EvalContext.out_dir`."""

    task: str
    primary: str
    metrics: dict[str, float]
    higher_is_better: bool = True
    baselines: dict[str, float] = field(default_factory=dict)
    n: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.primary not in self.metrics:
            raise ValueError(f"task {self.task}: the primary metric {self.primary!r} is not among its metrics")

    def summary(self) -> dict:
        """The JSON form kept in results.json (samples go to their own file)."""
        out = asdict(self)
        out.pop("samples")
        return out


@dataclass
class EvalContext:
    model: torch.nn.Module
    tokenizer: Any  # workbench.data.tokenizer.Tokenizer
    generator: Generator
    out_dir: Path
    source: dict[str, Any]  # {"ckpt", "run_dir", "step"} or {"hf_dir"}
    job: Any = None  # the run's JobConfig when the model came from a run folder
    batch_size: int = 16
    max_length: int = 2048
    log: Callable[[str], None] = print

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 desc: str | None = None) -> list[Completion]:
        """Completions of token-id prompts in batches (a chat reply stops at the `stop_token_ids` of its params:
        `chat_prompts` gives them)."""
        return scoring.generate(self.generator, prompts, params, self.batch_size, progress=desc)

    def chat_prompts(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int,
                     option: str = "max_new_tokens", skip_long: bool = False) -> tuple[list, list[int]]:
        """(prompt ids asking for the next assistant turn of each conversation, the stop ids) through the chat
        template (`workbench.data.chat`); a prompt that does not fit the window with `max_new_tokens` is an error
        (a conversation cut at its start loses its question), or None in its place with `skip_long`."""
        from workbench.data.chat import ChatTemplate

        template = ChatTemplate(self.tokenizer)
        prompts = [template.prompt_ids(c) for c in conversations]
        room = self.max_length - max_new_tokens
        long = [len(p) for p in prompts if len(p) > room]
        if skip_long:
            return [p if len(p) <= room else None for p in prompts], template.stop_ids
        if long:
            raise WorkbenchError(f"{len(long)} of {len(prompts)} chat prompts (the longest {max(long)} tokens) do not "
                                 f"fit with {option} = {max_new_tokens} in the scoring window of {self.max_length} "
                                 f"tokens: lower {option} or raise --max-length")
        return prompts, template.stop_ids

    def score(self, requests: Sequence[scoring.Request], desc: str | None = None):
        return scoring.score(self.model, requests, self.batch_size, self.max_length, progress=desc)


class Task(Protocol):
    name: str
    description: str
    Config: type

    def run(self, ctx: EvalContext, cfg: Any) -> TaskResult: ...


_TASKS: dict[str, Task] | None = None


def tasks() -> dict[str, Task]:
    """Every registered task by name (the modules of evals.tasks, imported once)."""
    global _TASKS
    if _TASKS is None:
        import evals.tasks as package

        found: dict[str, Task] = {}
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            task = getattr(module, "TASK", None)
            if task is None:
                raise RuntimeError(f"evals/tasks/{info.name}.py defines no TASK")
            if task.name != info.name:
                raise RuntimeError(f"evals/tasks/{info.name}.py: TASK.name is {task.name!r}, not the file's name")
            found[task.name] = task
        _TASKS = found
    return _TASKS


def get(name: str) -> Task:
    known = tasks()
    if name not in known:
        raise WorkbenchError(f"unknown eval task {name!r}; known tasks: {', '.join(known)} "
                             f"(`workbench eval --list` describes them)")
    return known[name]


def data_file(path: str | Path, option: str) -> Path:
    """`path` as an existing file, or a DataError naming the file and the option that set it."""
    p = Path(path)
    if not p.is_file():
        state = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise DataError(f"{option}: data file {p} {state}")
    return p


def read_jsonl(path: str | Path, option: str, required: Sequence[str]) -> list[dict]:
    """The records of a jsonl file; a missing file, a line that is not a JSON object or lacks a required
    key is an error naming the file and line."""
    from workbench.data.examples import jsonl_records

    p = data_file(path, option)
    records = []
    for i, rec in jsonl_records(p):
        missing = [k for k in required if k not in rec]
        if missing:
            raise DataError(f"{p}:{i}: missing key {missing[0]!r} (each line needs {', '.join(required)})")
        records.append(rec)
    if not records:
        raise DataError(f"{option}: data file {p} has no records")
    return records
