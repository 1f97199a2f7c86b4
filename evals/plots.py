"""The eval harness's figures: bars against baselines and histograms, drawn on a bare Agg canvas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from workbench.train.metrics import save_png


def new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, out: Path) -> Path:
    save_png(fig, out)
    return Path(out)


def bars(out: Path, labels: Sequence[str], values: Sequence[float], baselines: Sequence[float] | None = None,
         title: str = "", ylabel: str = "", baseline_label: str = "chance") -> Path:
    """One bar per label; a short black line on each bar at its baseline (e.g. chance for that group)."""
    fig = new_figure((max(4.0, 1.0 + 0.8 * len(labels)), 3.6))
    ax = fig.subplots()
    xs = range(len(labels))
    ax.bar(xs, values, color="C0", label="model")
    for x, v in zip(xs, values):
        ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
    if baselines is not None:
        ax.hlines(baselines, [x - 0.4 for x in xs], [x + 0.4 for x in xs], colors="k", linestyles="--",
                  label=baseline_label)
    ax.set_xticks(list(xs), labels, rotation=30 if len(labels) > 5 else 0)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="best")
    return save_figure(fig, out)


def histogram(out: Path, values: Sequence[float], mark: Mapping[str, float] | None = None, title: str = "",
              xlabel: str = "") -> Path:
    """A histogram of `values` with vertical lines at the named `mark` values (an aggregate, baselines)."""
    fig = new_figure((6.4, 3.6))
    ax = fig.subplots()
    ax.hist([v for v in values if v == v], bins=min(40, max(5, len(values) // 3)), color="C0", alpha=0.8)
    for i, (name, value) in enumerate((mark or {}).items()):
        ax.axvline(value, color=f"C{i + 1}", linestyle="--", label=f"{name} ({value:.3g})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if mark:
        ax.legend(loc="best", fontsize=8)
    return save_figure(fig, out)
