"""Rectified flow for the AsymmDiT: the training loss, Mochi's sigma schedule and the Euler sampler with CFG.

The convention (Mochi's; sigma = 1 is pure noise, sigma = 0 the data)
    z_sigma = (1 - sigma) x0 + sigma eps,        eps ~ N(0, I),  sigma in [0, 1]
    v       = x0 - eps                           what the model predicts (the direction towards the data)
    d z_sigma / d sigma = eps - x0 = -v,  so one Euler step from sigma_i down to sigma_{i+1} < sigma_i is
    z_{i+1} = z_i + (sigma_i - sigma_{i+1}) v_hat

    Sign pitfalls: diffusers' `FlowMatchEulerDiscreteScheduler` writes the step as z + (s_{i+1} - s_i) v with
    its *inverted* sigmas s = 1 - sigma (Mochi's scheduler config sets invert_sigmas), which is the same step;
    SD3/Flux use the opposite velocity (eps - x0) with the non-inverted sigmas. The model's time embedder
    sees 1000 (1 - sigma) (diffusers' pipeline passes `timestep` = 1000 (1 - sigma) as well, "Mochi uses
    reversed timesteps"); `AsymmDiT` takes sigma and does the 1 - sigma itself, so callers never do.

The loss
    L = mean over every latent element of (model(z_sigma, sigma, text) - (x0 - eps))^2
    sigma ~ U[0, 1) by default, or logit-normal (sigmoid of N(0, 1), SD3's choice, which spends more
    samples at middle noise levels). With `token_range` (context parallelism) the model returns the patch
    predictions of a slice of the visual tokens, and the loss is the slice's *sum* divided by the global
    element count, so the losses of the cp ranks add up to the single-process mean.

The schedule (genmo's `linear_quadratic_schedule`, num_steps = n, threshold tau = 0.025, m = n // 2)
    for i < m:   u_i = i tau / m                                       linear up to tau at i = m
    for i >= m:  u_i = a i^2 + b i + c      with  d = m - tau n,  q = n - m,
                 a = d / (m q^2),  b = tau / m - 2 d / q^2,  c = a m^2  (continuous at m, u_n = 1)
    sigma_i = 1 - u_i for i = 0..n-1, then sigma_n = 0. Most steps are spent at high noise (where the layout
    of the video is decided) and the schedule drops quickly at the end.

Classifier-free guidance: one batched pass over [uncond; cond] per step, v = v_u + w (v_c - v_u);
guidance <= 1 runs the conditional pass alone (w = 1 is exactly the conditional velocity).

Sources: Liu et al., "Flow Straight and Fast" (rectified flow), arXiv 2209.03003; Esser et al., "Scaling
Rectified Flow Transformers" (SD3, logit-normal sampling), arXiv 2403.03206; genmoai/mochi infer.py;
diffusers pipeline_mochi.py and scheduling_flow_match_euler_discrete.py (read, not copied).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

SCHEDULES = ("linear_quadratic", "linear")


def noisy(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z_sigma = (1 - sigma) x0 + sigma eps, sigma (B,) broadcast over the other axes."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target v = x0 - eps."""
    return x0 - eps


def sample_sigma(batch: int, generator=None, device=None, kind: str = "uniform") -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    raise ValueError(f"sigma sampling {kind!r}: expected 'uniform' or 'logit_normal'")


def flow_loss(model, x0: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, generator=None, *,
              sigma: torch.Tensor | None = None, eps: torch.Tensor | None = None,
              sigma_kind: Literal["uniform", "logit_normal"] = "uniform",
              token_range: tuple[int, int] | None = None) -> torch.Tensor:
    """Scalar rectified-flow loss of `model` on clean latents x0 (B, C, T, H, W).

    sigma (B,) and eps (like x0) are drawn from `generator` when not given (on the generator's device, which
    must be x0's). token_range: see the module docstring (context parallelism)."""
    B = x0.shape[0]
    if sigma is None:
        sigma = sample_sigma(B, generator, x0.device, sigma_kind)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    z = noisy(x0, eps, sigma)
    target = velocity(x0, eps)
    if token_range is None:
        pred = model(z, sigma, text, text_mask)  # (B, C, T, H, W)
        return F.mse_loss(pred.float(), target.float())
    pred = model(z, sigma, text, text_mask, token_range=token_range)  # (B, n, p*p*C)
    start, stop = token_range
    target = model.patchify(target)[:, start:stop]
    return (pred.float() - target.float()).pow(2).sum() / x0.numel()


