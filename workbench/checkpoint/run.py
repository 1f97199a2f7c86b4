"""Run-folder checkpoints: `checkpoints/step-N/`, complete or absent, verified before use.

Layout of one checkpoint

    checkpoints/step-N/
      model.safetensors      consolidated weights: what generate, eval, export and the next stage read
      train_state.json       step, data cursor, the layout that wrote it, anything else JSON can hold
      engine/                the engine's resume state, written by every rank:
                               single, ddp, fsdp2 (and tp)   dcp/ (torch.distributed.checkpoint: each rank's
                                                             optimizer shards + .metadata) and state.json
                                                             (optimizer hyperparameters, the schedule)
                               zero1-3                       deepspeed/ (DeepSpeed's own checkpoint)
      manifest.json          sha256 and size of every file above
      COMPLETE               written last

Atomicity: everything is written into `step-N.tmp/` (every rank writes its engine shards there, then rank 0
the rest), the marker last, then the folder is renamed to `step-N`. A crash leaves either a `.tmp` folder
(ignored, removed by the next save) or a complete checkpoint. Readers take the newest folder with a
`COMPLETE` marker and verify the manifest before loading anything, because safetensors detects truncation
but not a flipped bit, and DCP metadata and DeepSpeed files are pickles. Several nodes need a checkpoint
folder on storage they all share.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from workbench.checkpoint.safetensors_io import read_file
from workbench.errors import CheckpointError

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------------------------
# Nested state (optimizer state dicts and the like) as tensors + JSON


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into named tensors and a JSON skeleton that refers to them by name.

    Dict keys keep their type (optimizer states are keyed by int), tuples stay tuples.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(x, dict):
            return {"__dict__": [[k, enc(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} at {path} in a checkpoint (tensors and JSON only)")

    return tensors, enc(obj, "s")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    def dec(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__dict__" in x:
                return {k: dec(v) for k, v in x["__dict__"]}
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
        if isinstance(x, list):
            return [dec(v) for v in x]
        return x

    return dec(skeleton)


def write_json_state(path: Path, obj: Any) -> None:
    """A nested structure without tensors (optimizer hyperparameters, a schedule) as JSON, key types kept."""
    tensors, skeleton = flatten_state(obj)
    if tensors:
        raise TypeError(f"{path}: tensors at {', '.join(tensors)} (they belong in safetensors or DCP)")
    path.write_text(json.dumps(skeleton) + "\n")


def read_json_state(path: Path) -> Any:
    return unflatten_state({}, json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------------
# Manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, MARKER))
    manifest = {str(p.relative_to(folder).as_posix()): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def verify(folder: str | Path) -> None:
    """Check the marker and every file's size and sha256 against the manifest; errors name the file."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise CheckpointError(f"checkpoint {folder}: no {MARKER} marker (the write did not finish)")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder}: unreadable {MANIFEST} ({e})") from None
    for rel, entry in manifest.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path}: missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)")
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {path}: sha256 differs from the manifest (corrupt)")


# ----------------------------------------------------------------------------------------------------
# Save / find / load


def step_of(folder: Path) -> int:
    m = _STEP_RE.match(folder.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0 and (p / MARKER).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict,
    write_engine_state: Callable[[Path], None] | None = None,
    keep_last: int | None = None,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint `step` of a run. Every rank calls this; `write_engine_state(folder)` runs on every
    rank (a collective: each writes its shards), the rest on rank 0 (`is_main`) alone, `write_extra(folder)`
    included (more files inside the checkpoint, e.g. LoRA adapters; the manifest covers them). `barrier` waits
    for all ranks (a no-op in one process)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if (final / MARKER).is_file():
        # never delete a complete checkpoint to write another: there would be a moment with neither
        raise CheckpointError(f"checkpoint {final}: already exists")
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    if write_engine_state is not None:
        write_engine_state(tmp / "engine")
    barrier()
    if not is_main:
        return final
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1) + "\n")
    if write_extra is not None:
        write_extra(tmp)
    _write_manifest(tmp)
    _fsync_tree(tmp)
    (tmp / MARKER).write_text(f"step {step}\n")
    if final.exists():  # an incomplete folder of that name (never read): replaced
        shutil.rmtree(final)
    os.replace(tmp, final)
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from either a run folder (newest complete one) or a `step-N` folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path}: not found")
    if (path / "checkpoints").is_dir() or (path / "config.toml").is_file():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CheckpointError(f"run folder {path}: no complete checkpoint under {path / 'checkpoints'}")
        return ckpt
    if (path / "model.safetensors").is_file() or (path / MANIFEST).is_file():
        return path
    raise CheckpointError(f"checkpoint path {path}: neither a run folder (config.toml, checkpoints/) nor a checkpoint")


def load_model_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    ckpt = Path(ckpt)
    verify(ckpt)
    return read_file(ckpt / "model.safetensors")


def load_for_resume(ckpt: str | Path, check: bool = True) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(model_state, train_state, engine state folder) of a checkpoint, after verifying its manifest
    (`check=False`: another rank has just verified the same files)."""
    ckpt = Path(ckpt)
    if check:
        verify(ckpt)
    return read_file(ckpt / "model.safetensors"), json.loads((ckpt / "train_state.json").read_text()), ckpt / "engine"
