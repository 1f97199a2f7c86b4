"""What the long-context tasks share (passkey, niah, ruler_multikey, variable_tracking, ppl_position).

Lengths past the window. A run's scoring window (`EvalContext.max_length`) is the window it was trained
on; the point of these tasks is to ask past it, so a length longer than the window runs as asked —
nothing is truncated — and is marked `past_window` in the details and by a dotted line in the plots. The
option `past_window = false` refuses such lengths instead (an error naming them). Nothing else limits a
prompt: RoPE is computed from positions, the KV cache is sized per batch, and `max_seq_len` of a model
config is documentation, not a bound.

Prompts are the tokenizer's prefix (bos) + the encoded text, counted the same way when fitting a sample
to its length (`counter`), so a sample of length L is at most L tokens as the model reads it. Answers are
generated greedily (temperature 0) for the answer's own token count plus a few, per sample.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from data_pipelines import long_context as lc
from evals.registry import EvalContext
from evals.scoring import prefix_ids
from workbench.data.shards import Manifest, read_texts
from workbench.errors import DataError, WorkbenchError
from workbench.inference.generator import SamplingParams

EVAL_SEED = 20260707  # held out: training recipes that mix in passkeys draw from other seeds
SLACK_TOKENS = 3  # generated past the answer's own token count (a space or a merge may cost one more)


def sample_rng(task: str, seed: int, *cell) -> random.Random:
    """The generator of one sample: fixed by the task, seed and cell (length, depth, index), not by the
    other cells asked for. (A str seed is hashed by sha512: the same on every run and machine.)"""
    return random.Random("/".join(str(x) for x in (task, seed, *cell)))


def counter(tokenizer) -> Callable[[str], int]:
    """Tokens the model reads for a prompt text: the prefix (bos) + the text."""
    n_prefix = len(prefix_ids(tokenizer))
    return lambda text: n_prefix + len(tokenizer.encode(text, add_special_tokens=False))


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    prefix = prefix_ids(tokenizer)
    return [prefix + ids for ids in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def trained_window(ctx: EvalContext) -> int:
    """The window the model was trained on: a run's data.seq_len; else the scoring window."""
    return ctx.job.data.seq_len if ctx.job is not None else ctx.max_length


def check_lengths(ctx: EvalContext, task: str, lengths: Sequence[int], past_window: bool) -> list[int]:
    """The lengths in increasing order, those past the window logged (or refused without `past_window`)."""
    window = trained_window(ctx)
    past = [n for n in lengths if n > window]
    if past and not past_window:
        raise WorkbenchError(f"{task}.lengths: {', '.join(map(str, past))} exceed the window of {window} tokens "
                             f"the model was trained on; set --{task}.past_window true to run them (that is "
                             f"the point of a long-context eval: it shows where the model fails)")
    if past:
        ctx.log(f"{task}: length {', '.join(map(str, past))} past the trained window of {window} tokens: "
                f"run as asked, not truncated")
    return sorted(set(lengths))


def haystack(ctx: EvalContext, task: str, choice: str, data: str | None, split: str) -> lc.Haystack:
    """`filler` sentences, or the lines of a dataset's held-out texts (`data`: `--TASK.data DIR`, else the
    run's data.dir); `auto` is the run's data when there is some, else filler."""
    if choice == "filler" or (choice == "auto" and data is None and ctx.job is None):
        return lc.FILLER_HAYSTACK
    if data is None and ctx.job is None:
        raise DataError(f"{task}: haystack = data needs a dataset: give --{task}.data DIR (a folder built by "
                        f"`workbench data`)")
    root = data or ctx.job.data.dir
    try:
        texts = [t for _, t in read_texts(root, split, log=ctx.log, manifest=Manifest.load(root))]
    except DataError:
        if choice == "auto" and data is None:
            ctx.log(f"{task}: the run's data ({root}) cannot be read; the haystack is filler")
            return lc.FILLER_HAYSTACK
        raise
    try:
        return lc.text_haystack(texts, name=f"{Path(root).name}:{split}")
    except ValueError as e:
        raise DataError(f"{task}: {e}") from None


def greedy_answers(ctx: EvalContext, items: Sequence[dict], desc: str) -> list[str]:
    """The greedy continuation of each item's prompt, for its answer's token count + SLACK_TOKENS tokens."""
    tok = ctx.tokenizer
    prompts = encode(tok, [it["prompt"] for it in items])
    params = [SamplingParams(max_new_tokens=len(tok.encode(it["answer"], add_special_tokens=False)) + SLACK_TOKENS,
                             temperature=0.0) for it in items]
    completions = ctx.generate(prompts, params, desc=desc)
    return [tok.decode(c.tokens, skip_special_tokens=True) for c in completions]


def group(samples: Sequence[dict], key: str, fields: Sequence[str], window: int | None = None) -> dict:
    """{value of key: {mean of each field, n[, past_window]}} over samples, keys in increasing order."""
    groups: dict = defaultdict(list)
    for s in samples:
        groups[s[key]].append(s)
    out = {}
    for k in sorted(groups):
        g = groups[k]
        row = {f: sum(float(s[f]) for s in g) / len(g) for f in fields}
        row["n"] = len(g)
        if window is not None:
            row["past_window"] = k > window
        out[k] = row
    return out


def tail(text: str, chars: int = 160) -> str:
    """A prompt's end (the question and what precedes it), for the samples file."""
    return text if len(text) <= chars else "\u2026" + text[-chars:]


def fitted_items(task: str, seed: int, lengths: Sequence[int], depths: Sequence[float | None], n: int,
                 make: Callable[[random.Random, int, float | None], dict]) -> list[dict]:
    """`n` samples per (length, depth) cell, each make(rng, length, depth) fitted to `length` tokens, plus its
    length. The rng is the cell's (`sample_rng` over (length, depth, i), or (length, i) where depths is
    [None]); a length too short for the needles and the question is an error naming the option."""
    items = []
    for length in lengths:
        for depth in depths:
            for i in range(n):
                cell = (length, i) if depth is None else (length, depth, i)
                try:
                    items.append({**make(sample_rng(task, seed, *cell), length, depth), "length": length})
                except ValueError as e:
                    raise WorkbenchError(f"{task}.lengths: {length} tokens is too short ({e})") from None
    return items
