"""Noisy periodic signals for next-value prediction: sums of sines with random frequencies, plus noise.

Each sequence n is, for steps t = 0 .. length - 1,

    s_t = sum_{k=1..K} a_k sin(2 pi f_k t + phi_k)         (the clean signal)
    x_t = s_t + noise * eps_t,   eps_t ~ N(0, 1)            (what a model sees)

with K = `components`, and a_k ~ U(amp_min, amp_max), f_k ~ U(freq_min, freq_max) cycles per step and
phi_k ~ U(0, 2 pi) drawn afresh for every sequence. The task is to predict x_{t+1} from x_0 .. x_t. Because
the frequencies differ from sequence to sequence, a predictor has to infer them from the history it has
read so far; the first few steps are therefore hard for any model (`score_from` in the sequence task skips
them when scoring).

Reference points for the mean squared error of predicting x_{t+1}
    noise floor    noise^2: eps_{t+1} is independent of everything before it, so even a predictor that knew
                   s_{t+1} exactly would be off by it (the true floor is a little higher: s_{t+1} must itself
                   be estimated from noisy history);
    persistence    x_hat_{t+1} = x_t, the naive forecast, MSE = E[(s_{t+1} - s_t)^2] + 2 noise^2.
A clean sum of K sines obeys a linear recurrence of order 2K with coefficients set by its frequencies; a
single linear autoregression fitted over all sequences cannot use it (the coefficients change per sequence),
which is where a recurrent model's state helps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.config import fail, field_


@dataclass
class SignalConfig:
    length: int = field_(80, ge=4, doc="steps per sequence")
    components: int = field_(2, gt=0, doc="sines per sequence (K)")
    freq_min: float = field_(0.02, gt=0, lt=0.5, doc="lowest frequency, cycles per step")
    freq_max: float = field_(0.1, gt=0, lt=0.5, doc="highest frequency, cycles per step (below Nyquist, 0.5)")
    amp_min: float = field_(0.3, ge=0)
    amp_max: float = field_(1.0, gt=0)
    noise: float = field_(0.1, ge=0, doc="standard deviation of the added Gaussian noise")

    def validate(self) -> None:
        if self.freq_min > self.freq_max:
            fail("freq_min", f"must be <= freq_max ({self.freq_max}), got {self.freq_min}")
        if self.amp_min > self.amp_max:
            fail("amp_min", f"must be <= amp_max ({self.amp_max}), got {self.amp_min}")


def make_signals(n: int, seed: int, cfg: SignalConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy, clean), each (n, length) float32, deterministic in `seed`."""
    cfg = cfg or SignalConfig()
    g = torch.Generator().manual_seed(seed)
    K = cfg.components
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(n, K, 1, generator=g, dtype=torch.float64)  # noqa: E731
    amp, freq, phase = uniform(cfg.amp_min, cfg.amp_max), uniform(cfg.freq_min, cfg.freq_max), uniform(0, 2 * math.pi)
    t = torch.arange(cfg.length, dtype=torch.float64)
    # s_t = sum_k a_k sin(2 pi f_k t + phi_k)          (n, K, length) -> (n, length)
    clean = (amp * torch.sin(2 * math.pi * freq * t + phase)).sum(1)
    # x_t = s_t + noise * eps_t
    noisy = clean + cfg.noise * torch.randn(n, cfg.length, generator=g, dtype=torch.float64)
    return noisy.float(), clean.float()
