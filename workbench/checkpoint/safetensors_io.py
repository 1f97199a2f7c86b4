"""Reading and writing safetensors, single-file or sharded with an index, with errors that name the file.

safetensors is the only format the workbench loads model weights from: a JSON header plus raw bytes,
parsed in Rust, no code execution. The parser rejects truncated files and files whose offsets do not
cover the buffer exactly (`MetadataIncompleteBuffer`), but it has no checksum: a flipped bit inside the
tensor data loads silently. Run folders therefore carry a sha256 manifest (`workbench.checkpoint.run`).

Sharded layout (what Hugging Face writes): `model-00001-of-00003.safetensors` ... plus
`model.safetensors.index.json` = {"metadata": {"total_size": bytes}, "weight_map": {name: file}}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from workbench.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_file(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a missing, truncated or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path}: not found")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"weights file {path}: unreadable safetensors ({detail}); truncated or corrupt?") from None


def read_dir(directory: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The weights of a model directory: `model.safetensors`, or the shards an index names."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"index file {index}: not a valid safetensors index ({e})") from None
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            part = read_file(directory / shard, device)
            tensors.update(part)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"index file {index}: tensor {missing[0]!r} is not in its shard {weight_map[missing[0]]}")
        return tensors
    single = directory / SINGLE_NAME
    if single.is_file():
        return read_file(single, device)
    files = sorted(directory.glob("*.safetensors"))
    if len(files) == 1:
        return read_file(files[0], device)
    raise CheckpointError(
        f"model directory {directory}: no {SINGLE_NAME} or {INDEX_NAME} (found {len(files)} .safetensors files)"
    )


def write_dir(
    tensors: dict[str, torch.Tensor],
    directory: str | Path,
    max_shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write `model.safetensors`, or shards + index when the tensors exceed `max_shard_bytes`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    meta = {"format": "pt", **(metadata or {})}
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(directory / SINGLE_NAME), metadata=meta)
        return [directory / SINGLE_NAME]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=meta)
        paths.append(directory / fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*paths, directory / INDEX_NAME]
