"""KV caches: what an attention layer keeps of earlier tokens so decoding is O(T) per step, not O(T^2).

The interface is shared by every attention type, and each type decides *what* it stores:

    plain / GQA attention   k, v             each (B, T, KV, D)
    MLA (DeepSeek-V3)       latent, k_rope   (B, T, kv_lora_rank), (B, T, rope_dim)  (deepseek_v3.py)
    sliding window          k, v as plain attention; the mask's window hides old slots, and the paged
                            engine hands back the blocks that fell out of the window

A layer calls `update(layer_idx, *new)` with the tensors of its new tokens (time on dim 1), and gets
back everything stored for that layer so far, new tokens included. The decoder calls `advance(T)` once
after all layers have run, so every layer of one forward writes the same slots [seen, seen + T).
Slots are per row of the batch; rows that started with left padding keep their pad slots, which the
mask spec's `key_padding` hides.

`StaticKVCache` preallocates `max_len` slots (no reallocation while decoding, friendly to CUDA graphs
and compile). `workbench.inference.paged.PagedKVCache` implements the same interface over a block pool shared
by the requests of the serving engine (each model names its per-token entries in `kv_entry_shapes()`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Interface: per-layer storage of earlier tokens' attention inputs."""

    seen: int  # slots written by earlier forwards; the current forward writes from here

    def update(self, layer_idx: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store `new` (each (B, T, ...)) at slots [seen, seen + T); return slots [0, seen + T)."""
        raise NotImplementedError

    def advance(self, n: int) -> None:
        """Mark n more slots as written (called once per forward, after every layer)."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class StaticKVCache(KVCache):
    """Preallocated buffers: one tensor (B, max_len, *shape) per entry per layer."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        entry_shapes: Sequence[tuple[int, ...]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        self.max_len = max_len
        self.seen = 0
        self.buffers = [
            [torch.zeros(batch_size, max_len, *shape, dtype=dtype, device=device) for shape in entry_shapes]
            for _ in range(n_layers)
        ]

    def update(self, layer_idx: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bufs = self.buffers[layer_idx]
        if len(new) != len(bufs):
            raise ValueError(f"this cache stores {len(bufs)} tensors per layer, got {len(new)}")
        t = new[0].shape[1]
        end = self.seen + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {self.seen} + {t} tokens > max_len {self.max_len}")
        out = []
        for buf, x in zip(bufs, new):
            buf[:, self.seen : end] = x
            out.append(buf[:, :end])
        return tuple(out)

    def advance(self, n: int) -> None:
        self.seen += n

    def reset(self) -> None:
        self.seen = 0
