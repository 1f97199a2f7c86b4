"""The noise schedules of workbench.models.diffusion.schedulers, drawn: abar_t and log-SNR per beta schedule, and
the inference timesteps each spacing picks; and the samplers on a 2-D toy with its exact denoiser.

    python benchmarks/sd_schedules.py      # docs/images/stable-diffusion/schedules.png and toy-sampling.png

The toy: data uniform on 8 points of a circle, for which E[x0 | x_t] is a softmax-weighted mean of the points
(tests/unit/test_diffusion_samplers.py checks the same thing); DDIM (eta 0), DDPM and DDIM with classifier-free
guidance towards 3 of the points (w = 3), 20 / 100 / 20 steps of SD's schedule, from the same noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from workbench.models.diffusion.schedulers import DDIMSampler, ScheduleConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/images/stable-diffusion/schedules.png")
    ap.add_argument("--toy-out", default="docs/images/stable-diffusion/toy-sampling.png")
    ap.add_argument("--steps", type=int, default=10, help="inference steps for the spacing panel")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = {
        "linear 1e-4..0.02 (DDPM)": ScheduleConfig(beta_start=1e-4, beta_end=0.02, beta_schedule="linear"),
        "scaled_linear 0.00085..0.012 (SD)": ScheduleConfig(),
        "squaredcos_cap_v2 (cosine)": ScheduleConfig(beta_schedule="squaredcos_cap_v2"),
        "SD, zero terminal SNR": ScheduleConfig(rescale_betas_zero_snr=True),
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    t = torch.arange(1000)
    for name, cfg in schedules.items():
        abar = DDIMSampler(cfg).alphas_cumprod.double()
        axes[0].plot(t, abar, label=name)
        axes[1].plot(t, (abar / (1 - abar)).log(), label=name)
    axes[0].set(title="abar_t (signal kept in x_t)", xlabel="t")
    axes[1].set(title="log SNR = log(abar / (1 - abar))", xlabel="t")
    axes[0].legend(fontsize=8)
    for row, spacing in enumerate(("leading", "trailing", "linspace")):
        offset = 1 if spacing == "leading" else 0
        s = DDIMSampler(ScheduleConfig(timestep_spacing=spacing, steps_offset=offset))
        ts = s.set_timesteps(args.steps)
        axes[2].scatter(ts, [row] * len(ts), s=18)
    axes[2].set(title=f"{args.steps} inference timesteps", xlabel="t", yticks=[0, 1, 2],
                yticklabels=["leading (+1)", "trailing", "linspace"], xlim=(-20, 1020))
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(args.out)
    toy(args.toy_out, plt)


def exact_eps(points: torch.Tensor, abar_of):
    """eps(x_t, t) of the exact denoiser for data uniform on `points` (N, 2)."""

    def model(x, t):
        abar = abar_of(int(t)).double()
        d = ((x[:, None, :] - abar.sqrt() * points[None]) ** 2).sum(-1)  # (B, N)
        x0 = torch.softmax(-d / (2 * (1 - abar)), dim=1) @ points
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    return model


def toy(out: str, plt) -> None:
    from workbench.models.diffusion.pipeline import cfg_predict
    from workbench.models.diffusion.schedulers import DDPMSampler

    angles = torch.arange(8, dtype=torch.float64) * (2 * torch.pi / 8)
    points = torch.stack([angles.cos(), angles.sin()], dim=1) * 2.0  # (8, 2)
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # x_T ~ N(0, I)
    cfg = ScheduleConfig(set_alpha_to_one=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, (title, sampler, steps, guided) in zip(axes, (("DDIM, eta 0, 20 steps", DDIMSampler(cfg), 20, False),
                                                          ("DDPM, 100 steps", DDPMSampler(cfg), 100, False),
                                                          ("DDIM + CFG w=3 towards 3 points", DDIMSampler(cfg), 20, True))):
        abar_of = sampler.alphas_cumprod.__getitem__
        uncond = exact_eps(points, abar_of)
        if guided:
            cond = exact_eps(points[:3], abar_of)

            def stand(xx, t, context, cond=cond, uncond=uncond):  # a UNet stand-in: the context's sign picks
                return torch.where(context[:, :1] > 0, cond(xx, t), uncond(xx, t))

            ones = torch.ones(len(x), 1, dtype=torch.float64)
            predict = cfg_predict(stand, ones, -ones, 3.0)
        else:
            predict = uncond
        path = [x]
        timesteps = sampler.set_timesteps(steps)
        xt = x
        g = torch.Generator().manual_seed(1)
        for t in timesteps:
            xt = sampler.step(predict(xt, t), t, xt, generator=g).prev_sample
            path.append(xt)
        path = torch.stack(path)  # (steps + 1, B, 2)
        for b in range(40):
            ax.plot(path[:, b, 0], path[:, b, 1], color="0.7", lw=0.6)
        ax.scatter(x[:, 0], x[:, 1], s=3, color="tab:blue", alpha=0.3, label="x_T (noise)")
        ax.scatter(path[-1, :, 0], path[-1, :, 1], s=8, color="tab:red", label="x_0 (samples)")
        ax.scatter(points[:, 0], points[:, 1], s=90, facecolors="none", edgecolors="k", label="data")
        if guided:
            ax.scatter(points[:3, 0], points[:3, 1], s=160, facecolors="none", edgecolors="tab:green", lw=2,
                       label="the guided class")
        ax.set(title=title, xlim=(-4, 4), ylim=(-4, 4), aspect="equal")
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(out)


if __name__ == "__main__":
    main()
