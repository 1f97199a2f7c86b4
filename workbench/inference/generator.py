"""The Generator protocol and its first implementation: batched decoding over a static KV cache.

Protocol
    generate(prompts, params) -> list[Completion]
    prompts: token-id lists (the caller tokenizes, so bos handling stays the tokenizer's business);
    params: one SamplingParams for all, or one per prompt (per-request seeds, temperatures, stops).
    Every consumer (`workbench generate`, chat, serve, RL rollouts, evals) uses only this, so the paged
    continuous-batching engine can replace `KVCacheGenerator` without touching them.

How KVCacheGenerator decodes a batch
    1. Left-pad the prompts to the longest (L). Pad slots are hidden from attention by the mask spec's
       `key_padding`, and each row's RoPE positions start at 0 on its first real token, so a padded row
       computes exactly what it would alone.
    2. Prefill: one forward over (B, L) writes the cache; the logits of slot L-1 give token 1.
    3. Decode: one forward per new token over (B, 1), reading the cache. Rows that finished keep
       stepping (their tokens are discarded) until every row is done or the longest budget is spent.

Sampling (per row): a repetition penalty first (when not 1: `apply_repetition_penalty`); then a temperature
below 1e-5 (`MIN_TEMPERATURE`, 0 included) is greedy (argmax, first index on ties, like transformers); otherwise logits / temperature, then top-k, then top-p (the smallest set of tokens whose probability
reaches p), then a draw from the row's own torch.Generator when `seed` is set.

Log-probs: `Completion.logprobs[i]` is log p(token_i | prefix) under the model's *unmodified*
distribution (temperature 1, no top-k/top-p), which is what an RL objective recomputes for the same
tokens. Stop strings are matched on the decoded continuation (needs a tokenizer); the text is cut
before the stop string, the tokens keep the one that completed it. An eos token, or one of the request's
`stop_token_ids` (a chat reply's `<|end|>`), ends a row with finish_reason "stop" and is kept in `tokens`
(not in `text`: special tokens are not decoded).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from workbench.config import fail, field_
from workbench.nn.attention import MaskSpec

MIN_TEMPERATURE = 1e-5
"""Below it sampling is greedy (as vLLM does): dividing logits by a tinier temperature overflows."""


@dataclass
class SamplingParams:
    max_new_tokens: int = field_(64, ge=0)
    temperature: float = field_(0.0, ge=0, doc="0 = greedy")
    top_k: int = field_(0, ge=0, doc="0 = off")
    top_p: float = field_(1.0, gt=0, le=1, doc="1 = off")
    repetition_penalty: float = field_(1.0, ge=0.01, le=100, doc="1 = off; > 1 makes tokens already in the prompt "
                                                                 "or the output less likely (CTRL's rule, as in "
                                                                 "transformers)")
    stop: list[str] = field_([], doc="strings that end generation (matched on the decoded text)")
    stop_token_ids: list[int] = field_([], doc="token ids that end generation besides the generator's eos ids (a "
                                              "chat reply's <|end|>: ChatTemplate.stop_ids); kept in `tokens`")
    seed: int | None = field_(None, ge=-(2**63), le=2**64 - 1, doc="a 64-bit integer (torch.Generator's range)")

    def validate(self) -> None:
        """Every field's range, also for params built in code (from_dict checks them too): one request's
        settings must not be able to break a decoding step that other requests share."""
        from workbench.config import _check_range

        for f in dataclasses.fields(self):
            _check_range(getattr(self, f.name), f.metadata, f.name)
        if isinstance(self.temperature, float) and not math.isfinite(self.temperature):
            fail("temperature", f"expected a finite number, got {self.temperature}")
        if any(not s for s in self.stop):
            fail("stop", "stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        """Temperatures below MIN_TEMPERATURE decode greedily (logits / 1e-40 would overflow to inf and NaN)."""
        return self.temperature < MIN_TEMPERATURE


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: Literal["stop", "length", "abort"] = "length"
    text: str | None = None


@runtime_checkable
class Generator(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]: ...


def per_row_params(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: `params` repeated n times, or the given list when it has n entries."""
    per_row = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(per_row) != n:
        raise ValueError(f"{len(per_row)} sampling params for {n} prompts")
    return per_row


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string in it, or all of it."""
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def apply_repetition_penalty(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty on a row of logits (V,): every token in `seen` (prompt and output so far)
    has its logit divided by `penalty` when positive and multiplied by it when negative (transformers'
    RepetitionPenaltyLogitsProcessor). Returns a new tensor; penalty 1 returns `logits` itself."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[idx]
    out = logits.clone()
    out[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def sample_next(logits: torch.Tensor, p: SamplingParams, rng: torch.Generator | None) -> int:
    """One token id from a row of logits (V,) under temperature / top-k / top-p."""
    if p.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach p (the top one always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng))


class KVCacheGenerator:
    """Generator over any decoder with `make_kv_cache` and `logits` (the simple, exact reference)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, eos_ids: Sequence[int] | None = None,
                 pad_id: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos_ids = sorted(tokenizer.eos_ids) if tokenizer is not None else []
        self.eos_ids = set(eos_ids)
        self.pad_id = pad_id

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        if not prompts:
            return []
        B = len(prompts)
        per_row = per_row_params(params, B)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (encode with a bos token)")
        if any(p.stop for p in per_row) and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the continuation")
        device = next(self.model.parameters()).device
        budget = max(p.max_new_tokens for p in per_row)
        results = [Completion(prompt_tokens=list(p)) for p in prompts]
        if budget == 0:
            return self._finish(results, per_row)

        L = max(len(p) for p in prompts)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long, device=device)
        valid = torch.ones(B, L + budget, dtype=torch.bool, device=device)  # key slots with real tokens
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
            valid[b, : L - len(p)] = False
        padded = bool((~valid[:, :L]).any())
        # RoPE positions count real tokens only: 0 on each row's first prompt token
        positions = (valid[:, :L].long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        cache = self.model.make_kv_cache(B, L + budget)
        rngs = [torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
                for p in per_row]
        done = [p.max_new_tokens == 0 for p in per_row]

        x = ids
        for step in range(budget):
            mask = MaskSpec(key_padding=valid[:, : cache.seen + x.shape[1]]) if padded else MaskSpec()
            out = self.model({"input_ids": x, "positions": positions, "mask": mask, "kv_cache": cache})
            # every row ends at the same slot (left padding), so its last hidden state gives the next token
            logits = self.model.logits(out.hidden[:, -1:])[:, 0].float()  # (B, V)
            logp = torch.log_softmax(logits, dim=-1)
            greedy = logits.argmax(-1).tolist() if any(p.greedy for p in per_row) else None
            toks = [self.pad_id] * B
            for b in range(B):
                if done[b]:
                    continue
                p = per_row[b]
                if p.greedy and p.repetition_penalty == 1.0:
                    toks[b] = greedy[b]
                else:
                    seen = list(prompts[b]) + results[b].tokens
                    toks[b] = sample_next(apply_repetition_penalty(logits[b], seen, p.repetition_penalty), p, rngs[b])
            tok_logp = logp.gather(1, torch.tensor(toks, device=device)[:, None])[:, 0].tolist()  # (B,)
            for b in range(B):
                if done[b]:
                    continue
                tok = toks[b]
                r = results[b]
                r.tokens.append(tok)
                r.logprobs.append(tok_logp[b])
                if tok in self.eos_ids or tok in per_row[b].stop_token_ids:
                    r.finish_reason, done[b] = "stop", True
                elif per_row[b].stop and self._hit_stop(r, per_row[b]):
                    r.finish_reason, done[b] = "stop", True
                elif len(r.tokens) >= per_row[b].max_new_tokens:
                    done[b] = True
            if all(done) or step == budget - 1:
                break
            x = torch.tensor(toks, dtype=torch.long, device=device)[:, None]  # (B, 1); finished rows get pad
            positions = positions[:, -1:] + 1
        return self._finish(results, per_row)

    def _hit_stop(self, r: Completion, p: SamplingParams) -> bool:
        text = self.tokenizer.decode(r.tokens)
        return any(s in text for s in p.stop)

    def _finish(self, results: list[Completion], per_row: list[SamplingParams]) -> list[Completion]:
        if self.tokenizer is None:
            return results
        for r, p in zip(results, per_row):
            text = self.tokenizer.decode(r.tokens)
            r.text = cut_at_stop(text, p.stop)
        return results
