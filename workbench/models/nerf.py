"""NeRF: a neural radiance field rendered by differentiable volume rendering, with hierarchical sampling.

What it is
    Mildenhall et al. (2020) represent a static scene as a function F(x, d) -> (c, sigma): the colour c that
    a point x emits towards viewing direction d, and the volume density sigma at x (view independent). An
    image is rendered by casting one ray per pixel and integrating F along it; the whole pipeline is
    differentiable, so F (an MLP) is fitted to posed photographs by the mean squared error of rendered pixels.

The math
    Positional encoding (the reference code's convention, the default; `pi_encoding` gives the paper's form):
        gamma(p) = [p, sin(2^0 p), cos(2^0 p), sin(2^1 p), cos(2^1 p), ..., sin(2^{L-1} p), cos(2^{L-1} p)]
        applied to each coordinate, the 3 sin values of a frequency then its 3 cos values; 3 + 3 * 2L dims:
        63 for xyz at L = 10, 27 for the direction at L = 4. The paper writes sin(2^k pi p) without the
        raw p; the released code drops pi (its scenes live in [-1.5, 1.5], where pi only rescales the bands)
        and keeps p, and every checkpoint and comparison uses the code's form.
    The MLP (paper flavor): 8 layers of 256 with ReLU on gamma(x); gamma(x) is concatenated again after
    layer index 4 (so layer 5 reads 256 + 63); sigma = ReLU(alpha_linear(h)) (256 -> 1, no direction);
    feature_linear(h) (256 -> 256) is concatenated with gamma(d) -> 128 (ReLU) -> RGB (sigmoid).
    Volume rendering along a ray r(t) = o + t d with samples t_1 < ... < t_N:
        delta_i = (t_{i+1} - t_i) * ||d||,  delta_N = 1e10 * ||d||   (distances in world units)
        alpha_i = 1 - exp(-sigma_i delta_i)
        T_i     = prod_{j<i} (1 - alpha_j + 1e-10)                  (exclusive cumulative product)
        w_i     = T_i alpha_i
        C = sum_i w_i c_i,  depth = sum_i w_i t_i,  acc = sum_i w_i;  white background: C += 1 - acc
    Hierarchical sampling: N_c stratified samples t = lower + (upper - lower) u between the midpoints of
    evenly spaced depths feed the coarse network; its weights w_2..w_{N_c - 1} (+1e-5) make a piecewise-
    constant pdf over bins whose edges are the midpoints of the coarse t; N_f samples are drawn from it by
    inverse CDF (searchsorted(cdf, u, right=True)), detached, sorted together with the coarse ones, and the
    fine network renders all N_c + N_f. Loss = MSE(coarse) + MSE(fine).

The intuition
    An MLP on raw coordinates is biased towards low frequencies (spectral bias); the sinusoids of gamma let it
    fit sharp edges and texture. Density independent of direction forces a consistent geometry across views,
    while the colour head may still model view-dependent shading. Exclusive transmittance means a ray's first
    sample is never occluded by itself, so an opaque first sample gets weight 1. The coarse pass is a cheap
    guess of where the surfaces are; the fine pass spends its samples there.

Design choices
    `Model` holds the coarse and the fine MLP (`coarse`, `fine`: the reference's two networks of the same
    shape); the sampling and rendering are plain functions (`render_rays`), so tests can drive each piece
    against closed forms. Randomness (stratified offsets, raw-sigma noise, inverse-CDF u) comes from an
    optional torch.Generator, else torch's global one (saved in checkpoints, so a resumed run is exact).
    Cameras: camera-to-world 4x4 matrices in the OpenGL / Blender convention the Blender synthetic scenes use:
    the camera looks down its -z axis, +y is up in the image, +x to the right; pixel (row i, column j) has its
    centre at (j + 0.5, i + 0.5). `init_weights` restores PyTorch's default Linear init, the reference's.
    `__init__` allocates no tensors beyond the Linear layers, so the model builds on the meta device.

Differences from the reference (nerf-pytorch, the paper's released TensorFlow code)
    Pixel centres at +0.5 (the reference casts through the pixel corner: i, j without 0.5): a half-pixel
    shift, so rays here hit what a rasteriser would; a model trained with one convention renders the other's
    views shifted by half a pixel. No NDC space (forward-facing LLFF scenes) and no linear-in-disparity
    sampling: the bounded scenes here (and Blender's) use linear depth between near and far.

Sources
    Mildenhall, Srinivasan, Tancik, Barron, Ramamoorthi, Ng, "NeRF: Representing Scenes as Neural Radiance
    Fields for View Synthesis", ECCV 2020 (arXiv 2003.08934); bmild/nerf (TensorFlow) and yenchenlin/nerf-pytorch
    run_nerf.py / run_nerf_helpers.py (read for the conventions above, not copied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.config import fail, field_

__all__ = ["Config", "FLAVORS", "Model", "NeRFMLP", "positional_encoding", "encoded_dim", "volume_render",
           "stratified_samples", "sample_pdf", "render_rays", "get_rays", "look_at"]


@dataclass
class Config:
    depth: int = field_(8, gt=0, doc="layers of the position trunk")
    width: int = field_(256, gt=0, doc="width of the position trunk")
    skips: list[int] = field_([4], doc="after these layer indices the trunk re-reads gamma(x)")
    multires: int = field_(10, ge=0, doc="L, frequencies of the xyz encoding")
    multires_views: int = field_(4, ge=0, doc="L, frequencies of the direction encoding")
    use_viewdirs: bool = field_(True, doc="colour depends on the viewing direction (feature -> +dir -> RGB)")
    pi_encoding: bool = field_(False, doc="the paper's sin(2^k pi p) without p; False = the reference code's form")
    view_width: int = field_(0, ge=0, doc="width of the direction branch; 0 = width // 2 (128 in the paper)")
    n_coarse: int = field_(64, gt=1, doc="stratified samples per ray for the coarse network")
    n_fine: int = field_(128, ge=0, doc="inverse-CDF samples per ray added for the fine network (0 = no fine net)")
    white_background: bool = field_(True, doc="composite onto white: C += 1 - acc (the Blender scenes)")
    raw_noise_std: float = field_(0.0, ge=0, doc="Gaussian noise on raw sigma while training (0 Blender, 1 LLFF)")

    def validate(self) -> None:
        for i, s in enumerate(self.skips):
            if not 0 <= s < self.depth - 1:
                fail(f"skips[{i}]", f"expected a layer index in [0, depth - 1) = [0, {self.depth - 1}), got {s}")

    @property
    def views_width(self) -> int:
        return self.view_width or self.width // 2


FLAVORS: dict[str, Config] = {
    # the paper's network (Blender settings): 8 x 256, skip after layer 4, L = 10 / 4, 64 + 128 samples
    "paper": Config(),
    # a CPU size: the scenes of workbench/data/scenes.py train in minutes on one core
    "small": Config(depth=4, width=64, skips=[2], multires=6, multires_views=2, n_coarse=32, n_fine=32),
    # tests
    "debug": Config(depth=3, width=16, skips=[1], multires=3, multires_views=1, n_coarse=8, n_fine=8),
}


# ----------------------------------------------------------------------------------------------------
# Positional encoding


def encoded_dim(num_freqs: int, pi_encoding: bool = False, dims: int = 3) -> int:
    """Width of gamma(p) for `dims` coordinates: dims (the raw input, reference form only) + dims * 2L."""
    return (0 if pi_encoding else dims) + dims * 2 * num_freqs


def positional_encoding(p: Tensor, num_freqs: int, pi_encoding: bool = False) -> Tensor:
    """gamma(p) of (..., D) -> (..., D + 2 L D): [p, sin(f_0 p), cos(f_0 p), ...] with f_k = 2^k (x pi if
    `pi_encoding`, which also drops p). Frequencies are the reference's 2^linspace(0, L-1, L), exact powers of 2."""
    freqs = 2.0 ** torch.arange(num_freqs, device=p.device, dtype=p.dtype)  # (L,)
    if pi_encoding:
        freqs = freqs * math.pi
    # (..., L, D): f_k p, one row per frequency
    fp = p.unsqueeze(-2) * freqs.unsqueeze(-1)
    # (..., L, 2D): [sin(f_k p), cos(f_k p)] per frequency, then flattened frequency-major -> (..., 2 L D)
    bands = torch.cat([torch.sin(fp), torch.cos(fp)], dim=-1).flatten(-2)
    return bands if pi_encoding else torch.cat([p, bands], dim=-1)


