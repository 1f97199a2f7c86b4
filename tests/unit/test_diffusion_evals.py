"""The diffusion evals' metrics and judges (evals/image_metrics.py, workbench/models/contrastive.py): FID against
closed forms, the contrastive losses against their textbook forms, and judges trained briefly on digits: the
CLIP-style model ranks matching captions first, and each metric puts real held-out images above noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from evals.image_metrics import EvalNets, NetsConfig, frechet_distance, gaussian_stats, nets_key, references
from workbench.data.captioned import load_captioned
from workbench.errors import ConfigError
from workbench.models import contrastive

# ----------------------------------------------------------------------------------------------------
# FID


def test_fid_of_identical_sets_is_zero_and_of_gaussians_the_closed_form():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    assert abs(frechet_distance(*gaussian_stats(f), *gaussian_stats(f))) < 1e-8
    # diagonal covariances: ||mu1 - mu2||^2 + sum (s1 - s2)^2 with s the standard deviations
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(want, rel=1e-10)
    # general covariances (not commuting): the textbook formula through scipy's sqrtm
    a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    c1, c2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8)
    # from samples: a shift of N(0, I) by m gives about ||m||^2 (the finite-sample bias is small at n = 20000)
    m = np.array([1.0, -2.0, 0.5])
    x, y = rng.standard_normal((20000, 3)), rng.standard_normal((20000, 3)) + m
    assert frechet_distance(*gaussian_stats(x), *gaussian_stats(y)) == pytest.approx((m**2).sum(), rel=0.02)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu1, c1, mu2[:4], c2[:4, :4])
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 3)))


# ----------------------------------------------------------------------------------------------------
# contrastive losses


def test_contrastive_losses_match_their_textbook_forms():
    torch.manual_seed(0)
    u, v = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-3.0)
    # CLIP with one positive per row: the symmetric cross-entropy over the batch
    logits = 10 * u @ v.T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    torch.testing.assert_close(contrastive.contrastive_loss(u, v, scale, bias, "clip"), want)
    # SigLIP: -1/N sum_ij log sigmoid(z_ij (t s_ij + b))
    z = 2 * torch.eye(6) - 1
    want = -sum(math.log(1 / (1 + math.exp(-z[i, j] * (10 * (u[i] @ v[j]).item() - 3))))
                for i in range(6) for j in range(6)) / 6
    assert contrastive.contrastive_loss(u, v, scale, bias, "siglip").item() == pytest.approx(want, rel=1e-5)
    # multi-positive: two images of one class, both captions count for both
    same = torch.tensor([0, 0, 1, 2, 3, 4])[:, None] == torch.tensor([0, 0, 1, 2, 3, 4])[None, :]
    target = same.float() / same.float().sum(1, keepdim=True)
    logp = F.log_softmax(logits, 1)
    rows = -(target * logp).sum(1).mean()
    cols = -(target * F.log_softmax(logits.T, 1)).sum(1).mean()
    torch.testing.assert_close(contrastive.contrastive_loss(u, v, scale, bias, "clip", same), 0.5 * (rows + cols))
    assert contrastive.clip_score(u, u).tolist() == pytest.approx([100.0] * 6)
    assert contrastive.clip_score(u, -u).tolist() == [0.0] * 6  # clipped at 0
    with pytest.raises(ConfigError, match="image_widths"):
        contrastive.make_config("debug", image_widths=(8, 6))


def test_the_contrastive_model_builds_on_meta():
    with torch.device("meta"):
        model = contrastive.ContrastiveModel(contrastive.make_config("debug"))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model.encode_text(torch.tensor([[1, 4, 5, 2, 0]]))).all()


# ----------------------------------------------------------------------------------------------------
# the judges, trained briefly on 8x8 digits (cached across the tests of this module)

NETS = NetsConfig(classifier="tiny", classifier_epochs=6, clip="small", clip_epochs=6, warmup_steps=20)


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    torch.manual_seed(0)
    with_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_captioned("digits", seed=0)
        cache = tmp_path_factory.mktemp("nets")
        logs: list[str] = []
        nets = EvalNets.load_or_train(cache, data, "digits", 0, 0, 0, 0.1, NETS, log=logs.append)
        refs = references(nets, data, per_class=15, seed=0)
        yield data, nets, refs, cache, logs
    finally:
        torch.set_num_threads(with_threads)


def test_the_text_image_model_ranks_matching_captions_first(judged):
    data, nets, _, _, _ = judged
    x, y = data.images.test
    _, _, emb = nets.judge(x)
    sims = emb @ nets.text(data.prompts()).T  # (N, K): each test image against every class's prompt
    zero_shot = (sims.argmax(1) == y).double().mean().item()
    assert zero_shot > 0.6  # chance is 0.1
    # the matching prompt's cosine beats the mean of the others for most images
    own = sims[torch.arange(len(y)), y]
    others = (sims.sum(1) - own) / (sims.shape[1] - 1)
    assert (own > others).double().mean().item() > 0.8
    assert nets.meta["real_clip_score"] > nets.meta["mismatched_clip_score"] + 10


def test_real_images_score_near_best_and_noise_worst(judged):
    data, nets, refs, _, _ = judged
    real, noise = refs["real"], refs["noise"]
    # FID: real held-out near the floor, noise far
    assert real["fid"] < 0.2 * noise["fid"]
    # accuracy: real near the classifier's test accuracy, noise near chance (0.1)
    assert nets.meta["test_accuracy"] > 0.8
    assert real["class_accuracy"] == pytest.approx(nets.meta["test_accuracy"], abs=0.1)
    assert noise["class_accuracy"] < 0.25
    # CLIP-style score: real pairs high, noise low
    assert real["clip_score"] > noise["clip_score"] + 10
    assert real["clip_score"] == pytest.approx(nets.meta["real_clip_score"], abs=5)
    # a degraded generator (real images blurred and dimmed) lands in between on FID
    x, y = data.images.test
    idx = torch.cat([torch.nonzero(y == k).flatten()[:15] for k in range(10)])
    blurred = 0.5 * F.avg_pool2d(x[idx], 3, stride=1, padding=1)
    mid = nets.score(blurred, y[idx], data.prompts(), refs["ref"])
    assert real["fid"] < mid["fid"]


def test_judges_are_cached_by_data_setting(judged):
    data, nets, refs, cache, logs = judged
    again_logs: list[str] = []
    again = EvalNets.load_or_train(cache, data, "digits", 0, 0, 0, 0.1, NETS, log=again_logs.append)
    assert any("loaded from" in m for m in again_logs) and any("training" in m for m in logs)
    assert again.meta == nets.meta
    x = data.images.test[0][:20]
    for a, b in zip(nets.judge(x), again.judge(x)):
        torch.testing.assert_close(a, b)
    assert nets_key("digits", 0, 0, 0, 0.1, NETS) != nets_key("digits", 0, 0, 1, 0.1, NETS)  # another seed
    assert nets_key("digits", 0, 0, 0, 0.1, NETS) != nets_key("digits", 0, 0, 0, 0.1, NetsConfig())  # another recipe
