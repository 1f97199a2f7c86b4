"""Optimizers and learning-rate schedules built from the `[optim]` section.

`optim.name`: AdamW (the default), SGD with optional momentum, or Muon (muon.py: Newton-Schulz-orthogonalised
momentum for hidden matrices, AdamW for embeddings, the head, norms and biases; with `qk_clip_tau > 0` it is
Kimi K2's MuonClip, whose QK-Clip hook the trainer calls after each step). SGD is there for layout tests: its update
is linear in the gradient, so two layouts that reduce gradients in a different order give weights equal to
rounding, where AdamW's division by sqrt(v) amplifies that noise in coordinates with tiny gradients.

Weight decay applies to matrices only (AdamW's is decoupled; SGD's is torch's L2 term, added to the
gradient and so carried by momentum): norms' gains and embeddings are not decayed
(decaying a gain toward 0 fights the normalization it scales; decaying embeddings shrinks rare tokens).

Schedules, as a multiplier on `lr` at step s (0-based, applied before the step's update):
    warmup     (s + 1) / warmup_steps                           for s < warmup_steps
    constant   1
    cosine     r + (1 - r) * (1 + cos(pi * p)) / 2,  p = (s - warmup) / (steps - warmup),  r = min_lr_ratio
    wsd        1                                                for warmup <= s < d0
               1 - (1 - r) * p,  p = (s - d0) / (steps - d0)    for s >= d0  (p capped at 1)
               d0 = max(warmup, steps - max(1, round(decay_fraction * steps)))

Both decaying schedules reach their floor r at s == steps, one past the last update: the last update
(s = steps - 1) runs at r + (1 - r) / (steps - d0) under wsd, and a little above r under cosine. wsd
(warmup-stable-decay) holds the peak lr for most of the run and decays linearly over its last
`decay_fraction` of the steps (never into the warmup), so a stable-phase checkpoint can be branched
into a shorter decay without retraining.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


TORCH_NAMES = {"adamw": "AdamW", "sgd": "SGD"}
"""optim.name -> the torch.optim class (also the name a DeepSpeed config gives it)."""


def optimizer_kwargs(optim) -> dict:
    """The hyperparameters of `optim.name` as torch.optim keyword arguments (a DeepSpeed config's too);
    the weight decay is the default that param_groups sets per group anyway."""
    if optim.name == "sgd":
        return {"lr": optim.lr, "momentum": optim.momentum}
    return {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}


def build_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    """`optim.name` over the model's parameter groups (see param_groups; Muon's own in muon.py). With
    `optim.qk_clip_tau > 0` it also turns on the attention modules' logit recording for QK-Clip."""
    from workbench.train.optim.muon import Muon, enable_qk_clip, muon_param_groups

    if getattr(optim, "qk_clip_tau", 0) > 0 and not enable_qk_clip(model):
        raise ValueError(f"optim.qk_clip_tau = {optim.qk_clip_tau}: {type(model).__name__} has no attention module "
                         f"that supports QK-Clip")
    if optim.name == "muon":
        return Muon(muon_param_groups(model, optim.weight_decay), lr=optim.lr, momentum=optim.muon_momentum,
                    ns_steps=optim.ns_steps, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    kwargs = optimizer_kwargs(optim)
    if optim.name == "adamw":
        kwargs["fused"] = next(model.parameters()).device.type == "cuda"
    return getattr(torch.optim, TORCH_NAMES[optim.name])(param_groups(model, optim.weight_decay), **kwargs)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float,
                  decay_fraction: float = 0.2) -> float:
    """The lr multiplier at 0-based step `step`; see the module docstring for each schedule's formula."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        if not 0 < decay_fraction <= 1:
            raise ValueError(f"wsd decay_fraction must be in (0, 1], got {decay_fraction}")
        decay_start = max(warmup_steps, total_steps - max(1, round(decay_fraction * total_steps)))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}: expected 'constant', 'cosine' or 'wsd'")
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    # r + (1 - r) * (1 + cos(pi p)) / 2
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    decay_fraction = getattr(optim, "decay_fraction", 0.2)  # OptimSection gains this field with "wsd"
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(s, total_steps, optim.warmup_steps, optim.schedule, optim.min_lr_ratio,
                                decay_fraction),
    )
