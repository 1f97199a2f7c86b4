"""Reading the vision-language dataset (diagram documents and captioned shapes) back for training and evals.

A dataset folder (written by `workbench diagrams OUT`, see `data_pipelines.vision_shards`) holds

    manifest.json          {"format": "workbench-vision/1", "settings": {kinds, counts, size, seed},
                            "splits": {"train"|"val"|"test": [{"file", "sha256", "size", "samples", "keys"}]},
                            "verilog": {...}, "documents": {...}}
    train-00000.tar ...    webdataset tars: per sample `KEY.png` (the picture) and `KEY.json`
    val-00000.tar ...      {"id", "kind", "caption", "qa": [{"question", "answer", "type"}], ...the structure}
    test-00000.tar ...
    verilog/*.v            every training circuit's gate-level netlist (a Verilog source tree)
    documents.pdf          pages that combine a diagram with a paragraph about it

`load_vision_split(root, split)` returns the split's samples in manifest order as `VisionExample`s: the image
as an (H, W, 3) uint8 array, the caption, the question/answer pairs, and `meta`, everything else the sample's
JSON holds (the structure: a flowchart's nodes and edges, a circuit's gates and its `netlist`, the shapes).
Every shard is checked against the manifest before it is used: a missing, truncated or altered file (its
sha256), a sample the manifest lists but the tar lacks, or a sample without its picture or JSON is a
`DataError` naming the file; nothing is skipped silently, since an eval over a silently shorter split would
report a number about other data.

`build_vision_dataset(out, ...)` is a thin wrapper over the maker (`data_pipelines.vision_shards.build`).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.errors import DataError

__all__ = ["VisionExample", "load_vision_split", "load_vision_manifest", "build_vision_dataset", "MANIFEST",
           "FORMAT", "SPLITS", "KINDS"]

MANIFEST = "manifest.json"
FORMAT = "workbench-vision/1"
SPLITS = ("train", "val", "test")
KINDS = ("flowchart", "circuit", "shapes")
_SAMPLE_KEYS = ("id", "kind", "caption", "qa")  # the JSON fields VisionExample holds itself; the rest is meta


@dataclass
class VisionExample:
    id: str
    kind: str  # "flowchart" | "circuit" | "shapes"
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    qa: list[dict]  # {"question", "answer", "type"}
    meta: dict = field(default_factory=dict)  # the structure: nodes/edges, gates/netlist, shapes, ...


def load_vision_manifest(root: str | Path) -> dict:
    """Read and check `root/manifest.json`; any problem is a `DataError` naming the file and the field."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"vision data folder {root} does not exist: build it with `workbench diagrams {root}`")
    if not path.is_file():
        raise DataError(f"vision data folder {root} has no {MANIFEST}: it is not a vision dataset "
                        f"(build one with `workbench diagrams {root}`)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise DataError(f"{path}: field 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
    for key in ("settings", "splits"):
        if not isinstance(raw.get(key), dict):
            raise DataError(f"{path}: field '{key}' should be an object, got {raw.get(key)!r:.60}")
    for name, shards in raw["splits"].items():
        if not isinstance(shards, list):
            raise DataError(f"{path}: field 'splits.{name}' should be a list of shards")
        for i, s in enumerate(shards):
            where = f"splits.{name}[{i}]"
            for key, kind in (("file", str), ("sha256", str), ("samples", int), ("keys", list)):
                if not isinstance(s, dict) or not isinstance(s.get(key), kind):
                    raise DataError(f"{path}: field '{where}.{key}' should be {kind.__name__}")
            if Path(s["file"]).name != s["file"]:  # shards live in the folder, nowhere else
                raise DataError(f"{path}: field '{where}.file' must be a file name, got {s['file']!r}")
            if len(s["keys"]) != s["samples"]:
                raise DataError(f"{path}: field '{where}.samples' is {s['samples']}, but it lists "
                                f"{len(s['keys'])} keys")
    return raw


def _read_shard(root: Path, info: dict) -> list[VisionExample]:
    from PIL import Image

    path = root / info["file"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"vision shard {path} cannot be read ({e.strerror or e}); rebuild the folder with "
                        f"`workbench diagrams {root} --force`") from None
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise DataError(f"vision shard {path}: sha256 differs from {root / MANIFEST}'s ({len(data)} bytes): the "
                        f"file is truncated or corrupt; rebuild with `workbench diagrams {root} --force`")
    parts: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise DataError(f"vision shard {path}: not a readable tar ({e})") from None
    out = []
    for key in info["keys"]:
        got = parts.get(key, {})
        missing = [ext for ext in ("png", "json") if ext not in got]
        if missing:
            raise DataError(f"vision shard {path}: sample {key!r} has no {' or '.join(missing)} member")
        try:
            record = json.loads(got["json"])
            with Image.open(io.BytesIO(got["png"])) as im:
                image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise DataError(f"vision shard {path}: sample {key!r} cannot be decoded ({e})") from None
        if not isinstance(record, dict) or any(k not in record for k in _SAMPLE_KEYS):
            raise DataError(f"vision shard {path}: sample {key!r}'s JSON lacks one of {', '.join(_SAMPLE_KEYS)}")
        out.append(VisionExample(id=record["id"], kind=record["kind"], image=image, caption=record["caption"],
                                 qa=list(record["qa"]),
                                 meta={k: v for k, v in record.items() if k not in _SAMPLE_KEYS}))
    return out


def load_vision_split(root: str | Path, split: str) -> list[VisionExample]:
    """Every sample of `split` ("train", "val" or "test") in manifest order, each shard's sha256 verified."""
    root = Path(root)
    manifest = load_vision_manifest(root)
    if split not in manifest["splits"]:
        raise DataError(f"{root / MANIFEST}: no split {split!r} (it has {', '.join(manifest['splits']) or 'none'})")
    examples: list[VisionExample] = []
    for info in manifest["splits"][split]:
        examples.extend(_read_shard(root, info))
    return examples


def build_vision_dataset(out: str | Path, *, n_train: int, n_val: int, n_test: int, size: int, seed: int = 0,
                         kinds: Sequence[str] = KINDS, force: bool = False,
                         log: Callable[[str], None] = print) -> Path:
    """Build (or find up to date) the dataset folder `out`; see `data_pipelines.vision_shards.build`."""
    from data_pipelines.vision_shards import build

    return build(out, n_train=n_train, n_val=n_val, n_test=n_test, size=size, seed=seed, kinds=kinds, force=force,
                 log=log)
