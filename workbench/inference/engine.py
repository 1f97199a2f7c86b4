"""The serving engine: continuous batching over the paged KV cache, behind the Generator protocol.

What it is
    `Engine` keeps a queue of requests and advances all of them together, one `step()` (one model forward)
    at a time. Requests join between steps as soon as there is room, and leave the moment they finish,
    handing their cache blocks back: no request waits for the longest one in its batch, which is what
    static batching (`KVCacheGenerator`, every row until the longest is done) costs on mixed lengths.

    engine = Engine(model, tokenizer)
    rid = engine.add_request(prompt_ids, SamplingParams(...), adapter=None)   # -> request id
    for out in engine.step(): ...        # RequestOutput per request that moved: new tokens, new text
    engine.abort(rid)                    # a client left: its blocks go back to the pool now
    engine.generate(prompts, params)     # the Generator protocol: run until these requests finish
    engine.stream(prompt, params)        # an iterator of RequestOutput deltas for one request

How a step is chosen (the scheduler)
    Each request has a feed: the tokens whose KV is not cached yet (its prompt at first, then the token
    it just sampled). A *prefill step* runs the feeds of requests still reading their prompt: those already
    running first, then waiting ones in arrival order while the batch has room (`max_batch`) and the pool
    has blocks, up to `max_step_tokens` fed tokens per step; a prompt longer than what is left of the budget
    is read in chunks over several steps (chunked prefill). A *decode step* feeds one token to every
    running request that has read its prompt. Prefill and decode steps alternate while both have work, so
    a stream of arrivals cannot stall the requests already decoding, and a decode step never pads one-token
    rows up to a prompt's length. A row's new token is sampled from the logits of its last fed token, once
    its whole feed is cached.
    When a decode step needs a block and none is free, the newest running request is preempted: its
    blocks are freed, and it goes back to the front of the queue to be recomputed from its prompt and the
    tokens it already has (vLLM's recompute preemption), so its output does not change.

Sampling (per request): greedy, temperature, top-k, top-p and a repetition penalty (CTRL's rule, as in
transformers: a seen token's logit is divided by the penalty when positive, multiplied when negative), a
per-request seed (its own torch.Generator, so a request samples the same tokens whatever it is batched
with), stop token ids and stop strings, exactly as `KVCacheGenerator` does (`sample_next` is shared); log-
probs are of the unmodified distribution. Streaming text holds back characters that could still become a
stop string and an incomplete UTF-8 sequence, so a client never sees text that is later cut.

Every decoder family works: the engine needs only the decoder interface, `kv_entry_shapes()` and the
KVCache interface (workbench/inference/paged.py says how a forward reads the pool). Sliding-window models
give back blocks that fell out of the window as they decode. MoBA models run one request per step: MoBA
gates on key blocks of slots, and right-aligned rows of different lengths would put block boundaries at
different positions than an unbatched run. Multi-adapter serving: with `adapters` (a registry from
`workbench.inference.adapters.load_adapters`), each request names its LoRA adapter and one forward serves
rows of different adapters.

Failures: `add_request` refuses what cannot run (an empty prompt, settings out of range via
`SamplingParams.validate`, more tokens than `max_len` or the whole pool); if a step's forward or sampling
raises anyway, that step's requests are aborted (blocks returned) and `StepError.request_ids` names them, while
queued and other running requests are untouched.

Not thread-safe: one thread drives an Engine (the HTTP server runs it in a loop thread).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from workbench.inference.generator import (
    Completion,
    SamplingParams,
    apply_repetition_penalty,
    cut_at_stop,
    per_row_params,
    sample_next,
)
from workbench.inference.paged import NULL_BLOCK, PagedKVCache
from workbench.nn.attention import MaskSpec

DEFAULT_CACHE_BYTES = 1 << 30  # the pool's size when num_blocks is not given: 1 GiB at most


class StepError(RuntimeError):
    """A step's forward or sampling failed: its requests (`request_ids`) were aborted, the others are intact."""

    def __init__(self, request_ids: list[int]):
        super().__init__(f"the engine step over requests {request_ids} failed (they were aborted)")
        self.request_ids = request_ids


@dataclass
class RequestOutput:
    """What one step did for one request: the tokens it added and the text they completed."""

    request_id: int
    new_tokens: list[int]
    new_text: str
    finished: bool
    completion: Completion  # the request so far (final once `finished`)


@dataclass(eq=False)  # requests compare by identity (`in self.running`), not field by field
class _Request:
    id: int
    params: SamplingParams
    adapter_id: int
    rng: torch.Generator | None
    completion: Completion
    stream_text: bool
    blocks: list[int] = field(default_factory=list)  # block table: logical block -> physical id (NULL once dropped)
    computed: int = 0  # tokens whose KV is in the pool
    emitted: int = 0  # characters of text already handed out
    finished: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.completion.prompt_tokens + self.completion.tokens

    @property
    def feed(self) -> int:
        return len(self.completion.prompt_tokens) + len(self.completion.tokens) - self.computed


