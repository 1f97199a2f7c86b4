"""The VAE (workbench/models/fundamentals/vae.py) and its task's pieces (workbench/train/fundamentals/vae.py):
the closed-form KL, the ELBO <= IWAE <= log p(x) ordering against a log p(x) computed by quadrature, the
reparameterised gradient, shapes, deterministic evaluation, the baseline and the config errors."""

import math
from dataclasses import replace

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from workbench.config import from_dict
from workbench.errors import ConfigError
from workbench.models.fundamentals.vae import (
    FLAVORS,
    MIN_LOG_SIGMA,
    VAE,
    Config,
    active_units,
    bernoulli_loglik,
    gaussian_kl,
    gaussian_loglik,
    reparameterize,
    slerp,
    standard_normal_logpdf,
)
from workbench.train.fundamentals import vae as task


def _model(flavor="debug", seed=0, **kw) -> VAE:
    torch.manual_seed(seed)
    m = VAE(replace(FLAVORS[flavor], channels=list(FLAVORS[flavor].channels), **kw))
    m.init_weights()
    return m


def _binary(n, c=1, s=8, seed=1) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, c, s, s), 0.3), generator=torch.Generator().manual_seed(seed))


def _spread_posterior(m: VAE, seed=2) -> None:
    """Give the encoder a head that puts q(z|x) well away from the prior (KL of several nats), so that
    checks involving the KL cannot pass by the KL being about zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.enc_head.weight.normal_(0, 0.3, generator=g)
        m.enc_head.bias.normal_(0, 1.0, generator=g)


def test_closed_form_kl_matches_torch_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    kl = gaussian_kl(mu, logvar)
    std = torch.exp(0.5 * logvar)
    ref = kl_divergence(Normal(mu, std), Normal(torch.zeros_like(mu), torch.ones_like(std))).sum(-1)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    # Monte Carlo: KL = E_q[log q(z) - log p(z)]
    eps = torch.randn(50_000, 4, 3, generator=g)
    z = reparameterize(mu, logvar, eps)
    log_q = Normal(mu, std).log_prob(z).sum(-1)
    diff = log_q - standard_normal_logpdf(z)  # (S, 4)
    se = diff.std(0) / math.sqrt(len(diff))
    assert ((diff.mean(0) - kl).abs() < 5 * se).all(), (diff.mean(0), kl, se)
    assert (kl > 0.5).all()  # a real check: the posteriors are far from the prior
    # zero exactly at the prior
    assert gaussian_kl(torch.zeros(2, 5), torch.zeros(2, 5)).abs().max() == 0


def test_likelihoods_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    logits, x = torch.randn(3, 1, 4, 4, generator=g) * 3, _binary(3, s=4)
    ref = Bernoulli(logits=logits).log_prob(x).flatten(1).sum(-1)
    torch.testing.assert_close(bernoulli_loglik(logits, x), ref)
    mean, xs = torch.rand(3, 2, 4, 4, generator=g), torch.rand(3, 2, 4, 4, generator=g)
    log_sigma = torch.rand(2, 4, 4, generator=g) - 2.0  # per pixel, above the floor
    ref = Normal(mean, log_sigma.exp()).log_prob(xs).flatten(1).sum(-1)
    torch.testing.assert_close(gaussian_loglik(mean, log_sigma, xs), ref)
    floored = gaussian_loglik(mean, torch.full((2, 4, 4), -50.0), mean)  # x = mean: only the -log s terms
    torch.testing.assert_close(floored, torch.full((3,), 32 * (-MIN_LOG_SIGMA - 0.5 * math.log(2 * math.pi))))


def _exact_log_px(m: VAE, x: torch.Tensor, half_width=7.0, n=401) -> torch.Tensor:
    """log p(x) = log integral p(x|z) N(z; 0, I) dz for a 2-d latent, by a Riemann sum
    on an n x n grid (the prior's mass outside +-7 is below 1e-11)."""
    t = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    dz = (t[1] - t[0]).item()
    z = torch.cartesian_prod(t, t)  # (n^2, 2)
    with torch.no_grad():
        logits = m.decode(z)  # (n^2, 1, 8, 8)
        # log p(x) ~ logsumexp_grid (log p(x|z) + log N(z; 0, I)) + log dz^2
        lp = [bernoulli_loglik(logits, xi.expand_as(logits)) + standard_normal_logpdf(z) for xi in x]
        return torch.stack([torch.logsumexp(v, 0) for v in lp]) + 2 * math.log(dz)


def test_elbo_below_iwae_below_exact_log_likelihood():
    m = _model("debug", latent=2).double().eval()
    _spread_posterior(m)
    x = _binary(4).double()
    exact = _exact_log_px(m, x)
    g = torch.Generator().manual_seed(3)
    reps = 200
    xr = x.repeat(reps, 1, 1, 1)  # (reps * 4, 1, 8, 8): each image scored reps times
    with torch.no_grad():
        elbo = m.elbo(xr, generator=g).elbo.view(reps, 4).mean(0)  # (4,)
        bounds = {k: m.iwae(xr, k, generator=g, chunk=k).view(reps, 4).mean(0) for k in (10, 100)}
    # the bound tightens with K and stays below log p(x); the gap at K = 1 is KL(q || posterior) > 0
    assert (elbo < bounds[10]).all() and (bounds[10] < bounds[100]).all(), (elbo, bounds)
    assert (bounds[100] <= exact + 1e-3).all(), (bounds[100], exact)
    assert (exact - elbo > 0.05).all()  # q is not the posterior: a real gap for the bounds to close
    assert ((exact - bounds[100]) < 0.5 * (exact - elbo)).all()  # K = 100 closes most of it


def test_iwae_with_one_sample_equals_the_elbo_in_expectation():
    m = _model("debug", latent=4).eval()
    _spread_posterior(m)
    x = _binary(6)
    with torch.no_grad():
        logw = m.log_weights(x, 4000, generator=torch.Generator().manual_seed(0), chunk=4000)  # (K, B): draws of L_1
        elbos = m.elbo(x.repeat(4000, 1, 1, 1), generator=torch.Generator().manual_seed(1)).elbo.view(4000, 6)
        kl = gaussian_kl(*m.encode(x))
    assert logw.shape == (4000, 6)
    assert (kl > 1.0).all()  # a wrong KL (a factor, a sign) would show
    se = torch.sqrt(logw.var(0) / len(logw) + elbos.var(0) / len(elbos))
    assert ((logw.mean(0) - elbos.mean(0)).abs() < 5 * se).all(), (logw.mean(0), elbos.mean(0), se)


def test_reparameterised_gradient_matches_the_analytic_one_and_beats_the_score_function():
    # f(z) = z^2, z ~ N(mu, sigma^2): E f = mu^2 + sigma^2, d/dmu = 2 mu, d/dlogvar = sigma^2
    mu = torch.tensor(0.7, requires_grad=True)
    logvar = torch.tensor(math.log(0.25), requires_grad=True)
    eps = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    z = reparameterize(mu, logvar, eps)
    z.pow(2).mean().backward()
    assert abs(mu.grad.item() - 1.4) < 0.02
    assert abs(logvar.grad.item() - 0.25) < 0.01
    # per-sample estimators of d/dmu: path-wise 2 z, score function f(z) (z - mu) / sigma^2
    with torch.no_grad():
        zs = 0.7 + 0.5 * eps
        path, score = 2 * zs, zs.pow(2) * (zs - 0.7) / 0.25
    assert abs(score.mean().item() - 1.4) < 0.1  # both unbiased ...
    assert score.var() > 3 * path.var()  # ... but the path-wise one has far lower variance


@pytest.mark.parametrize("flavor,c,s,lik", [("debug", 1, 8, "bernoulli"), ("mlp", 1, 8, "gaussian"),
                                            ("conv", 1, 8, "bernoulli"), ("conv", 3, 16, "gaussian")])
def test_shapes(flavor, c, s, lik):
    m = _model(flavor, in_channels=c, image_size=s, likelihood=lik)
    L = m.cfg.latent
    x = torch.rand(5, c, s, s)
    o = m(x)
    assert o.mu.shape == o.logvar.shape == o.z.shape == (5, L)
    assert o.out.shape == (5, c, s, s)
    t = m.elbo(x)
    assert t.rec.shape == t.kl.shape == t.elbo.shape == (5,)
    assert m.log_weights(x, 7, chunk=3).shape == (7, 5)
    assert m.iwae(x, 7).shape == (5,)
    samples = m.sample(4)
    assert samples.shape == (4, c, s, s) and samples.min() >= 0 and samples.max() <= 1
    assert (m.log_sigma is not None) == (lik == "gaussian")


def test_eval_is_deterministic_and_uses_the_posterior_mean():
    m = _model("mlp")
    x = _binary(3)
    m.train()
    o = m(x)
    assert not torch.equal(o.z, o.mu)  # training samples z
    m.eval()
    a, b = m(x), m(x)
    torch.testing.assert_close(a.z, a.mu, rtol=0, atol=0)
    torch.testing.assert_close(a.out, b.out, rtol=0, atol=0)
    e1 = m.elbo(x, generator=torch.Generator().manual_seed(5)).elbo
    e2 = m.elbo(x, generator=torch.Generator().manual_seed(5)).elbo
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)


