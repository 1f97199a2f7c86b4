"""Context planning: per-rank memory and attention FLOPs of one training step at 128K..4M-token contexts.

What it counts (per rank, for one micro-batch of B sequences of T tokens; `workbench plan-context` prints it)
    weights      sharded parameters, plus the gathered (unsharded) copies of the largest block and the
                 next one (FSDP's all-gather and prefetch) when the parameters are sharded
    gradients    sharded gradients, plus one unsharded block's gradients awaiting reduce-scatter
    optimizer    AdamW state: the fp32 master copy (bf16 runs) and the two moments
    activations  what autograd keeps between forward and backward (the quantity measured by `measure`), and
                 under checkpointing the one block recomputed during backward on top of it
    kv cache     the inference cache at that length (K and V, or MLA's latent + RoPE key), a separate column
    FLOPs        attention FLOPs per sequence for the pattern (forward; forward + backward = 3x), and the
                 FLOPs per token 6 N + attention, both the DESIGN.md convention (12 L H Q T, every key) and
                 the pattern's actual key count

Degrees (workbench/parallel/dims.py)
    FSDP / ZeRO-3 shards over S = dp_shard * cp ranks (context-parallel ranks hold the same weights, so they
    shard them too: the "dp_shard_cp" mesh); experts over the same S ranks (ep borrows them, so ep must divide
    S); tp splits every non-expert matrix and, with sequence parallelism, every saved activation. A cp rank
    holds T / cp tokens of each sequence. Under cp the flash kernel means a fused ring kernel (flash attention
    per K/V block, each received block freed after its hop), which is what production ring attention does and
    what the tables assume; the ring core of workbench/parallel/cp.py is a correctness-first eager one (it
    keeps every received K/V block and each sub-block's scores for the backward), so its memory is closer to
    `kernel = "eager"` with T / cp queries per rank.

Bytes per parameter (p = parameter count on the rank)
    bf16   weights 2 p, gradients 2 p, optimizer 12 p (fp32 master 4 + Adam m 4 + v 4)   (the ZeRO paper's 16)
    fp32   weights 4 p, gradients 4 p, optimizer  8 p
    (FSDP2's layout, fp32 sharded parameters and gradients with bf16 gathered copies, is the same 16 p.)

Saved activations per token of one block (a = activation bytes: 2 in bf16, 4 in fp32; d = dim, H heads,
KV key/value heads, D head dim, F FFN width, Tk keys per query; every term is what the workbench's own code
saves, found by listing autograd's saved tensors, and measured below)
    RMSNorm            4 d + 2 a d + 4      fp32 input (the residual stream), normalised x, output, 1/rms
    Llama attention    flash: a (2 H D + 2 KV D) + 4 H   q, k, v, output, log-sum-exp
                       eager: a (4 H D) + 4 H Tk (+ a H Tk in bf16) + Tq Tk / T mask bytes
                              q, k and v repeated to H heads, output copy, fp32 probabilities (T x T even
                              for a window or MoBA: the eager reference materialises the dense mask)
    MLA (DeepSeek-V3)  norms of the two latents (4 r_q + 2 a r_q + 4, 4 (r + d_r) + 2 a r + 4), the kv
                       up-projection a H (d_n + d_v), then q and k of width d_qk = d_n + d_r: as above with
                       a H d_qk each (v is a view of the up-projection; no copy)
    SwiGLU             4 a F                W1 x, W3 x, SiLU(W1 x), the product
    MoE (k of E)       router 4 E + 12 k + 8, per routed slot (k per token) 20 + 5 a d + 4 a F_e
                       (indices, weights, gathered rows, gate/up, SiLU, product, down, weighted), shared 4 a F_s
    head               final norm + 4 V (fp32 log-softmax of the full logits: the LM objective's default,
                       objective.loss_chunk = 0; a chunked loss is not modelled, see docs/context-memory.md)
    RoPE tables        2 a D_rope per token, shared by every layer
    checkpointing      full: a d per block (its input); selective: the input, every matmul output and the
                       attention output (torch's selective policy in workbench/parallel/checkpointing.py)
    MTP (V3)           2 norms + 2 a d + a MoE block + norm + 4 V per depth (never checkpointed)

Attention FLOPs per sequence and layer: 2 H (d_qk + d_v) x (query, key) pairs, with pairs
    dense causal   sum_t t = T (T + 1) / 2
    sliding W      sum_t min(t, W)
    MoBA (B, k)    sum_t min(t, k B)  + gating 2 H d_qk sum_t ceil(t / B)  (block-mean keys vs the query)
The 6 N term is `model.flops_per_token(0)` (the family's matmul weights, active experts only).

Sources of the numbers
    Shapes come from the family configs; parameter counts from the family's model built on the meta device
    (no memory); the cache's per-token entries from its `make_kv_cache` (the same shapes benchmarks/kv_bytes.py
    measures). Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
    (arXiv 2205.05198) derive the same per-layer bookkeeping for Megatron's layers; the terms here are the
    workbench's own layers, validated by `measure` (tests/unit/test_memory_plan.py; docs/context-memory.md).

Pure arithmetic: nothing here touches torch.distributed. `measure` (the validation) builds tiny CPU models.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from workbench.errors import ConfigError

GiB = 2**30
# what fits: an H100 80GB card shows 79.6 GiB; the CUDA context and allocator keep some of it
H100_USABLE = 78 * GiB
PRECISIONS = ("bf16", "fp32")
AC_MODES = ("none", "full", "selective")
KERNELS = ("flash", "eager")

def _bad(option: str, message: str):
    raise ConfigError(f"{option}: {message}")


# ---------------------------------------------------------------------------------------------------------
# parsing (shared by the CLI and the tests)


def parse_tokens(text: str, option: str = "--seq-len") -> int:
    """'128k' -> 131072, '1M' -> 1048576, '4096' -> 4096 (k = 1024, M = 1024^2)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not m:
        _bad(option, f"expected a token count such as 4096, 128k or 1M, got {text!r}")
    n = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
    if n < 1 or n != int(n):
        _bad(option, f"expected a whole number of tokens >= 1, got {text!r}")
    return int(n)


