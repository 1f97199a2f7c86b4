"""The global data cursor: where a run is in its data, independent of how many ranks read it.

The data is a sequence of samples indexed globally (0, 1, 2, ...; past the end of an epoch the index
keeps growing and the dataset maps it into the next epoch's order). The cursor is the index of the next
unread sample. At each read, rank r of W takes the samples k >= cursor with k mod W = r, in order, and
every rank advances the cursor by the same amount. So:

- the W ranks together read a contiguous block of samples, each exactly once;
- the checkpoint stores one integer, and a run saved at world size 4 resumes at world size 2 (or 1)
  without repeating or skipping a sample, provided the global batch stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataCursor:
    position: int = 0

    def take(self, count: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's `count` sample indices of the next block of count * world_size; advances the cursor."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        start = self.position
        # k = start + j * W + r: rank r's share of [start, start + count * W), and k mod W = r when start mod W = 0
        indices = [start + j * world_size + ((rank - start) % world_size) for j in range(count)]
        self.position = start + count * world_size
        return indices

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
