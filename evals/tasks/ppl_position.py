"""Perplexity by position: mean negative log-likelihood of held-out text as a function of where the token
sits in a long context, on either side of the window the model was trained on.

    NLL(bin) = sum over tokens at positions p in bin of -log p(x_p | x_<p) / their count

Each sequence is one forward pass of up to `length` tokens (no sliding window, no truncation: position p
really has p tokens of context, RoPE position p included), so a model that never saw positions past its
training window shows it as a rise of NLL there; one that extrapolates (or was extended with YaRN) stays
flat or falls with more context. Sequences are the held-out documents of a dataset (the run's val split
by default), each after the tokenizer's prefix and cut at `length` tokens, positions from 0 as in training
(documents shorter than a bin do not contribute to it: each bin reports its token count); with `concat`
the documents are joined (each after its prefix) into one stream cut into `length`-token sequences, for
datasets of short documents, though that also asks the model to attend across documents, which a run
trained with document masks never did.

Metrics: `nll` over every scored token (primary, lower is better), `nll_in_window` and `nll_past_window`
(targets at positions below / from the trained window on). Baseline: the uniform model over the
vocabulary, ln V nats per token. Bins are powers of two ([1, 2), [2, 4), ... up to `length`) or `n_bins`
equal bins; the plot is NLL by bin with the uniform line and the trained window.

    workbench eval --task ppl_position --ckpt runs/NAME --ppl_position.length 4096
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from evals.plots import lines
from evals.registry import EvalContext, TaskResult
from evals.scoring import prefix_ids
from evals.tasks import _long_context as common
from workbench.config import field_
from workbench.data.shards import Manifest, read_texts
from workbench.errors import DataError
from workbench.nn.attention import MaskSpec


@dataclass
class Config:
    data: str | None = field_(None, doc="a dataset folder (manifest.json, shards); default: the run's data.dir")
    split: str = "val"
    length: int = field_(4096, ge=2, doc="tokens per sequence (prefix included)")
    max_sequences: int = field_(16, gt=0, doc="sequences scored (the first ones of the split)")
    concat: bool = field_(False, doc="join documents into one stream (else each document alone, cut at length)")
    bins: Literal["log2", "linear"] = "log2"
    n_bins: int = field_(16, gt=0, doc="equal bins when bins = linear")
    past_window: bool = field_(True, doc="run a length past the trained window (false: refuse it)")

    def validate(self) -> None:
        if self.data is not None:
            Manifest.load(self.data)


def bin_edges(length: int, bins: str, n_bins: int) -> list[int]:
    """Edges e_0 < e_1 < ... of target positions 1..length-1: bin i is [e_i, e_{i+1})."""
    if bins == "log2":
        edges = [1]
        while edges[-1] < length:
            edges.append(min(edges[-1] * 2, length))
        return edges
    return sorted(set(np.linspace(1, length, n_bins + 1).round().astype(int).tolist()))


def sequences(docs: list[list[int]], length: int, concat: bool, limit: int) -> list[list[int]]:
    if concat:
        stream = [t for d in docs for t in d]
        return [stream[s : s + length] for s in range(0, len(stream) - 1, length)][:limit]
    return [d[:length] for d in docs if len(d) >= 2][:limit]


@torch.inference_mode()
def position_nll(model, seqs: list[list[int]], length: int,
                 head_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(sum of -log p, count) per target position 1..length-1 (index p), and each sequence's mean NLL; each
    sequence is one forward."""
    device = next(model.parameters()).device
    total, count, per_seq = np.zeros(length), np.zeros(length), []
    for seq in seqs:
        before = total.sum()
        ids = torch.tensor(seq[:-1], dtype=torch.long, device=device)[None]  # (1, T)
        T = ids.shape[1]
        hidden = model({"input_ids": ids, "positions": torch.arange(T, device=device)[None], "mask": MaskSpec()}).hidden
        targets = torch.tensor(seq[1:], dtype=torch.long, device=device)
        for s in range(0, T, head_chunk):
            logits = model.logits(hidden[:, s : s + head_chunk])[0].float()  # (n, V)
            # -log p(x_{p} | x_<p) for targets p = s+1 .. s+n
            nll = -torch.log_softmax(logits, -1).gather(1, targets[s : s + head_chunk, None])[:, 0]
            total[s + 1 : s + 1 + len(nll)] += nll.double().cpu().numpy()
            count[s + 1 : s + 1 + len(nll)] += 1
        per_seq.append(float(total.sum() - before) / (len(seq) - 1))
    return total, count, per_seq


class PplPosition:
    name = "ppl_position"
    description = "mean NLL of held-out text by token position in long contexts, in and past the trained window"
    Config = Config

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        if cfg.data is None and ctx.job is None:
            raise DataError("ppl_position: a Hugging Face model has no dataset of its own; give --ppl_position.data "
                            "DIR (a folder built by `workbench data`)")
        common.check_lengths(ctx, self.name, [cfg.length], cfg.past_window)
        window = common.trained_window(ctx)
        root = cfg.data or ctx.job.data.dir
        texts = [t for _, t in read_texts(root, cfg.split, log=ctx.log, manifest=Manifest.load(root)) if t]
        tok = ctx.tokenizer
        prefix = prefix_ids(tok)
        docs = [prefix + ids for ids in tok.encode_batch(texts, add_special_tokens=False)]
        seqs = sequences(docs, cfg.length, cfg.concat, cfg.max_sequences)
        if not seqs:
            raise DataError(f"ppl_position: the {cfg.split} split of {root} has no documents to score")
        total, count, per_seq = position_nll(ctx.model, seqs, cfg.length)
        edges = bin_edges(cfg.length, cfg.bins, cfg.n_bins)
        table = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            n = count[lo:hi].sum()
            table.append({"start": lo, "end": hi, "tokens": int(n),
                          "nll": float(total[lo:hi].sum() / n) if n else float("nan")})
        table = [row for row in table if row["tokens"]]
        inside, past = slice(1, window), slice(window, cfg.length)
        metrics = {"nll": float(total.sum() / count.sum())}
        metrics["nll_in_window"] = float(total[inside].sum() / count[inside].sum()) if count[inside].sum() else math.nan
        if count[past].sum():
            metrics["nll_past_window"] = float(total[past].sum() / count[past].sum())
        uniform = math.log(tok.vocab_size)
        plot = "ppl_position.png"
        lines(ctx.out_dir / plot, [math.sqrt(r["start"] * r["end"]) if cfg.bins == "log2" else (r["start"] + r["end"]) / 2
                                   for r in table], {"mean NLL": [r["nll"] for r in table]},
              hlines={"uniform": uniform}, vline=("trained window", window),
              title=f"NLL by position ({len(seqs)} sequences of up to {cfg.length} tokens)",
              xlabel="token position", ylabel="nats per token", logx=cfg.bins == "log2")
        samples = [{"sequence": i, "tokens": len(s), "nll": v} for i, (s, v) in enumerate(zip(seqs, per_seq))]
        return TaskResult(
            task=self.name, primary="nll", higher_is_better=False, metrics=metrics, baselines={"uniform": uniform},
            n=len(seqs), samples=samples, plots=[plot],
            details={"data": str(root), "split": cfg.split, "trained_window": window, "tokens": int(count.sum()),
                     "bins": table})


TASK = PplPosition()
