"""PSNR and SSIM of a `workbench nerf` run's held-out views, beside a second correct render, the mean colour and noise.

    workbench eval --task nerf --ckpt runs/nerf-shapes [--nerf.split test] [--nerf.margin_db 3]

What it measures
    The run's model renders every view of the split (test by default: poses no training image was taken
    from), deterministically (no jitter, no sigma noise), and each render is compared with the true image:
        psnr   10 log10(1 / MSE) in dB per view, averaged (evals/image_metrics.psnr);
        ssim   the structural similarity per view (11x11 Gaussian window, sigma 1.5), averaged
               (evals/image_metrics.ssim; equal to skimage's, tested).

References (each computed the same way against the same true images)
    real         a second, independent, correct image of the same view. For a scene the project renders
                 (workbench/data/scenes.py), the scene re-rendered from its geometry with `real_supersample`
                 rays per pixel side (4 by default, where the truth averaged 2 x 2): a better integral of the
                 same pixels, which differs from the truth only at edges, by the truth's own anti-aliasing
                 error. That is the level at which "matches the truth" stops meaning anything: a model this
                 close is as close as two correct renderers are to each other. (`real_supersample = 1`, one
                 ray through each pixel centre, is a weaker reference that a NeRF can beat, having learnt the
                 averaged pixels; docs/nerf.md gives both.) For a loaded Blender folder (no geometry): the
                 truth resampled to half size and back (bilinear), what losing half the resolution costs.
    mean_colour  the training images' mean colour everywhere: the best image that knows nothing of the scene's
                 layout (what a NeRF that learnt only the average would render).
    noise        uniform random pixels: the worst.
    The model's figure counts (`beats_baselines` = 1) when its PSNR exceeds both the mean colour's and noise's
    by `margin_db` and its SSIM exceeds both by `margin_ssim`; tests check real >> mean colour > noise on a
    rendered scene, so the scale is validated on real held-out data and on noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from evals.image_metrics import psnr, ssim
from evals.registry import EvalContext, TaskResult
from workbench.config import field_
from workbench.errors import WorkbenchError
from workbench.train.nerf import chw


@dataclass
class Config:
    split: Literal["test", "val"] = field_("test", doc="the held-out views to render")
    real_supersample: int = field_(4, gt=0, doc="rays per pixel side of the 'real' re-render (rendered scenes); the "
                                                "run's own supersample is refused: it would equal the truth")
    margin_db: float = field_(3.0, ge=0, doc="PSNR margin over the mean colour and noise for beats_baselines")
    margin_ssim: float = field_(0.1, ge=0, doc="SSIM margin over the mean colour and noise for beats_baselines")
    seed: int = field_(0, ge=0, doc="the noise images' seed")


def real_reference(data, views, supersample: int) -> tuple[torch.Tensor, str]:
    """(N, H, W, 3) second images of `views` and a sentence saying what they are (see the module notes)."""
    from workbench.data.scenes import render_views

    if data.scene is not None:
        images, _, _ = render_views(data.scene, views.poses, views.height, views.width, views.focal, supersample)
        return images, f"the scene re-rendered from its geometry with {supersample}x{supersample} ray(s) per pixel"
    x = chw(views.images)
    half = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True)
    back = F.interpolate(half, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return back.clamp(0, 1).permute(0, 2, 3, 1), "the true images resampled to half size and back (bilinear)"


class NerfEval:
    name = "nerf"
    description = ("PSNR and SSIM of a NeRF run's renders of held-out views, beside a second correct render of the "
                   "scene, the mean training colour and noise")
    Config = Config
    model_kind = "nerf"  # evals.runner loads a `workbench nerf` run (workbench.train.nerf.load_run)

    def run(self, ctx: EvalContext, cfg: Config) -> TaskResult:
        from workbench.train.fundamentals.plots import image_grid
        from workbench.train.nerf import NerfRun, baselines

        run = ctx.model if isinstance(ctx.model, NerfRun) else None
        if run is None:
            raise WorkbenchError("eval nerf: needs a `workbench nerf` run (--ckpt RUN_DIR)")
        data = run.data()
        if data.scene is not None and cfg.real_supersample == run.cfg.supersample:
            raise WorkbenchError(f"--nerf.real_supersample {cfg.real_supersample}: the run's truth is rendered with "
                                 f"it, so the 'real' reference would be the truth itself; choose another")
        views = getattr(data, cfg.split)
        truth = views.images
        ctx.log(f"eval nerf: rendering {len(views)} {cfg.split} views of {views.height}x{views.width} px")
        rgb, _ = run.render(views)
        p, s = psnr(chw(rgb), chw(truth)), ssim(chw(rgb), chw(truth))
        real, real_what = real_reference(data, views, cfg.real_supersample)
        refs = {"real": {"psnr": psnr(chw(real), chw(truth)).mean().item(),
                         "ssim": ssim(chw(real), chw(truth)).mean().item()}}
        refs |= baselines(data.train.images, truth, cfg.seed)
        metrics = {"psnr": p.mean().item(), "ssim": s.mean().item()}
        worst = {k: max(refs["mean_colour"][k], refs["noise"][k]) for k in ("psnr", "ssim")}
        metrics["beats_baselines"] = float(metrics["psnr"] >= worst["psnr"] + cfg.margin_db
                                           and metrics["ssim"] >= worst["ssim"] + cfg.margin_ssim)
        samples = [{"view": i, "psnr": round(float(a), 3), "ssim": round(float(b), 4),
                    "pose": views.poses[i].tolist()} for i, (a, b) in enumerate(zip(p, s))]
        grid = torch.stack([chw(truth), chw(rgb), chw(real)], 1).flatten(0, 1)
        image_grid(grid, 3, ctx.out_dir / "nerf-views.png",
                   title=f"{cfg.split} views: truth | NeRF render | real reference")
        return TaskResult(
            task=self.name, primary="psnr", metrics=metrics,
            baselines={"real (second render)": refs["real"]["psnr"], "mean training colour": refs["mean_colour"]["psnr"],
                       "uniform noise": refs["noise"]["psnr"]},
            n=len(views), samples=samples, plots=["nerf-views.png"],
            details={"references": refs, "real_reference": real_what, "split": cfg.split, "scene": data.summary(),
                     "margins": {"psnr_db": cfg.margin_db, "ssim": cfg.margin_ssim},
                     "per_view_psnr": [round(float(a), 3) for a in p]})


TASK = NerfEval()
