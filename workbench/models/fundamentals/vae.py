"""The variational autoencoder (VAE): a latent-variable image model trained by maximising the ELBO.

What it is
    A generative model p(x, z) = p(z) p(x|z) with a standard-normal prior p(z) = N(0, I) over a small latent
    z (L numbers) and a neural decoder p(x|z) over the D = C*H*W pixels of an image, trained together with
    an encoder q(z|x) = N(mu(x), diag sigma^2(x)) that guesses which z could have produced x. The encoder
    is "amortised inference": one network replaces a per-image optimisation of the posterior.

The math (one image x; z in R^L)
    ELBO. log p(x) = log E_q[p(x|z) p(z) / q(z|x)]  >=  E_q[log p(x|z) + log p(z) - log q(z|x)]   (Jensen:
        log is concave, so log of a mean >= mean of the log), and the right-hand side rearranges to
        ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))            (reconstruction  -  rate)
    The gap is exact: log p(x) - ELBO(x) = KL(q(z|x) || p(z|x)) >= 0, so raising the ELBO either raises
        log p(x) or makes the encoder's guess closer to the true posterior.
    Closed-form KL between diagonal Gaussians and the prior (per latent j, summed):
        KL(N(mu, sigma^2) || N(0, 1)) = 1/2 (mu^2 + sigma^2 - log sigma^2 - 1)
    Reparameterisation: z = mu + sigma * eps, eps ~ N(0, I), so that
        grad_phi E_q[f(z)] = E_eps[grad_phi f(mu_phi + sigma_phi * eps)]
    Decoder likelihoods (summed over the D pixels, in nats):
        Bernoulli:  log p(x|z) = sum_d x_d l_d - softplus(l_d)          (l = decoder logits; x in {0, 1})
        Gaussian:   log p(x|z) = -1/2 sum_d ((x_d - m_d)^2 / s_d^2 + log(2 pi s_d^2))   (m = decoder output)
    beta-VAE objective: E_q[log p(x|z)] - beta * KL; with beta = 1 it is the ELBO.
    Importance-weighted bound (IWAE), K samples z_k ~ q(z|x), w_k = p(x|z_k) p(z_k) / q(z_k|x):
        L_K(x) = E[log (1/K) sum_k w_k],   ELBO = L_1 <= L_K <= L_{K+1} <= log p(x),  L_K -> log p(x)
    Nats per image are -log p(x) (or its bound) summed over the image's pixels; bits/dim = nats / (D ln 2).

The intuition
    Why the reparameterisation has low variance. The score-function (REINFORCE) estimator
        f(z) grad log q(z) only sees the *value* of f at a sample and needs many samples to learn which
        direction helps; the path-wise estimator differentiates f itself, so each sample already says how f
        changes when mu or sigma move. tests/unit/test_vae.py measures both on f(z) = z^2.
    Posterior collapse. The rate term pulls every q(z|x) towards the prior. A latent dimension whose
        q(z_j|x) equals N(0, 1) for every x costs nothing and carries no information: the decoder ignores
        it. That is fine for spare dimensions, but with a decoder strong enough to model x alone (an
        autoregressive one) the whole code can collapse and the model becomes a plain density model.
        `active_units` counts the dimensions still used (Burda et al.: Cov_x(E_q[z_j]) > ACTIVE_VARIANCE).
    What beta does. beta > 1 prices information in z higher: fewer active units, blurrier reconstructions,
        and (Higgins et al.) more factorised codes; beta < 1 makes the model an autoencoder with a weak
        prior. For beta != 1 the objective is not a bound on log p(x), so held-out figures always use the
        beta = 1 ELBO and the IWAE bound. docs/vae.md measures a beta sweep on the digits, from a full code
        to total collapse (every q(z|x) the prior, the model exactly the independent-pixel baseline).

The design choices
    Two named flavors of one `VAE`: an MLP (flatten, `layers` hidden ReLU layers of width `hidden`) and a
        small conv net (stride-2 4x4 convolutions, each halving the image, then a linear head; the decoder
        mirrors it with transposed convolutions). Both output mu and log sigma^2 (unconstrained, so sigma > 0
        without a clamp in the encoder).
    Evaluation is deterministic: in eval mode `forward` returns z = mu (reconstructions and interpolation
        use the posterior mean), while the ELBO and the IWAE bound draw their own eps from a caller's
        generator, so a held-out figure is the same on every call with the same seed.
    log q(z|x) in the IWAE weights is computed from eps directly ((z - mu) / sigma = eps), not from z.
    `init_weights`: He-normal hidden layers, zero biases; the encoder head starts scaled down, so q(z|x)
        starts close to the prior (KL near 0 at step 0), and the decoder's output layer starts with zero
        weights, so the decoder starts as its output bias. That bias can be set to the logit of the training
        pixel mean (and a Gaussian's s_d to the pixels' spread), so that step 0 scores the independent-pixel
        baseline and training spends its steps on structure, not on the average image. The zero weights get
        a gradient at once (their inputs are not zero), the layers below from the second step on, so the zero
        start holds training back only in its first steps, while a Gaussian decoder with a small s_d and no
        such start begins far below the baseline.
    The Gaussian decoder learns one log s_d per pixel, not a function of z, with a floor (`MIN_LOG_SIGMA`):
        a density on pixel values that are in fact discrete grows without bound as s -> 0 on pixels that
        never change. Per pixel, so that the model family contains the independent-pixel Gaussian (a constant
        decoder with the training mean and spread): beating that baseline then measures only what z adds.
        `init_weights` can start s_d at the training images' spread.

What differs from the paper
    Kingma & Welling used tanh MLPs with one hidden layer and a per-pixel Gaussian or Bernoulli decoder; here
    the hidden layers are ReLU and the Gaussian's s_d is a learned constant per pixel rather than a decoder
    output (a sigma(z) can shrink towards zero on the training images and overfit the density). The IWAE
    here is used only to *evaluate* (Burda et al. also train with it).

Sources
    Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv 1312.6114 (ELBO, reparameterisation, the
    closed-form KL in appendix B); Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", arXiv
    1509.00519 (L_K, active units); Higgins et al., "beta-VAE", ICLR 2017; Bowman et al., "Generating
    Sentences from a Continuous Space", arXiv 1511.06349 (posterior collapse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import fail, field_

LOG_2PI = math.log(2 * math.pi)
MIN_LOG_SIGMA = math.log(1e-2)  # the Gaussian decoder's floor on log s


@dataclass
class Config:
    kind: Literal["mlp", "conv"] = "mlp"
    latent: int = field_(8, gt=0, doc="L, the size of z")
    hidden: int = field_(256, gt=0, doc="mlp: the width of each hidden layer")
    layers: int = field_(2, gt=0, doc="mlp: hidden layers in the encoder (the decoder mirrors them)")
    channels: list[int] = field_([32, 64], doc="conv: channels after each stride-2 stage")
    in_channels: int = field_(1, gt=0, doc="C of the images (set by the task from the data)")
    image_size: int = field_(8, gt=0, doc="H = W of the images (set by the task from the data)")
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"

    def validate(self) -> None:
        if self.kind == "conv":
            if not self.channels or any(c <= 0 for c in self.channels):
                fail("channels", f"must be a non-empty list of positive integers, got {self.channels}")
            stride = 2 ** len(self.channels)
            if self.image_size % stride:
                fail("image_size", f"must be divisible by 2^len(channels) = {stride} for the conv flavor, "
                                   f"got {self.image_size}")

    @property
    def pixels(self) -> int:
        return self.in_channels * self.image_size * self.image_size


FLAVORS: dict[str, Config] = {
    "debug": Config(kind="mlp", latent=2, hidden=32, layers=1),
    "mlp": Config(kind="mlp", latent=8, hidden=256, layers=2),
    "conv": Config(kind="conv", latent=8, channels=[32, 64]),
}


class Output(NamedTuple):
    mu: torch.Tensor  # (B, L)
    logvar: torch.Tensor  # (B, L)
    z: torch.Tensor  # (B, L)
    out: torch.Tensor  # (B, C, H, W): Bernoulli logits or Gaussian means


class ELBO(NamedTuple):
    rec: torch.Tensor  # (B,) log p(x|z), one sample
    kl: torch.Tensor  # (B,) KL(q(z|x) || N(0, I)), closed form
    elbo: torch.Tensor  # (B,) rec - kl


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row, in nats: (..., L) -> (...)."""
    # KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(-1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps, differentiable in mu and logvar; eps broadcasts over leading sample axes."""
    # z = mu + sigma * eps,  sigma = exp(logvar / 2)
    return mu + torch.exp(0.5 * logvar) * eps


