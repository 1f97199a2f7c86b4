"""Noise schedules, the training objectives and the DDPM / DDIM samplers of denoising diffusion.

What it is
    Everything about the noise that is not the network: the beta schedule, the forward process
    q(x_t | x0), the regression targets (epsilon, v, x0) and their loss, and the two classic reverse
    processes, DDPM (ancestral sampling) and DDIM (deterministic for eta = 0). Step-for-step equal to
    diffusers' `DDPMScheduler` and `DDIMScheduler` (tests/parity/test_diffusion_hf.py).

The math (T training steps, t = 0 .. T-1)
    betas: linear      beta_t = linspace(beta_start, beta_end, T)
           scaled_linear  beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2        (Stable Diffusion)
           squaredcos_cap_v2  beta_t = min(1 - abar(t+1/T) / abar(t/T), 0.999),
                              abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2               (Nichol & Dhariwal)
    alpha_t = 1 - beta_t,  abar_t = prod_{s <= t} alpha_s
    forward:   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  eps ~ N(0, I)
    targets:   epsilon: eps;   v_prediction: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0;   sample: x0
    loss:      mean ||target - model_out||^2
    inverting a prediction at x_t:  epsilon: x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
                                    v:       x0 = sqrt(abar) x_t - sqrt(1-abar) v,  eps = sqrt(abar) v + sqrt(1-abar) x_t
                                    sample:  eps = (x_t - sqrt(abar) x0) / sqrt(1-abar)
    DDPM step t -> t' (t' the next timestep of the inference schedule, abar_{-1} = 1):
        a_t = abar_t / abar_t',  b_t = 1 - a_t
        mu  = sqrt(abar_t') b_t / (1 - abar_t) x0 + sqrt(a_t) (1 - abar_t') / (1 - abar_t) x_t
        x_t' = mu + sigma z  (not at t = 0),  sigma^2 = (1 - abar_t') / (1 - abar_t) b_t  ("fixed_small")
                                              or b_t ("fixed_large")
    DDIM step t -> t' = t - T // N (abar below 0 is `final_alpha_cumprod`: 1 or abar_0, set_alpha_to_one):
        sigma = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t')
        x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma^2) eps + sigma z
    Inference timesteps for N steps: leading  (0, r, 2r, ..) reversed + steps_offset, r = T // N
                                     trailing round(T, T - T/N, ..) - 1
                                     linspace round(linspace(0, T-1, N)) reversed
    Zero terminal SNR (rescale_betas_zero_snr, Lin et al. 2023): sqrt(abar) shifted so its last value
    is 0 and rescaled so its first is unchanged; then the betas that give it.

The intuition
    epsilon prediction makes the network a denoiser of unit-variance noise at every level; v mixes
    eps and x0 so the target stays well-scaled at both ends (needed when abar_T -> 0). DDPM re-injects
    fresh noise each step and needs many steps; DDIM follows the same marginals with a deterministic
    ODE-like update, so 20-50 steps of the 1000 suffice.

Design choices
    All schedule arithmetic is float32 on 0-d tensors in the same order as diffusers', so steps agree to
    float rounding. Noise comes from `randn(shape, generator, device, dtype)`, which draws on the
    generator's device like diffusers' `randn_tensor`: a seeded CPU generator gives the same image on
    any device. Samplers hold no model: `step(model_out, t, x_t)` is the whole interface.

    Published API (used by the diffusion training, part D):
        cfg = ScheduleConfig(...) or FLAVORS["sd15"] / FLAVORS["ddpm"]
        sched = NoiseSchedule(cfg)
        t = sched.sample_timesteps(B, generator);  x_t = sched.add_noise(x0, noise, t)
        loss = diffusion_loss(model_out, x0, noise, t, cfg.prediction_type, sched)
        sampler = make_sampler("ddim" | "ddpm", cfg);  for t in sampler.set_timesteps(N):
            x = sampler.step(model(x, t), t, x, eta=..., generator=g).prev_sample

Differences from the reference
    Not implemented: dynamic thresholding, learned variances, custom timestep lists, "sigmoid" betas.

Sources
    Ho et al. 2020 (arXiv 2006.11239); Song et al., "Denoising Diffusion Implicit Models" (2010.02502);
    Nichol & Dhariwal 2021 (2102.09672); Salimans & Ho, "Progressive Distillation" (v, 2202.00512);
    Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed" (2305.08891); diffusers
    scheduling_ddpm.py and scheduling_ddim.py (read, not copied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from workbench.config import fail, field_

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = field_(1000, gt=0)
    beta_start: float = field_(0.00085, gt=0, lt=1)
    beta_end: float = field_(0.012, gt=0, lt=1)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    steps_offset: int = field_(1, ge=0, doc="added to leading-spaced timesteps (SD: 1)")
    set_alpha_to_one: bool = field_(False, doc="DDIM: the step past t=0 uses abar=1 (True) or abar_0 (False)")
    clip_sample: bool = field_(False, doc="clamp the predicted x0 to +-clip_sample_range")
    clip_sample_range: float = field_(1.0, gt=0)
    variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small"

    def validate(self) -> None:
        if self.beta_end < self.beta_start:
            fail("beta_end", f"must be >= beta_start ({self.beta_start}), got {self.beta_end}")
        if self.prediction_type not in PREDICTION_TYPES:
            fail("prediction_type", f"expected one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}")


FLAVORS: dict[str, ScheduleConfig] = {
    # Stable Diffusion 1.x / 2-base (scheduler_config.json of the released pipelines)
    "sd15": ScheduleConfig(),
    # SD 2.x 768-v
    "sd2-v": ScheduleConfig(prediction_type="v_prediction"),
    # the DDPM paper (pixel space): linear betas, x0 clipped to [-1, 1]
    "ddpm": ScheduleConfig(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", steps_offset=0,
                           set_alpha_to_one=True, clip_sample=True),
    # improved DDPM's cosine schedule, v targets (small pixel-space models train well on it)
    "cosine-v": ScheduleConfig(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", steps_offset=0,
                               set_alpha_to_one=True, clip_sample=True, timestep_spacing="trailing"),
}


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """The (T,) float32 betas of the config."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        # beta_t = linspace(sqrt(b0), sqrt(b1), T)^2
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        def abar(s: float) -> float:  # abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    else:
        fail("beta_schedule", f"expected linear, scaled_linear or squaredcos_cap_v2, got {cfg.beta_schedule!r}")
    if cfg.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose abar_T is exactly 0 (pure noise at the last step), abar_0 unchanged."""
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()  # sqrt(abar)
    s0, sT = s[0].clone(), s[-1].clone()
    # shift so the last is 0, scale so the first is unchanged
    s = (s - sT) * (s0 / (s0 - sT))
    abar = s**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])  # undo the cumulative product
    return 1 - alphas


def randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """N(0, I) drawn on the generator's device, then moved: a CPU seed gives the same numbers everywhere."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


