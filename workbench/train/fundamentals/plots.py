"""Pictures and baseline figures the tasks share: confusion matrices, image grids (PNG, written atomically)
and the scores of classifiers that ignore the input.

    class_baselines(y_train, y_test, k)        chance and majority-class accuracy, uniform and prior cross-entropy
    confusion_matrix(y_true, y_pred, k)        (k, k) counts: row = true class, column = predicted class
    plot_confusion(cm, classes, out, title)    the counts as a heat map, each row also as a share of its class
    image_grid(images, nrow, out, title)       (N, C, H, W) images in [0, 1] tiled nrow per row (C = 1 or 3)

They draw on a bare Agg canvas, like workbench.train.metrics, so no display or global backend is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from workbench.train.metrics import save_png


def class_baselines(y_train: torch.Tensor, y_test: torch.Tensor, k: int) -> dict[str, float]:
    """Accuracies and cross-entropies of predictors that ignore the input, from integer labels (tensors)."""
    counts = torch.bincount(torch.as_tensor(y_train).long().flatten(), minlength=k).double()
    prior = counts / counts.sum()
    majority = int(counts.argmax())
    nz = prior[prior > 0]
    return {
        "chance": 1.0 / k,
        "majority": (torch.as_tensor(y_test) == majority).double().mean().item(),
        "majority_class": majority,
        "uniform_loss": math.log(k),  # -log(1 / K)
        "prior_loss": float(-(nz * nz.log()).sum()),  # H(prior) = -sum_c p_c log p_c
    }


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, k: int) -> torch.Tensor:
    """(k, k) int64 counts; entry [i, j] = examples of true class i predicted as j."""
    y_true, y_pred = torch.as_tensor(y_true).long().flatten(), torch.as_tensor(y_pred).long().flatten()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"confusion_matrix: {y_true.numel()} labels but {y_pred.numel()} predictions")
    for name, y in (("labels", y_true), ("predictions", y_pred)):
        if y.numel() and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"confusion_matrix: {name} outside 0..{k - 1} (min {y.min().item()}, max {y.max().item()})")
    # each pair (i, j) -> the flat cell i k + j
    return torch.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def plot_confusion(cm: torch.Tensor, classes: Sequence[str], out: str | Path, title: str = "") -> Path:
    """A heat map of the row-normalised matrix (the share of each true class), annotated with the counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = torch.as_tensor(cm).long()
    k = cm.shape[0]
    if cm.shape != (k, k) or len(classes) != k:
        raise ValueError(f"plot_confusion: a ({len(classes)}, {len(classes)}) matrix expected, got {tuple(cm.shape)}")
    share = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.55 * k + 2.5)
    fig = Figure(figsize=(size + 1, size), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of the true class")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j].item()), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), [str(c) for c in classes], rotation=45 if max(map(len, map(str, classes))) > 3 else 0,
                  ha="right" if max(map(len, map(str, classes))) > 3 else "center")
    ax.set_yticks(range(k), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = cm.diag().sum().item() / max(1, cm.sum().item())
    ax.set_title(f"{title}{' · ' if title else ''}accuracy {acc:.3f} ({cm.sum().item()} examples)")
    save_png(fig, out)
    return Path(out)


def image_grid(images: torch.Tensor, nrow: int, out: str | Path, title: str = "",
               row_labels: Sequence[str] | None = None) -> Path:
    """Tile (N, C, H, W) images with values in [0, 1] into rows of `nrow`; C = 1 is drawn in grey."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = torch.as_tensor(images).detach().float().cpu().clamp(0, 1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid: expected (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    pad = 1
    canvas = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)  # white gaps between tiles
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
    scale = max(0.25, min(1.0, 8.0 / max(nrow, rows)))  # inches per tile, so large grids stay a sane size
    fig = Figure(figsize=(max(3.0, nrow * scale + (1.2 if row_labels else 0)), max(2.0, rows * scale + 0.6)),
                 dpi=max(100, int(2.5 * h / scale)) if h < 24 else 100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    pic = canvas.permute(1, 2, 0).numpy()  # (H', W', C)
    ax.imshow(pic[..., 0] if c == 1 else pic, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(row_labels))], list(row_labels), fontsize=8)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    save_png(fig, out)
    return Path(out)
