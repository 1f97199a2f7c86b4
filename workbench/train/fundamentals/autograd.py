"""Task "autograd": train the NumPy autograd engine's MLP or small CNN on scikit-learn's digits.

What it does
    Loads the digits (`workbench.data.images.load_images("digits")`: 8x8 grey images, stratified train / val /
    test splits from run.seed), converts them to NumPy, builds the engine's `MLP` or `SmallCNN`
    (workbench/models/fundamentals/autograd/), and trains it with the engine's own loop
    (`autograd.train.fit`) under the [train] section: epochs, batch_size, optimizer (the engine's SGD with
    momentum / Nesterov or AdamW), lr with the same warm-up + cosine multiplier as the torch runner,
    grad_clip, max_steps, log_every, ckpt_every. No torch op touches the model: torch appears only to hand
    arrays to the run folder's safetensors checkpoints and, with `compare_torch`, in the reference twin.

    It records, on the held-out test split (touched once, after training):
        test_accuracy, test_loss     the engine's model
        chance_accuracy              1 / K
        majority_accuracy            always predicting the most frequent training class
        margin                       test_accuracy minus the better of the two baselines
    and a confusion matrix (autograd-confusion.png). With `compare_torch = true` the same architecture is
    built in torch.nn from the same initial weights, trained on the same batches with torch.optim and the
    same schedule, and its test accuracy and milliseconds per step are recorded beside the engine's.

The loop and the run folder
    metrics.jsonl gets train records (loss, acc, lr, grad_norm, items_per_s) every log_every steps and
    val_loss / val_acc at step 0 and after every epoch. A checkpoint holds the weights (model.safetensors),
    the optimizer's state (moments or momentum buffers and the step count, as opt.* tensors), the position
    in the epoch and the dropout generator's state, so `--resume` continues the same run exactly (epoch e's
    batch order is a permutation drawn from (seed, e)). Ctrl-C / SIGTERM save a checkpoint and stop.

Design choices
    float32 by default for speed (the engine keeps float32 end to end); float64 is there for checking.
    The digits are used as they are, in [0, 1]: no standardisation layer, so the twin comparison is
    layer for layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from workbench.config import fail, field_
from workbench.models.fundamentals.autograd import (
    MLP,
    SGD,
    AdamW,
    Dropout,
    Module,
    Position,
    SmallCNN,
    evaluate,
    fit,
)
from workbench.models.fundamentals.autograd.optim import Optimizer
from workbench.models.fundamentals.autograd.train import epoch_order, lr_at
from workbench.train.fundamentals.runner import Context, Interrupted, Task

DIGITS_SIDE = 8  # load_images("digits") gives 8x8 images


@dataclass
class Config:
    model: Literal["mlp", "cnn"] = field_("mlp", doc="mlp: Flatten + Linear/ReLU layers; cnn: conv-relu-pool blocks")
    hidden: list[int] = field_([128], doc="mlp: the hidden layer widths ([] = logistic regression)")
    channels: list[int] = field_([16, 32], doc="cnn: output channels of each conv-relu-pool(2) block")
    kernel_size: int = field_(3, gt=0, doc="cnn: the convolution kernel (odd; padded to keep the size)")
    dropout: float = field_(0.0, ge=0, lt=1, doc="mlp: after each hidden ReLU; cnn: before the last Linear; 0 = off")
    dtype: Literal["float32", "float64"] = field_("float32", doc="the engine's float type")
    n: int = field_(0, ge=0, doc="a seeded subset of the 1797 digits (0 = all)")
    val_fraction: float = field_(0.1, ge=0, lt=1, doc="share of the training pool held out for validation")
    eval_batch_size: int = field_(512, gt=0)
    compare_torch: bool = field_(False, doc="also train the same model in torch from the same start; "
                                            "record its test accuracy and ms per step")

    def validate(self) -> None:
        from workbench.data.images import image_options_error

        if bad := image_options_error("digits", self.n, 0):
            fail(*bad)
        if any(h < 1 for h in self.hidden):
            fail("hidden", f"expected positive widths, got {self.hidden}")
        if self.model == "cnn":
            if not self.channels or any(c < 1 for c in self.channels):
                fail("channels", f"expected a non-empty list of positive channel counts, got {self.channels}")
            blocks = int(math.log2(DIGITS_SIDE))
            if len(self.channels) > blocks:
                fail("channels", f"at most {blocks} blocks: each halves the {DIGITS_SIDE}x{DIGITS_SIDE} digits, "
                                 f"got {len(self.channels)}")
            if self.kernel_size % 2 == 0:
                fail("kernel_size", f"expected an odd size (padding k // 2 keeps the image size), got {self.kernel_size}")


def build_model(cfg: Config, shape: tuple[int, int, int], k: int, seed: int) -> Module:
    """The engine's model, initialised from `seed` (so the torch twin can start from the same weights)."""
    dtype = np.dtype(cfg.dtype)
    init = np.random.default_rng([seed, 0])
    drop = np.random.default_rng([seed, 1])  # dropout masks: a generator of their own, saved in checkpoints
    c, h, w = shape
    if cfg.model == "mlp":
        return MLP(c * h * w, list(cfg.hidden), k, dropout=cfg.dropout, rng=init, dropout_rng=drop, dtype=dtype)
    return SmallCNN(c, h, list(cfg.channels), k, kernel_size=cfg.kernel_size, dropout=cfg.dropout, rng=init,
                    dropout_rng=drop, dtype=dtype)