class NoiseSchedule:
    """The forward process and the training targets of a schedule."""

    def __init__(self, cfg: ScheduleConfig):
        cfg.validate()
        self.cfg = cfg
        self.betas = make_betas(cfg)  # (T,)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # abar_t, (T,)

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _bcast(self.alphas_cumprod.to(like.device, like.dtype)[t.to(like.device)], like)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """t ~ U{0, .., T-1}, (B,) int64."""
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator,
                          device=generator.device if generator is not None else device)
        return t.to(device) if device is not None else t

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        abar = self._abar(t, x0)
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
        abar = self._abar(t, x0)
        return abar**0.5 * noise - (1 - abar) ** 0.5 * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str | None = None):
        kind = prediction_type or self.cfg.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.velocity(x0, noise, t)
        if kind == "sample":
            return x0
        raise ValueError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {kind!r}")


def diffusion_loss(model_out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   prediction_type: str = "epsilon", schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """mean ||target - model_out||^2 in float32; the v target needs the `schedule` (its abar_t)."""
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = x0
    elif prediction_type == "v_prediction":
        if schedule is None:
            raise ValueError("diffusion_loss: prediction_type 'v_prediction' needs the schedule (abar_t)")
        target = schedule.velocity(x0, noise, t)
    else:
        raise ValueError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    return F.mse_loss(model_out.float(), target.float())


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class _Sampler(NoiseSchedule):
    def __init__(self, cfg: ScheduleConfig):
        super().__init__(cfg)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1)
        self.init_noise_sigma = 1.0  # x_T ~ N(0, I)

    def set_timesteps(self, num_inference_steps: int, device=None) -> torch.Tensor:
        """The N inference timesteps, descending (also kept as `self.timesteps`)."""
        T, N, cfg = self.num_train_timesteps, num_inference_steps, self.cfg
        if not 0 < N <= T:
            raise ValueError(f"steps: expected 1 .. {T} (the schedule's training steps), got {N}")
        self.num_inference_steps = N
        if cfg.timestep_spacing == "linspace":
            ts = torch.linspace(0, T - 1, N, dtype=torch.float64).round().flip(0)
        elif cfg.timestep_spacing == "leading":
            ts = (torch.arange(N, dtype=torch.float64) * (T // N)).flip(0) + cfg.steps_offset
        elif cfg.timestep_spacing == "trailing":
            ts = torch.arange(T, 0, -T / N, dtype=torch.float64).round() - 1
        else:
            fail("timestep_spacing", f"expected leading, trailing or linspace, got {cfg.timestep_spacing!r}")
        self.timesteps = ts.to(torch.int64).to(device)
        return self.timesteps

    def _x0_eps(self, model_out, x_t, abar):
        """(x0, eps) from the model's prediction at x_t."""
        kind, b = self.cfg.prediction_type, 1 - abar
        if kind == "epsilon":
            # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
            return (x_t - b**0.5 * model_out) / abar**0.5, model_out
        if kind == "sample":
            # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
            return model_out, (x_t - abar**0.5 * model_out) / b**0.5
        # v: x0 = sqrt(abar) x_t - sqrt(1 - abar) v;  eps = sqrt(abar) v + sqrt(1 - abar) x_t
        return abar**0.5 * x_t - b**0.5 * model_out, abar**0.5 * model_out + b**0.5 * x_t

    def _clip(self, x0):
        r = self.cfg.clip_sample_range
        return x0.clamp(-r, r) if self.cfg.clip_sample else x0

    def _check(self):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(N) before step()")


class DDIMSampler(_Sampler):
    """Denoising diffusion implicit models: eta = 0 deterministic, eta = 1 DDPM-like noise."""

    def __init__(self, cfg: ScheduleConfig):
        super().__init__(cfg)
        # abar "before t = 0": 1, or abar_0 (SD)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, model_out: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             use_clipped_model_output: bool = False) -> StepOutput:
        self._check()
        t = int(t)
        prev = t - self.num_train_timesteps // self.num_inference_steps
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        x0, eps = self._x0_eps(model_out, x_t, abar)
        x0 = self._clip(x0)
        # sigma^2 = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        sigma = eta * var**0.5
        if use_clipped_model_output:
            eps = (x_t - abar**0.5 * x0) / (1 - abar) ** 0.5
        # x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps (+ sigma z)
        prev_sample = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn(model_out.shape, generator, model_out.device, model_out.dtype)
            prev_sample = prev_sample + sigma * variance_noise
        return StepOutput(prev_sample, x0)


class DDPMSampler(_Sampler):
    """Ancestral sampling from the posterior q(x_t' | x_t, x0) with the predicted x0."""

    def previous_timestep(self, t: int) -> int:
        if self.num_inference_steps is None:
            return t - 1
        idx = (self.timesteps.cpu() == t).nonzero()
        if idx.numel() == 0:
            raise ValueError(f"timestep {t} is not one of this sampler's timesteps")
        i = int(idx[0, 0])
        return -1 if i == len(self.timesteps) - 1 else int(self.timesteps[i + 1])

    def step(self, model_out: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor,
             generator: torch.Generator | None = None, **_unused) -> StepOutput:
        self._check()
        t = int(t)
        prev = self.previous_timestep(t)
        one = torch.tensor(1.0)
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else one
        b, b_prev = 1 - abar, 1 - abar_prev
        a_t = abar / abar_prev  # the alpha of this (possibly strided) step
        beta_t = 1 - a_t
        x0, _ = self._x0_eps(model_out, x_t, abar)
        x0 = self._clip(x0)
        # mu = sqrt(abar_prev) beta_t / (1 - abar) x0 + sqrt(a_t) (1 - abar_prev) / (1 - abar) x_t
        mu = (abar_prev**0.5 * beta_t) / b * x0 + a_t**0.5 * b_prev / b * x_t
        if t > 0:
            z = randn(model_out.shape, generator, model_out.device, model_out.dtype)
            if self.cfg.variance_type == "fixed_small":
                # sigma^2 = (1 - abar_prev) / (1 - abar) beta_t, clamped away from 0
                var = torch.clamp(b_prev / b * beta_t, min=1e-20)
            else:
                var = beta_t
            mu = mu + var**0.5 * z
        return StepOutput(mu, x0)


SAMPLERS = {"ddim": DDIMSampler, "ddpm": DDPMSampler}


def make_sampler(name: str, cfg: ScheduleConfig) -> DDIMSampler | DDPMSampler:
    if name not in SAMPLERS:
        raise ValueError(f"scheduler: expected one of {', '.join(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](cfg)
