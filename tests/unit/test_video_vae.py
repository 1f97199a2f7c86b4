"""The causal video VAE (workbench.models.video.vae): shapes and compression arithmetic for every flavor,
causality (gradients are exactly zero from the future), single-frame encoding, the posterior and its KL,
latent statistics, meta-device construction and a short overfit that must lower the reconstruction error."""

import pytest
import torch

from workbench.config import ConfigError
from workbench.models.video.vae import FLAVORS, CausalVideoVAE, Config, DiagonalGaussian

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Mochi's factors (1 * 2 * 3 = 6 in time, 8 spatially) at tiny widths
MOCHI_TINY = Config(latent_channels=3, encoder_channels=[8, 8, 8, 8], decoder_channels=[8, 8, 8, 8],
                    layers_per_block=[1, 1, 1, 1, 1], norm_num_groups=4, attention_head_dim=4)


def _vae(cfg: Config, seed: int = 0) -> CausalVideoVAE:
    torch.manual_seed(seed)
    return CausalVideoVAE(cfg).eval()


def _video(B, T, H, W, seed=0):
    return torch.rand(B, 3, T, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("flavor, tf, s, cz", [("debug", 2, 4, 4), ("small", 2, 4, 4), ("mochi", 6, 8, 12)])
def test_flavor_factors_and_latent_shape(flavor, tf, s, cz):
    with torch.device("meta"):
        m = CausalVideoVAE(FLAVORS[flavor])
    assert (m.temporal_factor, m.spatial_factor, m.latent_channels) == (tf, s, cz)
    assert m.latent_shape(1, s, s) == (1, 1, 1)
    assert m.latent_shape(4 * tf + 1, 3 * s, 5 * s) == (5, 3, 5)
    with pytest.raises(ValueError, match=rf"T={tf + 2}: expected T = {tf} k \+ 1"):
        m.latent_shape(tf + 2, s, s)
    with pytest.raises(ValueError, match=f"width W={s + 2}: expected a positive multiple of the spatial factor {s}"):
        m.latent_shape(1, s, s + 2)
    with pytest.raises(ValueError, match="height H"):
        m.latent_shape(1, s // 2, s)


def test_mochi_flavor_real_sizes_on_meta():
    """The real flavor: 163 x 480 x 848 -> 28 x 60 x 106 x 12 (shapes traced on the meta device, no memory);
    the encoder / decoder parameter counts of Mochi's AsymmVAE (diffusers' defaults: 97.2M / 362.5M)."""
    with torch.device("meta"):
        m = CausalVideoVAE(FLAVORS["mochi"])
        post = m.encode(torch.empty(1, 3, 163, 480, 848))
        assert post.mean.shape == post.logvar.shape == (1, 12, 28, 60, 106)
        assert m.decode(post.mean).shape == (1, 3, 163, 480, 848)
    n_enc = sum(p.numel() for p in m.encoder.parameters())
    n_dec = sum(p.numel() for p in m.decoder.parameters())
    assert (n_enc, n_dec) == (97_222_016, 362_526_595)


@pytest.mark.parametrize("flavor", ["debug", "small"])
def test_cpu_flavor_shapes(flavor):
    m = _vae(FLAVORS[flavor])
    n = sum(p.numel() for p in m.parameters())
    assert n < 400_000
    with torch.no_grad():
        for T, H, W in ((9, 32, 32), (1, 16, 24), (3, 8, 4)):
            x = _video(2, T, H, W)
            recon, post = m(x, generator=torch.Generator().manual_seed(0))
            assert post.mean.shape == (2, 4, *m.latent_shape(T, H, W))
            assert recon.shape == x.shape and torch.isfinite(recon).all()
    with pytest.raises(ValueError, match=r"expected \(B, 3, T, H, W\)"):
        m.encode(torch.zeros(1, 3, 9, 32))
    with pytest.raises(ValueError, match="T=8"):
        m.encode(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match=r"latents: expected \(B, 4, T_lat, h, w\)"):
        m.decode(torch.zeros(1, 3, 2, 4, 4))


def test_mochi_factors_tiny_shapes():
    m = _vae(MOCHI_TINY)
    with torch.no_grad():
        post = m.encode(_video(1, 13, 16, 8))
        assert post.mean.shape == (1, 3, 3, 2, 1)
        assert m.decode(post.mean).shape == (1, 3, 13, 16, 8)
        assert m.decode(torch.zeros(1, 3, 1, 2, 2)).shape == (1, 3, 1, 16, 16)


@pytest.mark.parametrize("cfg_name", ["small", "mochi-tiny"])
def test_causality_by_gradients(cfg_name):
    """Encoder: latent frame j depends on input frames <= j tf only; decoder: output frame i on latent frames
    <= ceil(i / tf) only. Checked exactly with gradients, and that the last frame allowed does matter."""
    cfg = MOCHI_TINY if cfg_name == "mochi-tiny" else FLAVORS["small"]
    m = _vae(cfg)
    tf = m.temporal_factor
    T_lat = 3
    T = tf * (T_lat - 1) + 1
    x = _video(1, T, 8, 8).requires_grad_(True)
    mean = m.encode(x).mean  # (1, C, T_lat, h, w)
    for j in range(T_lat):
        (g,) = torch.autograd.grad(mean[:, :, j].sum(), x, retain_graph=True)
        per_frame = g.abs().flatten(3).sum(-1).sum(1)[0]  # (T,)
        assert torch.all(per_frame[j * tf + 1:] == 0), (j, per_frame)
        assert per_frame[j * tf] > 0
    z = torch.randn(1, m.latent_channels, T_lat, 1, 1, requires_grad=True)
    y = m.decode(z)  # (1, 3, T, s, s)
    for i in range(T):
        (g,) = torch.autograd.grad(y[:, :, i].sum(), z, retain_graph=True)
        per_latent = g.abs().flatten(3).sum(-1).sum(1)[0]  # (T_lat,)
        last = -(-i // tf)  # ceil(i / tf)
        assert torch.all(per_latent[last + 1:] == 0), (i, per_latent)
        assert per_latent[last] > 0


@pytest.mark.parametrize("cfg_name", ["small", "mochi-tiny"])
def test_perturbing_a_frame_leaves_the_past_unchanged_and_first_frame_encodes_alone(cfg_name):
    cfg = MOCHI_TINY if cfg_name == "mochi-tiny" else FLAVORS["small"]
    m = _vae(cfg)
    tf = m.temporal_factor
    x = _video(2, 2 * tf + 1, 16, 16)
    with torch.no_grad():
        base = m.encode(x).mean
        k = tf + 1  # first input frame of latent frame 2
        x2 = x.clone()
        x2[:, :, k] += 0.5
        pert = m.encode(x2).mean
        torch.testing.assert_close(pert[:, :, :2], base[:, :, :2], rtol=0, atol=1e-6)
        assert (pert[:, :, 2] - base[:, :, 2]).abs().max() > 1e-3
        # a single image is a one-frame video: T = 1 -> T_lat = 1, equal to the video's first latent frame
        alone = m.encode(x[:, :, :1]).mean
        assert alone.shape[2] == 1
        torch.testing.assert_close(alone, base[:, :, :1], rtol=0, atol=1e-5)
        # decoding is causal the same way: a prefix of latents decodes to a prefix of frames
        z = torch.randn(2, m.latent_channels, 3, 2, 2)
        full = m.decode(z)
        torch.testing.assert_close(m.decode(z[:, :, :2]), full[:, :, : tf + 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(m.decode(z[:, :, :1]), full[:, :, :1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg_name", ["small", "mochi-tiny"])
def test_chunked_decode_equals_one_shot(cfg_name):
    """decode(z, chunk_frames=k) carries each causal conv's last frames across chunks: the same video for every
    chunk size, the caches are cleared after (also after an error), and a bad chunk size is refused."""
    m = _vae(MOCHI_TINY if cfg_name == "mochi-tiny" else FLAVORS["small"])
    z = torch.randn(2, m.latent_channels, 5, 2, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m.decode(z)
        for k in (1, 2, 3, 5, 9):
            torch.testing.assert_close(m.decode(z, chunk_frames=k), full, rtol=0, atol=1e-5)
        convs = [mod for mod in m.modules() if hasattr(mod, "stream")]
        assert convs and all(c.stream is None for c in convs)
        with pytest.raises(ValueError, match="chunk_frames: expected a positive number"):
            m.decode(z, chunk_frames=0)
        with pytest.raises(RuntimeError):  # fails inside the decoder, after the caches were switched on
            m.decode(torch.zeros(1, m.latent_channels, 4, 0, 3), chunk_frames=2)
        assert all(c.stream is None for c in convs)
        # without the cache (each chunk decoded on its own) the result differs: the carry is what makes it equal
        alone = torch.cat([m.decoder(z[:, :, :2]), m.decoder(z[:, :, 2:])], dim=2)[:, :, m.temporal_factor - 1:]
        assert alone.shape == full.shape and (alone - full).abs().max() > 1e-3


@pytest.mark.parametrize("cfg_name", ["small", "mochi-tiny"])
def test_chunked_encode_equals_one_shot(cfg_name):
    """encode(x, chunk_frames=k): strided convs carry their unconsumed frames, attention its past keys and values;
    the posterior equals the one-shot one for every chunk size, and the caches are dropped after."""
    m = _vae(MOCHI_TINY if cfg_name == "mochi-tiny" else FLAVORS["small"])
    tf = m.temporal_factor
    x = _video(2, 4 * tf + 1, 16, 8, seed=6)
    with torch.no_grad():
        full = m.encode(x)
        for k in (1, 2, 3, 5):
            chunked = m.encode(x, chunk_frames=k)
            torch.testing.assert_close(chunked.mean, full.mean, rtol=0, atol=1e-5)
            torch.testing.assert_close(chunked.logvar, full.logvar, rtol=0, atol=1e-5)
        assert all(mod.stream is None for mod in m.modules() if hasattr(mod, "stream"))
        with pytest.raises(ValueError, match="chunk_frames: expected a positive number"):
            m.encode(x, chunk_frames=-1)
        # the carried past matters: without it (a later chunk encoded alone) the latents differ
        alone = m.encode(x[:, :, tf:]).mean  # frame tf, then the frames of latents 2..4, as a clip of its own
        assert (alone[:, :, 1:] - full.mean[:, :, 2:]).abs().max() > 1e-3


def test_posterior_sample_mean_kl():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 2, 3, 5, generator=g)
    post = DiagonalGaussian(moments)
    assert post.mean.shape == post.logvar.shape == (3, 4, 2, 3, 5)
    torch.testing.assert_close(post.mode(), moments[:, :4])
    s1 = post.sample(torch.Generator().manual_seed(7))
    s2 = post.sample(torch.Generator().manual_seed(7))
    assert s1.shape == post.mean.shape and torch.equal(s1, s2)
    assert not torch.equal(s1, post.sample(torch.Generator().manual_seed(8)))
    kl = post.kl()
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(post.mean.double(), post.std.double()), torch.distributions.Normal(0.0, 1.0)
    ).flatten(1).sum(1)
    assert kl.shape == (3,) and torch.all(kl >= 0)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 8, 1, 2, 2)).kl(), torch.zeros(2))
    # the clamp keeps exp finite
    assert torch.isfinite(DiagonalGaussian(torch.full((1, 2, 1, 1, 1), 1e4)).kl()).all()
    # many samples: the empirical mean / std approach the posterior's
    wide = DiagonalGaussian(torch.tensor([0.5, 2 * torch.log(torch.tensor(0.3))]).view(1, 2, 1, 1, 1).expand(4000, 2, 1, 1, 1))
    draws = wide.sample(torch.Generator().manual_seed(1))
    assert abs(draws.mean().item() - 0.5) < 0.03 and abs(draws.std().item() - 0.3) < 0.03


def test_latent_statistics_round_trip_and_init():
    m = _vae(FLAVORS["debug"])
    assert torch.equal(m.latents_mean, torch.zeros(4)) and torch.equal(m.latents_std, torch.ones(4))
    assert {"latents_mean", "latents_std"} <= set(m.state_dict())
    z = torch.randn(2, 4, 3, 2, 2) * torch.tensor([1.0, 2.0, 3.0, 0.5]).view(1, 4, 1, 1, 1) + 5
    m.latents_mean.copy_(z.mean(dim=(0, 2, 3, 4)))
    m.latents_std.copy_(z.std(dim=(0, 2, 3, 4)))
    zn = m.normalize(z)
    torch.testing.assert_close(zn.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(zn.std(dim=(0, 2, 3, 4)), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.denormalize(zn), z, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.normalize(z.double()).float(), zn, atol=1e-5, rtol=0)
    m.init_weights()
    assert torch.equal(m.latents_mean, torch.zeros(4)) and torch.equal(m.latents_std, torch.ones(4))


def test_meta_init_then_materialize_matches_eager_init():
    eager = CausalVideoVAE(FLAVORS["debug"])
    torch.manual_seed(3)
    eager.init_weights()
    with torch.device("meta"):
        lazy = CausalVideoVAE(FLAVORS["debug"])
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    torch.manual_seed(3)
    lazy.init_weights()
    for (n, a), (_, b) in zip(eager.state_dict().items(), lazy.state_dict().items()):
        assert torch.equal(a, b), n


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'spatial_expansions'"):
        Config(temporal_expansions=[1, 2], spatial_expansions=[2]).validate()
    with pytest.raises(ConfigError, match="'encoder_channels': 20 is not a positive multiple of norm_num_groups"):
        CausalVideoVAE(Config(encoder_channels=[64, 128, 20, 384]))
    with pytest.raises(ConfigError, match="'layers_per_block': must have levels \\+ 2 = 5"):
        Config(layers_per_block=[1, 1]).validate()
    with pytest.raises(ConfigError, match="'encoder_attention': stage 1 has 24 channels"):
        Config(encoder_channels=[8, 24, 32, 32], norm_num_groups=8, attention_head_dim=16).validate()


def test_overfitting_two_clips_lowers_reconstruction_error():
    """A few dozen Adam steps on two 5-frame 16 x 16 clips (a moving square and a fading one) must cut the
    reconstruction MSE by well over half: a broken decoder, a wrong depth-to-space or a detached path fails."""
    torch.manual_seed(0)
    m = CausalVideoVAE(FLAVORS["debug"]).train()
    x = -torch.ones(2, 3, 5, 16, 16)
    for t in range(5):
        x[0, 0, t, 4:10, 2 + 2 * t: 8 + 2 * t] = 1.0  # a red square moving right
        x[1, 2, t, 6:12, 6:12] = -1 + 0.5 * t  # a blue square brightening
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    with torch.no_grad():
        before = (m(x, sample_posterior=False)[0] - x).square().mean().item()
    for step in range(60):
        recon, post = m(x, generator=torch.Generator().manual_seed(step))
        loss = (recon - x).square().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = (m(x, sample_posterior=False)[0] - x).square().mean().item()
    assert after < 0.3 * before, (before, after)
