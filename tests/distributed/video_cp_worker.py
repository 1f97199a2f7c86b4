"""Run by tests/distributed/test_video_cp.py under torchrun (2 ranks, gloo): context parallelism over the video
tokens of the Mochi AsymmDiT (debug flavor) against one process, in one launch.

    torchrun --nproc-per-node 2 tests/distributed/video_cp_worker.py OUT_DIR

Every rank builds the same model (random weights, adaLN-Zero gates perturbed so every branch matters) and the
same batch (text row 0 padded). The reference is the plain model on the whole video; the cp model has its
`blocks.*.attn.core` swapped for JointVideoAttention and computes its contiguous slice of the visual tokens.
Rank 0 writes OUT_DIR/video-cp-results.json: {check: max |cp - single| / max |single|} for the gathered
output, the loss (sum over ranks), every parameter gradient (summed over ranks), the weights after 3 SGD
steps, the output with the cp cores disabled (whole video on each rank), and the error of a call without
token_range with the cores active.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from workbench.models.video import flow, mochi
from workbench.parallel.cp import (
    apply_context_parallel,
    context_parallel_disabled,
    gather_tokens,
    video_token_range,
)
from workbench.parallel.plans.mochi import PLAN


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def sgd_step(model, params, lr, group=None) -> None:
    for p in params:
        if p.grad is None:  # the last block's text-query norm
            continue
        if group is not None:
            dist.all_reduce(p.grad, group=group)  # SUM: see cp.JointVideoAttention
        p.data.add_(p.grad, alpha=-lr)
        p.grad = None


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    P, r = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(P)))
    cfg = mochi.FLAVORS["debug"]
    torch.manual_seed(0)
    ref = mochi.AsymmDiT(cfg)
    ref.init_weights(torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name != "pos_frequencies":  # RoPE keeps its init: angles reach ~100 rad, where fp32 noise grows
                p.add_(0.2 * torch.randn(p.shape))
    cp = copy.deepcopy(ref)
    apply_context_parallel(cp, PLAN, group, "joint")

    g = torch.Generator().manual_seed(2)
    B, C, T, H, W = 2, cfg.in_channels, 3, 4, 8
    x0 = torch.randn(B, C, T, H, W, generator=g)
    text = torch.randn(B, 5, cfg.text_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # row 0: two padded tokens
    sigma = torch.tensor([0.3, 0.85])
    eps = torch.randn(x0.shape, generator=g)
    z = flow.noisy(x0, eps, sigma)
    N = T * (H // cfg.patch_size) * (W // cfg.patch_size)
    span = video_token_range(N, P, r)
    res = {"tokens": N, "span": list(span)}

    # forward: the gathered slices equal the whole video
    with torch.no_grad():
        full = ref(z, sigma, text, mask)
        local = cp(z, sigma, text, mask, token_range=span)  # (B, N/P, p*p*C)
        res["output"] = rel(cp.unpatchify(gather_tokens(local, group), T, H, W), full)
        with context_parallel_disabled(cp):
            res["output_cp_disabled"] = rel(cp(z, sigma, text, mask), full)
        try:  # cp cores active, the whole video on each rank (no token_range): refused, not P-fold keys
            cp(z, sigma, text, mask)
            res["whole_video_refused"] = ""
        except ValueError as e:
            res["whole_video_refused"] = str(e)

    # loss and gradients
    loss_ref = flow.flow_loss(ref, x0, text, mask, sigma=sigma, eps=eps)
    loss_ref.backward()
    loss_cp = flow.flow_loss(cp, x0, text, mask, sigma=sigma, eps=eps, token_range=span)
    loss_cp.backward()
    total = loss_cp.detach().clone()
    dist.all_reduce(total, group=group)
    res["loss"] = rel(total, loss_ref.detach())
    res["loss_value"] = float(loss_ref.detach())
    ref_params, cp_params = dict(ref.named_parameters()), dict(cp.named_parameters())
    assert ref_params.keys() == cp_params.keys()
    # the last block's text-query norm feeds nothing (its text outputs are never used): no gradient anywhere
    unused = sorted(n for n, p in ref_params.items() if p.grad is None)
    res["unused"] = unused
    grads = {}
    for name, p in cp_params.items():
        if name in unused:
            grads[name] = 0.0 if p.grad is None else float(p.grad.abs().max())
            continue
        gsum = p.grad.clone()
        dist.all_reduce(gsum, group=group)
        grads[name] = rel(gsum, ref_params[name].grad)
    res["grads"] = grads
    res["grads_nonzero"] = sum(p.grad is not None and float(p.grad.abs().max()) > 0 for p in ref_params.values())
    res["n_params"] = len(ref_params)

    # weights after 3 SGD steps (the first uses the gradients above)
    lr = 0.02
    before = {n: q.detach().clone() for n, q in ref_params.items()}
    sgd_step(ref, list(ref_params.values()), lr)
    sgd_step(cp, list(cp_params.values()), lr, group)
    for _ in range(2):
        flow.flow_loss(ref, x0, text, mask, sigma=sigma, eps=eps).backward()
        flow.flow_loss(cp, x0, text, mask, sigma=sigma, eps=eps, token_range=span).backward()
        sgd_step(ref, list(ref_params.values()), lr)
        sgd_step(cp, list(cp_params.values()), lr, group)
    res["weights"] = {n: rel(cp_params[n].detach(), p.detach()) for n, p in ref_params.items()}
    res["weights_abs"] = {n: float((cp_params[n].detach() - p.detach()).abs().max()) for n, p in ref_params.items()}
    res["weights_moved"] = max(float((p.detach() - before[n]).abs().max()) for n, p in ref_params.items())
    if r == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "video-cp-results.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
