"""A run's metrics, written to its run folder three ways: `RunLog`.

    metrics.jsonl   one JSON object per `RunLog.write`, flushed at once, so a crash loses nothing already
                    written. Every record has an int "step" (the optimizer steps done when it was logged).
                    Train records carry e.g. loss, lr, grad_norm, tokens_per_s, gflops; validation records
                    carry keys starting with "val_" (val_loss, val_bpb) at the same step numbering. Any
                    other JSON-serializable field is kept as is. This file is the source of truth:
                    `read_metrics` loads it, and the PNG can be redrawn from it with `plot_loss`.
    tb/             TensorBoard event files. Every numeric field except "step" becomes a scalar at
                    global step `step`: train fields as "train/<name>", validation fields as
                    "val/<name without the val_ prefix>". Strings and bools are skipped (they stay in
                    the JSONL).
    loss.png        `RunLog.plot()`: train loss and val loss (markers) against step (in nats/token for the
                    language models; `ylabel` names other units), with
                    the baselines (e.g. a unigram model's val loss) as dashed reference lines, and
                    val bits-per-byte in a second panel when logged. Written atomically (loss.png.tmp,
                    then os.replace), so a reader never sees half a file.

`plot_lr` draws lr.png (learning rate and gradient norm against step) the same way; the run report
(workbench.train.report) draws it from metrics.jsonl. Both plots go through `save_png`.

Resume. A resumed run restarts from its checkpoint at step `resume_step`; the steps after it run again
and would be logged twice. So `RunLog(run_dir, resume_step=s)` first rewrites metrics.jsonl keeping
only the records with step <= s (keeping them in memory too, so the plot covers the whole run), and
opens TensorBoard with `purge_step=s + 1`, which makes TensorBoard discard the events at steps > s
that the earlier process wrote. Without `resume_step` the JSONL is started afresh.

Only one process writes a run folder: in a distributed run, make the RunLog on the main rank only.

Listening. `validation_listener(fn)` calls `fn(record)` for every validation record (one with a "val_" key)
that a RunLog or a NullRunLog writes in this process while the block runs. Every rank of a distributed run
validates in lockstep and writes to one of the two, so each rank hears each validation once: that is how a
sweep trial (workbench.train.sweep) reports to Ray Tune without the trainer knowing about Ray.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
PLOT_FILE = "loss.png"
LR_PLOT_FILE = "lr.png"
VAL_PREFIX = "val_"


_listeners: list[Callable[[dict], None]] = []


@contextlib.contextmanager
def validation_listener(fn: Callable[[dict], None]) -> Iterator[None]:
    """Inside the block, `fn(record)` hears every validation record written in this process (module doc)."""
    _listeners.append(fn)
    try:
        yield
    finally:
        _listeners.remove(fn)


def _notify(record: Mapping) -> None:
    if _listeners and any(k.startswith(VAL_PREFIX) for k in record):
        for fn in list(_listeners):
            fn(dict(record))


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in file order; [] if the file does not exist.

    A final line that is not valid JSON (a write cut short by a crash) is dropped; a bad line anywhere
    else raises ValueError naming the line, since that is not how this module leaves a file.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # torn last write
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({e})") from e
    return records


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def tb_tag(key: str) -> str:
    """The TensorBoard tag of a record field: "val_loss" -> "val/loss", "loss" -> "train/loss"."""
    if key.startswith(VAL_PREFIX):
        return "val/" + key[len(VAL_PREFIX):]
    return "train/" + key


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to PATH.tmp, then rename it over `path`: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunLog:
    """Records a run's metrics in `run_dir`: metrics.jsonl, TensorBoard events under tb/, loss.png.

    `resume_step`: the step of the checkpoint being resumed (None for a new run); see the module doc.
    `baselines`: name -> loss in nats/token, drawn as dashed horizontal lines on the plot.
    Usable as a context manager (closes on exit).
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None,
                 baselines: Mapping[str, float] | None = None, ylabel: str = "loss (nats/token)"):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.baselines = dict(baselines or {})
        self.ylabel = ylabel
        self.resume_step = resume_step
        if resume_step is not None:
            self.records = [r for r in read_metrics(self.path) if r.get("step", -1) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self.records = []
            self._file = open(self.path, "w", encoding="utf-8")
        if resume_step is None:  # a new run: events an earlier, checkpoint-less attempt left must not mix in
            shutil.rmtree(self.run_dir / TB_DIR, ignore_errors=True)
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=purge)
        self._closed = False

    def write(self, record: Mapping) -> None:
        """Append one record (a dict with an int "step") to the JSONL and its numbers to TensorBoard."""
        if self._closed:
            raise RuntimeError(f"RunLog for {self.run_dir} is closed")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"a metrics record needs an int 'step', got {record!r}")
        rec = dict(record)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        for key, value in rec.items():
            if key != "step" and _is_number(value):
                self._tb.add_scalar(tb_tag(key), float(value), global_step=step)
        self._tb.flush()
        self.records.append(rec)
        _notify(rec)

    def plot(self) -> Path:
        """Draw loss.png from every record of the run (those reloaded on resume included); its path."""
        out = self.run_dir / PLOT_FILE
        plot_loss(self.records, out, title=self.run_dir.name, baselines=self.baselines, ylabel=self.ylabel)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._file.close()
        self._tb.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _series(records: Iterable[Mapping], key: str) -> tuple[list[int], list[float]]:
    points = sorted((r["step"], float(r[key])) for r in records
                    if "step" in r and _is_number(r.get(key)) and math.isfinite(r[key]))
    return [s for s, _ in points], [v for _, v in points]


