"""The Mochi AsymmDiT plan (workbench.models.video.mochi): blocks are `blocks.*`; context parallelism over video
tokens swaps each block's joint attention core for `workbench.parallel.cp.JointVideoAttention`.

How a cp group runs the model (P ranks, same samples on every rank; tests/distributed/test_video_cp.py):
    apply_context_parallel(model, PLAN, cp_group, "joint")
    start, stop = video_token_range(T * (H / p) * (W / p), P, cp_rank)   # contiguous slice of visual tokens
    loss_r = flow_loss(model, x0, text, mask, sigma=..., eps=..., token_range=(start, stop))
    loss_r.backward(); all-reduce SUM of every parameter gradient over the cp group
The text stream is computed whole on every rank; cp.JointVideoAttention's docstring says why summing its
gradients over the ranks gives the single-process gradient. No tensor-parallel styles yet.
"""

from workbench.parallel.plans import Plan

PLAN = Plan(
    blocks="blocks",
    context="blocks.*.attn.core",
    head="final.proj",
)
