"""The samplers and guidance against an exact denoiser, beyond parity with diffusers.

For data that is a finite set of points {x_i}, the optimal denoiser is known in closed form:
    E[x0 | x_t] = sum_i w_i x_i,  w = softmax_i(-||x_t - sqrt(abar_t) x_i||^2 / (2 (1 - abar_t)))
so a sampler fed it must carry pure noise onto the data points. This checks the whole reverse process
(timesteps, abar bookkeeping, each prediction type's inversion, CFG's batching and mix), not only one step."""

import pytest
import torch

from workbench.models.diffusion import schedulers as sch
from workbench.models.diffusion.pipeline import cfg_predict, denoise

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def exact_model(points: torch.Tensor, schedule: sch.NoiseSchedule, kind: str):
    """model(x_t, t) -> the exact epsilon / v / x0 prediction for data uniform on `points` (N, D)."""

    def model(x, t):
        abar = schedule.alphas_cumprod[int(t)].double()
        d = ((x[:, None, :] - abar.sqrt() * points[None]) ** 2).sum(-1)  # (B, N)
        w = torch.softmax(-d / (2 * (1 - abar)), dim=1)
        x0 = w @ points  # (B, D)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return {"epsilon": eps, "sample": x0, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[kind]

    return model


def nearest(x: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(x, points)
    return d.min(dim=1).values, d.argmin(dim=1)


@pytest.mark.parametrize("sampler,spacing,steps,zero_snr", [
    ("ddim", "leading", 50, False), ("ddim", "trailing", 30, False), ("ddim", "linspace", 30, False),
    ("ddim", "trailing", 30, True), ("ddpm", "leading", 100, False), ("ddpm", "trailing", 100, True),
])
def test_sampler_with_the_exact_denoiser_lands_on_the_data(sampler, spacing, steps, zero_snr):
    """Pure noise ends on the data points; and the epsilon, v and x0 parameterisations of the same exact denoiser
    give the same trajectory (each step inverts its prediction type correctly). Zero terminal SNR has
    abar_T = 0, where epsilon cannot give x0: there v and x0 are compared."""
    g = torch.Generator().manual_seed(0)
    points = torch.randn(6, 16, generator=g, dtype=torch.float64).sign()  # six +-1 "images" of 16 pixels
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    outs = {}
    for kind in (("v_prediction", "sample") if zero_snr else ("epsilon", "v_prediction", "sample")):
        cfg = sch.ScheduleConfig(prediction_type=kind, timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr,
                                 steps_offset=1 if spacing == "leading" else 0, set_alpha_to_one=spacing != "leading")
        s = sch.make_sampler(sampler, cfg)
        outs[kind] = denoise(exact_model(points, s, kind), s, steps, x, eta=0.5,
                             generator=torch.Generator().manual_seed(3))
    first, out = next(iter(outs)), next(iter(outs.values()))
    for kind, o in outs.items():
        # (the schedule is float32, as diffusers keeps it: its scalars round at ~1e-7 differently per kind)
        torch.testing.assert_close(o, out, atol=1e-5, rtol=0, msg=f"{kind} vs {first}")
    dist, which = nearest(out, points)
    # SD's DDIM ends at abar_0 < 1 (set_alpha_to_one = False): a residual noise of norm ~ sqrt(D (1 - abar_0))
    end = 1.0 if sampler == "ddpm" else float(s.final_alpha_cumprod)
    assert dist.max() < 0.05 + 2 * (16 * (1 - end)) ** 0.5, dist.max()
    assert len(set(which.tolist())) >= 4  # samples spread over the data, not collapsed onto one point
    # the noise it started from is far from every point: the sampler moved it there
    assert nearest(x, points)[0].min() > 1.0


def test_classifier_free_guidance_selects_the_class():
    """cond = the exact denoiser of class 1's points, uncond = of all points; with w = 4 every DDIM sample lands
    on a class-1 point (without guidance, w = 0 gives the unconditional model: both classes)."""
    g = torch.Generator().manual_seed(1)
    points = torch.randn(8, 16, generator=g, dtype=torch.float64).sign()
    cls1 = points[:3]
    s = sch.DDIMSampler(sch.ScheduleConfig(set_alpha_to_one=True))
    cond_model, uncond_model = exact_model(cls1, s, "epsilon"), exact_model(points, s, "epsilon")

    class TwoModels:  # a stand-in UNet: the context says which half of the batch is conditional
        def __call__(self, x, t, context):
            return torch.where(context[:, :1] > 0, cond_model(x, t), uncond_model(x, t))

    B = 64
    cond, uncond = torch.ones(B, 1, dtype=torch.float64), -torch.ones(B, 1, dtype=torch.float64)
    for w, want_class1_only in ((4.0, True), (0.0, False)):
        x = torch.randn(B, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        out = denoise(cfg_predict(TwoModels(), cond, uncond, w) if w > 1 else (lambda x, t: uncond_model(x, t)), s, 50, x)
        dist, which = nearest(out, points)
        assert dist.max() < 0.05
        assert (which < 3).all() == want_class1_only
