"""Task "nerf": fit a NeRF (workbench/models/nerf.py) to a scene the project renders, or to a Blender-format folder.

    workbench nerf configs/nerf/scene.toml [--resume] [--section.key value ...]
    workbench eval --task nerf --ckpt runs/nerf-shapes

What it does
    1. Data (`workbench.data.scenes.load_scene`): train / val / test views of a scene ray-cast from known
       geometry (spheres and boxes, Lambertian with shadows, supersampled), or a folder in the Blender
       synthetic layout (transforms_*.json + PNGs) when `scene` is a path.
    2. Rays: every training pixel's ray (origin, direction, colour) is one training example, so the runner's
       loop (`Context.fit`, workbench/train/fundamentals/runner.py) draws random ray batches across all
       training views each step (train.batch_size rays; 1024 in the paper).
    3. Loss per batch: stratified coarse samples and inverse-CDF fine samples along each ray (drawn from
       torch's global generator, which checkpoints save, so a resume is exact), then
           loss = MSE(C_coarse, C) + MSE(C_fine, C)
       The learning rate decays from train.lr to train.lr x train.min_lr_ratio (cosine; the reference decays
       exponentially from 5e-4 to 5e-5 over its run: the same end points, a different path).
    4. Validation after every epoch: the val views rendered whole (no jitter, no noise), MSE and PSNR; every
       `render_every` epochs a picture of them (val-step-N.png: truth | render).
    5. At the end: the test views' PSNR and SSIM (evals/image_metrics.py) beside two baselines computed the
       same way: the mean colour of the training images everywhere, and uniform noise; a picture of the test
       views (truth | render | depth, and the true depth when the scene is rendered here); and a novel-view
       GIF (novel-views.gif) on a camera orbit that no training view lies on.

`load_run(RUN_DIR)` gives the trained model with its scene and renderer (the eval task evals/tasks/nerf.py
uses it); `is_nerf_run(path)` says whether a folder is one.

Design choices
    Image size and sample counts are small (32 px, 32 + 32 samples, the "small" flavor's 4 x 64 MLP) so a run
    fits in minutes on one CPU core; `flavor = "paper"` with 64 + 128 samples is the paper's setup for a GPU.
    The scene's background is white and the renderer composites onto white (`white_background`), as for the
    Blender scenes, so empty space does not have to be learnt as dense white matter.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from workbench.config import fail, field_
from workbench.data.moving_shapes import write_gif
from workbench.train.fundamentals.runner import Context, Task

__all__ = ["Config", "build_model", "load_data", "render_views", "ray_psnr", "plot_ray", "load_run", "NerfRun",
           "is_nerf_run"]


@dataclass
class Config:
    scene: str = field_("shapes", doc="a scene of workbench.data.scenes.SCENES, or a folder in the Blender format")
    size: int = field_(32, ge=0, doc="image side in pixels (a Blender folder is resized to it; 0 keeps its size)")
    n_train: int = field_(40, gt=0, doc="rendered scenes: training views")
    n_val: int = field_(4, gt=0, doc="rendered scenes: validation views")
    n_test: int = field_(8, gt=0, doc="rendered scenes: test (held-out) views")
    supersample: int = field_(2, gt=0, doc="rendered scenes: s x s rays per pixel, averaged")
    flavor: str = field_("small", doc="a flavor of workbench.models.nerf.FLAVORS")
    n_coarse: int = field_(0, ge=0, doc="coarse samples per ray; 0 = the flavor's")
    n_fine: int = field_(-1, ge=-1, doc="fine samples per ray; -1 = the flavor's, 0 = no fine network")
    raw_noise_std: float = field_(0.0, ge=0, doc="noise on raw sigma while training (0 for these scenes)")
    render_every: int = field_(10, ge=0, doc="a picture of the val views every N epochs (0 = none)")
    gif_frames: int = field_(36, gt=1, doc="frames of the novel-view orbit GIF")
    gif_elevation: float = field_(30.0, ge=-89, le=89, doc="the orbit's elevation in degrees")
    chunk: int = field_(8192, gt=0, doc="rays per forward when rendering whole views")

    def validate(self) -> None:
        from workbench.models.nerf import FLAVORS

        if self.flavor not in FLAVORS:
            fail("flavor", f"expected one of {', '.join(FLAVORS)}, got {self.flavor!r}")
        from workbench.data.scenes import SCENES

        if self.scene not in SCENES and not Path(self.scene).is_dir():
            fail("scene", f"expected one of {', '.join(SCENES)} or a folder with transforms_train.json, got "
                          f"{self.scene!r}")
        if self.scene in SCENES and self.size < 1:
            fail("size", "a rendered scene needs its side in pixels (>= 1)")


def model_config(cfg: Config):
    from workbench.models.nerf import FLAVORS

    changes = {"raw_noise_std": cfg.raw_noise_std}
    if cfg.n_coarse:
        changes["n_coarse"] = cfg.n_coarse
    if cfg.n_fine >= 0:
        changes["n_fine"] = cfg.n_fine
    return dataclasses.replace(FLAVORS[cfg.flavor], **changes)


def build_model(cfg: Config):
    from workbench.models.nerf import Model

    return Model(model_config(cfg))


def load_data(cfg: Config, seed: int):
    from workbench.data.scenes import load_scene

    return load_scene(cfg.scene, size=cfg.size, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=seed,
                      supersample=cfg.supersample)


@torch.no_grad()
def render_views(model, views, near: float, far: float, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """rgb (N, H, W, 3) and depth (N, H, W) of every pose of `views`, deterministic, on the CPU. depth is the
    expected hit depth sum w t / acc where acc > 0.5 and 0 elsewhere (background), the truth's convention
    (the raw sum w t of a half-covered pixel would read as a surface nearer than any)."""
    from workbench.models.nerf import render_image

    rgb, depth = [], []
    for pose in views.poses:
        out = render_image(model, pose, views.height, views.width, views.focal, near, far, chunk)
        rgb.append(out["rgb"].clamp(0, 1).cpu())
        acc = out["acc"].cpu()
        depth.append(torch.where(acc > 0.5, out["depth"].cpu() / acc.clamp(min=1e-6), torch.zeros_like(acc)))
    return torch.stack(rgb), torch.stack(depth)


def chw(x: Tensor) -> Tensor:
    """(N, H, W, 3) -> (N, 3, H, W)."""
    return x.permute(0, 3, 1, 2)


def ray_psnr(rgb: Tensor, target: Tensor) -> float:
    """PSNR (dB) of a batch of ray colours (R, 3) in [0, 1]: evals.image_metrics.psnr of them as one image."""
    from evals.image_metrics import psnr

    # (R, 3) -> (1, 3, R, 1)
    return psnr(rgb.detach().t()[None, :, :, None], target.detach().t()[None, :, :, None]).item()


def depth_picture(depth: Tensor, near: float, far: float) -> Tensor:
    """(N, H, W) depths -> (N, 3, H, W) grey in [0, 1]: near = white, far (and background, 0) = black."""
    d = torch.where(depth > 0, depth, torch.full_like(depth, far))
    g = ((far - d) / (far - near)).clamp(0, 1)
    return g.unsqueeze(1).expand(-1, 3, -1, -1)


def baselines(train_images: Tensor, truth: Tensor, seed: int) -> dict[str, dict[str, float]]:
    """PSNR and SSIM (means over the views) of the mean training colour everywhere and of uniform noise."""
    from evals.image_metrics import psnr, ssim

    mean = train_images.reshape(-1, 3).mean(0)
    flat = mean.view(1, 1, 1, 3).expand_as(truth)
    noise = torch.rand(truth.shape, generator=torch.Generator().manual_seed(seed))
    t = chw(truth)
    return {name: {"psnr": psnr(chw(x), t).mean().item(), "ssim": ssim(chw(x), t).mean().item()}
            for name, x in (("mean_colour", flat), ("noise", noise))}


def orbit_poses(data, frames: int, elevation: float) -> Tensor:
    """A circle of cameras at the training cameras' mean distance from the origin."""
    from workbench.data.scenes import orbit

    radius = data.train.poses[:, :3, 3].norm(dim=-1).mean().item()
    return orbit(frames, radius, elevation)


