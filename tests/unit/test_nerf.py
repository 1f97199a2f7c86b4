"""NeRF (workbench/models/nerf.py): encoding, network shape, the renderer against closed forms, sampling, cameras;
the scenes the project renders (workbench/data/scenes.py) and the Blender format; PSNR / SSIM against skimage."""

import json
import math

import numpy as np
import pytest
import torch

from workbench.data import scenes
from workbench.errors import DataError
from workbench.models import nerf


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ----------------------------------------------------------------------------------------------------
# Positional encoding and the network


def test_positional_encoding_reference_form_values_and_dims():
    assert nerf.encoded_dim(10) == 63 and nerf.encoded_dim(4) == 27  # the reference's widths
    p = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    got = nerf.positional_encoding(p, 2)
    # [p, sin(p), cos(p), sin(2p), cos(2p)], three coordinates each
    want = torch.cat([p, p.sin(), p.cos(), (2 * p).sin(), (2 * p).cos()], -1)
    assert got.shape == (1, 15)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert nerf.positional_encoding(torch.randn(5, 7, 3), 10).shape == (5, 7, 63)
    # frequency k of the 10 is exactly 2^k (the reference's 2^linspace(0, 9, 10))
    x = torch.full((1, 3), 0.37, dtype=torch.float64)
    enc = nerf.positional_encoding(x, 10)
    torch.testing.assert_close(enc[0, 3 + 6 * 9], torch.sin(torch.tensor(0.37 * 512, dtype=torch.float64)))