# ----------------------------------------------------------------------------------------------------
# The network


class NeRFMLP(nn.Module):
    """F(gamma(x), gamma(d)) -> raw (..., 4): RGB logits and raw sigma (activated by `render_rays`).
    Attribute names follow nerf-pytorch (pts_linears, alpha_linear, feature_linear, views_linears, rgb_linear)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.in_pts = encoded_dim(cfg.multires, cfg.pi_encoding)
        self.in_views = encoded_dim(cfg.multires_views, cfg.pi_encoding)
        W = cfg.width
        # layer i + 1 reads W + in_pts when layer i is a skip (its output is concatenated with gamma(x))
        self.pts_linears = nn.ModuleList(
            [nn.Linear(self.in_pts, W)]
            + [nn.Linear(W + self.in_pts if i in cfg.skips else W, W) for i in range(cfg.depth - 1)])
        if cfg.use_viewdirs:
            self.alpha_linear = nn.Linear(W, 1)
            self.feature_linear = nn.Linear(W, W)
            self.views_linears = nn.ModuleList([nn.Linear(W + self.in_views, cfg.views_width)])
            self.rgb_linear = nn.Linear(cfg.views_width, 3)
        else:
            self.output_linear = nn.Linear(W, 4)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default Linear init (kaiming-uniform a = sqrt(5), uniform bias), as the reference uses."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, x: Tensor, d: Tensor | None = None) -> Tensor:
        """x (..., 3) points, d (..., 3) unit view directions -> raw (..., 4) = [rgb logits, raw sigma]."""
        cfg = self.cfg
        ex = positional_encoding(x, cfg.multires, cfg.pi_encoding)  # (..., in_pts)
        h = ex
        for i, layer in enumerate(self.pts_linears):
            h = F.relu(layer(h))
            if i in cfg.skips:
                h = torch.cat([ex, h], dim=-1)  # (..., in_pts + W): the reference's order, input first
        if not cfg.use_viewdirs:
            return self.output_linear(h)
        sigma = self.alpha_linear(h)  # (..., 1), no view dependence
        feat = self.feature_linear(h)
        ed = positional_encoding(d, cfg.multires_views, cfg.pi_encoding)  # (..., in_views)
        h = torch.cat([feat, ed], dim=-1)
        for layer in self.views_linears:
            h = F.relu(layer(h))
        return torch.cat([self.rgb_linear(h), sigma], dim=-1)


class Model(nn.Module):
    """The coarse and the fine network (the same shape, separate weights); `render_rays(model, ...)` renders."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.coarse = NeRFMLP(cfg)
        self.fine = NeRFMLP(cfg) if cfg.n_fine > 0 else None

    @torch.no_grad()
    def init_weights(self) -> None:
        self.coarse.init_weights()
        if self.fine is not None:
            self.fine.init_weights()