def parse_list(text: str, option: str, parse=None) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; each item a positive integer (or what `parse` accepts)."""
    out = []
    for item in str(text).split(","):
        if parse is not None:
            out.append(parse(item, option))
            continue
        if not item.strip().isdigit() or int(item) < 1:
            _bad(option, f"expected comma-separated integers >= 1, got {text!r}")
        out.append(int(item))
    return out


@dataclass(frozen=True)
class Pattern:
    """dense | sliding:W | moba:B:k (block size B, top-k blocks, the query's own block included)."""

    kind: str = "dense"
    window: int = 0
    block: int = 0
    topk: int = 0

    @classmethod
    def parse(cls, text: str, option: str = "--pattern") -> Pattern:
        parts = str(text).strip().split(":")
        try:
            if parts == ["dense"]:
                return cls()
            if parts[0] == "sliding" and len(parts) == 2:
                return cls("sliding", window=parse_tokens(parts[1], option))
            if parts[0] == "moba" and len(parts) == 3:
                block, topk = parse_tokens(parts[1], option), int(parts[2])
                if topk >= 1:
                    return cls("moba", block=block, topk=topk)
        except ValueError:
            pass
        _bad(option, f"expected dense, sliding:W or moba:B:k (e.g. sliding:4096, moba:4096:12), got {text!r}")

    def __str__(self) -> str:
        return {"dense": "dense", "sliding": f"sliding:{self.window}",
                "moba": f"moba:{self.block}:{self.topk}"}[self.kind]

    def pairs(self, T: int) -> int:
        """Causal (query, key) pairs one sequence of T tokens computes: sum over queries of the keys seen."""
        W = {"dense": T, "sliding": self.window, "moba": self.block * self.topk}[self.kind]
        W = min(W, T)
        # sum_t min(t, W), t = 1..T
        return W * (W + 1) // 2 + (T - W) * W

    def gate_pairs(self, T: int) -> int:
        """MoBA's gating: sum_t ceil(t / B), the (query, block-mean key) scores of a causal sequence."""
        if self.kind != "moba":
            return 0
        n, r = divmod(T, self.block)
        return self.block * n * (n + 1) // 2 + r * (n + 1)

    def cached(self, T: int) -> int:
        """Slots an inference cache keeps: a window's ring buffer, else every token."""
        return min(T, self.window) if self.kind == "sliding" else T


def resolve_model(spec: str, option: str = "--model"):
    """'llama3:8B', 'deepseek_v3:671B', 'deepseek_v3:kimi-k2' (or 'kimi-k2') -> (family, flavor, Config)."""
    from workbench.models.base import get_family

    spec = str(spec).strip()
    if spec.lower() in ("kimi-k2", "kimi_k2", "k2"):
        spec = "deepseek_v3:kimi-k2"
    if ":" not in spec:
        _bad(option, f"expected FAMILY:FLAVOR such as llama3:8B, deepseek_v3:671B or kimi-k2, got {spec!r}")
    family, flavor = spec.split(":", 1)
    try:
        module = get_family(family)
    except ConfigError:
        _bad(option, f"unknown model family {family!r} in {spec!r} (known: llama3, mixtral, deepseek_v3)")
    if flavor in module.FLAVORS:
        return family, flavor, module.FLAVORS[flavor]
    _bad(option, f"unknown {family} flavor {flavor!r} (known: {', '.join(module.FLAVORS)})")


# ---------------------------------------------------------------------------------------------------------
# the model side: counts that come from the family's own code


@dataclass(frozen=True)
class ModelCounts:
    params: int  # every parameter (MTP included)
    expert_params: int  # routed experts' stacked matrices
    block_params: int  # the largest block's non-expert parameters
    block_expert_params: int  # the largest block's routed-expert parameters
    matmul_flops: float  # 6 N_matmul per token (model.flops_per_token(0))
    convention_attn: float  # model.flops_per_token(1) - flops_per_token(0): 12 L H Q per token of context
    kv_per_token_layer: int  # cache elements per token and layer (make_kv_cache's entries)
    kv_layers: int


_COUNTS: dict[str, ModelCounts] = {}


def _counts(family: str, cfg) -> ModelCounts:
    key = f"{family}:{cfg!r}"  # configs are unhashable dataclasses
    if key not in _COUNTS:
        _COUNTS[key] = _count(family, cfg)
    return _COUNTS[key]


def _count(family: str, cfg) -> ModelCounts:
    import torch

    from workbench.models.base import get_family

    module = get_family(family)
    with torch.device("meta"):  # shapes only, no memory (Kimi K2 is a trillion parameters)
        model = module.Model(cfg)
    seen, total, experts = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        experts += p.numel() if _is_expert(name) else 0
    blocks = list(model.layers) + [m.block for m in getattr(model, "mtp", [])]
    per_block = [(sum(p.numel() for n, p in b.named_parameters() if not _is_expert(n)),
                  sum(p.numel() for n, p in b.named_parameters() if _is_expert(n))) for b in blocks]
    big = max(per_block, key=lambda nb: nb[0] + nb[1])
    cache = model.make_kv_cache(1, 1, dtype=torch.float32, device="meta")
    kv = sum(math.prod(b.shape[2:]) for b in cache.buffers[0])
    f0 = model.flops_per_token(0)
    return ModelCounts(total, experts, big[0], big[1], f0, model.flops_per_token(1) - f0, kv, len(cache.buffers))


def _is_expert(name: str) -> bool:
    return ".experts." in name and "shared_experts" not in name


# ---------------------------------------------------------------------------------------------------------
# activations: bytes per token saved by one block, from the layer code (see the note)


def _norm(d: int, a: int) -> int:
    # fp32 input (the residual in fp32, its float() copy in bf16), normalised x, output, 1/rms
    return 4 * d + 2 * a * d + 4


def _swiglu(F: int, a: int) -> int:
    # W1 x, W3 x, SiLU(W1 x), SiLU(W1 x) * W3 x
    return 4 * a * F


def _attn_core(H: int, dqk: int, dv: int, kv_q: int, kv_v: int, a: int, kernel: str, Tk: int) -> int:
    """The attention core's saved bytes per query token: flash keeps q, k, v, the output and the log-sum-exp;
    eager keeps q, k and v at H heads (kv_q / kv_v: what the caller's k and v cost), fp32 probabilities over Tk
    keys (plus their cast to a in bf16) and a copy of the output for the out-projection."""
    if kernel == "flash":
        return a * (H * dqk + kv_q + kv_v + H * dv) + 4 * H
    return a * (H * dqk + kv_q + kv_v + H * dv) + 4 * H * Tk + (a * H * Tk if a != 4 else 0)


def layer_terms(family: str, cfg, i: int, a: int, kernel: str, Tk: int, ac: str) -> dict[str, int]:
    """Bytes per token that block i keeps for backward (under `ac`), by term."""
    if ac == "full":
        return {"block input": a * cfg.dim}
    d = cfg.dim
    terms = {"norms": 2 * _norm(d, a)}
    if family == "llama3":
        H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        if ac == "selective":  # block input, the seven matmul outputs, attention output (+ lse)
            return {"block input": a * d, "matmuls": a * (H * D + 2 * KV * D + 2 * d + 2 * cfg.ffn_dim),
                    "attention": a * H * D + (4 * H if kernel == "flash" else a * H * Tk)}
        if kernel == "flash":
            terms["attention"] = _attn_core(H, D, D, KV * D, KV * D, a, kernel, Tk)
        else:  # repeat_kv copies k and v to H heads (no copy, and the same bytes, when KV == H)
            terms["attention"] = _attn_core(H, D, D, H * D, H * D, a, kernel, Tk)
        terms["ffn"] = _swiglu(cfg.ffn_dim, a)
        return terms
    if family != "deepseek_v3":
        raise ConfigError(f"--model: plan-context covers llama3 and deepseek_v3 (Kimi K2), got {family!r}")
    H, dn, dr, dv, r, rq = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                            cfg.kv_lora_rank, cfg.q_lora_rank)
    if ac == "selective":
        # mm outputs: wq_a, wq_b (or wq), wkv_a, wkv_b, wo; the dense SwiGLU, or the router gate and the shared
        # expert (the routed experts run _grouped_mm, which the policy recomputes)
        Fs = cfg.moe_ffn_dim * cfg.n_shared_experts
        ffn = 2 * cfg.ffn_dim + d if not cfg.moe_layer(i) else cfg.n_experts + (2 * Fs + d if Fs else 0)
        mm = (rq + H * (dn + dr) if rq else H * (dn + dr)) + (r + dr) + H * (dn + dv) + d + ffn
        return {"block input": a * d, "matmuls": a * mm,
                "attention": a * H * dv + (4 * H if kernel == "flash" else a * H * Tk)}
    # query latent: wq_a output (its fp32 norm input), normalised, q_norm output, 1/rms
    terms["q latent"] = _norm(rq, a) if rq else 0
    # kv latent: fp32 norm input (the whole wkv_a output when it already is fp32), normalised, output, 1/rms;
    # then the up-projection W_UKV c_KV (H (d_n + d_v)), of which v is a view
    terms["kv latent"] = 4 * (r + dr if a == 4 else r) + 2 * a * r + 4 + a * H * (dn + dv)
    # q and k after the concat of their nope and rope parts: H heads of d_qk each; v costs nothing more
    terms["attention"] = _attn_core(H, dn + dr, dv, H * (dn + dr), 0, a, kernel, Tk)
    if not cfg.moe_layer(i):
        terms["ffn"] = _swiglu(cfg.ffn_dim, a)
        return terms
    E, k, Fe = cfg.n_experts, cfg.top_k, cfg.moe_ffn_dim
    # router: fp32 scores (E), chosen indices (int64), their weights and the two normaliser columns
    terms["router"] = 4 * E + 8 * k + 4 * k + 8
    # per routed slot: sort order + token index (int64), weight, gathered row, gate|up, SiLU, product, down,
    # weighted down
    terms["experts"] = k * (8 + 8 + 4 + a * d + 2 * a * Fe + a * Fe + a * Fe + a * d + a * d)
    terms["shared"] = _swiglu(Fe * cfg.n_shared_experts, a) if cfg.n_shared_experts else 0
    return terms


