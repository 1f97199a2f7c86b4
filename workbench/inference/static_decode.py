"""StaticDecoder: greedy decoding with fixed shapes, so one decode step can be one CUDA graph (or one compiled graph).

What it is
    A greedy-only decoder for the decoders with a plain k/v cache (Llama 3, Mixtral) whose every decode step
    has the same tensor shapes, the same tensor addresses and no Python value that changes from step to step.
    That is what `torch.cuda.CUDAGraph` needs to record the step once and replay it per token (one launch
    instead of hundreds of small kernel launches from Python), and what `torch.compile(dynamic=False)` needs
    to compile the step once instead of recompiling per token. `KVCacheGenerator` computes the same tokens
    and log-probs, but its cache returns `buf[:, :seen + T]` (a new shape every step), its attention reads
    `seen` as a Python int, and it reads every token back to the host (`.tolist()`), so it is bound by Python
    and by the sync. Here the host reads the result once, at the end of the generation.

The mechanism
    State, allocated once at construction for `max_batch` rows and `max_len` slots (a batch of B rows uses
    the first B rows of each buffer, views of the same storage):
        SlotKVCache     per layer k, v (max_batch, max_len, KV, D); the write position `pos` is a device
                        long tensor (1,)
        tokens          (B, 1) the token fed to the next step          positions (B, 1) its RoPE position
        valid           (B, max_len) bool, True on slots that hold real tokens
        out, out_logp   (B, max_len) the generated tokens / their log-probs, written at the device index `step`
    Prefill (eager, once per generation, from an empty cache): the left-padded prompt (B, L) with
        MaskSpec(causal=True, key_padding=valid), RoPE positions counting real tokens only (0 on each row's
        first real token, as KVCacheGenerator does); its last hidden state gives token 1.
    Decode step (fixed shapes; the graph):
        valid[:, pos] = True                                   the incoming token's slot becomes real
        hidden = model(tokens, positions, MaskSpec(causal=False, key_padding=valid), cache)
                 every layer: k, v written at slot pos (index_copy_ with a device index), attention over
                 all max_len slots, the ones not yet written (or padding) hidden by `valid`
        pos += 1 (cache.advance, in place)
        next = argmax(logits(hidden))                          greedy, first index on ties
        tokens = next; out[:, step] = next; [out_logp[:, step] = log_softmax(logits)[next]]; positions += 1; step += 1
    Attending to all max_len slots (one masked query per row: `attention_sdpa` folds the GQA query groups so a
    fused kernel takes it) costs attention work over empty slots (the decode step reads the whole
    cache buffer, not the filled part); the matmuls, which read the weights, dominate batch-1 decoding
    until the cache is large.

    Why the mask stays exact without a per-step value. Causality needs no per-step number in decode: the
    only slots after the query's are the unwritten ones, which `valid` already hides, so the decode spec is
    causal=False. The one place the query's slot still enters is `MaskSpec.dense`'s guard for pad queries,
    `allowed |= (k == q)` with q = q_offset = the cache's `seen`. A captured graph bakes that q in. Pinning
    q to the padded prompt length L at capture would be exact within that generation (slot L is real from
    the first decode step on), but the graph is reused for later batches of the same size, whose L differs:
    their slot L may be a pad slot or a slot not written yet. So during decode the cache reports
    `seen = max_len`, one past the last slot: the guard then admits no slot at all, every key is decided by
    `valid` alone, and each decode query still sees at least its own slot (set True before the forward),
    so no row of the softmax is empty. The result is the same for every L and every replay, and the
    compiled step's guard on `seen` never changes. Only sliding windows and MoBA need the query's real
    slot; models configured with them are refused.

    CUDA graphs (`cuda_graph=True`, the default on a GPU). At the first decode step of the first batch of
    size B (after prefill filled the cache for real data), the step (eager or compiled) is run twice on a
    side stream to warm it up (cuBLAS workspaces, the compile itself), the small state it moved (pos,
    tokens, positions, valid, step) is restored, and the step is captured with `torch.cuda.graph`. Each
    later token is `graph.replay()`. A later batch of the same size refills the same buffers in place
    (copy_, prefill writing the cache), so the captured graph is reused; one graph is kept per (B,
    logprobs) pair.

Design choices
    Greedy only: sampling with per-row generators, top-k/top-p and repetition penalties would put
    per-row Python state into the step. `generate` refuses non-greedy params and names KVCacheGenerator.
    No early stop inside: every row runs max_new_tokens steps (a stop would need the host to look at the
    tokens, a sync per step); `generate` cuts each row at its first eos / stop token afterwards.
    `compile=True` wraps the step in `torch.compile(step, dynamic=False)` in the default mode, not
    mode="reduce-overhead": cudagraph trees skip a graph whose non-parameter inputs are mutated, and this
    step mutates the cache, the token buffers and the position counters by design; the explicit capture
    above is the CUDA-graph layer instead.
    Costs: one capture per batch size (seconds with compile; each graph also holds its own memory pool for
    the step's intermediates), and the cache is allocated for max_batch x max_len up front, whatever the
    batch: 2 x n_layers x max_batch x max_len x KV x D elements in the embedding's dtype.
    Graph limits: the step must not sync with the host. Llama 3 with a plain or llama3-scaled RoPE does not;
    "dynamic" / "longrope" RoPE read `positions.max()` (refused with cuda_graph=True), and Mixtral's MoE
    reads expert counts on the host in its loop path (`moe.Experts._loop`) and builds a host scalar for its
    aux counts, so Mixtral is tested here eagerly and compiled on the CPU, never captured. A capture that
    fails is re-raised naming cuda_graph=False.

Sources
    PyTorch's CUDA graph notes (torch.cuda.graph, warm-up on a side stream, static inputs refilled in place);
    gpt-fast (pytorch-labs) and transformers' StaticCache for the idea of a fixed-size cache written at a
    device index. The code here is this workbench's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from workbench.inference.generator import Completion, SamplingParams, per_row_params
from workbench.nn.attention import MaskSpec
from workbench.nn.kv_cache import KVCache

WARMUP_STEPS = 2
"""Eager or compiled calls on a side stream before a capture (PyTorch's CUDA graph notes ask for a few)."""


class SlotKVCache(KVCache):
    """Preallocated per-layer buffers written at a device position: every `update` returns the whole buffers.

    `pos` (a (1,) long device tensor) is where the next forward writes; `advance` adds to it in place.
    `seen` is the Python count of slots written by eager forwards (prefill), which the model reads as the
    first query slot; after `pin(offset)` it stays at `offset` and `advance` moves only `pos` (see the
    module notes: during decode nothing Python-side may change from step to step).
    """

    def __init__(self, buffers: list[list[torch.Tensor]], pos: torch.Tensor):
        self.buffers = buffers  # [layer][entry] (B, max_len, *entry)
        self.pos = pos  # (1,) long, shared with the decoder
        self.max_len = buffers[0][0].shape[1]
        self.seen = 0
        self.pinned = False
        self._arange = torch.arange(self.max_len, device=pos.device)  # (max_len,) slot offsets

    @classmethod
    def allocate(cls, n_layers: int, batch_size: int, max_len: int, entry_shapes: Sequence[tuple[int, ...]],
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> SlotKVCache:
        buffers = [[torch.zeros(batch_size, max_len, *shape, dtype=dtype, device=device) for shape in entry_shapes]
                   for _ in range(n_layers)]
        return cls(buffers, torch.zeros(1, dtype=torch.long, device=device))

    def rows(self, batch_size: int) -> SlotKVCache:
        """A cache over the first `batch_size` rows of these buffers (views: the same storage and `pos`)."""
        return SlotKVCache([[buf[:batch_size] for buf in bufs] for bufs in self.buffers], self.pos)

    def update(self, layer_idx: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bufs = self.buffers[layer_idx]
        if len(new) != len(bufs):
            raise ValueError(f"this cache stores {len(bufs)} tensors per layer, got {len(new)}")
        T = new[0].shape[1]
        if not self.pinned and self.seen + T > self.max_len:  # eager only: a device position cannot be checked
            raise ValueError(f"KV cache full: {self.seen} + {T} tokens > max_len {self.max_len}")
        slots = self.pos + self._arange[:T]  # (T,) slots [pos, pos + T), on the device
        for buf, x in zip(bufs, new):
            buf.index_copy_(1, slots, x.to(buf.dtype))  # (B, T, *entry) into (B, max_len, *entry)
        return tuple(bufs)

    def advance(self, n: int) -> None:
        self.pos.add_(n)
        if not self.pinned:
            self.seen += n

    def pin(self, offset: int) -> None:
        """From now on the model reads `seen == offset` and `advance` moves only the device position."""
        self.seen, self.pinned = offset, True

    def reset(self) -> None:
        self.pos.zero_()
        self.seen, self.pinned = 0, False


class _Rows:
    """The static state of one batch size: views of the decoder's buffers and the step that updates them."""

    def __init__(self, dec: StaticDecoder, B: int, logprobs: bool):
        self.model, self.logprobs = dec.model, logprobs
        self.cache = dec._cache.rows(B)
        self.tokens = dec._tokens[:B]  # (B, 1)
        self.positions = dec._positions[:B]  # (B, 1)
        self.valid = dec._valid[:B]  # (B, max_len)
        self.out = dec._out[:B]  # (B, max_len)
        self.out_logp = dec._out_logp[:B]  # (B, max_len)
        self.step_idx = dec._step  # (1,) long
        self.decode_mask = MaskSpec(causal=False, key_padding=self.valid)
        self.fn = torch.compile(self.step, dynamic=False) if dec.compile else self.step
        self.graph: torch.cuda.CUDAGraph | None = None

    def emit(self, logits: torch.Tensor) -> None:
        """Greedy token from logits (B, V) into `tokens` and `out[:, step]` (+ its log-prob); step += 1."""
        nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
        self.tokens.copy_(nxt)
        self.out.index_copy_(1, self.step_idx, nxt)
        if self.logprobs:
            # log p(next) under the unmodified distribution, in float32 (as KVCacheGenerator)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(1, nxt)  # (B, 1)
            self.out_logp.index_copy_(1, self.step_idx, logp)
        self.step_idx.add_(1)

    def step(self) -> None:
        """One decode step; fixed shapes, device-side indices only (the function a CUDA graph records)."""
        self.valid.index_fill_(1, self.cache.pos, True)  # the incoming token's slot is real
        out = self.model({"input_ids": self.tokens, "positions": self.positions, "mask": self.decode_mask,
                          "kv_cache": self.cache})
        self.emit(self.model.logits(out.hidden[:, -1:])[:, 0])  # (B, V)
        self.positions.add_(1)

    def _state(self) -> list[torch.Tensor]:
        return [self.cache.pos, self.tokens, self.positions, self.valid, self.step_idx]

    def warm_up(self) -> None:
        """Run the step WARMUP_STEPS times (on a side stream on CUDA), then restore the state it moved.

        Its cache and `out` writes land in slots that `valid` hides (pos was restored) or that later steps
        overwrite before anything reads them."""
        saved = [t.clone() for t in self._state()]
        cuda = self.cache.pos.device.type == "cuda"
        side = torch.cuda.Stream() if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            for _ in range(WARMUP_STEPS):
                self.fn()
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(self._state(), saved):
            t.copy_(s)

    def capture(self) -> None:
        """Warm up, then record one step into `self.graph` (capture runs nothing: the state is as before)."""
        self.warm_up()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.fn()
        except RuntimeError as e:  # typically a host sync (.item(), .tolist(), a host-built tensor) in the step
            raise RuntimeError(f"StaticDecoder: capturing the decode step as a CUDA graph failed ({e}); this "
                               f"model's step is not graph-safe, build the decoder with cuda_graph=False") from e
        self.graph = graph

    def run_step(self, use_graph: bool) -> None:
        if not use_graph:
            self.fn()
            return
        if self.graph is None:
            self.capture()
        self.graph.replay()


class StaticDecoder:
    """Greedy decoding with fixed-shape steps (eager, compiled, or one CUDA graph per step); see module notes."""

    def __init__(self, model: torch.nn.Module, max_batch: int, max_len: int, *, compile: bool = False,
                 cuda_graph: bool | None = None, eos_ids: Sequence[int] = (), pad_id: int = 0):
        missing = [name for name in ("kv_entry_shapes", "make_kv_cache", "logits") if not hasattr(model, name)]
        if missing:
            raise ValueError(f"StaticDecoder needs a decoder with a KV cache; {type(model).__name__} has no "
                             f"{', '.join(missing)}")
        cfg = getattr(model, "cfg", None)
        for name in ("sliding_window", "moba_block_size"):
            if getattr(cfg, name, None) is not None:
                raise ValueError(f"StaticDecoder: model.cfg.{name} is set; its decode mask needs the query's real "
                                 f"slot, which a fixed-shape step does not have (use KVCacheGenerator)")
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"StaticDecoder: max_batch must be >= 1 and max_len >= 2, got {max_batch}, {max_len}")
        params = [p for p in model.parameters() if p.is_floating_point()]
        device = params[0].device
        emb = getattr(model, "tok_embeddings", None)
        dtype = emb.weight.dtype if emb is not None else params[0].dtype
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        scaling = getattr(getattr(getattr(model, "rope", None), "cfg", None), "scaling", None)
        if cuda_graph and scaling in ("dynamic", "longrope"):
            raise ValueError(f"cuda_graph=True: {scaling!r} RoPE reads positions.max() on the host every step, "
                             f"which a CUDA graph cannot capture (use cuda_graph=False)")
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        self.compile, self.cuda_graph = compile, bool(cuda_graph)
        self.eos_ids, self.pad_id, self.device = set(eos_ids), pad_id, device
        n_layers = cfg.n_layers if cfg is not None and hasattr(cfg, "n_layers") else len(model.layers)
        # the static buffers, shared by every batch size (a batch of B uses rows [0, B))
        self._cache = SlotKVCache.allocate(n_layers, max_batch, max_len, model.kv_entry_shapes(), dtype, device)
        self._tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self._positions = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self._valid = torch.zeros(max_batch, max_len, dtype=torch.bool, device=device)
        self._out = torch.zeros(max_batch, max_len, dtype=torch.long, device=device)
        self._out_logp = torch.zeros(max_batch, max_len, dtype=torch.float32, device=device)
        self._step = torch.zeros(1, dtype=torch.long, device=device)
        self._slots = torch.arange(max_len, device=device)  # (max_len,)
        self._rows: dict[tuple[int, bool], _Rows] = {}  # (B, logprobs) -> its state (and graph)

    @torch.no_grad()
    def generate_ids(self, ids: torch.Tensor, max_new_tokens: int, prompt_lengths: torch.Tensor | None = None,
                     logprobs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy tokens (B, max_new_tokens) for left-padded prompts `ids` (B, L) (and their float32 log-probs
        (B, max_new_tokens) with `logprobs`), on the model's device. prompt_lengths (B,): each row's real
        length (its last prompt_lengths[b] columns); None = no padding. Every row runs all max_new_tokens."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be (B, L) token ids, got shape {tuple(ids.shape)}")
        B, L = ids.shape
        if B > self.max_batch:
            raise ValueError(f"batch of {B} prompts > max_batch {self.max_batch}")
        if B == 0:
            raise ValueError("no prompts: ids has 0 rows")
        if L == 0:
            raise ValueError("empty prompt: every prompt needs at least one token (encode with a bos token)")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if L > self.max_len - max_new_tokens:
            raise ValueError(f"prompt of {L} tokens is longer than max_len - max_new_tokens = {self.max_len} - "
                             f"{max_new_tokens} (build the StaticDecoder with a larger max_len)")
        if prompt_lengths is not None:
            lengths = torch.as_tensor(prompt_lengths, dtype=torch.long)
            if lengths.shape != (B,):
                raise ValueError(f"prompt_lengths must be ({B},), got shape {tuple(lengths.shape)}")
            if int(lengths.min()) < 1 or int(lengths.max()) > L:
                raise ValueError(f"empty prompt or prompt_lengths out of range: every length must be in [1, {L}], "
                                 f"got {lengths.tolist()}")
        N = max_new_tokens
        if N == 0:
            empty = torch.zeros(B, 0, dtype=torch.long, device=self.device)
            return (empty, torch.zeros(B, 0, device=self.device)) if logprobs else empty
        key = (B, bool(logprobs))
        if key not in self._rows:
            self._rows[key] = _Rows(self, B, bool(logprobs))
        rows = self._rows[key]
        ids = ids.to(self.device, torch.long)

        # refill the static state in place: valid = the real prompt slots, nothing after L
        first = torch.zeros(B, dtype=torch.long, device=self.device) if prompt_lengths is None \
            else L - lengths.to(self.device)  # (B,) each row's first real slot
        rows.valid.copy_((self._slots[None] >= first[:, None]) & (self._slots[None] < L))  # (B, max_len)
        # RoPE positions count real tokens only: 0 on each row's first prompt token
        positions = (rows.valid[:, :L].long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        rows.cache.reset()
        self._step.zero_()
        # prefill (eager): the prompt from an empty cache, causal, pad slots hidden
        out = self.model({"input_ids": ids, "positions": positions,
                          "mask": MaskSpec(causal=True, key_padding=rows.valid), "kv_cache": rows.cache})
        rows.emit(self.model.logits(out.hidden[:, -1:])[:, 0])  # token 1 (every row ends at slot L - 1)
        rows.positions.copy_(positions[:, -1:] + 1)
        rows.cache.pin(self.max_len)  # the decode step's constant q_offset (module notes)
        for _ in range(N - 1):
            rows.run_step(self.cuda_graph)
        rows.cache.seen, rows.cache.pinned = L + N - 1, False  # bookkeeping: slots written
        tokens = rows.out[:, :N].clone()
        return (tokens, rows.out_logp[:, :N].clone()) if logprobs else tokens

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """The Generator protocol, greedy only: each row cut at its first eos / stop token (kept, "stop"),
        else its max_new_tokens ("length"); log-probs filled. Other sampling settings are a ValueError."""
        if not prompts:
            return []
        B = len(prompts)
        per_row = per_row_params(params, B)
        for p in per_row:
            _check_greedy(p)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (encode with a bos token)")
        budget = max(p.max_new_tokens for p in per_row)
        results = [Completion(prompt_tokens=list(p)) for p in prompts]
        if budget == 0:
            return results
        L = max(len(p) for p in prompts)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts])
        tokens, logp = self.generate_ids(ids, budget, prompt_lengths=lengths, logprobs=True)
        tokens, logp = tokens.tolist(), logp.tolist()  # the one host sync
        for b, (r, p) in enumerate(zip(results, per_row)):
            stops = self.eos_ids | set(p.stop_token_ids)
            n = p.max_new_tokens
            for i, tok in enumerate(tokens[b][:n]):
                if tok in stops:
                    n, r.finish_reason = i + 1, "stop"
                    break
            r.tokens, r.logprobs = tokens[b][:n], logp[b][:n]
        return results


def _check_greedy(p: SamplingParams) -> None:
    """Only greedy decoding runs here; anything else names its field and the generator that runs it."""
    p.validate()
    bad = [("temperature", not p.greedy, p.temperature), ("top_k", p.top_k != 0, p.top_k),
           ("top_p", p.top_p != 1.0, p.top_p), ("repetition_penalty", p.repetition_penalty != 1.0, p.repetition_penalty),
           ("stop", bool(p.stop), p.stop)]
    for name, is_bad, value in bad:
        if is_bad:
            raise ValueError(f"StaticDecoder decodes greedily only: {name}={value!r} is not supported "
                             f"(use KVCacheGenerator for sampling and stop strings)")