# ----------------------------------------------------------------------------------------------------
# Rendering


def volume_render(rgb: Tensor, sigma: Tensor, t: Tensor, rays_d: Tensor,
                  white_background: bool = False) -> dict[str, Tensor]:
    """Composite samples along rays. rgb (R, N, 3) in [0, 1], sigma (R, N) >= 0, t (R, N) increasing depths
    (in units of the ray parameter), rays_d (R, 3) unnormalised directions -> rgb (R, 3), depth (R,), acc (R,),
    weights (R, N). See the module notes for the equations."""
    # delta_i = t_{i+1} - t_i, delta_N = 1e10; times ||d|| so distances are in world units
    delta = torch.cat([t[..., 1:] - t[..., :-1], torch.full_like(t[..., :1], 1e10)], dim=-1)
    delta = delta * rays_d.norm(dim=-1, keepdim=True)
    # alpha_i = 1 - exp(-sigma_i delta_i)
    alpha = 1.0 - torch.exp(-sigma * delta)
    # T_i = prod_{j<i} (1 - alpha_j + 1e-10): exclusive, so T_1 = 1
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha + 1e-10], dim=-1), dim=-1)[..., :-1]
    # w_i = T_i alpha_i
    weights = trans * alpha
    # C = sum_i w_i c_i, depth = sum_i w_i t_i, acc = sum_i w_i
    rgb_map = (weights.unsqueeze(-1) * rgb).sum(dim=-2)
    depth = (weights * t).sum(dim=-1)
    acc = weights.sum(dim=-1)
    if white_background:
        # C += 1 - acc: what the ray does not hit is white
        rgb_map = rgb_map + (1.0 - acc).unsqueeze(-1)
    return {"rgb": rgb_map, "depth": depth, "acc": acc, "weights": weights}


