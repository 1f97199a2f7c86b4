"""Perplexity and bits per byte on held-out documents of a workbench dataset.

    perplexity    = exp( sum of -log p(token) / tokens )           per token of the model's tokenizer
    bits per byte = sum of -log2 p(token) / UTF-8 bytes of the text  independent of the tokenizer

The documents are the split's texts (`KEY.txt` in the shards, each shard checked against the manifest),
encoded with the *model's* tokenizer, so a Hugging Face model and a workbench run can be compared on the
same text by bits per byte. Each document is scored on its own after the tokenizer's prefix (bos), every
token predicted once with the longest context up to `max_length` (evals.scoring: lm-eval's rolling rule).
The end-of-document token is not scored, so perplexity here is over text tokens only, slightly different
from the trainer's validation loss, which also predicts eos and packs documents into fixed windows.

Baselines, in bits per byte over the same tokens: a uniform model over the vocabulary (log2 V per token),
and, when the model's tokenizer is the dataset's, the add-one unigram model of the train split's token
counts (the trainer's baseline). A model worth anything is below both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from evals.plots import histogram
from evals.registry import EvalContext, TaskResult
from evals.scoring import bits_per_byte, prefix_ids, rolling_nll
from workbench.config import field_
from workbench.data.shards import Manifest, read_texts
from workbench.data.tokenizer import Tokenizer
from workbench.errors import DataError


@dataclass
class Config:
    data: str | None = field_(None, doc="a dataset folder (manifest.json, shards); default: the run's data.dir")
    split: str = "val"
    max_documents: int = field_(0, ge=0, doc="0 = every document of the split")

    def validate(self) -> None:
        if self.data is not None:
            Manifest.load(self.data)  # the folder and its manifest, before the model loads


class Perplexity:
    name = "perplexity"
    description = "perplexity and bits per byte on the held-out documents of a dataset (default: the run's val split)"
    Config = Config

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        if cfg.data is None and ctx.job is None:
            raise DataError("perplexity: a Hugging Face model has no dataset of its own; give --perplexity.data "
                            "DIR (a folder built by `workbench data`)")
        root = cfg.data or ctx.job.data.dir
        manifest = Manifest.load(root)
        docs = read_texts(root, cfg.split, log=ctx.log, manifest=manifest)
        if cfg.max_documents:
            docs = docs[: cfg.max_documents]
        docs = [(k, t) for k, t in docs if t]
        if not docs:
            raise DataError(f"perplexity: the {cfg.split} split of {root} has no documents with text")
        tok = ctx.tokenizer
        prefix = prefix_ids(tok)
        encoded = tok.encode_batch([t for _, t in docs], add_special_tokens=False)
        scored = rolling_nll(ctx.model, prefix, encoded, ctx.max_length, ctx.batch_size, progress="perplexity")
        n_bytes = [len(t.encode("utf-8")) for _, t in docs]
        nll, tokens, total_bytes = sum(s[0] for s in scored), sum(s[1] for s in scored), sum(n_bytes)
        samples = [{"key": k, "tokens": n, "bytes": b, "nll": v, "bits_per_byte": bits_per_byte(v, b)}
                   for (k, _), (v, n), b in zip(docs, scored, n_bytes)]
        bpb = bits_per_byte(nll, total_bytes)
        baselines = {"uniform": bits_per_byte(tokens * math.log(tok.vocab_size), total_bytes)}
        same_tokenizer = Tokenizer.from_file(manifest.tokenizer_path).backend.to_str() == tok.backend.to_str()
        if same_tokenizer and manifest.unigram_counts:
            counts = np.asarray(manifest.unigram_counts, dtype=np.float64) + 1.0  # add-one, as the trainer's
            logp = np.log(counts) - math.log(counts.sum())
            targets = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded if ids])
            baselines["unigram"] = bits_per_byte(float(-logp[targets].sum()), total_bytes)
        plot = "perplexity.png"
        histogram(ctx.out_dir / plot, [s["bits_per_byte"] for s in samples], mark={"all documents": bpb, **baselines},
                  title=f"bits per byte of each {cfg.split} document ({len(docs)})", xlabel="bits per byte")
        return TaskResult(
            task=self.name, primary="bits_per_byte", higher_is_better=False,
            metrics={"bits_per_byte": bpb, "perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens},
            baselines=baselines, n=len(docs), samples=samples, plots=[plot],
            details={"data": str(root), "split": cfg.split, "tokens": tokens, "bytes": total_bytes,
                     "max_length": ctx.max_length, "same_tokenizer_as_dataset": same_tokenizer})


TASK = Perplexity()
