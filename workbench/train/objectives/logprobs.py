"""Log-probabilities of given tokens, computed from hidden states a chunk of rows at a time.

DPO, and later PPO and GRPO, need log p(y_t | x, y_<t) for the completion tokens only: a scalar per target.
Computing the full logits (B, T, V) in float32 first would hold B * T * V floats, plus the log-softmax and its
gradient: 4 GiB for 8 x 1024 tokens of a 128K vocabulary. Here only the hidden states at target positions go
through the head (the DESIGN's `model.logits(hidden, positions)` contract), `chunk` of them at a time:

    h      = hidden[b, t]                      (N, D)   the rows whose next token is a target
    z      = h W_out^T                         (n, V)   one chunk of n rows, float32
    logp_i = z_i[y_i] - logsumexp(z_i)         (n,)

Under gradient each chunk runs inside activation checkpointing (`torch.utils.checkpoint`, non-reentrant):
autograd keeps the chunk's input rows and its n log-probs, and recomputes the (n, V) logits in backward, so
peak memory is one chunk's logits instead of N x V. `chunk = 0` computes every row at once (no recompute).
The values and gradients are the same either way (tested); the head's weight is read through the engine's
`logits`, so a sharded head (FSDP2) or ZeRO's gathered head work as they do for language modelling.

Under a sharded engine (FSDP2) each call of the head gathers its weight from every rank, so every rank must call it
the same number of times, though each holds a different number of targets: `rows`, the most targets any rank
holds (the caller's all-reduce), pads this rank's rows with zeros to that count before chunking, and the padded
rows' values are dropped. Padded or not, a chunk holds the same real rows, so the values do not change.

`label_logprobs` gives the per-token values at every target position (PPO and GRPO keep them per token);
`sequence_logprobs` sums the per-token values of each row: log p(y | x) = sum_t log p(y_t | x, y_<t), the
quantity DPO's implicit reward is built on (TRL's `sigmoid` loss sums; IPO averages, which is the sum over the
count returned beside it).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from workbench.data.packed import IGNORE_INDEX


def target_logprobs(logits_fn, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 0,
                    rows: int | None = None) -> torch.Tensor:
    """log softmax(logits_fn(h))[y] for rows h of `hidden` (N, D) and targets y (N,) -> (N,) float32.

    `logits_fn(h)` maps (1, n, D) hidden rows to (1, n, V) logits (an engine's or a model's `logits`). `rows`
    (>= N, the same on every rank): compute that many rows, the real ones then zeros, so that every rank calls
    `logits_fn` equally often; None computes the N rows alone (no call at all when N is 0)."""

    def one(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = logits_fn(h[None])[0].float()  # (n, V)
        # log p(y) = z[y] - logsumexp(z)
        return z.gather(1, y[:, None])[:, 0] - torch.logsumexp(z, dim=-1)

    n = hidden.shape[0]
    if rows is not None:
        if rows < n:
            raise ValueError(f"rows = {rows} is fewer than the {n} targets")
        rows = max(rows, 1)  # a rank without targets still calls the head once, as the others do
        hidden = torch.cat([hidden, hidden.new_zeros(rows - n, hidden.shape[1])])  # keeps hidden's autograd
        targets = torch.cat([targets, targets.new_zeros(rows - n)])
        return target_logprobs(logits_fn, hidden, targets, chunk)[:n]
    if n == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if chunk <= 0 or chunk >= n:
        return one(hidden, targets)
    parts = []
    for s in range(0, n, chunk):
        h, y = hidden[s : s + chunk], targets[s : s + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(one, h, y, use_reentrant=False))  # the (n, V) logits are recomputed in backward
        else:
            parts.append(one(h, y))
    return torch.cat(parts)


def label_logprobs(logits_fn, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 0,
                   agree=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(label) at every target position, in row-major order (N,) float32; their rows; their columns) for
    hidden (R, T, D) and labels (R, T) whose non-target positions hold IGNORE_INDEX. `agree(n)`: the most targets
    on any rank, given this rank's n (an engine's max all-reduce), for engines whose head call communicates."""
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # (N,) each: the targets in order
    most = None if agree is None else agree(rows.shape[0])
    return target_logprobs(logits_fn, hidden[rows, cols], labels[rows, cols], chunk, most), rows, cols


def sequence_logprobs(logits_fn, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 0,
                      agree=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over each row's targets of log p(label), the number of targets), both (R,), the sums float32; the
    arguments as `label_logprobs`'."""
    logp, rows, _ = label_logprobs(logits_fn, hidden, labels, chunk, agree)
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, logp)
    return sums, (labels != IGNORE_INDEX).sum(dim=1)


def most_on_any_rank(engine, n: int) -> int:
    """The largest `n` over the engine's data-parallel ranks (`n` itself on one process)."""
    return int(engine.all_reduce(torch.tensor(n, device=engine.device), op="max"))