def test_positional_encoding_paper_form():
    p = torch.tensor([[0.25, 0.5, -0.125]], dtype=torch.float64)
    got = nerf.positional_encoding(p, 3, pi_encoding=True)
    assert nerf.encoded_dim(3, pi_encoding=True) == got.shape[-1] == 18  # no raw p
    want = torch.cat([torch.cat([(2 ** k * math.pi * p).sin(), (2 ** k * math.pi * p).cos()], -1) for k in range(3)], -1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_paper_flavor_shapes_parameter_count_and_meta_init():
    cfg = nerf.FLAVORS["paper"]
    net = nerf.NeRFMLP(cfg)
    widths = [layer.in_features for layer in net.pts_linears]
    assert widths == [63, 256, 256, 256, 256, 256 + 63, 256, 256]  # the skip after layer index 4 feeds layer 5
    assert net.views_linears[0].in_features == 256 + 27 and net.views_linears[0].out_features == 128
    assert net.alpha_linear.in_features == 256 and net.rgb_linear.out_features == 3
    # 63*256+256 + 6 (256*256+256) + (319*256+256) + feature 65792 + alpha 257 + views 283*128+128 + rgb 387
    assert sum(p.numel() for p in net.parameters()) == 595_844
    model = nerf.Model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 2 * 595_844  # coarse + fine
    with torch.device("meta"):
        meta = nerf.Model(cfg)
    assert all(p.is_meta for p in meta.parameters())
    out = net(torch.randn(4, 5, 3), torch.nn.functional.normalize(torch.randn(4, 5, 3), dim=-1))
    assert out.shape == (4, 5, 4)


def test_the_skip_concatenates_the_encoding_first():
    # the reference's torch.cat([input_pts, h]): layer 5's first 63 input columns read gamma(x). With its other
    # columns zeroed, the layers before the skip cannot change the output
    torch.manual_seed(0)
    net = nerf.NeRFMLP(nerf.FLAVORS["paper"])
    x, d = torch.randn(3, 3), torch.nn.functional.normalize(torch.randn(3, 3), dim=-1)
    with torch.no_grad():
        net.pts_linears[5].weight[:, 63:] = 0
        before = net(x, d)
        net.pts_linears[4].weight.normal_()
    torch.testing.assert_close(net(x, d), before)


def test_sigma_does_not_depend_on_the_view_direction():
    torch.manual_seed(0)
    net = nerf.NeRFMLP(nerf.FLAVORS["debug"])
    x = torch.randn(6, 3)
    a, b = net(x, torch.nn.functional.normalize(torch.randn(6, 3), dim=-1)), net(x, torch.tensor([[0.0, 0, 1]]).expand(6, 3))
    torch.testing.assert_close(a[:, 3], b[:, 3])
    assert not torch.allclose(a[:, :3], b[:, :3])


def test_bad_skip_is_refused_naming_the_key():
    from workbench.config import from_dict
    from workbench.errors import ConfigError

    with pytest.raises(ConfigError, match="skips"):
        from_dict(nerf.Config, {"depth": 4, "skips": [3]})


# ----------------------------------------------------------------------------------------------------
# Volume rendering against closed forms


def _naive(rgb, sigma, t, d, white=False):
    """The renderer written as a per-ray, per-sample loop (float64): the reference's equations one by one."""
    out = []
    for r in range(len(t)):
        trans, c, dep, acc, ws = 1.0, torch.zeros(3, dtype=torch.float64), 0.0, 0.0, []
        for i in range(t.shape[1]):
            delta = (t[r, i + 1] - t[r, i] if i + 1 < t.shape[1] else 1e10) * d[r].norm()
            alpha = 1 - math.exp(-float(sigma[r, i]) * float(delta))
            w = trans * alpha
            ws.append(w)
            c, dep, acc = c + w * rgb[r, i], dep + w * t[r, i], acc + w
            trans *= 1 - alpha + 1e-10
        out.append((c + (1 - acc) if white else c, dep, acc, ws))
    return out


@pytest.mark.parametrize("norm", [1.0, 2.5, 0.3])
def test_uniform_slab_transmits_exp_minus_sigma_d(norm):
    # samples every 0.01 in t on [0, 2]; density s on t in [0.5, 1.5): a slab 1 / ||d|| ... thick in t, so
    # its world thickness is 1.0 * ||d||; the transmittance must be exp(-s * thickness)
    t = torch.arange(201, dtype=torch.float64).unsqueeze(0) * 0.01
    inside = ((t >= 0.5 - 1e-9) & (t < 1.5 - 1e-9)).double()
    d = torch.nn.functional.normalize(torch.tensor([[0.3, -0.5, 0.8]], dtype=torch.float64), dim=-1) * norm
    colour = torch.tensor([0.2, 0.7, 0.4], dtype=torch.float64)
    for s in (0.05, 0.7, 3.0):
        sigma = s * inside
        out = nerf.volume_render(colour.expand(1, 201, 3), sigma, t, d)
        thickness = 1.0 * norm
        want_acc = 1 - math.exp(-s * thickness)
        assert abs(out["acc"].item() - want_acc) < 1e-6, (s, norm)
        # a constant-colour medium renders that colour times acc (on black), plus 1 - acc on white
        torch.testing.assert_close(out["rgb"][0], colour * want_acc, rtol=0, atol=1e-6)
        white = nerf.volume_render(colour.expand(1, 201, 3), sigma, t, d, white_background=True)
        torch.testing.assert_close(white["rgb"][0], colour * want_acc + (1 - want_acc), rtol=0, atol=1e-6)


def test_renderer_equals_the_loop_written_out_and_its_first_weight_is_alpha0():
    g = torch.Generator().manual_seed(0)
    t = torch.sort(2 + 4 * torch.rand(3, 9, generator=g, dtype=torch.float64), -1).values
    sigma = torch.rand(3, 9, generator=g, dtype=torch.float64) * 2
    rgb = torch.rand(3, 9, 3, generator=g, dtype=torch.float64)
    d = torch.randn(3, 3, generator=g, dtype=torch.float64)
    for white in (False, True):
        out = nerf.volume_render(rgb, sigma, t, d, white)
        for r, (c, dep, acc, ws) in enumerate(_naive(rgb, sigma, t, d, white)):
            torch.testing.assert_close(out["rgb"][r], c)
            torch.testing.assert_close(out["depth"][r], torch.as_tensor(dep, dtype=torch.float64))
            torch.testing.assert_close(out["acc"][r], torch.as_tensor(acc, dtype=torch.float64))
            torch.testing.assert_close(out["weights"][r], torch.tensor(ws, dtype=torch.float64))
    # exclusive transmittance: the first sample is never occluded by itself, w_0 = alpha_0 exactly
    alpha0 = 1 - torch.exp(-sigma[:, 0] * (t[:, 1] - t[:, 0]) * d.norm(dim=-1))
    torch.testing.assert_close(out["weights"][:, 0], alpha0, rtol=0, atol=1e-15)


def test_opaque_first_sample_and_a_thin_opaque_wall():
    t = torch.linspace(2, 6, 33, dtype=torch.float64).unsqueeze(0)
    rgb = torch.rand(1, 33, 3, dtype=torch.float64)
    d = torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64)
    sigma = torch.zeros(1, 33, dtype=torch.float64)
    sigma[0, 0] = 1e6
    out = nerf.volume_render(rgb, sigma, t, d, white_background=True)
    torch.testing.assert_close(out["rgb"][0], rgb[0, 0])  # the first sample's colour, no background
    assert out["weights"][0, 1:].abs().max() < 1e-9
    # a wall at sample 20 (t = 4.5): depth is its t, acc 1, colour its colour
    sigma = torch.zeros(1, 33, dtype=torch.float64)
    sigma[0, 20] = 1e4
    out = nerf.volume_render(rgb, sigma, t, d)
    assert abs(out["depth"].item() - t[0, 20].item()) < 1e-6 and abs(out["acc"].item() - 1) < 1e-6
    torch.testing.assert_close(out["rgb"][0], rgb[0, 20])