def plot_loss(records: Iterable[Mapping], out: str | Path, title: str = "",
              baselines: Mapping[str, float] | None = None, ylabel: str = "loss (nats/token)") -> None:
    """Write a PNG of train/val loss (and val bits-per-byte if present) against step, atomically.

    Draws on a bare Agg canvas (no pyplot, no display, no global backend change). With no records it
    still writes a figure: axes, title and any baselines.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(records)
    train_steps, train_loss = _series(records, "loss")
    val_steps, val_loss = _series(records, "val_loss")
    bpb_steps, bpb = _series(records, "val_bpb")

    fig = Figure(figsize=(8, 7 if bpb else 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if bpb:
        ax, ax_bpb = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    else:
        ax, ax_bpb = fig.subplots(1, 1), None

    if train_steps:
        ax.plot(train_steps, train_loss, color="C0", linewidth=1.2, label="train loss")
    if val_steps:
        ax.plot(val_steps, val_loss, color="C1", marker="o", markersize=4, linewidth=1.0, label="val loss")
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(float(value), color=f"C{i + 2}", linestyle="--", linewidth=1.0, label=f"{name} ({value:.3g})")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")
    if not (train_steps or val_steps):
        ax.text(0.5, 0.5, "no metrics yet", transform=ax.transAxes, ha="center", va="center", color="gray")

    if ax_bpb is not None:
        ax_bpb.plot(bpb_steps, bpb, color="C1", marker="o", markersize=4, linewidth=1.0, label="val bpb")
        ax_bpb.set_ylabel("val bits/byte")
        ax_bpb.grid(True, alpha=0.3)
        ax_bpb.legend(loc="upper right")
        ax_bpb.set_xlabel("step")
    else:
        ax.set_xlabel("step")

    save_png(fig, out)


def save_png(fig, out: str | Path) -> None:
    """Save a matplotlib Figure (on an Agg canvas) as the PNG `out`, atomically: OUT.tmp, then os.replace."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)


def plot_lr(records: Iterable[Mapping], out: str | Path, title: str = "") -> None:
    """Write a PNG of the learning rate (top) and the gradient norm (bottom) against step, atomically.

    Same canvas as `plot_loss`. The gradient norm goes on a log axis when it spans more than two decades
    (early spikes would flatten the rest). With no records it still writes the two empty panels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(records)
    lr_steps, lr = _series(records, "lr")
    gn_steps, grad_norm = _series(records, "grad_norm")

    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_lr, ax_gn = fig.subplots(2, 1, sharex=True)
    for ax, steps, values, label, color in ((ax_lr, lr_steps, lr, "learning rate", "C0"),
                                            (ax_gn, gn_steps, grad_norm, "grad norm", "C3")):
        if steps:
            ax.plot(steps, values, color=color, linewidth=1.2)
        else:
            ax.text(0.5, 0.5, "no metrics yet", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if grad_norm and min(grad_norm) > 0 and max(grad_norm) / min(grad_norm) > 100:
        ax_gn.set_yscale("log")
    ax_lr.set_title(title)
    ax_gn.set_xlabel("step")
    save_png(fig, out)


class NullRunLog:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's metrics)."""

    def write(self, record: Mapping) -> None:
        _notify(record)

    def plot(self) -> None:
        pass

    def close(self) -> None:
        pass
