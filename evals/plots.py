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


def lines(out: Path, xs: Sequence[float], series: Mapping[str, Sequence[float]],
          hlines: Mapping[str, float] | None = None, vline: tuple[str, float] | None = None, title: str = "",
          xlabel: str = "", ylabel: str = "", logx: bool = False, ylim: tuple[float, float] | None = None) -> Path:
    """One line with markers per named series over `xs`; dashed horizontal lines at the named `hlines`
    (baselines), and a dotted vertical line at `vline` = (label, x) (e.g. the window a model was trained on)."""
    fig = new_figure((6.4, 3.8))
    ax = fig.subplots()
    for i, (name, ys) in enumerate(series.items()):
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=name)
    for j, (name, value) in enumerate((hlines or {}).items()):
        ax.axhline(value, color=f"C{len(series) + j}", linestyle="--", linewidth=1, label=f"{name} ({value:.3g})")
    if vline is not None:
        ax.axvline(vline[1], color="k", linestyle=":", linewidth=1, label=f"{vline[0]} ({vline[1]:g})")
    if logx:
        ax.set_xscale("log", base=2)
        if len(xs) <= 12 and all(float(x).is_integer() for x in xs):  # lengths: label each one
            ax.set_xticks(list(xs), [f"{x:g}" for x in xs])
            ax.minorticks_off()
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, out)


def heatmap(out: Path, values: Sequence[Sequence[float]], xlabels: Sequence[str], ylabels: Sequence[str],
            title: str = "", xlabel: str = "", ylabel: str = "", vmin: float = 0.0, vmax: float = 1.0,
            mark_x: float | None = None) -> Path:
    """values[row][col] as coloured cells (red = vmin, green = vmax: the needle-in-a-haystack picture), each
    annotated; `mark_x` draws a dotted line at that fractional column index (e.g. the trained window)."""
    fig = new_figure((max(4.5, 1.2 + 0.75 * len(xlabels)), max(3.0, 1.0 + 0.4 * len(ylabels))))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            ax.annotate("-" if v != v else f"{v:.2g}", (c, r), ha="center", va="center", fontsize=7)
    if mark_x is not None:
        ax.axvline(mark_x, color="k", linestyle=":", linewidth=1.5)
    ax.set_xticks(range(len(xlabels)), list(xlabels), rotation=30 if len(xlabels) > 6 else 0)
    ax.set_yticks(range(len(ylabels)), list(ylabels))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=ax, fraction=0.05)
    return save_figure(fig, out)