# ----------------------------------------------------------------------------------------------------
# Sampling


def test_stratified_samples_stay_in_their_strata():
    near, far = torch.full((50,), 2.0), torch.full((50,), 6.0)
    even = nerf.stratified_samples(near, far, 9, perturb=False)
    torch.testing.assert_close(even[0], torch.linspace(2, 6, 9))
    t = nerf.stratified_samples(near, far, 9, generator=torch.Generator().manual_seed(0))
    edges = torch.cat([torch.tensor([2.0]), 0.5 * (even[0, 1:] + even[0, :-1]), torch.tensor([6.0])])
    assert ((t >= edges[:-1]) & (t <= edges[1:])).all()
    assert (t.diff(dim=-1) >= 0).all() and t.std(0).min() > 0.05  # jittered, still sorted


def test_inverse_cdf_sampling_follows_the_weights_and_is_detached():
    bins = torch.linspace(2, 6, 11).expand(4, 11)  # 10 bins of width 0.4
    # uniform weights + deterministic u = linspace(0, 1): the samples are evenly spaced over [2, 6]
    uniform = nerf.sample_pdf(bins, torch.ones(4, 10), 17, deterministic=True)
    torch.testing.assert_close(uniform, torch.linspace(2, 6, 17).expand(4, 17), rtol=0, atol=1e-5)
    # all the mass in bin 6 ([4.4, 4.8)): the samples concentrate there
    w = torch.zeros(4, 10, requires_grad=True)
    peaked = w.detach().clone()
    peaked[:, 6] = 1.0
    s = nerf.sample_pdf(bins, peaked + 0 * w, 2000, generator=torch.Generator().manual_seed(0))
    assert not s.requires_grad  # detached: no gradient flows into the sample positions
    share = ((s >= 4.4) & (s <= 4.8)).double().mean().item()
    assert share > 0.99, share
    # the histogram of many samples matches a non-trivial pdf (+1e-5 per bin, normalised)
    p = torch.tensor([0.0, 1, 2, 3, 4, 0, 0, 5, 1, 4])
    s = nerf.sample_pdf(bins[:1], p.unsqueeze(0), 40000, generator=torch.Generator().manual_seed(1))
    hist = torch.histc(s, bins=10, min=2, max=6) / s.numel()
    torch.testing.assert_close(hist, (p + 1e-5) / (p + 1e-5).sum(), rtol=0, atol=0.01)


