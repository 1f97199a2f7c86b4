"""Task "cnn": train a CNN or ResNet (workbench/models/fundamentals/cnn.py) to classify images, test it, draw it.

What it does
    1. Data (`workbench.data.images`). `dataset = "cifar10"` reads the official python batches from `data_dir`
       (the folder or its cifar-10-batches-py/ child). When they are not there, or data_dir is empty, the
       task says so in the log and uses `fallback` ("shapes", generated, or "digits", shipped with
       scikit-learn) instead; the result "dataset" records which set was used. Files that are present but
       broken are an error, never a silent fallback. Splits are drawn from run.seed.
    2. Model: the named `model` flavor with in_channels, num_classes (and the plain CNN's image_size) taken from
       the data, behind a fixed per-channel standardisation x -> (x - mean_c) / std_c whose mean and std are
       the training images' (buffers, so they travel with the checkpoint).
    3. Training through the runner's loop (`Context.fit`): cross-entropy on mini-batches, augmented on the fly
       (below); validation loss and accuracy after every epoch.
    4. Test: accuracy against two baselines that ignore the image, chance (1 / K) and the majority class
       (always answer the most frequent training class), and the margin over the better one; a confusion
       matrix (cnn-confusion.png); misclassified test images, one row per true class (cnn-errors.png); a
       few training images per class (cnn-samples.png).

Augmentation (`augment`)
    crop_flip   pad by `crop_padding` zeros on every side, cut a random window of the original size (a shift of
                up to crop_padding pixels each way), and mirror left-right with probability 1/2: the He et al.
                CIFAR recipe. Label-preserving for CIFAR-10's photos and for the shapes (every class is
                mirror-symmetric up to a rotation, and rotations are already random).
    none        what "auto" picks for digits: a mirrored 2, 3, 4, 5, 7 or 9 is no longer that digit, and an
                8x8 image has no pixels to spare for shifting.
    auto        crop_flip for cifar10 and shapes, none for digits.
    The random draws come from torch's global generator (seeded by the runner and saved in checkpoints), so
    a resumed run augments exactly as the uninterrupted one.

The loss plot shows two references: log K (the cross-entropy of a uniform guess) and the entropy of the
training class frequencies (the best loss without looking at the image); one line when the classes are balanced.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.config import fail, field_
from workbench.train.fundamentals.runner import Context, Task


@dataclass
class Config:
    dataset: Literal["cifar10", "digits", "shapes"] = field_("cifar10", doc="the image set (workbench.data.images)")
    data_dir: str = field_("", doc="cifar10: the folder with data_batch_1..5, test_batch, batches.meta")
    fallback: Literal["shapes", "digits"] = field_("shapes", doc="used when CIFAR-10 is not found in data_dir")
    model: str = field_("resnet20", doc="a flavor of workbench.models.fundamentals.cnn.FLAVORS")
    zero_init_residual: bool = field_(False, doc="resnet: start each block as the identity (last BN gamma = 0)")
    augment: Literal["auto", "crop_flip", "none"] = field_("auto", doc="auto: crop_flip except for digits")
    crop_padding: int = field_(4, ge=0, doc="crop_flip: the largest shift in pixels")
    n: int = field_(0, ge=0, doc="shapes: images rendered (0 = the default); digits, cifar10: a seeded subset")
    size: int = field_(0, ge=0, doc="0 = the dataset's own side; else render (shapes) or resize to it")
    val_fraction: float = field_(0.1, ge=0, lt=1, doc="share of the training pool held out for validation")
    eval_batch_size: int = field_(512, gt=0)
    errors_per_class: int = field_(8, ge=0, doc="misclassified test images drawn per true class; 0 = no picture")

    def validate(self) -> None:
        from workbench.data.images import find_cifar10, image_options_error
        from workbench.models.fundamentals.cnn import FLAVORS

        if self.model not in FLAVORS:
            fail("model", f"expected one of {', '.join(FLAVORS)}, got {self.model!r}")
        if self.data_dir and self.dataset != "cifar10":
            fail("data_dir", f"only read for dataset = 'cifar10' (dataset is {self.dataset!r})")
        # n and size are checked against the set the run will load: cifar10 only when its batches are there
        used = self.fallback if self.dataset == "cifar10" and find_cifar10(self.data_dir) is None else self.dataset
        if bad := image_options_error(used, self.n, self.size):
            key, message = bad
            why = (f" (for the fallback {used!r}: CIFAR-10 is not in data_dir {self.data_dir!r})"
                   if used != self.dataset else "")
            fail(key, message + why)


class Standardize(nn.Module):
    """x -> (x - mean_c) / std_c with fixed per-channel statistics of the training images."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Standardize, then the CNN: takes images in [0, 1], returns logits (B, K)."""

    def __init__(self, norm: Standardize, net: nn.Module):
        super().__init__()
        self.norm, self.net = norm, net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.norm(x))