@pytest.mark.parametrize("lik", ["bernoulli", "gaussian"])
def test_init_starts_at_the_independent_pixel_baseline(lik):
    g = torch.Generator().manual_seed(1)
    if lik == "bernoulli":
        train, test = _binary(200, seed=1), _binary(50, seed=2)
    else:  # grey images whose pixels have different means and spreads
        scale = torch.rand(1, 8, 8, generator=g)
        train, test = (0.5 + scale * (torch.rand(n, 1, 8, 8, generator=g) - 0.5) for n in (200, 50))
    torch.manual_seed(0)
    m = VAE(replace(FLAVORS["mlp"], likelihood=lik))
    m.init_weights(pixel_mean=train.mean(0), pixel_std=train.std(0, unbiased=False))
    with torch.no_grad():
        elbo = m.elbo(test, generator=torch.Generator().manual_seed(0)).elbo.mean()
    base = task.baseline_log_px(train, test, lik).mean()
    # the decoder starts as its bias, q near the prior: step 0 scores within a nat of the baseline
    assert base.abs() > 10
    assert abs(elbo - base) < 1.0, (elbo, base)


def test_baseline_is_smoothed_independent_pixels():
    train = torch.zeros(8, 1, 2, 2)
    train[:6, 0, 0, 0] = 1  # pixel (0, 0) on in 6 of 8 images; the others never on
    test = torch.zeros(1, 1, 2, 2)
    test[0, 0, 1, 1] = 1  # a pixel never on in training: finite thanks to add-one smoothing
    p00, p_other = 7 / 10, 1 / 10
    expect = math.log(1 - p00) + 2 * math.log(1 - p_other) + math.log(p_other)
    assert task.baseline_log_px(train, test, "bernoulli").item() == pytest.approx(expect, rel=1e-6)
    g = task.baseline_log_px(torch.rand(50, 1, 2, 2), torch.rand(3, 1, 2, 2), "gaussian")
    assert g.shape == (3,) and torch.isfinite(g).all()


