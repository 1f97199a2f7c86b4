"""The paged KV cache: a pool of fixed-size blocks shared by every request, and a block table per request.

What it is
    PagedAttention (Kwon et al. 2023, vLLM) stores the KV cache the way an operating system stores memory
    pages. The pool holds `num_blocks` blocks of `block_size` token slots per layer; a request owns a list
    of physical block ids (its *block table*), and the token at position p lives in slot

        slot(p) = block_table[p // block_size] * block_size + p % block_size

    so only a request's last block is ever partly empty. A request takes blocks as it grows and gives them
    all back when it ends, so memory follows the tokens actually held, not `batch x max_len` reserved up
    front (a static cache reserves the longest possible request for every row).

What a layer stores is its attention type's business (DESIGN.md): the pool keeps, per layer, one tensor
per entry of `model.kv_entry_shapes()`: k and v (KV, D) for plain and grouped-query attention, MLA's
normalised latent (r,) and rotated RoPE key (d_r,) for DeepSeek-V3 and Kimi K2 (about 1/28 of the bytes
of K2's expanded keys and values per token). A sliding-window model keeps the same entries; the engine
hands back every block that has fallen out of the window (`PagedKVCache` only sees what is gathered).

How a forward reads it (the `KVCache` interface every model already calls)
    The engine binds a step's layout before the forward: for each row b, the slots its new tokens go to
    (`write`), and the slots to read back, right-aligned in a (B, Tk) grid: row b's n_b cached tokens
    (new ones included) fill the last n_b columns, the rest read the null block. Right-aligned rows end at
    the same column, so the queries of every row are the last Tq columns, `seen = Tk - Tq` is one scalar
    query offset, and the mask spec of the dense models (causal on slots, `key_padding` for the empty
    columns, a sliding window on slot differences) applies unchanged: within a row, slot differences are
    position differences. RoPE positions come separately, per row.
    `update(layer, *new)` scatters the new tokens' entries into the pool (one index_copy_ per tensor) and
    returns one gather (index_select) of the grid. Block 0 is the null block: never handed out, zero, the
    source of every empty column, so a gather never reads another request's slots.

Design choices
    A gather per layer per step, not a paged-attention kernel: it costs one extra read and write of the
    cached entries, which on a CPU at these sizes is small next to reading the weights, and it lets every
    attention backend (SDPA, math, flex, block) and both MLA paths run unchanged. A GPU engine would fuse
    the gather into the attention kernel (vLLM's paged_attention reads the block table directly).
    No copy-on-write block sharing or prefix caching: each request owns its blocks.

Sources
    Kwon et al., "Efficient Memory Management for Large Language Model Serving with PagedAttention",
    SOSP 2023, arXiv 2309.06180; vllm-project/vllm (read, not copied).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.nn.kv_cache import KVCache

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for (the scheduler preempts or waits)."""


class BlockAllocator:
    """Free-list of physical block ids 1..num_blocks-1 (block 0 is the null block, never handed out)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks: expected at least 2 (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out the lowest ids first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks a request can ever hold (all but the null block)."""
        return self.num_blocks - 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if b == NULL_BLOCK:
                continue
            if not 0 < b < self.num_blocks:
                raise ValueError(f"block id {b} is not in this pool (1..{self.num_blocks - 1})")
            self._free.append(b)
        if len(self._free) > self.num_blocks - 1 or len(set(self._free)) != len(self._free):
            raise RuntimeError("a block was released twice")


class PagedKVCache(KVCache):
    """The pool (num_blocks * block_size slots, per layer and entry) behind the model's KVCache interface."""

    def __init__(self, n_layers: int, entry_shapes: Sequence[tuple[int, ...]], num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if block_size < 1:
            raise ValueError(f"block_size: expected an integer >= 1, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        slots = num_blocks * block_size
        self.entry_shapes = [tuple(s) for s in entry_shapes]
        self.pools = [[torch.zeros(slots, *shape, dtype=dtype, device=device) for shape in self.entry_shapes]
                      for _ in range(n_layers)]
        self.seen = 0
        self._layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int] | None = None

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers."""
        pool = self.pools[0][0]
        per_layer = sum(int(torch.Size(s).numel()) for s in self.entry_shapes) * pool.element_size()
        return per_layer * len(self.pools)

    def plan(self, tables: Sequence[Sequence[int]], computed: Sequence[int], feeds: Sequence[int],
             starts: Sequence[int]) -> dict[str, torch.Tensor]:
        """The tensors of one step, for rows whose block tables are `tables`, with `computed[b]` positions
        cached and `feeds[b]` new ones, reading from position `starts[b]` on (past a dropped window):

            positions (B, Tq)   RoPE positions of the right-aligned queries (0 in pad columns)
            real      (B, Tq)   which query columns hold new tokens
            write_rows (W,)     those columns in the flattened (B * Tq) input, and
            write_slots (W,)    the pool slots they go to
            read      (B, Tk)   pool slots of the right-aligned key grid (the null slot 0 in empty columns)
            valid     (B, Tk)   which key columns hold a token

        Built with a few tensor ops whatever the batch, so a decode step's bookkeeping stays small."""
        bs = self.block_size
        nb = max(len(t) for t in tables)
        table = torch.tensor([list(t) + [NULL_BLOCK] * (nb - len(t)) for t in tables])  # (B, nb)
        comp, start = torch.tensor(computed), torch.tensor(starts)
        end = comp + torch.tensor(feeds)  # (B,) positions cached after this step
        Tq, Tk = max(feeds), int((end - start).max())

        def slot_of(pos):  # pool slot of each (clamped) position through the row's block table
            pos = pos.clamp(min=0)
            return table.gather(1, pos // bs) * bs + pos % bs

        kpos = end[:, None] - Tk + torch.arange(Tk)  # (B, Tk) the position in each key column
        valid = kpos >= start[:, None]
        qpos = end[:, None] - Tq + torch.arange(Tq)  # (B, Tq) the position in each query column
        real = qpos >= comp[:, None]
        return {"positions": torch.where(real, qpos, 0), "real": real,
                "write_rows": real.reshape(-1).nonzero()[:, 0], "write_slots": slot_of(qpos)[real],
                "read": torch.where(valid, slot_of(kpos), 0), "valid": valid}

    def bind(self, write_rows: torch.Tensor, write_slots: torch.Tensor, read_slots: torch.Tensor, q_len: int) -> None:
        """Lay out the next forward: new token (row i of the flattened (B * Tq) input) `write_rows[j]` goes to
        pool slot `write_slots[j]`; the (B, Tk) grid `read_slots` is what each layer reads back."""
        B, Tk = read_slots.shape
        self._layout = (write_rows, write_slots, read_slots.reshape(-1), B, Tk)
        self.seen = Tk - q_len

    def update(self, layer_idx: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._layout is None:
            raise RuntimeError("PagedKVCache.update before bind(): the engine lays out each step")
        rows, dst, read, B, Tk = self._layout
        pools = self.pools[layer_idx]
        if len(new) != len(pools):
            raise ValueError(f"this cache stores {len(pools)} tensors per layer, got {len(new)}")
        out = []
        for pool, x in zip(pools, new):
            flat = x.reshape(-1, *x.shape[2:])  # (B * Tq, ...)
            pool.index_copy_(0, dst, flat.index_select(0, rows).to(pool.dtype))
            out.append(pool.index_select(0, read).view(B, Tk, *pool.shape[1:]))
        return tuple(out)

    def advance(self, n: int) -> None:
        self._layout = None  # the next forward needs a new layout

    def reset(self) -> None:
        self._layout, self.seen = None, 0
