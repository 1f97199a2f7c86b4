"""The Objective protocol: what a training pipeline is, apart from the loop that runs it.

    roles                      {"policy": ModelRole(trainable=True), "reference": ModelRole(False), ...}
                               each role gets its own engine; frozen ones have no optimizer
    experience(step, models, data) -> micro-batches
                               the identity for language modelling; rollouts with old log-probs
                               (generated through the Generator) for PPO and GRPO
    units(micro_batch) -> int  how many loss terms the micro-batch contributes (target tokens for LM)
    loss(models, micro_batch, total_units) -> LossOutput
                               the micro-batch's *sum* of loss terms divided by `total_units`, the
                               count over every micro-batch of the step on every rank (all-reduced
                               by the trainer before the first forward)
    data                       what it trains on: "windows" (packed text of the dataset's shards), "chat"
                               (conversations of data.train_file, targets on the assistant turns) or
                               "pairs" (prompt, chosen, rejected); workbench.data.examples reads the last two
    setup(job, tokenizer)      once, before anything else (what validation and sampling need to know)
    frozen_models(job) -> {role: (path, config key)}
                               the frozen roles the trainer loads (a run folder or checkpoint each, checked to
                               share the dataset's tokenizer): distillation's teacher, DPO's reference
    prepare(models, train, val, log) -> roles
                               once, after the engines exist and before the first step; returns the roles no
                               longer needed (DPO with precomputed reference log-probs drops its reference)
    validation_sums(models, batch) -> {name: sum}      one held-out micro-batch, as sums
    validation_metrics(sums) -> {"val_...": value}     the held-out metrics from the sums over every batch
    sample_prompt(text) -> ids, stop_ids               how the closing sample is asked for

Loss normalization (docs/architecture.md): dividing each micro-batch's sum by the global count makes the step's
loss the plain mean over all its terms, whatever the micro-batch split, accumulation depth or number of
ranks; averaging per-micro-batch means instead would weight short micro-batches more.

A new pipeline is a new objective file plus a config, never a new training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from workbench.parallel.engine import Engine


@dataclass(frozen=True)
class ModelRole:
    trainable: bool = True


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: sum of loss terms / total_units (backward on this)
    metrics: dict[str, float] = field(default_factory=dict)  # per-micro-batch values to log
    units: dict[str, int] = field(default_factory=dict)  # throughput units processed: tokens, images, rays
    # per-unit quantities as sums over the micro-batch's units (DPO's reward accuracy, a distillation divergence):
    # the trainer adds them over micro-batches and ranks and logs each divided by the step's total units
    sums: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    name: str
    roles: dict[str, ModelRole]

    def experience(self, step: int, models: dict[str, Engine], data: list[dict]) -> list[dict]: ...

    def units(self, micro_batch: dict) -> int: ...

    def loss(self, models: dict[str, Engine], micro_batch: dict, total_units: int) -> LossOutput: ...