def test_binarize():
    x = torch.tensor([0.0, 0.2, 0.6, 1.0])
    assert task.binarize(x, "threshold").tolist() == [0, 0, 1, 1]
    assert torch.equal(task.binarize(x, "none"), x)
    d = task.binarize(x.expand(20_000, 4), "dynamic", torch.Generator().manual_seed(0))
    assert set(d.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(d.mean(0), x, atol=0.02, rtol=0)


def test_slerp_and_active_units():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    path = slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=-1), torch.full((5,), 2.0))  # stays on the circle (lerp: 1.41)
    torch.testing.assert_close(slerp(a, 2 * a, torch.tensor([0.5]))[0], 1.5 * a)  # parallel: linear
    mu = torch.zeros(100, 5)
    mu[:, 1] = torch.linspace(-1, 1, 100)
    mu[:, 3] = torch.linspace(0, 0.5, 100)  # variance about 0.02
    mu[:, 4] = torch.linspace(0, 0.1, 100)  # variance about 0.001: collapsed
    assert active_units(mu) == 2


def test_meta_device_build_then_init():
    with torch.device("meta"):
        m = VAE(replace(FLAVORS["conv"], channels=[8, 16], likelihood="gaussian"))
    assert next(m.parameters()).is_meta
    m.to_empty(device="cpu")
    m.init_weights(pixel_mean=torch.full((1, 8, 8), 0.25))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    torch.testing.assert_close(m.decoder[-1].bias, torch.tensor([0.25]))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="image_size"):
        VAE(Config(kind="conv", channels=[8, 8, 8], image_size=12))
    with pytest.raises(ConfigError, match="channels"):
        VAE(Config(kind="conv", channels=[]))
    with pytest.raises(ConfigError, match="task.flavor.*huge"):
        from_dict(task.Config, {"flavor": "huge"}, "task")
    with pytest.raises(ConfigError, match="task.binarize"):
        from_dict(task.Config, {"likelihood": "gaussian"}, "task")
    with pytest.raises(ConfigError, match="task.beta"):
        from_dict(task.Config, {"beta": -1.0}, "task")
    assert from_dict(task.Config, {"likelihood": "gaussian", "binarize": "none"}, "task").likelihood == "gaussian"
