"""Optimizers for the NumPy autograd engine: SGD with momentum (optionally Nesterov) and AdamW, plus
gradient-norm clipping.

What it is
    Update rules that read each parameter's `.grad` and change its `.data` in place, with PyTorch's exact
    conventions, so the same parameters and gradients give the same trajectory as torch.optim (the unit
    tests compare several steps).

The math (parameter p, gradient g, step t = 1, 2, ..., learning rate lr, weight decay wd)
    SGD (torch.optim.SGD, dampening 0):
        g <- g + wd p                                   (L2 penalty folded into the gradient)
        b <- g                       at t = 1
        b <- mu b + g                at t > 1           (momentum buffer: a running sum, not an average)
        d  = g + mu b  (Nesterov)  or  d = b            (look-ahead vs heavy ball)
        p <- p - lr d
    AdamW (Loshchilov & Hutter; torch.optim.AdamW):
        p <- p (1 - lr wd)                              (decoupled decay: not mixed into the moments)
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    Clipping: n = sqrt(sum over all parameters of ||g||^2); if n > c, every g <- g c / (n + 1e-6).

The intuition and the design choices
    PyTorch's momentum form (b = mu b + g, then p -= lr b) differs from the textbook v = mu v - lr g only
    when lr changes between steps (a schedule): the buffer holds gradients, not steps, so a new lr applies
    to the whole buffer at once. Adam divides by a running RMS of the gradient, giving every parameter a
    step of about lr whatever its gradient scale; the bias corrections undo the zero initialization of
    m and v in the first steps. AdamW's decay shrinks weights at a rate independent of that RMS, which
    plain Adam + L2 does not.
    `lr` is a plain attribute, so a schedule sets `opt.lr` before each step. State (buffers, moments, the
    step count) is exported as arrays by `state_dict()` for checkpoints.

What differs from PyTorch
    One parameter group; SGD has no dampening; AdamW has no amsgrad; parameters whose grad is None are
    skipped (as in PyTorch).

Sources
    Sutskever et al., "On the importance of initialization and momentum in deep learning", ICML 2013
    (Nesterov momentum); Kingma & Ba, "Adam", arXiv 1412.6980; Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", arXiv 1711.05101; torch.optim.SGD and AdamW documentation (the update pseudocode).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from workbench.models.fundamentals.autograd.nn import Parameter

__all__ = ["Optimizer", "SGD", "AdamW", "clip_grad_norm"]


class Optimizer:
    def __init__(self, params: Iterable[Parameter], lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.lr = lr
        self.t = 0  # steps taken

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        raise NotImplementedError

    def _slots(self) -> dict[str, list[np.ndarray | None]]:
        """Per-parameter state arrays, by name."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"t": np.asarray(self.t)}
        for name, arrays in self._slots().items():
            for i, a in enumerate(arrays):
                if a is not None:
                    state[f"{name}.{i}"] = a.copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(np.asarray(state["t"]).item())
        for name, arrays in self._slots().items():
            for i, p in enumerate(self.params):
                key = f"{name}.{i}"
                if key in state:
                    if state[key].shape != p.shape:
                        raise ValueError(f"optimizer state '{key}' has shape {state[key].shape}, parameter "
                                         f"{i} has shape {p.shape}")
                    arrays[i] = np.array(state[key], dtype=p.dtype)
                else:
                    arrays[i] = None


class SGD(Optimizer):
    def __init__(self, params: Iterable[Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(params, lr)
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.buffers: list[np.ndarray | None] = [None] * len(self.params)

    def _slots(self) -> dict[str, list[np.ndarray | None]]:
        return {"momentum_buffer": self.buffers}

    def step(self) -> None:
        self.t += 1
        mu = self.momentum
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay:
                # g <- g + wd p
                g = g + self.weight_decay * p.data
            if mu:
                if self.buffers[i] is None:
                    # b <- g at the first step
                    self.buffers[i] = np.array(g, copy=True)
                else:
                    # b <- mu b + g
                    self.buffers[i] = mu * self.buffers[i] + g
                # d = g + mu b (Nesterov) or d = b
                g = g + mu * self.buffers[i] if self.nesterov else self.buffers[i]
            # p <- p - lr d
            p.data -= self.lr * g


class AdamW(Optimizer):
    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW betas must lie in [0, 1), got {betas}")
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.m: list[np.ndarray | None] = [None] * len(self.params)
        self.v: list[np.ndarray | None] = [None] * len(self.params)

    def _slots(self) -> dict[str, list[np.ndarray | None]]:
        return {"exp_avg": self.m, "exp_avg_sq": self.v}

    def step(self) -> None:
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.m[i] is None:
                self.m[i], self.v[i] = np.zeros_like(p.data), np.zeros_like(p.data)
            # p <- p (1 - lr wd): decoupled weight decay
            p.data *= 1 - self.lr * self.weight_decay
            # m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            # p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
            denom = np.sqrt(self.v[i]) / np.sqrt(1 - b2 ** t) + self.eps
            p.data -= (self.lr / (1 - b1 ** t)) * self.m[i] / denom


def clip_grad_norm(params: Iterable[Parameter], max_norm: float) -> float:
    """Scale all gradients so that their global L2 norm is at most `max_norm` (0 = only measure it).

    Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    # n = sqrt(sum ||g||^2) over every parameter
    total = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads)))
    if max_norm > 0 and total > max_norm:
        # g <- g c / (n + 1e-6), PyTorch's clip_grad_norm_
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g *= scale
    return total
