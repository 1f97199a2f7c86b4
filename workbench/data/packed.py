"""Packed token samples: documents concatenated and cut into fixed-length windows, with document ids.

    tokens   [bos a a a eos bos b b eos bos c c c c ...]      (one long stream, documents back to back)
    doc ids  [ 0  0 0 0  0   1  1 1  1   2  2 ...     ]
    sample k = tokens[k*T : k*T + T + 1]                      (T + 1 tokens: inputs and shifted labels)

Packing wastes no compute on padding. The document ids go into the mask spec, so attention never
crosses from one document into another, and `collate` masks the one label per boundary that would ask
the model to predict the next document's first token from the previous one.

Order: global sample index g -> epoch g // N, slot g % N -> a permutation of the N windows drawn from a
generator seeded with (seed, epoch). Deterministic, so the global cursor alone says what comes next.
This in-memory source serves the spine's main job and tests; the webdataset shard reader of the data
issue implements the same `sample(g)` contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


class PackedTokens:
    def __init__(self, tokens: np.ndarray, doc_ids: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True):
        if len(tokens) != len(doc_ids):
            raise ValueError("tokens and doc_ids differ in length")
        self.tokens, self.doc_ids = tokens, doc_ids
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(tokens)} tokens are fewer than one sample of seq_len + 1 = {seq_len + 1}")
        self._perm_epoch, self._perm = -1, None

    @classmethod
    def from_documents(cls, token_lists: Sequence[Sequence[int]], eos_id: int, seq_len: int, **kw) -> PackedTokens:
        lengths = [len(t) + 1 for t in token_lists]
        tokens = np.empty(sum(lengths), dtype=np.int64)
        doc_ids = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        pos = 0
        for toks, n in zip(token_lists, lengths):
            tokens[pos : pos + n - 1] = toks
            tokens[pos + n - 1] = eos_id  # every document ends with eos
            pos += n
        return cls(tokens, doc_ids, seq_len, **kw)

    def __len__(self) -> int:
        return self.num_windows

    def window_of(self, g: int) -> int:
        epoch, slot = divmod(g, self.num_windows)
        if not self.shuffle:
            return slot
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return int(self._perm[slot])

    def sample(self, g: int) -> dict[str, np.ndarray]:
        """Global sample g: T + 1 tokens and their document ids."""
        start = self.window_of(g) * self.seq_len
        end = start + self.seq_len + 1
        return {"tokens": self.tokens[start:end], "doc_ids": self.doc_ids[start:end]}


def collate(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """(T + 1)-token samples -> input_ids, labels (shifted here, once), document_ids, positions.

    positions restart at 0 at every document start inside the window (RoPE sees each document as if
    it stood alone); a document cut by the window's left edge counts from the edge.
    """
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]))  # (B, T + 1)
    docs = torch.from_numpy(np.stack([s["doc_ids"] for s in samples]))  # (B, T + 1)
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    in_docs = docs[:, :-1]
    # a label from the next document cannot be predicted from this one
    labels[docs[:, 1:] != in_docs] = IGNORE_INDEX
    # position = index - index of the document's first token in this window
    T = inputs.shape[1]
    idx = torch.arange(T).expand_as(in_docs)
    starts = torch.ones_like(in_docs, dtype=torch.bool)
    starts[:, 1:] = in_docs[:, 1:] != in_docs[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return {"input_ids": inputs.contiguous(), "labels": labels, "document_ids": in_docs.contiguous(),
            "positions": idx - first}