def stratified_samples(near: Tensor, far: Tensor, n: int, perturb: bool = True,
                       generator: torch.Generator | None = None) -> Tensor:
    """(R, n) depths: n evenly spaced between near and far (R,), each jittered uniformly inside its stratum
    (between the midpoints of its neighbours) when `perturb`."""
    u = torch.linspace(0.0, 1.0, n, device=near.device, dtype=near.dtype)
    t = near.unsqueeze(-1) * (1.0 - u) + far.unsqueeze(-1) * u  # (R, n)
    if not perturb:
        return t
    mids = 0.5 * (t[..., 1:] + t[..., :-1])
    upper = torch.cat([mids, t[..., -1:]], dim=-1)
    lower = torch.cat([t[..., :1], mids], dim=-1)
    # t = lower + (upper - lower) u
    return lower + (upper - lower) * _rand(t.shape, generator, t)


def sample_pdf(bins: Tensor, weights: Tensor, n: int, deterministic: bool = False,
               generator: torch.Generator | None = None) -> Tensor:
    """n samples (R, n) from the piecewise-constant pdf with bin edges `bins` (R, M + 1) and bin weights
    `weights` (R, M), by inverse CDF; detached (no gradient flows into the sample positions)."""
    bins, weights = bins.detach(), weights.detach()
    weights = weights + 1e-5  # no zero-probability bin: keeps the pdf defined on empty rays
    pdf = weights / weights.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, dim=-1)], dim=-1)  # (R, M + 1)
    if deterministic:
        u = torch.linspace(0.0, 1.0, n, device=bins.device, dtype=bins.dtype).expand(*cdf.shape[:-1], n)
    else:
        u = _rand((*cdf.shape[:-1], n), generator, bins)
    u = u.contiguous()
    # the bin of each u: cdf[below] <= u < cdf[above]
    idx = torch.searchsorted(cdf.contiguous(), u, right=True)
    below = (idx - 1).clamp(min=0)
    above = idx.clamp(max=cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, below), cdf.gather(-1, above)
    bin_lo, bin_hi = bins.gather(-1, below), bins.gather(-1, above)
    denom = cdf_hi - cdf_lo
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    # linear inside the bin: t = bin_lo + (u - cdf_lo) / (cdf_hi - cdf_lo) * (bin_hi - bin_lo)
    return bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)