def test_render_rays_coarse_and_fine_shapes_sorted_detached_fine_samples():
    torch.manual_seed(0)
    model = nerf.Model(nerf.FLAVORS["debug"])
    o, d = torch.zeros(5, 3), torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    out = nerf.render_rays(model, o, d, 2.0, 6.0, generator=torch.Generator().manual_seed(0))
    c, f = out["coarse"], out["fine"]
    assert c["t"].shape == (5, 8) and f["t"].shape == (5, 16) and f["rgb"].shape == (5, 3)
    assert (f["t"].diff(dim=-1) >= 0).all() and not f["t"].requires_grad
    # every coarse sample is among the fine network's samples
    assert all(torch.isin(c["t"][r], f["t"][r]).all() for r in range(5))
    (f["rgb"].sum() + c["rgb"].sum()).backward()
    assert model.coarse.pts_linears[0].weight.grad is not None and model.fine.pts_linears[0].weight.grad is not None
    # raw-sigma noise (training only) changes the render; the same generator seed repeats it
    noisy = [nerf.render_rays(model, o, d, 2.0, 6.0, perturb=False, raw_noise_std=1.0,
                              generator=torch.Generator().manual_seed(5))["fine"]["rgb"] for _ in range(2)]
    torch.testing.assert_close(noisy[0], noisy[1])
    assert not torch.allclose(noisy[0], nerf.render_rays(model, o, d, 2.0, 6.0, perturb=False)["fine"]["rgb"])
    # deterministic rendering twice gives the same image
    a = nerf.render_rays(model, o, d, 2.0, 6.0, perturb=False)["fine"]["rgb"]
    torch.testing.assert_close(a, nerf.render_rays(model, o, d, 2.0, 6.0, perturb=False)["fine"]["rgb"])


# ----------------------------------------------------------------------------------------------------
# Cameras and the scenes the project renders


def test_look_at_is_a_rotation_and_rays_point_at_the_target():
    c2w = nerf.look_at(torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64))
    r = c2w[:3, :3]
    torch.testing.assert_close(r.T @ r, torch.eye(3, dtype=torch.float64))
    assert abs(torch.linalg.det(r).item() - 1) < 1e-12
    o, d = nerf.get_rays(33, 33, 40.0, c2w)  # odd size: the centre pixel's ray is the optical axis
    torch.testing.assert_close(torch.nn.functional.normalize(d[16, 16], dim=0), torch.tensor([-1.0, 0, 0], dtype=torch.float64))
    assert d[0, 16, 2] > 0 and d[16, 32, 1] > 0  # the top row looks up (+z), the right column to +y
    with pytest.raises(ValueError, match="parallel"):
        nerf.look_at(torch.tensor([0.0, 0.0, 3.0]))


def test_rays_hit_the_expected_pixels_of_an_analytic_sphere():
    # a small sphere off the axis; its projection by the pinhole equations, then the rendered hit mask
    size, focal, eye = 48, 50.0, torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64)
    scene = scenes.Scene(spheres=[scenes.Sphere((0.0, 0.5, 0.3), 0.2, (1.0, 0.0, 0.0))])
    img, depth, alpha = scenes.render_views(scene, nerf.look_at(eye).unsqueeze(0), size, size, focal, supersample=4)
    # camera axes: right = +y, up = +z, looking down -x; the centre (0, 0.5, 0.3) is 4 units ahead
    col, row = size / 2 + focal * 0.5 / 4, size / 2 - focal * 0.3 / 4
    a = alpha[0].double()
    ii, jj = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    centroid = ((a * jj).sum() / a.sum()).item(), ((a * ii).sum() / a.sum()).item()
    assert abs(centroid[0] - col) < 0.25 and abs(centroid[1] - row) < 0.25, (centroid, col, row)
    # the pixel holding the projected centre hits at about the distance to the sphere's near side
    hit = depth[0, int(row), int(col)].item() * nerf.get_rays(size, size, focal, nerf.look_at(eye))[1][int(row), int(col)].norm()
    assert abs(hit - (math.sqrt(4 ** 2 + 0.5 ** 2 + 0.3 ** 2) - 0.2)) < 0.03
    assert torch.equal(img[0, 0, 0], torch.ones(3))  # a corner sees the white background


