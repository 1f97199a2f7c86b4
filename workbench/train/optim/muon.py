"""MuonClip: the Muon optimizer (AdamW for what is not a hidden matrix) and QK-Clip, Kimi K2's optimizer.

What it is
    Muon (Jordan et al. 2024; at scale in Moonlight, Liu et al. 2025) replaces a hidden weight matrix's
    update by the nearest semi-orthogonal matrix to its momentum: every singular value of the step is
    (about) 1. Kimi K2 (2025) trained 1T parameters with it and added QK-Clip, a post-step rescaling of the
    query and key weights of any attention head whose largest logit exceeded tau, which is what kept Muon's
    attention logits from exploding (zero loss spikes over 15.5T tokens). `optim.name = "muon"` selects it;
    `optim.qk_clip_tau > 0` turns QK-Clip on.

The math (one hidden matrix W of shape (n, m), gradient G_t, lr eta, weight decay lambda)
    M_t = mu M_{t-1} + G_t                                         momentum (mu = optim.muon_momentum)
    O_t = NS5(M_t) * sqrt(max(n, m)) * 0.2                         orthogonalised, RMS-matched to AdamW
    W_t = W_{t-1} - eta (O_t + lambda W_{t-1})                      decoupled weight decay
    NS5: X_0 = M / ||M||_F (transposed when n > m, so X X^T is the small Gram matrix), then ns_steps times
         X <- a X + (b A + c A^2) X,  A = X X^T,  (a, b, c) = (3.4445, -4.7750, 2.0315)
    With M = U S V^T, each iteration maps every singular value s to p(s) = a s + b s^3 + c s^5 and keeps U and
    V, so the result is U p^5(S) V^T ~ U V^T. The coefficients trade exact convergence for speed: p has a
    steep slope at 0 (a = 3.4 lifts small singular values fast) and does not converge to 1 but oscillates in
    a band around it (tests/unit/test_muon.py measures it: [0.68, 1.13] for random square, wide and tall
    matrices after 5 steps).
    RMS matching: a semi-orthogonal (n, m) matrix has RMS sqrt(min(n, m) / (n m)) = 1 / sqrt(max(n, m)); times
    sqrt(max(n, m)) * 0.2 it has RMS 0.2, about the RMS of an AdamW update (Moonlight), so Muon and the AdamW
    parameters share one learning rate and one weight decay, as Kimi's recipe does.

QK-Clip (after the optimizer step; it changes weights, not gradients)
    S_max^h = max over the step's batch (all micro-batches, all data-parallel ranks: MAX-reduced) of the
    pre-softmax logits q_i^h . k_j^h * scale of head h, recorded by the attention modules during the forward;
    for every head with S_max^h > tau: gamma_h = tau / S_max^h and the head's weights are rescaled so that
    its logits scale by exactly gamma_h (the next step's S_max^h is tau for the same batch):
        MHA  W_q^h, W_k^h *= sqrt(gamma_h)
        GQA  W_q^h *= gamma_h; the shared W_k^g untouched (every head of the group reads it; rescaling it would
             move the others' logits), the same choice K2 makes for MLA's shared rotary key
        MLA  W_q^{h,nope} (wq_b rows), W_k^{h,nope} (wkv_b key rows) *= sqrt(gamma_h); W_q^{h,rope} *= gamma_h;
             the shared rotary key k^R (wkv_a) untouched
    Heads at or below tau are not touched. The rule lives in each attention module (`qk_clip_rows`); the
    logged metrics are qk_clip_max_logit (the step's largest S_max^h before clipping) and qk_clip_heads (how
    many heads were clipped).

Which parameters get Muon
    Hidden matrices only: 2-D weights other than the token embedding and the output head (the attention
    and MLP projections, MLA's low-rank factors, the routers' gates, DeepSeek-V3's MTP eh_proj), and the
    stacked experts (E, out, in), orthogonalised expert by expert (a batched NS5); the fused gate_up_proj
    (E, 2F, D) is split into its gate and up halves first, so each is its own matrix as in the unfused
    checkpoints. Embeddings (a lookup: each row sees only its tokens' gradients), the output head (Moonlight
    and K2 keep it on AdamW), norms, biases and other 1-D parameters get AdamW with optim.betas and optim.eps.
    Weight decay follows param_groups: matrices decayed, norms and embeddings not.

Design choices
    No Nesterov: the K2 report's algorithm writes M_t = mu M_{t-1} + G_t and orthogonalises M_t; Keller
    Jordan's reference code and Moonlight's default use the Nesterov form (G_t + mu M_t), which helps a
    little in small speedruns. We follow the K2 formula so the notes and the code say the same thing.
    Precision: NS5 runs in bf16 on CUDA (its iterations are self-correcting, the reference runs it in bf16)
    and in float32 on CPU (bf16 matmuls are slow there, and tests compare exactly). The momentum buffer and
    the weights stay float32.
    One torch.optim.Optimizer subclass holding both rules (param groups flagged use_muon), so the engines,
    the schedule (LambdaLR scales every group's lr) and checkpoints (torch.distributed.checkpoint: the state
    is per-parameter tensors: momentum_buffer, or AdamW's step/exp_avg/exp_avg_sq) treat it like AdamW.
    FSDP2: parameters are DTensors sharded on dim 0. A 2-D matrix's shard is not a matrix one can
    orthogonalise, so the momentum is all-gathered (`full_tensor()`), every rank runs NS5 on the whole matrix
    and keeps its own shard (`distribute_tensor(..., src_data_rank=None)`: no communication). Correct, but
    every rank repeats every matrix's NS5 and each step all-gathers the momenta once; faster schemes give
    each rank whole matrices to orthogonalise and scatter the results (Moonlight's distributed Muon) - not
    built. Stacked experts sharded on their expert dim are orthogonalised locally: a shard holds whole
    experts. DeepSpeed ZeRO owns its optimizer: muon (and qk-clip, whose weight edits ZeRO's fp32 partitions
    would overwrite) are refused with zero1-3 when the config is validated.

Sources
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024, blog and code);
    J. Liu et al., "Muon is Scalable for LLM Training" (Moonlight), arXiv 2502.16982; Kimi Team, "Kimi K2:
    Open Agentic Intelligence", arXiv 2507.20534, section 2.1 (MuonClip); Su Jianlin's QK-Clip post (read,
    not copied).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)
RMS_MATCH = 0.2  # the target update RMS (about AdamW's)
_HEAD_NAMES = ("output.weight", "lm_head.weight")


def newton_schulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """~U V^T for G = U S V^T on the last two dims (batched over the leading ones); same dtype as G."""
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on the wide orientation: A = X X^T is then the smaller Gram matrix
        X = X.mT
    # X_0 = G / ||G||_F: every singular value in [0, 1], where p's iteration is meant to run
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        # X <- a X + (b A + c A^2) X
        X = a * X + (b * A + c * (A @ A)) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def muon_update(M: torch.Tensor, steps: int = 5, split: int = 1) -> torch.Tensor:
    """O = NS5(M) * sqrt(max(n, m)) * 0.2 for each (n, m) matrix in M (..., split * n, m)."""
    shape = M.shape
    n, m = shape[-2] // split, shape[-1]
    X = M.reshape(*shape[:-2], split, n, m) if split > 1 else M  # (..., split, n, m)
    return (newton_schulz5(X, steps) * (math.sqrt(max(n, m)) * RMS_MATCH)).reshape(shape)


def _local_whole_matrices(t: DTensor) -> bool:
    """A DTensor of stacked matrices split only along dim 0 (experts): each shard holds whole matrices."""
    return t.ndim == 3 and all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in t.placements)


def orthogonalized(M: torch.Tensor, steps: int, split: int) -> torch.Tensor:
    """muon_update on plain tensors and on DTensors (see the notes: gather, orthogonalise, keep the shard)."""
    if not isinstance(M, DTensor):
        return muon_update(M, steps, split)
    if _local_whole_matrices(M):
        return DTensor.from_local(muon_update(M.to_local(), steps, split), M.device_mesh, M.placements,
                                  shape=M.shape, stride=M.stride())
    full = muon_update(M.full_tensor(), steps, split)
    return distribute_tensor(full, M.device_mesh, M.placements, src_data_rank=None)


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """Muon's parameters: 2-D and stacked 3-D weights except the token embedding and the output head."""
    return p.ndim in (2, 3) and "embed" not in name and not name.endswith(_HEAD_NAMES)


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Muon groups (fused gate_up experts split in two) and AdamW groups (decayed matrices, the rest)."""
    muon, fused, decay, no_decay, seen = [], [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if is_hidden_matrix(name, p):
            (fused if name.endswith("gate_up_proj") else muon).append(p)
        else:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": muon, "use_muon": True, "split": 1, "weight_decay": weight_decay},
              {"params": fused, "use_muon": True, "split": 2, "weight_decay": weight_decay},
              {"params": decay, "use_muon": False, "weight_decay": weight_decay},
              {"params": no_decay, "use_muon": False, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Muon(torch.optim.Optimizer):
    """Muon on the groups flagged `use_muon`, AdamW (torch's formula, decoupled decay) on the others."""

    def __init__(self, params, lr: float, momentum: float = 0.95, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1):
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, use_muon=False, split=1)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon if group["use_muon"] else self._adamw)(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            # M_t = mu M_{t-1} + G_t
            buf.mul_(mu).add_(p.grad)
            # O_t = NS5(M_t) * sqrt(max(n, m)) * 0.2
            update = orthogonalized(buf, group["ns_steps"], group["split"])
            # W_t = W_{t-1} - lr (O_t + wd W_{t-1})
            p.mul_(1 - lr * wd).add_(update.to(p.dtype), alpha=-lr)

    def _adamw(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g, state = p.grad, self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * wd)
            # m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            # W -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
            denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1**t))