def _rand(shape, generator: torch.Generator | None, like: Tensor, normal: bool = False) -> Tensor:
    """U[0, 1) (or N(0, 1)) numbers shaped `shape` from `generator` (on its own device), on `like`'s device."""
    fn = torch.randn if normal else torch.rand
    if generator is None:
        return fn(shape, device=like.device, dtype=like.dtype)
    return fn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _activate(raw: Tensor, noise_std: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """raw (R, N, 4) -> rgb = sigmoid(raw[..., :3]), sigma = ReLU(raw[..., 3] + noise)."""
    s = raw[..., 3]
    if noise_std > 0:
        s = s + _rand(s.shape, generator, s, normal=True) * noise_std
    return torch.sigmoid(raw[..., :3]), F.relu(s)


def _run(net: NeRFMLP, rays_o: Tensor, rays_d: Tensor, t: Tensor) -> Tensor:
    # points r(t) = o + t d: (R, N, 3); directions unit length, one per ray, repeated per sample
    pts = rays_o.unsqueeze(-2) + t.unsqueeze(-1) * rays_d.unsqueeze(-2)
    view = F.normalize(rays_d, dim=-1).unsqueeze(-2).expand_as(pts)
    return net(pts, view)


def render_rays(model: Model, rays_o: Tensor, rays_d: Tensor, near: float | Tensor, far: float | Tensor, *,
                perturb: bool = True, raw_noise_std: float | None = None, white_background: bool | None = None,
                n_coarse: int | None = None, n_fine: int | None = None,
                generator: torch.Generator | None = None) -> dict[str, dict[str, Tensor]]:
    """Render rays (R, 3) origins and directions through the coarse and (if any) the fine network.

    Returns {"coarse": {...}, "fine": {...}} (fine absent without a fine net), each with rgb (R, 3), depth (R,),
    acc (R,), weights (R, N), t (R, N). Sampling settings default to the model's config; at test time pass
    perturb=False and raw_noise_std=0 (the reference's render-time settings)."""
    cfg = model.cfg
    noise = cfg.raw_noise_std if raw_noise_std is None else raw_noise_std
    white = cfg.white_background if white_background is None else white_background
    nc, nf = n_coarse or cfg.n_coarse, cfg.n_fine if n_fine is None else n_fine
    r = rays_o.shape[0]
    near_t = torch.as_tensor(near, dtype=rays_o.dtype, device=rays_o.device).expand(r)
    far_t = torch.as_tensor(far, dtype=rays_o.dtype, device=rays_o.device).expand(r)
    t_c = stratified_samples(near_t, far_t, nc, perturb, generator)  # (R, Nc)
    rgb, sigma = _activate(_run(model.coarse, rays_o, rays_d, t_c), noise, generator)
    out = {"coarse": volume_render(rgb, sigma, t_c, rays_d, white) | {"t": t_c}}
    if model.fine is None or nf <= 0:
        return out
    # bins = midpoints of the coarse t; pdf from the interior weights w_2..w_{Nc-1}
    mids = 0.5 * (t_c[..., 1:] + t_c[..., :-1])  # (R, Nc - 1)
    t_f = sample_pdf(mids, out["coarse"]["weights"][..., 1:-1], nf, deterministic=not perturb, generator=generator)
    t_all, _ = torch.sort(torch.cat([t_c, t_f.detach()], dim=-1), dim=-1)  # (R, Nc + Nf)
    rgb, sigma = _activate(_run(model.fine, rays_o, rays_d, t_all), noise, generator)
    out["fine"] = volume_render(rgb, sigma, t_all, rays_d, white) | {"t": t_all}
    return out


@torch.no_grad()
def render_image(model: Model, c2w: Tensor, height: int, width: int, focal: float, near: float, far: float,
                 chunk: int = 4096) -> dict[str, Tensor]:
    """Render one view deterministically (no jitter, no noise): rgb (H, W, 3), depth (H, W), acc (H, W) of the
    fine network (the coarse one without it)."""
    device = next(model.parameters()).device
    rays_o, rays_d = get_rays(height, width, focal, c2w.to(device))
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)  # (H W, 3)
    parts: dict[str, list[Tensor]] = {"rgb": [], "depth": [], "acc": []}
    for lo in range(0, len(rays_o), chunk):
        out = render_rays(model, rays_o[lo:lo + chunk], rays_d[lo:lo + chunk], near, far, perturb=False,
                          raw_noise_std=0.0)
        best = out.get("fine", out["coarse"])
        for k in parts:
            parts[k].append(best[k])
    return {k: torch.cat(v).reshape(height, width, *((3,) if k == "rgb" else ())) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------------
# Cameras


def get_rays(height: int, width: int, focal: float | tuple[float, float], c2w: Tensor) -> tuple[Tensor, Tensor]:
    """Pinhole rays of every pixel: origins and (unnormalised, z = -1 in the camera) directions, (H, W, 3) each,
    in world coordinates. c2w is (3 or 4, 4) camera-to-world, OpenGL axes (the camera looks down -z, +y up).
    Pixel (i, j) (row, column) has its centre at (j + 0.5, i + 0.5); the principal point is the image centre."""
    fx, fy = (focal, focal) if isinstance(focal, (int, float)) else focal
    dtype, device = c2w.dtype, c2w.device
    i, j = torch.meshgrid(torch.arange(height, dtype=dtype, device=device),
                          torch.arange(width, dtype=dtype, device=device), indexing="ij")  # (H, W) each
    # camera-space direction: x right, y up (image rows go down), looking along -z
    dirs = torch.stack([(j + 0.5 - width / 2) / fx, -(i + 0.5 - height / 2) / fy, -torch.ones_like(i)], dim=-1)
    # rotate into the world: d_world = R d_cam
    rays_d = dirs @ c2w[:3, :3].T  # (H, W, 3)
    rays_o = c2w[:3, 3].expand(rays_d.shape)
    return rays_o, rays_d


def look_at(eye: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """The (4, 4) camera-to-world matrix of a camera at `eye` looking at `target` (the origin) with world `up`
    (+z) up in the image, in the OpenGL convention of `get_rays`."""
    eye = torch.as_tensor(eye, dtype=torch.float64 if not torch.is_tensor(eye) else eye.dtype)
    target = torch.zeros_like(eye) if target is None else torch.as_tensor(target, dtype=eye.dtype)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype) if up is None else torch.as_tensor(up, dtype=eye.dtype)
    back = F.normalize(eye - target, dim=0)  # the camera's +z points away from what it looks at
    right = torch.linalg.cross(up, back)
    if right.norm() < 1e-9:
        raise ValueError(f"look_at: the view direction from {eye.tolist()} to {target.tolist()} is parallel to up "
                         f"{up.tolist()}; choose another up")
    right = F.normalize(right, dim=0)
    cam_up = torch.linalg.cross(back, right)
    c2w = torch.eye(4, dtype=eye.dtype)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, back, eye
    return c2w