def dropout_rng(model: Module) -> np.random.Generator | None:
    """The generator the model's dropout layers draw from (None without dropout)."""
    return next((m.rng for m in model.modules() if isinstance(m, Dropout)), None)


def build_optimizer(model: Module, train) -> Optimizer:
    if train.optimizer == "sgd":
        return SGD(model.parameters(), lr=train.lr, momentum=train.momentum, nesterov=train.nesterov,
                   weight_decay=train.weight_decay)
    return AdamW(model.parameters(), lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def run(ctx: Context, cfg: Config) -> None:
    from workbench.data.images import load_images
    from workbench.train.fundamentals.plots import class_baselines, confusion_matrix, plot_confusion

    t, seed = ctx.job.train, ctx.job.run.seed
    if ctx.device.type != "cpu":
        ctx.log(f"autograd: the NumPy engine runs on the CPU (run.device resolved to {ctx.device}; the torch twin "
                f"uses it)")
    data = load_images("digits", seed=seed, val_fraction=cfg.val_fraction, n=cfg.n)
    ctx.log(f"autograd: {data.summary()}")
    dtype = np.dtype(cfg.dtype)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        (x.numpy().astype(dtype), y.numpy()) for x, y in (data.train, data.val, data.test))
    k = len(data.classes)
    model = build_model(cfg, data.shape, k, seed)
    opt = build_optimizer(model, t)
    per_epoch = math.ceil(len(y_train) / t.batch_size)
    total = ctx.total_steps(len(y_train))
    ctx.log(f"autograd: {cfg.model} in {cfg.dtype}, {model.num_parameters():,} parameters, {per_epoch} batches "
            f"of {t.batch_size} per epoch, {total} steps, optimizer {t.optimizer}")

    base = class_baselines(torch.from_numpy(y_train), torch.from_numpy(y_test), k)
    ctx.runlog.ylabel = "cross-entropy (nats/image)"
    ctx.runlog.baselines["uniform guess (log K)"] = base["uniform_loss"]
    ctx.runlog.baselines["class prior"] = base["prior_loss"]

    pos = Position()
    resumed = ctx.resume_state()
    if resumed is not None:
        tensors, state, extra = resumed
        model.load_state_dict({name: v.numpy() for name, v in tensors.items()})
        opt.load_state_dict({name[4:]: v.numpy() for name, v in extra.items() if name.startswith("opt.")})
        if state.get("dropout_rng") and dropout_rng(model) is not None:
            dropout_rng(model).bit_generator.state = state["dropout_rng"]
        pos = Position(epoch=state["epoch"], batch=state["batch"], step=state["step"])
    saved_at = pos.step if resumed is not None else -1

    def save(p: Position) -> None:
        nonlocal saved_at
        if saved_at == p.step:
            return
        saved_at = p.step
        rng = dropout_rng(model)
        ctx.checkpoint(p.step, {name: torch.from_numpy(a) for name, a in model.state_dict().items()},
                       {"epoch": p.epoch, "batch": p.batch,
                        "dropout_rng": rng.bit_generator.state if rng is not None else None},
                       {f"opt.{name}": torch.from_numpy(np.ascontiguousarray(a)) for name, a in opt.state_dict().items()})

    def validate(p: Position) -> None:
        if len(y_val) == 0:
            return
        m = evaluate(model, x_val, y_val, cfg.eval_batch_size)
        ctx.runlog.write({"step": p.step, "epoch": p.epoch, "val_loss": m["loss"], "val_acc": m["accuracy"]})
        ctx.log(f"step {p.step} (epoch {p.epoch}): val loss {m['loss']:.4f}, val acc {m['accuracy']:.4f}")

    last_log = [time.perf_counter()]

    def on_log(p: Position, m: dict) -> None:
        now = time.perf_counter()
        ctx.runlog.write({"step": p.step, "epoch": p.epoch, "loss": m["loss"], "acc": m["accuracy"], "lr": m["lr"],
                          "grad_norm": m["grad_norm"], "items_per_s": m["examples"] / max(now - last_log[0], 1e-9)})
        last_log[0] = now
        bar.update(p.step - bar.n)
        bar.set_postfix(loss=f"{m['loss']:.4f}")

    def on_epoch(p: Position) -> None:
        validate(p)
        if t.ckpt_every and p.epoch % t.ckpt_every == 0 and p.step < total:
            save(p)

    if pos.step == 0:
        validate(pos)
    start_step = pos.step
    bar = ctx.progress_bar(total, pos.step)
    t0 = time.perf_counter()
    with ctx.signals():
        pos = fit(model, opt, x_train, y_train, epochs=t.epochs, batch_size=t.batch_size, seed=seed, lr=t.lr,
                  schedule=t.schedule, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio,
                  grad_clip=t.grad_clip, max_steps=t.max_steps, log_every=t.log_every, start=pos,
                  on_log=on_log, on_epoch=on_epoch, should_stop=lambda: ctx.stop_signal is not None)
        seconds = time.perf_counter() - t0
        bar.close()
        if pos.batch and saved_at != pos.step:  # stopped mid-epoch (max_steps or a signal)
            validate(pos)
        save(pos)
    if ctx.stop_signal is not None:
        raise Interrupted(ctx.stop_signal, pos.step)

    result = evaluate(model, x_test, y_test, cfg.eval_batch_size)
    acc, pred = result["accuracy"], result["pred"]
    best_base = max(base["chance"], base["majority"])
    what = f"{cfg.model} ({cfg.dtype}) in the NumPy engine"
    ctx.result("test_accuracy", acc, f"{len(y_test)} held-out test digits, {what}")
    ctx.result("test_loss", result["loss"], "cross-entropy, nats/image")
    ctx.result("chance_accuracy", base["chance"], f"1 / K, K = {k} classes")
    ctx.result("majority_accuracy", base["majority"],
               f"always '{data.classes[base['majority_class']]}' (the most frequent training class)")
    ctx.result("margin", acc - best_base, "test accuracy minus the better of the two baselines")
    ctx.result("parameters", model.num_parameters(), what)
    steps_now = pos.step - start_step
    if steps_now:
        ctx.result("engine_ms_per_step", round(1000 * seconds / steps_now, 3),
                   f"wall time of the engine's loop (per-epoch validation included) / {steps_now} steps, "
                   f"batch {t.batch_size}")
    ctx.log(f"autograd: test accuracy {acc:.4f} (chance {base['chance']:.4f}, majority {base['majority']:.4f})")
    cm = confusion_matrix(torch.from_numpy(y_test), torch.from_numpy(pred), k)
    plot_confusion(cm, data.classes, ctx.figure("autograd-confusion.png",
                                                f"confusion matrix of the engine's {cfg.model} on the held-out "
                                                f"digits test set (rows: true class)"),
                   title=f"autograd engine {cfg.model} · digits")

    if cfg.compare_torch:
        twin = torch_twin(cfg, data.shape, k, build_model(cfg, data.shape, k, seed))
        pred_t, ms = train_torch_twin(twin, ctx, (x_train, y_train), (x_val, y_val), x_test, total)
        acc_t = float((pred_t == y_test).mean())
        ctx.result("torch_test_accuracy", acc_t, "the same architecture in torch.nn, the same initial weights, "
                                                 "batches and schedule, torch.optim")
        ctx.result("torch_agreement", float((pred_t == pred).mean()),
                   "share of the test digits on which the engine and the torch twin predict the same class")
        ctx.result("torch_ms_per_step", round(ms, 3), f"the torch twin's loop on the CPU, {total} steps, "
                                                      f"{torch.get_num_threads()} thread(s)")
        ctx.log(f"autograd: torch twin test accuracy {acc_t:.4f}, {ms:.2f} ms/step")


