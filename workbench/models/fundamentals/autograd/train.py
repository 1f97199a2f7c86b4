"""A training loop for the NumPy autograd engine: shuffled mini-batches, a learning-rate schedule, gradient
clipping, periodic evaluation, and a resumable position.

What it is
    `fit` trains a classifier with cross-entropy on in-memory arrays. It knows nothing about run folders:
    the caller passes hooks (`on_log` every `log_every` steps, `on_epoch` after each epoch, where it
    evaluates and checkpoints) and gets back the loop's position, which is all a checkpoint needs besides
    the weights, the optimizer state and the dropout generator's state.

The math
    Each epoch e visits the training set in the order perm_e = permutation(n) drawn from a generator
    seeded with (seed, e); the batches are consecutive slices of perm_e of `batch_size` (the last one may
    be shorter). One step: loss = mean cross-entropy of the batch, backward, clip, optimizer step.
    Learning rate at step t (0-based) of T: lr_t = lr * min(1, (t + 1) / warmup) * c_t with
        c_t = 1                                            (constant)
        c_t = r + (1 - r) 0.5 (1 + cos(pi (t - warmup) / (T - warmup)))   for t >= warmup
    (cosine from lr down to r lr; r = min_lr_ratio, the same multiplier as workbench.train.optim).
    `on_log` also gets `examples`, the number of training examples since the previous log.

The intuition and the design choices
    The order depends only on (seed, epoch), so a run stopped after batch b of epoch e resumes by
    redrawing perm_e and skipping b batches: the resumed run sees exactly the batches the uninterrupted
    one would have, and with the weights and optimizer state restored it follows the same trajectory.
    Evaluation runs under no_grad in eval mode, in batches, and returns loss, accuracy and predictions.

Sources
    Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", arXiv 1608.03983 (cosine
    schedule); Goyal et al., arXiv 1706.02677 (linear warm-up).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from workbench.models.fundamentals.autograd.functional import cross_entropy
from workbench.models.fundamentals.autograd.nn import Module
from workbench.models.fundamentals.autograd.optim import Optimizer, clip_grad_norm
from workbench.models.fundamentals.autograd.tensor import Tensor, no_grad

__all__ = ["Position", "epoch_order", "lr_at", "evaluate", "fit"]


@dataclass
class Position:
    """Where the loop is: `epoch` epochs are complete, plus `batch` batches of the next; `step` in total."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch `epoch`: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def lr_at(step: int, total: int, lr: float, schedule: str = "constant", warmup: int = 0,
          min_lr_ratio: float = 0.0) -> float:
    # linear warm-up: lr * (t + 1) / warmup for the first `warmup` steps
    scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine" and step >= warmup:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        # c_t = r + (1 - r) 0.5 (1 + cos(pi (t - warmup) / (T - warmup)))
        scale *= min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    return lr * scale


def evaluate(model: Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> dict:
    """Mean cross-entropy, accuracy and the predicted classes of `model` on (x, y), without gradients."""
    was_training = model.training
    model.eval()
    total_loss, preds = 0.0, []
    with no_grad():
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            logits = model(Tensor(xb))
            total_loss += cross_entropy(logits, yb).item() * len(xb)
            preds.append(logits.data.argmax(axis=1))
    model.train(was_training)
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    return {"loss": total_loss / max(len(x), 1), "accuracy": float((pred == y).mean()) if len(y) else 0.0,
            "pred": pred}


def fit(model: Module, opt: Optimizer, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
        seed: int, lr: float, schedule: str = "constant", warmup_steps: int = 0, min_lr_ratio: float = 0.0,
        grad_clip: float = 0.0,
        max_steps: int = 0, log_every: int = 10, start: Position | None = None,
        on_log: Callable[[Position, dict], None] | None = None,
        on_epoch: Callable[[Position], None] | None = None,
        should_stop: Callable[[], bool] | None = None) -> Position:
    """Train until `epochs` epochs (or `max_steps` steps, when > 0) are done, from `start`.

    `on_log(pos, metrics)` gets the mean training loss / accuracy since the last log; `on_epoch(pos)` runs
    after each full epoch (evaluate and checkpoint there); `should_stop()` lets a caller stop between
    steps (a signal): the returned position then says where to resume."""
    if len(x) != len(y):
        raise ValueError(f"fit: {len(x)} inputs but {len(y)} labels")
    if batch_size < 1 or len(x) == 0:
        raise ValueError(f"fit: need batch_size >= 1 and a non-empty training set, got {batch_size} and {len(x)}")
    pos = Position(**vars(start)) if start else Position()
    per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * per_epoch if max_steps <= 0 else min(max_steps, epochs * per_epoch)
    params = model.parameters()
    window_loss, window_correct, window_seen = 0.0, 0, 0
    model.train()
    while pos.epoch < epochs and pos.step < total:
        order = epoch_order(len(x), seed, pos.epoch)
        while pos.batch < per_epoch and pos.step < total:
            if should_stop is not None and should_stop():
                return pos
            idx = order[pos.batch * batch_size:(pos.batch + 1) * batch_size]
            opt.lr = lr_at(pos.step, total, lr, schedule, warmup_steps, min_lr_ratio)
            opt.zero_grad()
            logits = model(Tensor(x[idx]))
            loss = cross_entropy(logits, y[idx])
            loss.backward()
            grad_norm = clip_grad_norm(params, grad_clip)
            opt.step()
            pos.batch += 1
            pos.step += 1
            window_loss += loss.item() * len(idx)
            window_correct += int((logits.data.argmax(axis=1) == y[idx]).sum())
            window_seen += len(idx)
            if on_log is not None and (pos.step % log_every == 0 or pos.step == total):
                on_log(pos, {"loss": window_loss / window_seen, "accuracy": window_correct / window_seen,
                             "lr": opt.lr, "grad_norm": grad_norm, "examples": window_seen})
                window_loss, window_correct, window_seen = 0.0, 0, 0
        if pos.batch == per_epoch:
            pos.epoch, pos.batch = pos.epoch + 1, 0
            if on_epoch is not None:
                on_epoch(pos)
    return pos