def standard_normal_logpdf(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last axis."""
    # log N(z; 0, I) = -1/2 sum_j (z_j^2 + log 2 pi)
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def bernoulli_loglik(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | logits) summed over every axis after the first: (B, ...) -> (B,)."""
    # log p(x|z) = sum_d x_d l_d - softplus(l_d)
    return (x * logits - F.softplus(logits)).flatten(1).sum(-1)


def gaussian_loglik(mean: torch.Tensor, log_sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, s^2) with log s (C, H, W) per pixel, floored at MIN_LOG_SIGMA, summed per image:
    (B, C, H, W) -> (B,)."""
    ls = log_sigma.clamp(min=MIN_LOG_SIGMA)  # (C, H, W), broadcast over B
    # log p(x|z) = -1/2 sum_d ((x_d - m_d)^2 / s_d^2 + log 2 pi + 2 log s_d)
    return (-0.5 * ((x - mean) * torch.exp(-ls)).pow(2) - ls - 0.5 * LOG_2PI).flatten(1).sum(-1)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows a, b (L,) at times t (T,) -> (T, L); linear where a || b."""
    cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum().clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    t = t[:, None]  # (T, 1)
    if omega.abs() < 1e-4:
        return (1 - t) * a + t * b
    # slerp(a, b; t) = sin((1 - t) w) / sin w * a + sin(t w) / sin w * b,   cos w = <a, b> / |a||b|
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


class VAE(nn.Module):
    """q(z|x) = N(mu, diag sigma^2) by `encode`, p(x|z) by `decode`; `elbo`, `iwae`, `sample` on top."""

    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, S, L = cfg.in_channels, cfg.image_size, cfg.latent
        if cfg.kind == "mlp":
            enc, width = [], cfg.pixels
            for _ in range(cfg.layers):
                enc += [nn.Linear(width, cfg.hidden), nn.ReLU()]
                width = cfg.hidden
            self.encoder = nn.Sequential(nn.Flatten(), *enc)
            self.enc_head = nn.Linear(width, 2 * L)
            dec, width = [], L
            for _ in range(cfg.layers):
                dec += [nn.Linear(width, cfg.hidden), nn.ReLU()]
                width = cfg.hidden
            # (B, D) -> (B, C, H, W)
            self.decoder = nn.Sequential(*dec, nn.Linear(width, cfg.pixels), nn.Unflatten(1, (C, S, S)))
        else:
            chans = [C, *cfg.channels]
            enc = []
            for cin, cout in zip(chans[:-1], chans[1:]):
                enc += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
            s = S // 2 ** len(cfg.channels)
            # (B, C_last, s, s) -> (B, C_last * s * s)
            self.encoder = nn.Sequential(*enc, nn.Flatten())
            self.enc_head = nn.Linear(chans[-1] * s * s, 2 * L)
            dec: list[nn.Module] = [nn.Linear(L, chans[-1] * s * s), nn.ReLU(), nn.Unflatten(1, (chans[-1], s, s))]
            rev = chans[::-1]
            for i, (cin, cout) in enumerate(zip(rev[:-1], rev[1:])):
                dec.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
                if i < len(rev) - 2:
                    dec.append(nn.ReLU())
            self.decoder = nn.Sequential(*dec)  # (B, C, H, W)
        # NEW (vs the paper): a learned log s per pixel, not a function of z; Gaussian decoder only
        self.log_sigma = nn.Parameter(torch.empty(C, S, S)) if cfg.likelihood == "gaussian" else None

    def init_weights(self, pixel_mean: torch.Tensor | None = None, pixel_std: torch.Tensor | None = None) -> None:
        """He-normal hidden weights, zero biases, a small encoder head (q starts near the prior), a zero
        output layer (the decoder starts as its bias); given the training images' mean (C, H, W), the output bias fits that
        mean image; given their standard deviation (C, H, W), the Gaussian's log s starts there."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                # std = sqrt(2 / fan_in)
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / _fan_in(m)))
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.enc_head.weight.mul_(0.1)
            self._output_layer().weight.zero_()  # the decoder starts as its bias (it learns from step 1 on)
            if self.log_sigma is not None:
                if pixel_std is None:
                    self.log_sigma.fill_(math.log(0.1))
                else:
                    self.log_sigma.copy_(pixel_std.to(self.log_sigma).log().clamp(min=MIN_LOG_SIGMA))
            if pixel_mean is not None:
                self.set_output_bias(pixel_mean)

    @torch.no_grad()
    def set_output_bias(self, pixel_mean: torch.Tensor) -> None:
        """Make the decoder's output bias the per-pixel fit to `pixel_mean` (C, H, W): its logit for a
        Bernoulli decoder, itself for a Gaussian one (the conv decoder's bias is per channel: the mean)."""
        last = self._output_layer()
        p = pixel_mean.to(last.bias)
        target = torch.logit(p.clamp(1e-3, 1 - 1e-3)) if self.cfg.likelihood == "bernoulli" else p
        if self.cfg.kind == "mlp":
            last.bias.copy_(target.flatten())  # (C, H, W) -> (D,)
        else:
            last.bias.copy_(target.flatten(1).mean(1))  # (C, H, W) -> (C,)

    def _output_layer(self) -> nn.Module:
        """The decoder's last Linear (mlp; an Unflatten follows it) or ConvTranspose2d (conv)."""
        return self.decoder[-2] if self.cfg.kind == "mlp" else self.decoder[-1]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> mu (B, L), logvar (B, L)."""
        h = self.enc_head(self.encoder(x))  # (B, 2L)
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, L) -> Bernoulli logits or Gaussian means (N, C, H, W)."""
        return self.decoder(z)

    def mean_image(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's expected image in [0, 1]: sigmoid of the logits, or the clamped Gaussian mean."""
        return torch.sigmoid(out) if self.cfg.likelihood == "bernoulli" else out.clamp(0, 1)

    def loglik(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per image (B,), in nats, from the decoder output `out` (B, C, H, W)."""
        if self.cfg.likelihood == "bernoulli":
            return bernoulli_loglik(out, x)
        return gaussian_loglik(out, self.log_sigma, x)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> Output:
        """Encode, pick z, decode. z = mu + sigma * eps in training (eps drawn here if not given); in eval
        mode z = mu unless eps is passed, so reconstructions are deterministic."""
        mu, logvar = self.encode(x)
        if eps is None and self.training:
            eps = torch.randn_like(mu)
        z = mu if eps is None else reparameterize(mu, logvar, eps)
        return Output(mu, logvar, z, self.decode(z))

    def elbo(self, x: torch.Tensor, generator: torch.Generator | None = None) -> ELBO:
        """One-sample ELBO per image with the closed-form KL (any mode: z is always sampled here)."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        out = self.decode(reparameterize(mu, logvar, eps))
        rec, kl = self.loglik(out, x), gaussian_kl(mu, logvar)
        # ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z))
        return ELBO(rec, kl, rec - kl)

    def log_weights(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None,
                    chunk: int = 64) -> torch.Tensor:
        """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) for K samples per image: (K, B)."""
        mu, logvar = self.encode(x)  # (B, L)
        logw = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)  # (n, B, L)
            z = reparameterize(mu, logvar, eps)  # (n, B, L)
            out = self.decode(z.flatten(0, 1))  # (n*B, C, H, W)
            rec = self.loglik(out, x.repeat(n, 1, 1, 1)).view(n, -1)  # (n*B,) -> (n, B)
            # log q(z|x) = -1/2 sum_j (eps_j^2 + log 2 pi + logvar_j),  since (z - mu) / sigma = eps
            log_q = -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(-1)  # (n, B)
            logw.append(rec + standard_normal_logpdf(z) - log_q)
        return torch.cat(logw)  # (K, B)

    def iwae(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None, chunk: int = 64) -> torch.Tensor:
        """The importance-weighted lower bound L_K on log p(x) per image (B,), in nats."""
        logw = self.log_weights(x, k, generator, chunk)
        # L_K = log (1/K) sum_k w_k, computed as logsumexp - log K
        return torch.logsumexp(logw, 0) - math.log(k)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode n draws z ~ N(0, I) into expected images (n, C, H, W) in [0, 1]."""
        p = next(self.parameters())
        z = torch.randn((n, self.cfg.latent), generator=generator, device=p.device, dtype=p.dtype)
        return self.mean_image(self.decode(z))


def _fan_in(m: nn.Module) -> int:
    """Inputs that reach one output: in_features; C_in k^2 for a conv; C_in k^2 / stride^2 for a
    transposed conv (only every stride-th tap lands on a given output pixel)."""
    if isinstance(m, nn.ConvTranspose2d):
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1] // (m.stride[0] * m.stride[1])
    return m.weight[0].numel()  # Linear (out, in) -> in;  Conv2d (out, in, k, k) -> in * k * k


ACTIVE_VARIANCE = 1e-2  # a latent dimension is active when Var_x(mu_j(x)) exceeds this (Burda et al.)


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_VARIANCE) -> int:
    """Latent dimensions in use: those whose posterior mean varies across images (mu (N, L)), by Burda
    et al.'s Cov_x(E_q[z_j]) > threshold; collapsed dimensions have mu_j = 0 for every x."""
    # A_u = #{j : Var_x(mu_j(x)) > threshold}
    return int((mu.var(0, unbiased=False) > threshold).sum())
