"""Scoring primitives every task and the lm-eval adapter share: log-likelihoods and batched generation.

Log-likelihood of a target given a context
    score(model, [(context_ids, target_ids), ...]) returns, per request, log p(target_i | context,
    target_<i) for every target token (float64) and whether greedy decoding would have produced the whole
    target. The input is context + target minus its last token; when it is longer than `max_length` it is
    cut from the left, so the targets keep the most context that fits. Requests are batched longest first
    and right-padded: a causal model's outputs at real positions never see the padding after them, so no
    mask is needed. Only the hidden states at target positions go through the output head (a 128K
    vocabulary over every position of a batch would not fit), in chunks.

Rolling log-likelihood of a document (perplexity, bits per byte)
    A document of n tokens after its prefix (the bos the tokenizer adds, or eos for tokenizers that add
    nothing: `prefix_ids`) is cut into chunks of `max_length` targets; every token is predicted exactly
    once, and each chunk gets the longest context that fits, including tokens of earlier chunks
    (`rolling_requests`). This is lm-evaluation-harness's `loglikelihood_rolling` rule, so our
    perplexity task and lm-eval's bits_per_byte agree on the same text.

Generation
    `fit_prompts` encodes prompts after the prefix so that prompt + completion fit in `max_length` (for a
    run, the window it was trained on): a long prompt keeps its end, or is refused where its start matters.
    (Scoring windows, by contrast, are cut like lm-eval's, the prefix included: there the prefix is only
    context.) `generate(generator, prompts, params,
    batch_size)` sends prompts through any `Generator` in batches of similar length (less left padding),
    with a progress bar, and returns completions in prompt order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm import tqdm

from workbench.errors import WorkbenchError
from workbench.inference.generator import Completion, Generator, SamplingParams
from workbench.nn.attention import MaskSpec

Request = tuple[Sequence[int], Sequence[int]]


def prefix_ids(tokenizer) -> list[int]:
    """What every document is scored after: the special tokens `encode` puts in front of text (Llama's
    and our tokenizers' bos), else the bos id, else the eos id (the token a packed document follows)."""
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    if len(with_special) > len(plain) and with_special[-len(plain):] == plain:
        return with_special[: len(with_special) - len(plain)]
    for token in (tokenizer.bos_id, tokenizer.eos_id):
        if token is not None:
            return [token]
    raise WorkbenchError("the tokenizer adds no bos and has neither a bos nor an eos id: no token to score "
                         "the first token of a document after")


def fit_prompts(tokenizer, texts: Sequence[str], max_length: int, max_new_tokens: int,
                option: str = "max_new_tokens", truncate: bool = True) -> tuple[list[list[int]], int]:
    """(prefix + tokens of each text, how many were cut): prompt and completion must fit in `max_length`
    (a model asked past the window it was trained on answers from positions it never saw). With `truncate`
    a long prompt keeps its end (the prefix stays: a prompt always starts a document); without, a prompt
    that does not fit is an error (a question cut off its start cannot be answered)."""
    prefix = prefix_ids(tokenizer)
    room = max_length - max_new_tokens - len(prefix)
    if room < 1:
        raise WorkbenchError(f"{option} = {max_new_tokens} leaves no room for a prompt within the scoring window "
                             f"of {max_length} tokens: lower {option} or raise --max-length")
    encoded = [tokenizer.encode(t, add_special_tokens=False) if t else [] for t in texts]
    long = [len(ids) for ids in encoded if len(ids) > room]
    if long and not truncate:
        raise WorkbenchError(f"{len(long)} of {len(texts)} prompts (the longest {max(long)} tokens) do not fit "
                             f"with {option} = {max_new_tokens} in the scoring window of {max_length} tokens: "
                             f"lower {option} or raise --max-length")
    return [prefix + ids[-room:] for ids in encoded], len(long)


def rolling_requests(prefix: Sequence[int], tokens: Sequence[int], max_length: int) -> list[Request]:
    """(context, target) requests that predict each of `tokens` once, after `prefix`, in chunks of
    `max_length` targets; `score` trims each context to the `max_length` inputs before its targets."""
    full = list(prefix) + list(tokens)
    p = len(prefix)
    return [(full[:s], full[s : s + max_length]) for s in range(p, len(full), max_length)]


@torch.inference_mode()
def score(
    model: torch.nn.Module, requests: Sequence[Request], batch_size: int = 16, max_length: int = 2048,
    head_chunk: int = 2048, progress: str | None = None,
) -> list[tuple[torch.Tensor, bool]]:
    """(log-probs of each target token (float64, 1-D), greedy?) for each (context, target) request."""
    for context, target in requests:
        if not context:
            raise ValueError("every request needs a context of at least one token (a document's prefix)")
        if not target or len(target) > max_length:
            raise ValueError(f"a target must have 1 to max_length = {max_length} tokens, got {len(target)}")
    device = next(model.parameters()).device
    inputs = [(list(c) + list(t))[:-1][-max_length:] for c, t in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    out: list[tuple[torch.Tensor, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=progress, disable=progress is None, dynamic_ncols=True, leave=False)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        T = len(inputs[rows[0]])
        ids = torch.zeros(len(rows), T, dtype=torch.long, device=device)
        for b, i in enumerate(rows):
            ids[b, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        positions = torch.arange(T, device=device).expand(len(rows), T)
        hidden = model({"input_ids": ids, "positions": positions, "mask": MaskSpec()}).hidden  # (B, T, D)
        # the positions whose next token is a target: the last len(target) inputs of each row
        rows_idx, cols_idx, targets = [], [], []
        for b, i in enumerate(rows):
            target = list(requests[i][1])
            n_in = len(inputs[i])
            rows_idx += [b] * len(target)
            cols_idx += range(n_in - len(target), n_in)
            targets += target
        picked = hidden[torch.tensor(rows_idx, device=device), torch.tensor(cols_idx, device=device)]  # (N, D)
        tgt = torch.tensor(targets, dtype=torch.long, device=device)
        logp, greedy = [], []
        for s in range(0, len(tgt), head_chunk):
            logits = model.logits(picked[None, s : s + head_chunk])[0].float()  # (n, V)
            lsm = torch.log_softmax(logits, dim=-1)
            logp.append(lsm.gather(1, tgt[s : s + head_chunk, None])[:, 0].double().cpu())
            greedy.append((logits.argmax(-1) == tgt[s : s + head_chunk]).cpu())
        logp_all, greedy_all = torch.cat(logp), torch.cat(greedy)
        offset = 0
        for i in rows:
            n = len(requests[i][1])
            out[i] = (logp_all[offset : offset + n], bool(greedy_all[offset : offset + n].all()))
            offset += n
        bar.update(len(rows))
    bar.close()
    return out  # type: ignore[return-value]


def rolling_nll(model, prefix: Sequence[int], documents: Sequence[Sequence[int]], max_length: int,
                batch_size: int = 16, progress: str | None = None) -> list[tuple[float, int]]:
    """(sum of -log p in nats, tokens scored) of each document, each token predicted once (see notes)."""
    requests, owner = [], []
    for d, tokens in enumerate(documents):
        for r in rolling_requests(prefix, tokens, max_length):
            requests.append(r)
            owner.append(d)
    totals = [[0.0, 0] for _ in documents]
    for d, (logp, _) in zip(owner, score(model, requests, batch_size, max_length, progress=progress)):
        totals[d][0] -= float(logp.sum())
        totals[d][1] += len(logp)
    return [(nll, n) for nll, n in totals]


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood (nats) of a text per byte of its UTF-8, in bits: tokenizer-independent."""
    return nll_nats / (math.log(2) * n_bytes) if n_bytes else float("nan")


def generate(
    generator: Generator, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
    batch_size: int = 16, progress: str | None = None,
) -> list[Completion]:
    """Completions of `prompts` (token ids) in order, generated in batches of prompts of similar length."""
    per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=progress, disable=progress is None, dynamic_ncols=True, leave=False)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        for i, c in zip(rows, generator.generate([prompts[i] for i in rows], [per_row[i] for i in rows])):
            out[i] = c
        bar.update(len(rows))
    bar.close()
    return out  # type: ignore[return-value]