# ------------------------------------------------------------------------------------------------ QK-Clip


def qk_clip_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules that can record their logits and name their clipping rows."""
    return [m for m in model.modules() if hasattr(m, "qk_clip_rows") and hasattr(m, "qk_clip_record")]


def enable_qk_clip(model: nn.Module, on: bool = True) -> int:
    """Make the model's attention modules record S_max^h in training forwards; returns how many there are."""
    mods = qk_clip_modules(model)
    for m in mods:
        m.qk_clip_record = on
        m.qk_max_logit = None
    return len(mods)


def _scale_rows_(weight: torch.Tensor, rows: torch.Tensor) -> None:
    """weight[r, :] *= rows[r], for a plain tensor or a DTensor (the factor laid out like the weight)."""
    factor = rows.to(device=weight.device, dtype=weight.dtype)[:, None]  # (R, 1)
    if isinstance(weight, DTensor):
        if any(p.is_shard() and p.dim != 0 for p in weight.placements):
            raise NotImplementedError("QK-Clip on a weight sharded along its input dim (tensor parallel) is not built")
        factor = distribute_tensor(factor, weight.device_mesh, weight.placements, src_data_rank=None)
    weight.mul_(factor)


@torch.no_grad()
def qk_clip_(model: nn.Module, tau: float, applied: bool = True, reduce=lambda t: t) -> dict[str, float]:
    """The post-step hook: MAX-reduce every head's recorded S_max^h (`reduce(t)` over the data-parallel ranks),
    rescale the heads above tau (gamma_h = tau / S_max^h, each module's rule), clear the records.
    Skipped steps (`applied` False) clear the records and touch nothing. Returns the step's metrics."""
    mods = qk_clip_modules(model)
    if not mods:
        return {}
    heads = [m.qk_max_logit for m in mods]
    if any(h is None for h in heads) and not all(h is None for h in heads):
        # a module that did not run this step (e.g. an MTP block): no logits, nothing to clip there
        n = next(h for h in heads if h is not None)
        heads = [h if h is not None else torch.full((m.n_heads if hasattr(m, "n_heads") else m.cfg.n_heads,),
                                                     float("-inf"), device=n.device) for m, h in zip(mods, heads)]
    for m in mods:
        m.qk_max_logit = None
    if heads[0] is None:
        return {}
    sizes = [h.numel() for h in heads]
    s_max = reduce(torch.cat(heads))  # (sum of H over the modules,), identical on every rank afterwards
    metrics = {"qk_clip_max_logit": float(s_max.max()), "qk_clip_heads": 0}
    if not applied:
        return metrics
    # gamma_h = tau / S_max^h where S_max^h > tau, else 1
    over = torch.isfinite(s_max) & (s_max > tau)
    gamma = torch.where(over, tau / s_max.clamp_min(tau), torch.ones_like(s_max))
    metrics["qk_clip_heads"] = int(over.sum())
    for m, g, o in zip(mods, gamma.split(sizes), over.split(sizes)):
        if o.any():
            for weight, rows in m.qk_clip_rows(g):
                _scale_rows_(weight, rows)
    return metrics
