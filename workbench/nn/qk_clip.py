"""What QK-Clip needs from an attention module: the largest pre-softmax logit of each head.

    S_max^h = max over the batch b, query slots i and key slots j that the mask allows of  q_i^h . k_j^h * scale

An attention module that supports QK-Clip (llama3.Attention, deepseek_v3.MLA) calls `record_max_logits`
from its forward when its `qk_clip_record` flag is set (workbench.train.optim.muon.enable_qk_clip sets it)
and it is training (the trainer validates in eval mode, so held-out batches never count); the value is kept as a running max over the step's micro-batches in `qk_max_logit`
(H,) until the post-step hook (workbench.train.optim.muon.qk_clip_) reads, reduces and clears it. The
module also answers `qk_clip_rows(gamma)`: which rows of which weight to multiply by what so that head h's
logits scale by gamma_h (the rule is the module's: MHA, GQA and MLA differ). Scaling the weights happens
outside (a sharded weight is a DTensor, and model code stays single-device: DESIGN.md rule 2).

Cost: computed under no_grad in float32, over blocks of query slots so that no more than
`max_elements` scores (about B * H * Tq_block * Tk) exist at once: never more than a math-backend attention
holds, and a small extra matmul next to the attention itself. Soft-capping (Gemma 2) is ignored: the
recorded logit is the one before the cap.
"""

from __future__ import annotations

import torch

from workbench.nn.attention import MaskSpec
from workbench.nn.moba import moba_mask


@torch.no_grad()
def head_max_logits(q: torch.Tensor, k: torch.Tensor, mask: MaskSpec, q_offset: int, scale: float,
                    max_elements: int = 1 << 22) -> torch.Tensor:
    """q (B, Tq, H, D), k (B, Tk, KV, D) with H a multiple of KV (GQA: query head h reads KV head
    h // (H / KV)) -> (H,) float32: the largest allowed q.k * scale of each head (-inf where none)."""
    B, Tq, H, D = q.shape
    Tk, KV = k.shape[1], k.shape[2]
    G = H // KV
    qf = q.float().reshape(B, Tq, KV, G, D).permute(0, 2, 3, 1, 4)  # (B, KV, G, Tq, D)
    kf = k.float().permute(0, 2, 3, 1)[:, :, None]  # (B, KV, 1, D, Tk)
    block = max(1, max_elements // max(1, B * H * Tk))
    out = torch.full((H,), float("-inf"), device=q.device)
    # MoBA's allowed keys depend on q and k: its (B, H, Tq, Tk) mask, chosen once (only the picked blocks count)
    moba = None if mask.moba is None else moba_mask(q.transpose(1, 2), k.transpose(1, 2), mask, q_offset)
    for s in range(0, Tq, block):
        e = min(Tq, s + block)
        # scores = q k^T * scale on query slots s..e
        scores = torch.matmul(qf[:, :, :, s:e], kf) * scale  # (B, KV, G, e - s, Tk)
        if moba is None:
            allowed = mask.dense(e - s, Tk, q_offset + s, q.device)[:, :, None]  # (B|1, 1, 1, e - s, Tk)
        else:
            allowed = moba[:, :, s:e].reshape(B, KV, G, e - s, Tk)  # head h = kv * G + g
        if mask.key_padding is not None:  # a pad query's own-slot score is not a logit that matters
            real_q = mask.key_padding.to(q.device)[:, q_offset + s:q_offset + e].bool()  # (B, e - s)
            allowed = allowed & real_q[:, None, None, :, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.maximum(out, scores.amax(dim=(0, 3, 4)).reshape(H))
    return out


def record_max_logits(module: torch.nn.Module, q, k, mask: MaskSpec, q_offset: int, scale: float) -> None:
    """module.qk_max_logit = max(module.qk_max_logit, this forward's per-head maxima)."""
    new = head_max_logits(q, k, mask, q_offset, scale)
    old = getattr(module, "qk_max_logit", None)
    module.qk_max_logit = new if old is None else torch.maximum(old, new)