# ----------------------------------------------------------------------------------------------------
# The torch twin (the reference the engine is compared with)


def torch_twin(cfg: Config, shape: tuple[int, int, int], k: int, start: Module) -> torch.nn.Module:
    """torch.nn layers in the engine model's order, holding `start`'s (initial) weights."""
    nn = torch.nn
    c, h, _ = shape
    layers: list[torch.nn.Module] = []
    if cfg.model == "mlp":
        width = c * h * h
        layers.append(nn.Flatten())
        for hid in cfg.hidden:
            layers += [nn.Linear(width, hid), nn.ReLU()] + ([nn.Dropout(cfg.dropout)] if cfg.dropout else [])
            width = hid
        layers.append(nn.Linear(width, k))
    else:
        size = h
        for out in cfg.channels:
            layers += [nn.Conv2d(c, out, cfg.kernel_size, padding=cfg.kernel_size // 2), nn.ReLU(), nn.MaxPool2d(2)]
            c, size = out, size // 2
        layers += [nn.Flatten()] + ([nn.Dropout(cfg.dropout)] if cfg.dropout else []) + [nn.Linear(c * size * size, k)]
    net = nn.Sequential(*layers).to(torch.float64 if cfg.dtype == "float64" else torch.float32)
    ours, theirs = start.parameters(), list(net.parameters())
    assert [p.shape for p in ours] == [tuple(q.shape) for q in theirs], "the twin's layers must mirror the engine's"
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            q.copy_(torch.from_numpy(p.data))
    return net


def train_torch_twin(net: torch.nn.Module, ctx: Context, train, val, x_test: np.ndarray,
                     total: int) -> tuple[np.ndarray, float]:
    """Train the twin on the engine's batches and schedule; (its test predictions, ms per step)."""
    t, seed = ctx.job.train, ctx.job.run.seed
    device = ctx.device
    net.to(device)
    x, y = (torch.from_numpy(a).to(device) for a in train)
    params = list(net.parameters())
    opt = ctx.build_optimizer(params)  # the torch runner's SGD / AdamW from the same [train] settings
    xv, yv = (torch.from_numpy(a).to(device) for a in val)
    step, epoch = 0, 0
    t0 = time.perf_counter()
    while step < total:
        order = torch.from_numpy(epoch_order(len(y), seed, epoch)).to(device)
        for b in range(math.ceil(len(y) / t.batch_size)):
            if step >= total:
                break
            idx = order[b * t.batch_size:(b + 1) * t.batch_size]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, t.lr, t.schedule, t.warmup_steps, t.min_lr_ratio)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip or float("inf"))
            opt.step()
            step += 1
        epoch += 1
        if len(yv):  # the engine validates every epoch too: keep the two loops doing the same work
            net.eval()
            with torch.no_grad():
                torch.nn.functional.cross_entropy(net(xv), yv)
            net.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - t0) / max(step, 1)
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(x_test).to(device)).argmax(1).cpu().numpy()
    return pred, ms


TASKS = {"autograd": Task(config=Config, run=run)}
