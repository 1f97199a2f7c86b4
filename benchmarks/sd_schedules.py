"""The noise schedules of workbench.models.diffusion.schedulers, drawn: abar_t and log-SNR per beta schedule, and
the inference timesteps each spacing picks.

    python benchmarks/sd_schedules.py --out docs/images/stable-diffusion/schedules.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from workbench.models.diffusion.schedulers import DDIMSampler, ScheduleConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/images/stable-diffusion/schedules.png")
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


if __name__ == "__main__":
    main()