def activation_bytes(family: str, cfg, T: int, B: int, a: int, kernel: str, ac: str, Tk: int | None = None,
                     tp: int = 1) -> dict[str, float]:
    """Saved bytes for B sequences of T tokens on one rank (T = this rank's tokens; Tk = keys per query,
    T unless context parallel makes it larger): 'saved' (kept from forward to backward, what `measure`
    checks), 'recompute' (one block's working set rebuilt in backward under checkpointing) and 'peak'."""
    Tk = T if Tk is None else Tk
    n = B * T
    L = cfg.n_layers
    per_layer = [layer_terms(family, cfg, i, a, kernel, Tk, ac) for i in range(L)]
    blocks = sum(sum(t.values()) for t in per_layer) * n
    if kernel == "eager" and ac == "none":  # the boolean mask (Tq, Tk), built per layer, shared by the batch
        blocks += L * T * Tk
    kernel = "eager" if kernel == "sdpa-math" else kernel  # torch's SDPA math fallback: eager, causal flag, no mask
    rope_dim = cfg.hd if family == "llama3" else cfg.qk_rope_head_dim
    head = (_norm(cfg.dim, a) + 4 * cfg.vocab_size) * n + 2 * a * rope_dim * n
    mtp = 0
    for d_ in range(getattr(cfg, "mtp_layers", 0)):  # MTP blocks are outside the checkpointed `layers`
        Tm = T - d_ - 1
        body = sum(layer_terms(family, cfg, L + d_, a, kernel, Tk, "none").values())
        mtp += (3 * _norm(cfg.dim, a) + 2 * a * cfg.dim + body + 4 * cfg.vocab_size) * B * Tm
        mtp += (T * Tk if kernel == "eager" else 0)
    saved = (blocks + head + mtp) / tp
    recompute = 0.0
    if ac != "none":  # backward reruns one block's forward: its un-checkpointed set is live again
        worst = max(sum(layer_terms(family, cfg, i, a, kernel, Tk, "none").values()) for i in range(L))
        recompute = (worst * n + (T * Tk if kernel == "eager" else 0)) / tp
    return {"saved": saved, "recompute": recompute, "peak": saved + recompute}


