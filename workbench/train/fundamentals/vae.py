"""Task "vae": train a variational autoencoder (workbench/models/fundamentals/vae.py) on small images.

What it does
    Loads an image set (`workbench.data.images.load_images`: scikit-learn's digits by default, generated
    shapes, or CIFAR-10 batches), trains the VAE through `Context.fit` with the loss -(E_q[log p(x|z)] -
    beta KL) per image (mean over the batch), and then, on the held-out test split, records
        test_elbo        the ELBO (beta = 1), nats per image
        test_log_px      the importance-weighted bound L_K on log p(x), nats per image (K = iw_samples)
        baseline_log_px  log p(x) of the independent-pixel model fitted to the training set
        margin           test_log_px - baseline_log_px: how much better than the baseline the VAE models x
    and, beside them, the rate (KL), the active latent units and bits per dimension; and three pictures:
    decoded samples z ~ N(0, I), reconstructions (each original row above its reconstruction) and
    interpolations (decoded points between the posterior means of two test images, linear or spherical);
    with a 2-d latent also the decoded grid of z over the prior's quantiles.

The baseline
    The strongest model with no interaction between pixels: each pixel d independent,
        Bernoulli: p_d = (sum_n x_nd + 1) / (N + 2)     (the training mean with add-one smoothing, so that a
                   pixel never on in training does not give log 0 on a test image where it is on)
        Gaussian:  N(mean_d, std_d^2) with the training mean and standard deviation (std floored like the
                   decoder's s_d); the VAE's family contains it (a decoder that ignores z)
    Its log-likelihood on the test set is the number the VAE has to beat: everything above it is structure
    (strokes, shapes, correlations) that the latent code captures.

Binarisation (Bernoulli only; a Bernoulli likelihood is normalised only over x in {0, 1})
    "dynamic":   each training batch is sampled afresh, x_b ~ Bernoulli(x) (a regulariser on a small set; the
                 usual choice since Burda et al.), validation and test images once, with a generator seeded
                 from run.seed, so every evaluation scores the same binary images
    "threshold": x > 0.5 everywhere
    "none":      grey values with the Bernoulli cross-entropy. That is not a normalised likelihood, so its
                 "nats" compare only with the baseline's under the same loss, not with published figures.
    The Gaussian likelihood takes the grey values as they are ("none"): a density, so it can be positive.

Design choices
    The decoder's output bias starts at the training images' mean (and a Gaussian's s_d at their spread:
        VAE.init_weights), so step 0 already scores about the baseline and the loss curve shows what the
        latent code adds.
    The test ELBO is the mean of the K log-weights log w_k whose log-mean-exp is the IWAE bound: one set of
        samples gives both (E_q[log w] is the ELBO exactly, with the KL estimated by sampling instead of in
        closed form; training and validation use the closed form).
    Validation (each epoch, beta = 1 ELBO with eps from a fixed seed) is on the validation split; the test
        split is touched once, after training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from workbench.config import fail, field_
from workbench.models.fundamentals.vae import (
    ACTIVE_VARIANCE,
    FLAVORS,
    MIN_LOG_SIGMA,
    VAE,
    active_units,
    gaussian_kl,
    slerp,
)
from workbench.train.fundamentals.runner import Context, Task

EVAL_ROWS = 16384  # images decoded at once when evaluating (batch x samples): bounds evaluation memory


@dataclass
class Config:
    dataset: Literal["digits", "shapes", "cifar10"] = "digits"
    data_dir: str = field_("", doc="cifar10: the folder with the python batches")
    n: int = field_(0, ge=0, doc="0 = every image; else at most n (load_images' n)")
    size: int = field_(0, ge=0, doc="0 = the dataset's size; else the image side (load_images' size)")
    val_fraction: float = field_(0.1, gt=0, lt=1)
    flavor: str = field_("mlp", doc="a key of workbench.models.fundamentals.vae.FLAVORS")
    latent: int = field_(0, ge=0, doc="L, the size of z; 0 = the flavor's")
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    binarize: Literal["dynamic", "threshold", "none"] = "dynamic"
    beta: float = field_(1.0, ge=0, doc="the KL weight of the training loss (beta-VAE); evaluation uses 1")
    iw_samples: int = field_(1000, gt=0, doc="K of the importance-weighted bound on the test set")
    eval_images: int = field_(0, ge=0, doc="0 = the whole test split; else its first n (CIFAR-10 at large K)")
    n_samples: int = field_(64, gt=0, doc="prior samples in samples.png")
    interpolation: Literal["linear", "slerp"] = "slerp"
    interp_pairs: int = field_(6, gt=0, doc="rows of interpolation.png")
    interp_steps: int = field_(8, ge=2, doc="decoded points per row, the two ends included")
    latent_grid: int = field_(12, ge=2, doc="latent = 2 only: latent_grid.png decodes a side x side grid of z")

    def validate(self) -> None:
        from workbench.data.images import image_options_error

        if bad := image_options_error(self.dataset, self.n, self.size):
            fail(*bad)
        if self.flavor not in FLAVORS:
            fail("flavor", f"expected one of {', '.join(FLAVORS)}, got {self.flavor!r}")
        if self.likelihood == "gaussian" and self.binarize != "none":
            fail("binarize", f"must be 'none' with likelihood = 'gaussian' (a density over grey values), "
                             f"got {self.binarize!r}")


def binarize(x: torch.Tensor, how: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The images a Bernoulli decoder is scored on: sampled, thresholded, or left grey ("none")."""
    if how == "dynamic":
        return torch.bernoulli(x, generator=generator)
    if how == "threshold":
        return (x > 0.5).to(x.dtype)
    return x