def test_sphere_silhouette_area_matches_its_projection():
    # a sphere of radius r at distance D projects to a disc of radius f r / sqrt(D^2 - r^2) pixels
    scene = scenes.SCENES["sphere"]
    size, focal = 64, 40.0
    poses = scenes.camera_poses(3, scene.radius, torch.Generator().manual_seed(0))
    _, depth, alpha = scenes.render_views(scene, poses, size, size, focal, supersample=3)
    r, dist = scene.spheres[0].radius, scene.radius
    area = math.pi * (focal * r) ** 2 / (dist ** 2 - r ** 2)
    for k in range(3):
        assert abs(alpha[k].sum().item() / area - 1) < 0.02
        assert abs(depth[k, size // 2, size // 2].item() - (dist - r)) < 0.02  # near the axis: t ~ D - r


def test_load_scene_is_deterministic_and_held_out_views_are_new():
    a = scenes.load_scene("shapes", size=12, n_train=5, n_val=2, n_test=3, seed=3)
    b = scenes.load_scene("shapes", size=12, n_train=5, n_val=2, n_test=3, seed=3)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.poses, b.test.poses)
    assert a.train.images.shape == (5, 12, 12, 3) and len(a.val) == 2 and len(a.test) == 3
    assert 0 <= a.train.images.min() and a.train.images.max() <= 1
    eyes = lambda v: v.poses[:, :3, 3]  # noqa: E731
    assert torch.cdist(eyes(a.test), eyes(a.train)).min() > 1e-3  # no test camera is a training camera
    o, d, c = a.train.rays()
    assert o.shape == d.shape == c.shape == (5 * 144, 3)
    with pytest.raises(DataError, match="nowhere"):
        scenes.load_scene("nowhere")


def test_blender_format_round_trip_and_errors(tmp_path):
    data = scenes.load_scene("shapes", size=16, n_train=3, n_val=1, n_test=2, seed=0)
    scenes.write_blender(data, tmp_path / "scene")
    meta = json.loads((tmp_path / "scene" / "transforms_train.json").read_text())
    assert meta["frames"][0]["file_path"] == "./train/r_0" and len(meta["frames"]) == 3
    back = scenes.load_blender(tmp_path / "scene")
    for split in ("train", "val", "test"):
        a, b = getattr(data, split), getattr(back, split)
        assert (a.images - b.images).abs().max() < 2.5 / 255  # 8-bit PNGs, alpha-composited on white
        torch.testing.assert_close(a.poses, b.poses)
        assert abs(a.focal - b.focal) < 1e-4
    assert (back.near, back.far) == (2.0, 6.0)
    # a resize keeps the field of view: the focal length scales with the width
    small = scenes.load_blender(tmp_path / "scene", size=8)
    assert small.train.images.shape == (3, 8, 8, 3) and abs(small.train.focal - data.train.focal / 2) < 1e-4
    # through load_scene by path, as the training task does
    assert scenes.load_scene(str(tmp_path / "scene"), size=0).train.images.shape == (3, 16, 16, 3)
    (tmp_path / "scene" / "val" / "r_0.png").unlink()
    with pytest.raises(DataError, match="r_0.png"):
        scenes.load_blender(tmp_path / "scene")
    bad = tmp_path / "scene" / "transforms_test.json"
    bad.write_text(json.dumps({"camera_angle_x": 0.7, "frames": [{"file_path": "./test/r_0", "transform_matrix": [[1]]}]}))
    with pytest.raises(DataError, match="4x4"):
        scenes._read_split(tmp_path / "scene", "test", None, True)
    with pytest.raises(DataError, match="transforms_train.json"):
        scenes.load_blender(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------
# PSNR and SSIM against skimage


def test_psnr_and_ssim_equal_skimage():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from evals.image_metrics import psnr, ssim

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 20, 23, generator=g, dtype=torch.float64)
    cases = [(a, (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)),
             (a, a.flip(-1)), (a, torch.full_like(a, 0.5)),
             (a[:, :1], (a[:, :1] * 0.8 + 0.1))]  # one channel; a contrast change
    for x, y in cases:
        p, s = psnr(x, y), ssim(x, y)
        assert p.shape == s.shape == (len(x),)
        for i in range(len(x)):
            xi, yi = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
            want_s = structural_similarity(xi, yi, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=1.0, channel_axis=2)
            assert abs(s[i].item() - want_s) < 1e-6, (s[i].item(), want_s)
            assert abs(p[i].item() - peak_signal_noise_ratio(xi, yi, data_range=1.0)) < 1e-9
    assert ssim(a, a).allclose(torch.ones(3, dtype=torch.float64)) and torch.isinf(psnr(a, a)).all()
    with pytest.raises(ValueError, match="window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    # a larger data range scales PSNR by 20 log10(L)
    assert abs(psnr(255 * a, 255 * cases[0][1], max_val=255.0) - psnr(*cases[0])).max() < 1e-9
    assert np.isfinite(ssim(a.float(), a.float().flip(-2)).numpy()).all()