def sigma_schedule(steps: int, kind: str = "linear_quadratic", threshold_noise: float = 0.025) -> torch.Tensor:
    """(steps + 1,) float64 noise levels from 1 (pure noise) down to 0, for `sample`."""
    if steps < 1:
        raise ValueError(f"sigma_schedule: steps must be >= 1, got {steps}")
    if kind == "linear":
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if kind != "linear_quadratic":
        raise ValueError(f"sigma_schedule: kind {kind!r} (expected one of {', '.join(SCHEDULES)})")
    if not 0 < threshold_noise < 1:
        raise ValueError(f"sigma_schedule: threshold_noise must be in (0, 1), got {threshold_noise}")
    n, tau = steps, threshold_noise
    m = n // 2
    if m == 0:  # one step: straight from noise to data
        return torch.tensor([1.0, 0.0], dtype=torch.float64)
    q = n - m
    d = m - tau * n
    a = d / (m * q ** 2)
    b = tau / m - 2 * d / q ** 2
    c = a * m ** 2
    # u_i = i tau / m (i < m);  u_i = a i^2 + b i + c (i >= m)
    u = [i * tau / m for i in range(m)] + [a * i * i + b * i + c for i in range(m, n)]
    return torch.tensor([1.0 - v for v in u] + [0.0], dtype=torch.float64)


def _pad_text(text: torch.Tensor, mask: torch.Tensor, length: int):
    """Right-pad (B, L, D) features and their (B, L) mask to `length` tokens (padding masked out)."""
    extra = length - text.shape[1]
    if extra == 0:
        return text, mask
    return F.pad(text, (0, 0, 0, extra)), F.pad(mask.bool(), (0, extra), value=False)


@torch.no_grad()
def sample(model, shape, text: torch.Tensor, text_mask: torch.Tensor, null_text: torch.Tensor | None = None,
           null_mask: torch.Tensor | None = None, steps: int = 64, guidance: float = 4.5, generator=None, *,
           schedule: str = "linear_quadratic", threshold_noise: float = 0.025,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Generate clean latents of `shape` (B, C, T, H, W) by Euler steps of the flow, sigma 1 -> 0.

    text (B, L, Dt), text_mask (B, L); null_text / null_mask: the unconditional input, (B or 1, L', Dt) and
    (B or 1, L') (L' may differ from L: the shorter is padded). guidance > 1 runs [uncond; cond] as one
    batch of 2B per step: v = v_u + w (v_c - v_u); guidance <= 1 runs the conditional pass only.
    The loop runs in float32 (as Mochi's pipeline does), the model in its own dtype."""
    B = shape[0]
    device = text.device
    dtype = next(model.parameters()).dtype
    z = noise.float().clone() if noise is not None else torch.randn(shape, generator=generator, device=device)
    sigmas = sigma_schedule(steps, schedule, threshold_noise).tolist()
    cfg = guidance > 1
    if cfg:
        if null_text is None or null_mask is None:
            raise ValueError("sample: guidance > 1 needs null_text and null_mask (the unconditional input)")
        null_text = null_text.expand(B, -1, -1) if null_text.shape[0] == 1 else null_text
        null_mask = null_mask.expand(B, -1) if null_mask.shape[0] == 1 else null_mask
        L = max(text.shape[1], null_text.shape[1])
        text, text_mask = _pad_text(text, text_mask, L)
        null_text, null_mask = _pad_text(null_text, null_mask, L)
        text_in = torch.cat([null_text, text]).to(dtype)  # (2B, L, Dt): [uncond; cond]
        mask_in = torch.cat([null_mask.bool(), text_mask.bool()])
    else:
        text_in, mask_in = text.to(dtype), text_mask.bool()
    for s_now, s_next in zip(sigmas[:-1], sigmas[1:]):
        zin = torch.cat([z, z]) if cfg else z
        sig = torch.full((zin.shape[0],), s_now, device=device)
        v = model(zin.to(dtype), sig, text_in, mask_in).float()
        if cfg:
            v_u, v_c = v.chunk(2)
            # v = v_u + w (v_c - v_u)
            v = v_u + guidance * (v_c - v_u)
        # z_{i+1} = z_i + (sigma_i - sigma_{i+1}) v
        z = z + (s_now - s_next) * v
    return z
