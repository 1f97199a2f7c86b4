"""The trainer: one loop for every pipeline, talking only to Engines and an Objective.

One step
    1. read grad_accum micro-batches for this rank at the global data cursor
    2. micro_batches = objective.experience(step, engines, data)
    3. N = all_reduce(sum of objective.units(mb))           the step's global count of loss terms
    4. for each micro-batch: loss = objective.loss(engines, mb, N); engine.backward(loss)
       (inside engine.no_sync() for all but the last, so data-parallel engines reduce once)
    5. grad norm (clipped); a non-finite loss or norm skips the update and says which step
    6. engine.step(); engine.zero_grad()

The run folder (out_dir/name) holds config.toml (the resolved config), tokenizer.json, metrics.jsonl
and checkpoints/step-N (see workbench.checkpoint.run). `resume=True` continues from the newest complete
checkpoint (weights, optimizer and schedule state, the data cursor), refusing config changes that would
make it a different run (see RESUMABLE_CHANGES); with no checkpoint yet it starts the run.

This is the spine's trainer: single engine, LM objective, the in-memory packed corpus. The data and
training issue adds shards, validation, schedules, plots and signal handling on the same loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from workbench.checkpoint.run import latest_checkpoint, load_for_resume, save_checkpoint
from workbench.config import dumps_toml, flatten, load_config, to_dict
from workbench.data.cursor import DataCursor
from workbench.data.packed import PackedTokens, collate
from workbench.data.tokenizer import Tokenizer, check_fits
from workbench.errors import ConfigError, DataError, WorkbenchError
from workbench.inference.generator import KVCacheGenerator, SamplingParams
from workbench.job import JobConfig
from workbench.models.base import build_model, count_params
from workbench.parallel.single import SingleEngine
from workbench.train.objectives.lm import LMObjective
from workbench.train.optim import build_adamw, build_scheduler


def pick_device(name: str, what: str = "config key 'run.device'") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError(f"{what}: 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def prepare_tokenizer(job: JobConfig, documents: list) -> Tokenizer:
    if job.data.tokenizer:
        return Tokenizer.from_file(job.data.tokenizer)
    from data_pipelines.tokenizer import train_bpe

    return train_bpe((d.text for d in documents), job.data.vocab_size)


def build_dataset(job: JobConfig, log=print, tokenizer: Tokenizer | None = None) -> tuple[PackedTokens, Tokenizer]:
    """The packed corpus, tokenized with `tokenizer` (a resumed run's own) or one prepared from the config."""
    from data_pipelines.corpus import load_documents

    t0 = time.perf_counter()
    docs = load_documents(job.data.source or None, max_bytes=job.data.max_bytes)
    tokenizer = tokenizer or prepare_tokenizer(job, docs)
    token_lists = tokenizer.encode_batch([d.text for d in docs])
    total = sum(len(t) + 1 for t in token_lists)
    if total < job.data.seq_len + 1:
        raise DataError(f"config key 'data.seq_len': {job.data.seq_len} is longer than the whole corpus "
                        f"({total} tokens); lower it or give more data (data.source, data.max_bytes)")
    data = PackedTokens.from_documents(token_lists, tokenizer.eos_id, job.data.seq_len, seed=job.run.seed)
    log(f"data: {len(docs)} documents, {len(data.tokens):,} tokens, {len(data)} samples of "
        f"{job.data.seq_len} (tokenizer: {tokenizer.vocab_size} tokens) in {time.perf_counter() - t0:.1f}s")
    return data, tokenizer


# What a resumed run may change: nothing that shapes the model, the data order or the optimizer's state.
RESUMABLE_CHANGES = frozenset({
    "run.name", "run.out_dir", "run.device",
    "train.log_every", "train.ckpt_every", "train.keep_last", "train.sample_prompt", "train.sample_tokens",
})


def check_resumable(saved: JobConfig, job: JobConfig, where: Path) -> None:
    old, new = flatten(to_dict(saved)), flatten(to_dict(job))
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            raise ConfigError(
                f"config key '{key}': --resume keeps the run's settings, and {where} has {old.get(key)!r} "
                f"where this config has {new.get(key)!r}")


class Trainer:
    def __init__(self, job: JobConfig, run_dir: str | Path | None = None, resume: bool = False, log=print):
        """`resume`: continue the run folder's newest complete checkpoint if it has one, else start it."""
        if job.parallel.backend != "single":
            raise WorkbenchError(
                f"config key 'parallel.backend': {job.parallel.backend!r} is not available yet (only 'single')")
        self.job, self.log = job, log
        self.run_dir = Path(run_dir) if run_dir is not None else Path(job.run.out_dir) / job.run.name
        self.device = pick_device(job.run.device)
        torch.manual_seed(job.run.seed)
        self.resume_from = latest_checkpoint(self.run_dir)
        if self.resume_from is not None and not resume:
            raise WorkbenchError(
                f"run folder {self.run_dir} already has checkpoints: pass --resume to continue it, "
                f"or choose another --run.name")
        if self.resume_from is not None:
            check_resumable(load_config(JobConfig, self.run_dir / "config.toml"), job, self.run_dir / "config.toml")

        saved_tokenizer = Tokenizer.from_file(self.run_dir / "tokenizer.json") if self.resume_from else None
        self.data, self.tokenizer = build_dataset(job, log, saved_tokenizer)
        check_fits(self.tokenizer, job.model.config.vocab_size)
        self.model = build_model(job.model, self.device)
        optimizer = build_adamw(self.model, job.optim)
        scheduler = build_scheduler(optimizer, job.optim, job.train.steps)
        autocast = torch.bfloat16 if job.run.precision == "bf16" else None
        self.engine = SingleEngine(self.model, optimizer, scheduler, autocast_dtype=autocast)
        self.objective = LMObjective()
        self.cursor = DataCursor()
        self.step = 0
        if self.resume_from is not None:
            model_state, train_state, engine_state = load_for_resume(self.resume_from)
            self.model.load_state_dict(model_state)
            self.engine.load_state_dict(engine_state)
            self.cursor.load_state_dict(train_state["cursor"])
            self.step = train_state["step"]
            self._truncate_metrics(self.step)
            log(f"resumed from {self.resume_from} at step {self.step}")
        else:  # the run folder describes itself before the first checkpoint
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(self.run_dir / "tokenizer.json")
        (self.run_dir / "config.toml").write_text(dumps_toml(job))
        self.saved_step = self.step

    def _truncate_metrics(self, step: int) -> None:
        """Drop records logged after the checkpoint being resumed: those steps run again."""
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------------------------------------

    def next_micro_batches(self) -> list[dict]:
        e = self.engine
        out = []
        for _ in range(self.job.train.grad_accum):
            idx = self.cursor.take(self.job.train.micro_batch_size, e.rank, e.world_size)
            batch = collate([self.data.sample(i) for i in idx])
            out.append({k: v.to(self.device) for k, v in batch.items()})
        return out

    def train_step(self) -> dict:
        engines = {"policy": self.engine}
        micro_batches = self.objective.experience(self.step, engines, self.next_micro_batches())
        total = self.engine.all_reduce(
            torch.tensor(sum(self.objective.units(mb) for mb in micro_batches), device=self.device))
        total_units = int(total)
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for i, mb in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else self.engine.no_sync():
                out = self.objective.loss(engines, mb, total_units)
                self.engine.backward(out.loss)
            loss_sum += out.loss.detach()
            tokens += out.units.get("tokens", 0)
        loss = float(self.engine.all_reduce(loss_sum))
        grad_norm = float(self.engine.clip_grad_norm(self.job.optim.grad_clip))
        lr = self.engine.lr
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.log(f"step {self.step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                     f"the update is not applied")
            self.engine.zero_grad()
        else:
            self.engine.step()
            self.engine.zero_grad()
        self.step += 1
        return {"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                "tokens": tokens * self.engine.world_size, "skipped": skipped}

    def save(self) -> Path:
        train_state = {"step": self.step, "cursor": self.cursor.state_dict()}  # the rest is in config.toml
        path = save_checkpoint(self.run_dir, self.step, self.engine.model_state_dict(), train_state,
                               self.engine.state_dict(), keep_last=self.job.train.keep_last)
        self.saved_step = self.step
        return path

    def fit(self) -> list[dict]:
        job = self.job
        n_params = count_params(self.model)
        self.log(f"model: {job.model.family} {job.model.flavor}, {n_params:,} parameters, on {self.device}")
        self.log(f"run folder: {self.run_dir}")
        history = []
        mode = "a" if self.resume_from is not None else "w"
        t_last, tokens_since = time.perf_counter(), 0
        bar = tqdm(total=job.train.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not self.engine.is_main)
        with open(self.run_dir / "metrics.jsonl", mode) as metrics:
            while self.step < job.train.steps:
                rec = self.train_step()
                tokens_since += rec["tokens"]
                history.append(rec)
                if self.step % job.train.log_every == 0 or self.step == job.train.steps:
                    now = time.perf_counter()
                    rec["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                    t_last, tokens_since = now, 0
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
                if job.train.ckpt_every and self.step % job.train.ckpt_every == 0 and self.step < job.train.steps:
                    self.save()
        bar.close()
        if self.step > self.saved_step:
            self.log(f"checkpoint: {self.save()}")
        return history

    def sample(self, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
        with self.engine.gather_for_generation() as model:
            gen = KVCacheGenerator(model, self.tokenizer)
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed)
            return gen.generate([self.tokenizer.encode(prompt)], params)[0].text