@torch.no_grad()
def plot_ray(model, views, near: float, far: float, out: str | Path, view: int = 0,
             pixel: tuple[int, int] | None = None) -> Path:
    """One ray of `views[view]` (the centre pixel by default) with its coarse samples and their weights and the
    fine samples the inverse CDF drew from them, beside the true hit depth when the scene knows it (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from workbench.models.nerf import get_rays, render_rays
    from workbench.train.metrics import save_png

    i, j = pixel or (views.height // 2, views.width // 2)
    device = next(model.parameters()).device
    o, d = get_rays(views.height, views.width, views.focal, views.poses[view].to(device))
    rays_o, rays_d = o[i, j].unsqueeze(0), d[i, j].unsqueeze(0)
    # one deterministic coarse pass, then the fine samples with fresh u (what training draws)
    r = render_rays(model, rays_o, rays_d, near, far, perturb=False, raw_noise_std=0.0)
    gen = torch.Generator().manual_seed(0)
    r_train = render_rays(model, rays_o, rays_d, near, far, perturb=True, raw_noise_std=0.0, generator=gen)
    fig = Figure(figsize=(8.0, 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    tc, wc = r["coarse"]["t"][0].cpu(), r["coarse"]["weights"][0].cpu()
    ax.vlines(tc, 0, wc, color="tab:blue", lw=2, label=f"coarse samples ({len(tc)}) and their weights")
    ax.plot(tc, wc, "o", color="tab:blue", ms=3)
    if "fine" in r:
        tf, wf = r["fine"]["t"][0].cpu(), r["fine"]["weights"][0].cpu()
        ax.plot(tf, wf, "-", color="tab:orange", lw=1, label=f"fine network's weights over all {len(tf)} samples")
        coarse_set = set(tc.tolist())
        new = torch.tensor([t for t in tf.tolist() if t not in coarse_set])
        ax.plot(new, torch.full_like(new, -0.04), "|", color="tab:orange", ms=10,
                label=f"inverse-CDF fine samples ({len(new)})")
        jitter = r_train["fine"]["t"][0].cpu()
        ax.plot(jitter, torch.full_like(jitter, -0.09), "|", color="tab:gray", ms=6,
                label="a training draw (stratified + random u)")
    if views.depth is not None and views.depth[view, i, j] > 0:
        ax.axvline(float(views.depth[view, i, j]), color="k", ls="--", lw=1, label="true surface (ray-cast)")
    ax.set_xlim(near, far)
    ax.set_xlabel("t along the ray (near to far)")
    ax.set_ylabel("weight w_i = T_i alpha_i")
    ax.set_title(f"pixel ({i}, {j}) of view {view}: coarse weights guide the fine samples", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    save_png(fig, out)
    return Path(out)


# ----------------------------------------------------------------------------------------------------
# The task


def run(ctx: Context, cfg: Config) -> None:
    from evals.image_metrics import psnr, ssim
    from workbench.models.nerf import render_rays
    from workbench.train.fundamentals.plots import image_grid

    seed = ctx.job.run.seed
    data = load_data(cfg, seed)
    near, far = data.near, data.far
    ctx.log(f"nerf: {data.summary()}")
    rays_o, rays_d, colours = data.train.rays()  # (N H W, 3) each: one example per training pixel
    model = build_model(cfg)
    mcfg = model.cfg
    params = sum(p.numel() for p in model.parameters())
    ctx.log(f"nerf: {cfg.flavor} flavor, {params:,} parameters (coarse + fine), {mcfg.n_coarse} + {mcfg.n_fine} "
            f"samples per ray, {len(rays_o):,} training rays")
    base = baselines(data.train.images, data.val.images, seed)
    ctx.runlog.ylabel = "mean squared error of the rendered colour"
    ctx.runlog.baselines["mean training colour (val)"] = 10 ** (-base["mean_colour"]["psnr"] / 10)
    n_batches = math.ceil(len(rays_o) / ctx.job.train.batch_size)
    state = {"step": ctx.step}

    def picture(model, views, filename: str, caption: str, with_depth: bool) -> Tensor:
        rgb, depth = render_views(model, views, near, far, cfg.chunk)
        cols = [chw(views.images), chw(rgb)]
        if with_depth:
            cols.append(depth_picture(depth, near, far))
            if views.depth is not None:
                cols.append(depth_picture(views.depth, near, far))
        grid = torch.stack(cols, 1).flatten(0, 1)  # (N * columns, 3, H, W): one row per view
        image_grid(grid, len(cols), ctx.figure(filename, caption), title=caption.split(";")[0])
        return rgb

    def evaluate(m) -> dict[str, float]:
        step = state["step"]
        if cfg.render_every and step and step % (cfg.render_every * n_batches) == 0:
            picture(m, data.val, f"val-step-{step}.png", f"val views at step {step}; truth | render", False)
        rgb, _ = render_views(m, data.val, near, far, cfg.chunk)
        mse = (rgb - data.val.images).square().mean().item()
        return {"loss": mse, "psnr": psnr(chw(rgb), chw(data.val.images)).mean().item()}

    def loss_fn(m, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict]:
        o, d, c = batch
        out = render_rays(m, o, d, near, far, perturb=True)
        # loss = MSE(coarse) + MSE(fine)
        mse_c = (out["coarse"]["rgb"] - c).square().mean()
        loss = mse_c
        metrics = {"psnr_coarse": ray_psnr(out["coarse"]["rgb"], c)}
        if "fine" in out:
            mse_f = (out["fine"]["rgb"] - c).square().mean()
            loss = loss + mse_f
            metrics["psnr"] = ray_psnr(out["fine"]["rgb"], c)
        return loss, metrics

    def after_step(step: int) -> None:
        state["step"] = step

    t0 = time.perf_counter()
    ctx.fit(model, (rays_o, rays_d, colours), loss_fn, evaluate, after_step=after_step)
    seconds = time.perf_counter() - t0
    model.eval()

    # held-out test views: PSNR and SSIM beside the mean colour and noise
    rgb = picture(model, data.test, "test-views.png",
                  "held-out test views; truth | render | rendered depth" + (" | true depth" if data.test.depth is not None
                                                                            else "") + "; depth: near = white", True)
    truth = data.test.images
    p, s = psnr(chw(rgb), chw(truth)), ssim(chw(rgb), chw(truth))
    base = baselines(data.train.images, truth, seed)
    ctx.result("test_psnr", round(p.mean().item(), 3), f"dB, mean over the {len(truth)} held-out test views (fine "
                                                        f"network, deterministic render)")
    ctx.result("test_ssim", round(s.mean().item(), 4), "mean over the test views (11x11 Gaussian window, sigma 1.5)")
    ctx.result("mean_colour_psnr", round(base["mean_colour"]["psnr"], 3), "the training images' mean colour everywhere")
    ctx.result("mean_colour_ssim", round(base["mean_colour"]["ssim"], 4), "the same, SSIM")
    ctx.result("noise_psnr", round(base["noise"]["psnr"], 3), "uniform noise images")
    ctx.result("noise_ssim", round(base["noise"]["ssim"], 4), "the same, SSIM")

    plot_ray(model, data.test, near, far, ctx.figure("ray-samples.png", "one test ray: coarse samples and weights, "
                                                    "the fine samples drawn from them, the true surface"))

    # the novel-view orbit
    poses = orbit_poses(data, cfg.gif_frames, cfg.gif_elevation)
    from workbench.data.scenes import Views

    orbit_views = Views(torch.zeros(len(poses), data.test.height, data.test.width, 3), poses, data.test.focal)
    frames, depth = render_views(model, orbit_views, near, far, cfg.chunk)
    # (T, H, W, 3) in [0, 1] -> uint8 (T, 3, H, W), the GIF writer's layout
    gif = write_gif((frames.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 3, 1, 2),
                    ctx.run_dir / "novel-views.gif", fps=12, scale=4)
    show = frames[:: max(1, len(frames) // 8)][:8]
    image_grid(chw(show), len(show), ctx.figure("novel-views.png", f"novel views on an orbit at "
                                                f"{cfg.gif_elevation} degrees elevation (every "
                                                f"{max(1, len(frames) // 8)}th frame of {gif.name})"),
               title="novel views (orbit)")
    ctx.result("novel_view_gif", gif.name, f"{len(frames)} frames on an orbit no training camera lies on")
    ctx.result("parameters", params, f"{cfg.flavor} flavor, coarse + fine networks")
    ctx.result("train_seconds", round(seconds, 1), f"ctx.fit wall time on {ctx.device}, validation included")
    ctx.result("scene", data.name, data.source)


TASKS = {"nerf": Task(config=Config, run=run)}


# ----------------------------------------------------------------------------------------------------
# Loading a finished run (the eval)


@dataclass
class NerfRun:
    """A trained run: its model (coarse + fine), task config, seed, source; `data()` re-renders its scene."""

    model: object
    cfg: Config
    seed: int
    source: dict
    job: object = None
    _data: object = field(default=None, repr=False)

    def data(self):
        if self._data is None:
            self._data = load_data(self.cfg, self.seed)
        return self._data

    def render(self, views) -> tuple[Tensor, Tensor]:
        """rgb (N, H, W, 3) in [0, 1] and depth (N, H, W) of the poses of `views` (a workbench.data.scenes.Views)."""
        d = self.data()
        return render_views(self.model, views, d.near, d.far, self.cfg.chunk)


def is_nerf_run(path: str | Path) -> bool:
    """Whether `path` (a run folder or one of its checkpoints) holds a `workbench nerf` run."""
    from workbench.train.fundamentals.runner import is_task_run

    return is_task_run(path, ("nerf",))


def load_run(ckpt: str | Path, device: torch.device | str = "cpu") -> NerfRun:
    """The model of a nerf run folder (its newest complete checkpoint) or checkpoint, verified first."""
    from workbench.train.fundamentals.runner import load_task_checkpoint

    ck = load_task_checkpoint(ckpt, ("nerf",))
    cfg = ck.job.task.config
    model = build_model(cfg)
    ck.load_into(model)
    return NerfRun(model=model.to(device).eval(), cfg=cfg, seed=ck.job.run.seed, job=ck.job, source=ck.source)
