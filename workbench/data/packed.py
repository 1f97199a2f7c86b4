"""The packing collator: (T + 1)-token windows of packed documents -> a training micro-batch.

    tokens   [bos a a a eos bos b b eos bos c c c c ...]      (one long stream, documents back to back)
    doc ids  [ 0  0 0 0  0   1  1 1  1   2  2 ...     ]
    window w = tokens[w*T : w*T + T + 1]                      (T + 1 tokens: inputs and shifted labels)

Packing wastes no compute on padding. The windows come from `workbench.data.shards.ShardStream`; their
document ids go into the mask spec, so attention never crosses from one document into another, and
`collate` masks the one label per boundary that would ask the model to predict the next document's
first token from the previous one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


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