def crop_flip(x: Tensor, padding: int, flip: bool = True) -> Tensor:
    """Random shifted crops (zero padding) and left-right mirrors of a batch x (B, C, H, W), one draw per image."""
    b, c, h, w = x.shape
    if padding:
        xp = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
        dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
        rows = dy + torch.arange(h, device=x.device)  # (B, H): the window's rows in the padded image
        cols = dx + torch.arange(w, device=x.device)  # (B, W)
        # out[b, :, i, j] = xp[b, :, rows[b, i], cols[b, j]]: (B, H, W, C) -> (B, C, H, W)
        x = xp[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2)
    if flip:
        mirror = torch.rand(b, device=x.device) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x.contiguous()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, device: torch.device, batch_size: int) -> Tensor:
    """Logits (N, K) of `model` in eval mode, computed in batches."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def run(ctx: Context, cfg: Config) -> None:
    from workbench.data.images import find_cifar10, load_images
    from workbench.models.fundamentals.cnn import build, count_parameters, flops_per_image, make_config
    from workbench.train.fundamentals.plots import (
        class_baselines,
        confusion_matrix,
        image_grid,
        plot_confusion,
    )

    seed = ctx.job.run.seed
    name, why = cfg.dataset, ""
    if name == "cifar10" and find_cifar10(cfg.data_dir) is None:
        why = (f"CIFAR-10 not found in data_dir {cfg.data_dir!r}" if cfg.data_dir else "data_dir is empty")
        ctx.log(f"cnn: {why}; using the fallback {cfg.fallback!r} (set task.data_dir to the CIFAR-10 folder)")
        name = cfg.fallback
    data = load_images(name, cfg.data_dir if name == "cifar10" else "", seed=seed,
                       val_fraction=cfg.val_fraction, n=cfg.n, size=cfg.size)
    ctx.log(f"cnn: {data.summary()}")
    ctx.result("dataset", name, data.source + (f" (fallback: {why})" if why else ""))
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = data.train, data.val, data.test
    k = len(data.classes)
    c, h, w = data.shape

    augment = cfg.augment if cfg.augment != "auto" else ("none" if name == "digits" else "crop_flip")
    mcfg = make_config(cfg.model, in_channels=c, num_classes=k, image_size=h,
                       zero_init_residual=cfg.zero_init_residual)
    mean = x_train.mean(dim=(0, 2, 3))
    std = x_train.std(dim=(0, 2, 3)).clamp(min=1e-3)
    model = Classifier(Standardize(mean, std), build(mcfg))
    ctx.log(f"cnn: {cfg.model} ({mcfg.arch}, depth {mcfg.depth}), {count_parameters(model):,} parameters, "
            f"{flops_per_image(model.net, (c, h, w)) / 1e6:.1f} MFLOP per image, augmentation {augment}")

    base = class_baselines(y_train, y_test, k)
    ctx.runlog.ylabel = "cross-entropy (nats/image)"
    if base["uniform_loss"] - base["prior_loss"] > 1e-3:
        ctx.runlog.baselines["uniform guess (log K)"] = base["uniform_loss"]
        ctx.runlog.baselines["class prior (its entropy)"] = base["prior_loss"]
    else:  # balanced classes: the two are the same line
        ctx.runlog.baselines["uniform guess = class prior (log K)"] = base["uniform_loss"]

    def loss_fn(m: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict]:
        x, y = batch
        if augment == "crop_flip":
            x = crop_flip(x, cfg.crop_padding)
        logits = m(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"acc": (logits.argmax(1) == y).float().mean().item()}

    def evaluate(m: nn.Module) -> dict[str, float]:
        if len(y_val) == 0:
            return {}
        logits = predict(m, x_val, ctx.device, cfg.eval_batch_size)
        return {"loss": F.cross_entropy(logits, y_val).item(), "acc": (logits.argmax(1) == y_val).float().mean().item()}

    t0 = time.perf_counter()
    ctx.fit(model, (x_train, y_train), loss_fn, evaluate)
    seconds = time.perf_counter() - t0

    logits = predict(model, x_test, ctx.device, cfg.eval_batch_size)
    pred = logits.argmax(1)
    acc = (pred == y_test).double().mean().item()
    best_base = max(base["chance"], base["majority"])
    ctx.result("test_accuracy", acc, f"{len(y_test)} test images, {cfg.model} on {name}")
    ctx.result("test_loss", F.cross_entropy(logits, y_test).item(), "cross-entropy, nats/image")
    ctx.result("chance_accuracy", base["chance"], f"1 / K, K = {k} classes")
    ctx.result("majority_accuracy", base["majority"],
               f"always '{data.classes[base['majority_class']]}' (the most frequent training class)")
    ctx.result("margin", acc - best_base, "test accuracy minus the better of the two baselines")
    ctx.result("parameters", count_parameters(model.net), f"{cfg.model}: {mcfg.arch}, depth {mcfg.depth}")
    ctx.result("train_seconds", round(seconds, 1), f"ctx.fit wall time on {ctx.device}, validation included")
    ctx.log(f"cnn: test accuracy {acc:.4f} (chance {base['chance']:.4f}, majority {base['majority']:.4f})")

    cm = confusion_matrix(y_test, pred, k)
    plot_confusion(cm, data.classes, ctx.figure("cnn-confusion.png", f"confusion matrix of {cfg.model} on the "
                                                 f"{name} test set (rows: true class)"), title=f"{cfg.model} · {name}")
    per_class = 8
    samples = torch.cat([x_train[y_train == i][:per_class] for i in range(k)])
    if len(samples) == per_class * k:
        image_grid(samples, per_class, ctx.figure("cnn-samples.png", f"training images, one row per class ({name})"),
                   title=f"{name} training images", row_labels=data.classes)
    if cfg.errors_per_class:
        rows, labels = [], []
        for i in range(k):
            every = torch.nonzero((y_test == i) & (pred != i)).flatten()
            wrong = every[:cfg.errors_per_class]
            if len(wrong):
                guesses = Counter(data.classes[j] for j in pred[every].tolist()).most_common(2)
                labels.append(f"{data.classes[i]} -> " + ", ".join(f"{g} {c}" for g, c in guesses))
                fill = torch.ones(cfg.errors_per_class - len(wrong), c, h, w)  # white tiles pad short rows
                rows.append(torch.cat([x_test[wrong], fill]))
        if rows:
            image_grid(torch.cat(rows), cfg.errors_per_class,
                       ctx.figure("cnn-errors.png", "misclassified test images, one row per true class; the "
                                  "row label gives the two most frequent wrong answers and their counts"),
                       title=f"{cfg.model} errors on {name}", row_labels=labels)


TASKS = {"cnn": Task(config=Config, run=run)}