def model_window(model: torch.nn.Module) -> int | None:
    """The sliding window every layer of `model` uses, or None (full attention, or a pattern on some layers)."""
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "moba_block_size", None) is not None:
        return None
    return getattr(cfg, "sliding_window", None)


class Engine:
    """Continuous batching over a paged KV cache (see the module notes)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, eos_ids: Sequence[int] | None = None, *,
                 block_size: int = 16, num_blocks: int | None = None, max_batch: int = 16,
                 max_step_tokens: int = 512, max_len: int | None = None, adapters=None, pad_id: int = 0):
        for name, value, low in (("block_size", block_size, 1), ("max_batch", max_batch, 1),
                                 ("max_step_tokens", max_step_tokens, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        if not hasattr(model, "kv_entry_shapes"):
            raise ValueError(f"{type(model).__name__} has no kv_entry_shapes(): the engine cannot size its cache")
        self.model = model
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos_ids = sorted(tokenizer.eos_ids) if tokenizer is not None else []
        self.eos_ids = set(eos_ids)
        self.pad_id = pad_id
        self.adapters = adapters
        cfg = getattr(model, "cfg", None)
        self.max_len = int(max_len or getattr(cfg, "max_seq_len", 0) or 4096)
        self.window = model_window(model)
        self.max_batch = 1 if getattr(cfg, "moba_block_size", None) is not None else max_batch
        self.max_step_tokens = max_step_tokens
        w = next(model.parameters())
        self.device = w.device
        shapes = model.kv_entry_shapes()
        n_layers = len(getattr(model, "layers", [])) or cfg.n_layers
        if num_blocks is None:
            per_token = sum(math.prod(s) for s in shapes) * w.element_size() * n_layers
            tokens = min(max_batch * self.max_len, DEFAULT_CACHE_BYTES // max(per_token, 1))
            num_blocks = math.ceil(tokens / block_size) + 1
        self.cache = PagedKVCache(n_layers, shapes, num_blocks, block_size, dtype=w.dtype, device=w.device)
        self.block_size = block_size
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self._last_kind = "decode"
        self.stats = {"steps": 0, "prefill_steps": 0, "decode_steps": 0, "fed_tokens": 0, "padded_tokens": 0,
                      "preemptions": 0, "peak_blocks": 0}

    # ------------------------------------------------------------------------------------------- requests

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds (one request may use all of it)."""
        return self.cache.allocator.capacity * self.block_size

    def add_request(self, prompt: Sequence[int], params: SamplingParams, adapter: str | None = None,
                    stream_text: bool = True) -> int:
        """Queue a request; returns its id. The prompt is token ids (the caller tokenizes)."""
        return self._add(prompt, params, adapter, stream_text).id

    def _add(self, prompt: Sequence[int], params: SamplingParams, adapter: str | None, stream_text: bool) -> _Request:
        if len(prompt) == 0:
            raise ValueError("prompt: every prompt needs at least one token (encode with a bos token)")
        params.validate()
        if (params.stop or stream_text) and self.tokenizer is None:
            if params.stop:
                raise ValueError("stop strings need a tokenizer to decode the continuation")
            stream_text = False
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt: {len(prompt)} tokens leave no room to generate within max_len {self.max_len}")
        need = min(len(prompt) + params.max_new_tokens, self.max_len)
        if need > self.capacity_tokens:
            raise ValueError(f"prompt + max_new_tokens: {need} tokens exceed the KV cache's {self.capacity_tokens} "
                             f"({self.cache.allocator.capacity} blocks of {self.block_size}); raise num_blocks")
        if adapter is not None and self.adapters is None:
            raise ValueError(f"adapter: {adapter!r} asked for, but this engine serves no adapters")
        adapter_id = self.adapters.id_of(adapter) if self.adapters is not None else 0
        rid = self._next_id
        self._next_id += 1
        rng = torch.Generator(device=self.device).manual_seed(params.seed) if params.seed is not None else None
        req = _Request(rid, params, adapter_id, rng, Completion(prompt_tokens=list(prompt)), stream_text)
        self._requests[rid] = req
        if params.max_new_tokens == 0:
            self._finish(req, "length")
        else:
            self.waiting.append(req)
        return req

    def abort(self, request_id: int) -> bool:
        """Drop a request (a client that went away): its blocks return to the pool. False if it is unknown."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.finished = True
        req.completion.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def free_blocks(self) -> int:
        return self.cache.allocator.free

    # ----------------------------------------------------------------------------------------- protocol

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 adapters: Sequence[str | None] | None = None) -> list[Completion]:
        """The Generator protocol: queue every prompt, step until all of them finished, completions in order."""
        per_row = per_row_params(params, len(prompts))
        names = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(names) != len(prompts):
            raise ValueError(f"{len(names)} adapters for {len(prompts)} prompts")
        reqs: list[_Request] = []
        try:
            for p, sp, a in zip(prompts, per_row, names):
                reqs.append(self._add(p, sp, a, stream_text=False))
            while not all(r.finished for r in reqs):
                self.step()
        except BaseException:
            for r in reqs:
                self.abort(r.id)
            raise
        return [r.completion for r in reqs]

    def stream(self, prompt: Sequence[int], params: SamplingParams, adapter: str | None = None
               ) -> Iterator[RequestOutput]:
        """Deltas of one request as they come (steps every other queued request along the way)."""
        req = self._add(prompt, params, adapter, stream_text=True)
        rid = req.id
        try:
            if req.finished:
                yield RequestOutput(rid, [], req.completion.text or "", True, req.completion)
                return
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(rid)

    # ------------------------------------------------------------------------------------------- steps

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One forward over the requests the scheduler picks; outputs for those that produced a token."""
        rows, feeds = self._schedule()
        if not rows:
            return []
        try:
            outputs = self._run(rows, feeds)
        except Exception as e:  # the step's requests end here (their blocks back in the pool); the rest go on
            ids = [r.id for r in rows]
            for rid in ids:
                self.abort(rid)
            raise StepError(ids) from e
        used = self.cache.allocator.capacity - self.cache.allocator.free
        self.stats["peak_blocks"] = max(self.stats["peak_blocks"], used)
        return outputs

    def _schedule(self) -> tuple[list[_Request], list[int]]:
        self._drop_out_of_window()
        prefilling = [r for r in self.running if r.feed > 1]
        decoding = [r for r in self.running if r.feed == 1]
        can_admit = bool(self.waiting) and len(self.running) < self.max_batch
        if (prefilling or can_admit) and (self._last_kind == "decode" or not decoding):
            rows, feeds = self._prefill_batch(prefilling)
            if rows:
                self._last_kind = "prefill"
                return rows, feeds
        if decoding:
            rows = self._decode_batch(decoding)
            if rows:
                self._last_kind = "decode"
                return rows, [1] * len(rows)
        if self.running:  # every running request waits for blocks: the newest makes room
            self._preempt(self.running[-1])
            return self._schedule()
        if self.waiting:  # add_request rules this out: any one request fits the empty pool
            raise RuntimeError("a queued request does not fit the empty KV cache")
        return [], []

    def _prefill_batch(self, prefilling: list[_Request]) -> tuple[list[_Request], list[int]]:
        rows, feeds, budget = [], [], self.max_step_tokens
        for req in prefilling:
            if budget == 0 or len(rows) == self.max_batch:
                break
            t = min(req.feed, budget)
            if self._reserve(req, req.computed + t):
                rows.append(req)
                feeds.append(t)
                budget -= t
        while self.waiting and budget > 0 and len(self.running) < self.max_batch and len(rows) < self.max_batch:
            req = self.waiting[0]
            t = min(req.feed, budget)
            if not self._reserve(req, req.computed + t):
                break  # first come, first served: later requests wait behind it
            self.waiting.popleft()
            self.running.append(req)
            rows.append(req)
            feeds.append(t)
            budget -= t
        self.stats["prefill_steps"] += bool(rows)
        return rows, feeds

    def _decode_batch(self, decoding: list[_Request]) -> list[_Request]:
        rows = []
        for req in decoding:  # oldest first: they keep their blocks, the newest give theirs up
            if req not in self.running:
                continue  # preempted below for an older request
            while not self._reserve(req, req.computed + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
                if victim in rows:
                    rows.remove(victim)
            if req in self.running:
                rows.append(req)
        self.stats["decode_steps"] += bool(rows)
        return rows

    def _reserve(self, req: _Request, tokens: int) -> bool:
        """Give `req` blocks for its first `tokens` positions; False (nothing taken) if the pool is short."""
        need = math.ceil(tokens / self.block_size) - len(req.blocks)
        if need <= 0:
            return True
        if need > self.cache.allocator.free:
            return False
        req.blocks += self.cache.allocator.allocate(need)
        return True

    def _release(self, req: _Request) -> None:
        self.cache.allocator.release(req.blocks)
        req.blocks = []

    def _preempt(self, req: _Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.computed = 0
        self.waiting.appendleft(req)
        self.stats["preemptions"] += 1

    def _drop_out_of_window(self) -> None:
        """Sliding window: a block whose every position is older than the window is never read again."""
        if self.window is None:
            return
        for req in self.running:
            first_needed = req.computed - self.window + 1  # the oldest key the next query can see
            for i in range(max(first_needed, 0) // self.block_size):
                if req.blocks[i] != NULL_BLOCK:
                    self.cache.allocator.release([req.blocks[i]])
                    req.blocks[i] = NULL_BLOCK

    def _run(self, rows: list[_Request], feeds: list[int]) -> list[RequestOutput]:
        bs = self.block_size
        B, Tq = len(rows), max(feeds)
        # the first position each row reads: past the blocks a sliding window dropped
        starts = [next((i for i, b in enumerate(r.blocks) if b != NULL_BLOCK), 0) * bs for r in rows]
        plan = self.cache.plan([r.blocks for r in rows], [r.computed for r in rows], feeds, starts)
        ids = torch.tensor([[self.pad_id] * (Tq - t) + _feed_tokens(r, t) for r, t in zip(rows, feeds)])
        dev = self.device
        valid = plan["valid"]
        self.cache.bind(plan["write_rows"].to(dev), plan["write_slots"].to(dev), plan["read"].to(dev), Tq)
        mask = MaskSpec() if bool(valid.all()) else MaskSpec(key_padding=valid.to(dev))
        batch = {"input_ids": ids.to(dev), "positions": plan["positions"].to(dev), "mask": mask, "kv_cache": self.cache}
        adapter_ctx = nullcontext()
        if self.adapters is not None:
            from workbench.inference.adapters import adapter_rows

            adapter_ctx = adapter_rows(self.model, torch.tensor([r.adapter_id for r in rows], device=dev))
        with adapter_ctx:
            out = self.model(batch)
        self.cache.advance(Tq)
        self.stats["steps"] += 1
        self.stats["fed_tokens"] += sum(feeds)
        self.stats["padded_tokens"] += B * Tq - sum(feeds)
        for req, t in zip(rows, feeds):
            req.computed += t
        ready = [b for b, req in enumerate(rows) if req.feed == 0]
        if not ready:
            return []
        # every row ends at the last column, so its last hidden state gives its next token
        logits = self.model.logits(out.hidden[ready, -1:])[:, 0].float()  # (R, V)
        logp = torch.log_softmax(logits, dim=-1)
        toks = logits.argmax(-1).tolist()
        for i, b in enumerate(ready):
            p = rows[b].params
            if not p.greedy or p.repetition_penalty != 1.0:
                toks[i] = sample_next(apply_repetition_penalty(logits[i], rows[b].tokens, p.repetition_penalty),
                                      p, rows[b].rng)
        tok_logp = logp.gather(1, torch.tensor(toks, device=logp.device)[:, None])[:, 0].tolist()
        outputs = []
        for i, b in enumerate(ready):
            rows[b].completion.tokens.append(toks[i])
            rows[b].completion.logprobs.append(tok_logp[i])
            outputs.append(self._advance_request(rows[b], toks[i]))
        return outputs

    def _advance_request(self, req: _Request, tok: int) -> RequestOutput:
        c, p = req.completion, req.params
        text = None
        if p.stop or req.stream_text:
            text = self.tokenizer.decode(c.tokens)
        reason = None
        if tok in self.eos_ids or tok in p.stop_token_ids:
            reason = "stop"
        elif p.stop and any(s in text for s in p.stop):
            reason = "stop"
        elif len(c.tokens) >= p.max_new_tokens or len(c.prompt_tokens) + len(c.tokens) >= self.max_len:
            reason = "length"
        if reason is not None:
            self._finish(req, reason, text)
            delta = (c.text or "")[req.emitted:] if req.stream_text else ""
            req.emitted += len(delta)
            return RequestOutput(req.id, [tok], delta, True, c)
        delta = ""
        if req.stream_text:
            safe = _safe_prefix(text, p.stop)
            delta = text[req.emitted : safe] if safe > req.emitted else ""
            req.emitted += len(delta)
        return RequestOutput(req.id, [tok], delta, False, c)

    def _finish(self, req: _Request, reason: str, text: str | None = None) -> None:
        c = req.completion
        c.finish_reason = reason
        if self.tokenizer is not None:
            text = self.tokenizer.decode(c.tokens) if text is None else text
            c.text = cut_at_stop(text, req.params.stop)
        if req in self.running:
            self.running.remove(req)
        self._release(req)
        req.finished = True
        self._requests.pop(req.id, None)


def _feed_tokens(req: _Request, t: int) -> list[int]:
    """The next `t` tokens of a request whose KV is not cached yet (without copying prompt + output)."""
    prompt, out, c = req.completion.prompt_tokens, req.completion.tokens, req.computed
    if c >= len(prompt):
        return out[c - len(prompt) : c - len(prompt) + t]
    return (prompt + out)[c : c + t]


def _safe_prefix(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be handed out: not a trailing replacement character (an incomplete UTF-8
    sequence the next token may finish), nor a tail that could still grow into a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end