def baseline_log_px(train_x: torch.Tensor, test_x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """log p(x) per test image (N,) under independent pixels fitted to `train_x` (module doc)."""
    if likelihood == "bernoulli":
        # p_d = (sum_n x_nd + 1) / (N + 2)
        p = (train_x.sum(0) + 1) / (len(train_x) + 2)  # (C, H, W)
        # log p(x) = sum_d x_d log p_d + (1 - x_d) log(1 - p_d)
        return (test_x * p.log() + (1 - test_x) * (1 - p).log()).flatten(1).sum(-1)
    mean, log_std = train_x.mean(0), train_x.std(0, unbiased=False).log().clamp(min=MIN_LOG_SIGMA)
    # log p(x) = -1/2 sum_d ((x_d - mean_d)^2 / std_d^2 + log 2 pi) - sum_d log std_d
    z = (test_x - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).flatten(1).sum(-1)


@torch.no_grad()
def evaluate_bounds(model: VAE, x: torch.Tensor, k: int, seed: int) -> dict[str, torch.Tensor]:
    """Per image (N,): the ELBO (mean of the K log-weights), L_K, the closed-form KL, and mu (N, L)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    batch = max(1, EVAL_ROWS // min(k, EVAL_ROWS))
    out: dict[str, list[torch.Tensor]] = {"elbo": [], "iwae": [], "kl": [], "mu": []}
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        logw = model.log_weights(xb, k, generator=g, chunk=max(1, EVAL_ROWS // len(xb)))  # (K, B)
        mu, logvar = model.encode(xb)
        out["elbo"].append(logw.mean(0))
        # L_K = logsumexp_k log w_k - log K
        out["iwae"].append(torch.logsumexp(logw, 0) - math.log(k))
        out["kl"].append(gaussian_kl(mu, logvar))
        out["mu"].append(mu)
    return {key: torch.cat(v) for key, v in out.items()}


def run(ctx: Context, cfg: Config) -> None:
    from workbench.data.images import load_images
    from workbench.train.fundamentals.plots import image_grid

    seed = ctx.job.run.seed
    data = load_images(cfg.dataset, cfg.data_dir, seed=seed, val_fraction=cfg.val_fraction, n=cfg.n, size=cfg.size)
    train_x, val_x, test_x = data.train[0], data.val[0], data.test[0]  # (N, C, H, W) in [0, 1]
    if cfg.eval_images:
        test_x = test_x[:cfg.eval_images]
    ctx.log(f"vae: {data.source}: {len(train_x)} train / {len(val_x)} val / {len(test_x)} test images "
            f"of {tuple(train_x.shape[1:])}")
    how = cfg.binarize if cfg.likelihood == "bernoulli" else "none"
    # the held-out images, binarised once (dynamic: a fixed draw per split)
    val_b = binarize(val_x, how, torch.Generator().manual_seed(seed + 1))
    test_b = binarize(test_x, how, torch.Generator().manual_seed(seed + 2))
    train_fixed = binarize(train_x, how) if how != "dynamic" else train_x  # dynamic: sampled per batch below

    if train_x.shape[2] != train_x.shape[3]:
        fail("dataset", f"the VAE expects square images, {cfg.dataset!r} has {tuple(train_x.shape[2:])}")
    base = FLAVORS[cfg.flavor]
    mcfg = replace(base, in_channels=train_x.shape[1], image_size=train_x.shape[2], likelihood=cfg.likelihood,
                   latent=cfg.latent or base.latent, channels=list(base.channels))
    stride = 2 ** len(mcfg.channels)
    if mcfg.kind == "conv" and mcfg.image_size % stride:
        fail("flavor", f"{cfg.flavor!r} halves the image {len(mcfg.channels)} times, so the side must be "
                       f"divisible by {stride}; {cfg.dataset!r} images are {mcfg.image_size} wide (set size)")
    model = VAE(mcfg)
    # the output bias starts at E[x] of the images as modelled (dynamic: the grey means are the Bernoulli means)
    model.init_weights(pixel_mean=train_fixed.mean(0), pixel_std=train_fixed.std(0, unbiased=False))

    baseline_val = -baseline_log_px(train_fixed, val_b, cfg.likelihood).mean().item()
    ctx.runlog.baselines["independent pixels, val"] = baseline_val
    ctx.runlog.ylabel = "-ELBO (nats/image)" if cfg.beta == 1 else f"-(rec - {cfg.beta:g} KL) (nats/image)"

    def loss_fn(m: VAE, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict]:
        x = binarize(batch[0], "dynamic") if how == "dynamic" else batch[0]
        t = m.elbo(x)
        # loss = -(E_q[log p(x|z)] - beta KL), mean over the batch
        loss = -(t.rec - cfg.beta * t.kl).mean()
        return loss, {"elbo": t.elbo.mean().item(), "kl": t.kl.mean().item()}

    def evaluate(m: VAE) -> dict[str, float]:
        xv = val_b.to(ctx.device)
        t = m.elbo(xv, generator=torch.Generator(device=ctx.device).manual_seed(seed + 3))
        mu, _ = m.encode(xv)
        return {"loss": -(t.rec - cfg.beta * t.kl).mean().item(), "elbo": t.elbo.mean().item(),
                "kl": t.kl.mean().item(), "active_units": active_units(mu)}

    ctx.fit(model, (train_fixed,), loss_fn, evaluate)

    # -- held-out figures ----------------------------------------------------------------------------
    model.eval()
    xt = test_b.to(ctx.device)
    b = evaluate_bounds(model, xt, cfg.iw_samples, seed + 4)
    base_lp = baseline_log_px(train_fixed.to(ctx.device), xt, cfg.likelihood)
    dims = mcfg.pixels
    n = len(xt)
    kind = "log-likelihood" if cfg.likelihood == "gaussian" or how != "none" else "negative cross-entropy"
    ctx.result("test_elbo", b["elbo"].mean().item(), f"ELBO on {n} test images, nats/image (beta = 1)")
    ctx.result("test_log_px", b["iwae"].mean().item(),
               f"IWAE bound L_K on log p(x), K = {cfg.iw_samples}, nats/image")
    ctx.result("baseline_log_px", base_lp.mean().item(),
               f"independent-pixel model fitted to the training set: test {kind}, nats/image")
    margin = (b["iwae"] - base_lp)
    ctx.result("margin", margin.mean().item(),
               f"test_log_px - baseline_log_px, nats/image (+- {margin.std().item() / math.sqrt(n):.2f} s.e.)")
    if kind == "log-likelihood" and cfg.likelihood == "bernoulli":  # a density's bits would mean nothing here
        ctx.result("test_bits_per_dim", -b["iwae"].mean().item() / (dims * math.log(2)),
                   f"-L_K / (D ln 2), D = {dims} binary values per image")
    ctx.result("test_kl", b["kl"].mean().item(), "the rate KL(q(z|x) || N(0, I)), nats/image")
    ctx.result("active_units", active_units(b["mu"]), f"of {mcfg.latent} latent dimensions (Var_x mu_j > {ACTIVE_VARIANCE})")

    # -- pictures ------------------------------------------------------------------------------------
    g = torch.Generator(device=ctx.device).manual_seed(seed + 5)
    with torch.no_grad():
        samples = model.sample(cfg.n_samples, generator=g)
        image_grid(samples, 8, ctx.figure("samples.png", "decoded prior samples z ~ N(0, I) (pixel means)"),
                   title=f"samples, {cfg.dataset}, L = {mcfg.latent}")
        k = min(16, n)
        originals = xt[:2 * k] if n >= 2 * k else xt[:k]
        recon = model.mean_image(model(originals).out)  # eval mode: z = mu
        rows = []
        for i in range(0, len(originals), k):  # (2k, C, H, W): a row of originals above its reconstructions
            rows += [originals[i:i + k], recon[i:i + k]]
        labels = ["original", "reconstruction"] * (len(rows) // 2)
        image_grid(torch.cat(rows), k, ctx.figure("reconstructions.png", "test images (odd rows) and their "
                   "reconstructions from the posterior mean (even rows)"), title="reconstructions", row_labels=labels)
        pairs = min(cfg.interp_pairs, n // 2)
        mu = b["mu"]
        t = torch.linspace(0, 1, cfg.interp_steps, device=ctx.device)
        grid = []
        for i in range(pairs):
            a, c = mu[2 * i], mu[2 * i + 1]
            # linear: z_t = (1 - t) a + t c;  slerp: along the great circle (VAE notes)
            z = slerp(a, c, t) if cfg.interpolation == "slerp" else (1 - t[:, None]) * a + t[:, None] * c
            grid += [xt[2 * i:2 * i + 1], model.mean_image(model.decode(z)), xt[2 * i + 1:2 * i + 2]]
        image_grid(torch.cat(grid), cfg.interp_steps + 2,
                   ctx.figure("interpolation.png", f"{cfg.interpolation} interpolation between the posterior means "
                              "of two test images (outer columns: the two images)"),
                   title=f"{cfg.interpolation} interpolation in z")
        if mcfg.latent == 2:  # the whole 2-d code at a glance: z on a grid of equal prior mass
            q = torch.linspace(0.5 / cfg.latent_grid, 1 - 0.5 / cfg.latent_grid, cfg.latent_grid, device=ctx.device)
            # z = Phi^-1(q): the normal quantiles, so each cell holds the same prior probability
            axis = math.sqrt(2) * torch.erfinv(2 * q - 1)
            z = torch.stack(torch.meshgrid(axis.flip(0), axis, indexing="ij")[::-1], -1).flatten(0, 1)  # (side^2, 2)
            image_grid(model.mean_image(model.decode(z)), cfg.latent_grid,
                       ctx.figure("latent_grid.png", "decoded z over a grid of prior quantiles (z1 left to right, "
                                  "z2 bottom to top)"), title="the 2-d latent space")


TASKS = {"vae": Task(config=Config, run=run)}