# ---------------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Plan:
    """One row: the model, the layout and what a rank holds."""

    model: str
    seq_len: int
    cp: int
    pattern: str
    ac: str
    weights: float
    gradients: float
    optimizer: float
    activations: float  # peak (saved + one recomputed block)
    saved: float
    kv_cache: float
    attn_fwd: float  # attention FLOPs per sequence, forward (whole sequence, all ranks)
    attn_fwd_bwd: float
    flops_per_token: float  # 6 N + attention (fwd + bwd) / T for this pattern
    flops_per_token_convention: float  # 6 N + 12 L H Q T (DESIGN.md), every key counted
    step_flops_per_rank: float  # one micro-batch's fwd + bwd (+ recompute) on this rank

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= H100_USABLE


def plan(model: str, seq_len: int, cp: int = 1, pattern: str | Pattern = "dense", ac: str = "none",
         dp_shard: int = 1, tp: int = 1, ep: int = 1, micro_batch: int = 1, precision: str = "bf16",
         kernel: str = "flash") -> Plan:
    family, flavor, cfg = resolve_model(model)
    pat = pattern if isinstance(pattern, Pattern) else Pattern.parse(pattern)
    for opt, v, allowed in (("--ac", ac, AC_MODES), ("--precision", precision, PRECISIONS),
                            ("--kernel", kernel, KERNELS)):
        if v not in allowed:
            _bad(opt, f"expected one of {', '.join(allowed)}, got {v!r}")
    for opt, v in (("--cp", cp), ("--dp-shard", dp_shard), ("--tp", tp), ("--ep", ep),
                   ("--micro-batch", micro_batch), ("--seq-len", seq_len)):
        if not isinstance(v, int) or v < 1:
            _bad(opt, f"expected an integer >= 1, got {v!r}")
    if seq_len % cp:
        _bad("--cp", f"must divide the sequence length ({seq_len}), got {cp}")
    shard = dp_shard * cp
    if shard % ep:
        _bad("--ep", f"must divide dp_shard * cp ({shard}), got {ep}")
    c = _counts(family, cfg)
    a = 2 if precision == "bf16" else 4
    opt_b = 12 if precision == "bf16" else 8
    # p: parameters on this rank (experts over the S sharding ranks, the rest over tp * S)
    p = (c.params - c.expert_params) / (tp * shard) + c.expert_params / shard
    gathered = (c.block_params / tp + c.block_expert_params / ep) * a if shard > 1 else 0.0
    weights = a * p + 2 * gathered  # the current block's all-gather and the prefetched next one
    gradients = a * p + gathered  # one unsharded block's gradients before reduce-scatter
    optimizer = opt_b * p
    T = seq_len // cp
    # eager attention stores each local query's probabilities over all seq_len keys; flash stores none
    act = activation_bytes(family, cfg, T, micro_batch, a, kernel, ac, Tk=seq_len, tp=tp)
    # inference cache at this length: entries per token and layer from make_kv_cache, split over cp ranks;
    # tp splits GQA heads (up to KV ways), never MLA's single latent
    kv_split = min(tp, cfg.n_kv_heads) if family == "llama3" else 1
    kv = micro_batch * pat.cached(seq_len) / cp * c.kv_layers * c.kv_per_token_layer * a / kv_split
    if pat.kind == "moba":  # the block-mean keys the gate reads
        kv += micro_batch * (seq_len // pat.block) / cp * c.kv_layers * c.kv_per_token_layer * a / 2 / kv_split
    H = cfg.n_heads
    dqk, dv = (cfg.hd, cfg.hd) if family == "llama3" else (cfg.qk_head_dim, cfg.v_head_dim)
    # forward: 2 H (d_qk + d_v) per (query, key) pair and layer, + MoBA's 2 H d_qk per (query, block)
    attn_fwd = cfg.n_layers * (2 * H * (dqk + dv) * pat.pairs(seq_len) + 2 * H * dqk * pat.gate_pairs(seq_len))
    fpt = c.matmul_flops + 3 * attn_fwd / seq_len
    conv = c.matmul_flops + c.convention_attn * seq_len
    step = micro_batch * (fpt * seq_len) / cp / tp
    if ac != "none":  # one more forward of the blocks (2 N + attention forward), roughly
        step += micro_batch * (c.matmul_flops / 3 * seq_len + attn_fwd) / cp / tp
    return Plan(f"{family}:{flavor}", seq_len, cp, str(pat), ac, weights, gradients, optimizer, act["peak"],
                act["saved"], kv, attn_fwd, 3 * attn_fwd, fpt, conv, step)


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_tokens(n: int) -> str:
    for unit, size in (("M", 1024**2), ("k", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def table(rows: list[Plan]) -> str:
    """A markdown table, one row per plan."""
    head = ("| model | T | cp | pattern | AC | weights | grads | optimizer | activations | total / rank "
            "| fits 80 GB | KV cache / rank | attn fwd / seq | FLOPs / token | 6N+12LHQT |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r.model} | {fmt_tokens(r.seq_len)} | {r.cp} | {r.pattern} | {r.ac} | {fmt_bytes(r.weights)} "
            f"| {fmt_bytes(r.gradients)} | {fmt_bytes(r.optimizer)} | {fmt_bytes(r.activations)} "
            f"| {fmt_bytes(r.total)} | {'yes' if r.fits else 'no'} | {fmt_bytes(r.kv_cache)} "
            f"| {r.attn_fwd:.3g} | {r.flops_per_token:.3g} | {r.flops_per_token_convention:.3g} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# measurement: the formulas against what small CPU models really keep (fp32)


def measure(family: str, seq_len: int, ac: str = "none", backend: str = "sdpa", flavor: str = "debug",
            batch: int = 1, dtype: str = "fp32") -> dict[str, float]:
    """Build `family:flavor` (fp32, CPU; MTP off), run forward + the LM loss on `batch` x `seq_len` tokens,
    and count the bytes that are still alive before backward and were created by the forward (the unique
    storages of every tensor an op produced, parameters excluded): the saved activations. Then one AdamW
    step; a prefill into `make_kv_cache`. Returns measured and predicted values.

    A TorchDispatchMode sees every op, inside checkpointed blocks too (where saved-tensor hooks would miss
    the inputs the checkpoint holds), and a tensor's storage is alive iff some tensor object still refers
    to it, so weak references to the op outputs find exactly what autograd (or a checkpoint) kept.
    """
    import weakref

    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from workbench.models.base import ModelSection, build_model
    from workbench.parallel.checkpointing import apply_activation_checkpointing
    from workbench.parallel.plans import Plan

    over = {"attn_backend": backend} | ({"mtp_layers": 0} if family == "deepseek_v3" else {})
    section = ModelSection.of(family, flavor, **over)
    cfg = section.config
    torch.manual_seed(0)
    model = build_model(section, dtype=torch.bfloat16 if dtype == "bf16" else None)

    apply_activation_checkpointing(model, Plan(blocks="layers"), ac)  # the decoders' unit blocks
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    labels = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), ids, labels]}

    class Track(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.refs += [weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            return out

    def step():
        out = model({"input_ids": ids})
        logits = model.logits(out.hidden).float()  # (B, T, V), as the LM objective
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")

    track = Track()
    with track:
        loss = step()
    alive = {}
    for ref in track.refs:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in skip:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    alive.pop(loss.untyped_storage().data_ptr(), None)
    measured_act = sum(alive.values())
    del track, alive

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss.backward()
    opt.step()
    params = {id(p): p for p in model.parameters()}
    w_bytes = sum(p.nbytes for p in params.values())
    g_bytes = sum(p.grad.nbytes for p in params.values() if p.grad is not None)
    o_bytes = sum(v.nbytes for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))

    cache = model.make_kv_cache(batch, seq_len)  # the parameters' dtype
    with torch.no_grad():
        model({"input_ids": ids, "kv_cache": cache})
    filled = sum(b[:, :cache.seen].nbytes for layer in cache.buffers for b in layer)

    # CPU SDPA: a flash kernel when q, k and v share a head dim (Llama); MLA's d_qk != d_v takes its math fallback
    kernel = "eager" if backend == "math" else "flash" if family == "llama3" else "sdpa-math"
    a = 2 if dtype == "bf16" else 4
    predicted = activation_bytes(family, cfg, seq_len, batch, a, kernel, ac)["saved"]
    c = _counts(family, cfg)
    return {
        "seq_len": seq_len, "ac": ac, "kernel": kernel,
        "act_measured": measured_act, "act_predicted": predicted,
        "act_error": (predicted - measured_act) / measured_act,
        "weights_measured": w_bytes, "weights_predicted": a * c.params,
        "grads_measured": g_bytes, "optimizer_measured": o_bytes, "optimizer_predicted": 2 * a * c.params,
        "kv_measured": filled, "kv_predicted": batch * seq_len * c.kv_layers * c.kv_per_token_layer * a,
    }


VALIDATION_CASES = (("llama3", "sdpa"), ("llama3", "math"), ("deepseek_v3", "sdpa"), ("deepseek_v3", "math"))


def validation_table(lengths=(256, 512, 1024, 2048), acs=("none", "full", "selective"), dtypes=("fp32",),
                     cases=VALIDATION_CASES) -> tuple[str, float]:
    """Predicted vs measured for every case; returns (a markdown table, the largest |relative error|)."""
    lines = ["| model (debug) | attention | AC | dtype | T | activations measured | predicted | error "
             "| weights, grads, AdamW, KV cache |", "|" + "---|" * 9]
    worst = 0.0
    for family, backend in cases:
        for ac in acs:
            for dtype in dtypes:
                for T in lengths:
                    r = measure(family, T, ac, backend, dtype=dtype)
                    exact = (r["weights_measured"] == r["weights_predicted"] == r["grads_measured"]
                             and r["optimizer_measured"] == r["optimizer_predicted"]
                             and r["kv_measured"] == r["kv_predicted"])
                    worst = max(worst, abs(r["act_error"]))
                    lines.append(f"| {family} | {backend} ({r['kernel']}) | {ac} | {dtype} | {T} "
                                 f"| {r['act_measured']:,} | {r['act_predicted']:,.0f} | {r['act_error']:+.2e} "
                                 f"| {'exact' if exact else 'MISMATCH'} |")
    return "\n".join(lines), worst


def run_cli(model: str = "llama3:8B", seq_len: str = "128k,1M,4M", cp: str = "1", pattern: str = "dense",
            ac: str = "none", dp_shard: str = "1", tp: str = "1", ep: str = "1", micro_batch: str = "1",
            precision: str = "bf16", kernel: str = "flash", measure_mode: bool = False) -> str:
    """What `workbench plan-context` prints: every combination of the comma-separated options, or (measure_mode)
    the validation table over `seq_len` (default 256..2048 there)."""
    if measure_mode:
        lengths = parse_list(seq_len, "--seq-len", parse_tokens)
        text, worst = validation_table(lengths, acs=str(ac).split(","), dtypes=str(precision).split(","))
        return f"{text}\n\nlargest |relative error| of the activation prediction: {worst:.2e}"
    one = {}
    for opt, v in (("--dp-shard", dp_shard), ("--tp", tp), ("--ep", ep), ("--micro-batch", micro_batch)):
        vals = parse_list(v, opt)
        if len(vals) != 1:
            _bad(opt, f"expected one integer >= 1, got {v!r}")
        one[opt] = vals[0]
    rows = []
    for m in str(model).split(","):
        for T in parse_list(seq_len, "--seq-len", parse_tokens):
            for c in parse_list(cp, "--cp"):
                for pat in str(pattern).split(","):
                    for mode in str(ac).split(","):
                        rows.append(plan(m, T, c, pat, mode, one["--dp-shard"], one["--tp"], one["--ep"],
                                         one["--micro-batch"], precision, kernel))
    return table(rows)
