"""Stable Diffusion components vs diffusers / transformers on the tiny configs of models.md section 6 (fp32).

Each reference is built with random weights, its state dict goes through the checkpoint adapter
(`workbench.checkpoint.hf.diffusers_sd`) into the from-scratch component, and outputs are compared."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from workbench.checkpoint.hf import diffusers_sd as sd_io  # noqa: E402
from workbench.models.diffusion import unet as unet_mod  # noqa: E402

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (diffusers' defaults leave norms at 1/0; ours zero some convs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.1))


UNET_CASES = {
    # models.md's tiny UNet: a CrossAttn block with 1x1-conv projections, the cross-attention mid block
    "tiny-conv": dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                      attention_head_dim=2, norm_num_groups=8),
    # SD2-style: linear projections, per-block head counts, two transformer layers, a plain mid block
    "linear-proj": dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=3, out_channels=3,
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
                        transformer_layers_per_block=2, mid_block_type="UNetMidBlock2D", flip_sin_to_cos=False,
                        freq_shift=1),
    # no text at all: plain blocks, the self-attention mid block (pixel-space DDPM shape)
    "uncond": dict(block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=16, in_channels=3, out_channels=3,
                   down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                   mid_block_type="UNetMidBlock2D", attention_head_dim=8, norm_num_groups=8),
}


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_matches_diffusers(case):
    kw = UNET_CASES[case]
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**kw).eval()
    _randomize(ref, 1)
    cfg = sd_io.unet_config_from_diffusers(dict(ref.config))
    ours = unet_mod.UNet(cfg).eval()
    sd_io.load_into(ours, sd_io.unet_state_from_diffusers(ref.state_dict(), cfg), "unet")
    g = torch.Generator().manual_seed(2)
    C, S = kw["in_channels"], kw["sample_size"]
    # an odd size too (13): the up path then upsamples to the skip's size
    for (h, w) in ((S, S), (13, S // 2 + 2)):
        x = torch.randn(2, C, h, w, generator=g)
        t = torch.tensor([3, 917])
        ctx = torch.randn(2, 7, kw.get("cross_attention_dim", 8), generator=g)
        with torch.no_grad():
            want = ref(x, t, encoder_hidden_states=ctx).sample
            got = ours(x, t, ctx if cfg.uses_context else None)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # a scalar timestep is broadcast over the batch like diffusers does
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 500, ctx if cfg.uses_context else None),
                                   ref(x, 500, encoder_hidden_states=ctx).sample, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ schedulers

from workbench.models.diffusion import schedulers as sch  # noqa: E402

SCHED_CASES = [
    # Stable Diffusion's: scaled_linear, leading + offset 1, abar_0 past the end
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, set_alpha_to_one=False,
         clip_sample=False),
    dict(beta_schedule="linear", prediction_type="v_prediction", timestep_spacing="trailing",
         rescale_betas_zero_snr=True, clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", timestep_spacing="linspace"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
         clip_sample=True, clip_sample_range=0.5, num_train_timesteps=100),
]


def _run_both(ref, ours, steps, shape, eta=None, seed=0):
    """Step both samplers on the same fake model outputs; compare every step's x_prev and x0."""
    ref.set_timesteps(steps)
    ts = ours.set_timesteps(steps)
    assert ts.tolist() == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    xr = x.clone()
    gr, go = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    for t in ts:
        out = torch.randn(shape, generator=g)  # a stand-in for the network's prediction
        kw_r = dict(generator=gr) if eta is None else dict(eta=eta, generator=gr)
        kw_o = dict(generator=go) if eta is None else dict(eta=eta, generator=go)
        r = ref.step(out, t, xr, **kw_r)
        o = ours.step(out, t, x, **kw_o)
        torch.testing.assert_close(o.pred_original_sample, r.pred_original_sample, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(o.prev_sample, r.prev_sample, atol=1e-6, rtol=1e-5)
        x, xr = o.prev_sample, r.prev_sample
    return x


@pytest.mark.parametrize("i", range(len(SCHED_CASES)))
def test_schedulers_match_diffusers_step_by_step(i):
    kw = SCHED_CASES[i]
    cfg = sd_io.schedule_config_from_diffusers(kw)
    ref_ddim, ours_ddim = diffusers.DDIMScheduler(**kw), sch.DDIMSampler(cfg)
    torch.testing.assert_close(ours_ddim.alphas_cumprod, ref_ddim.alphas_cumprod, atol=0, rtol=0)
    for steps, eta in ((10, 0.0), (7, 1.0), (25, 0.3)):
        _run_both(ref_ddim, ours_ddim, steps, (2, 3, 4, 4), eta=eta, seed=steps)
    ref_ddpm, ours_ddpm = diffusers.DDPMScheduler(**{k: v for k, v in kw.items() if k != "set_alpha_to_one"}), \
        sch.DDPMSampler(cfg)
    for steps in (10, 3):
        _run_both(ref_ddpm, ours_ddpm, steps, (2, 3, 4, 4), seed=steps)
    # the forward process and the v target
    g = torch.Generator().manual_seed(i)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 17, cfg.num_train_timesteps // 2, cfg.num_train_timesteps - 1])
    torch.testing.assert_close(ours_ddim.add_noise(x0, noise, t), ref_ddim.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_ddim.velocity(x0, noise, t), ref_ddim.get_velocity(x0, noise, t), atol=1e-6, rtol=0)


def test_ddpm_fixed_large_and_full_chain():
    """variance_type fixed_large, and the un-strided 1000-step chain's last steps (t = 2, 1, 0)."""
    kw = dict(variance_type="fixed_large", beta_schedule="linear")
    ref, ours = diffusers.DDPMScheduler(**kw), sch.DDPMSampler(sch.ScheduleConfig(**{**sd_io._SCHEDULER_DEFAULTS, **kw}))
    _run_both(ref, ours, 1000, (1, 1, 2, 2), seed=3)


def test_diffusion_loss_targets():
    """The loss regresses the right target: zero exactly at it, and v = sqrt(abar) eps - sqrt(1-abar) x0."""
    sched = sch.NoiseSchedule(sch.FLAVORS["sd15"])
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 500, 999])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    assert sch.diffusion_loss(noise, x0, noise, t, "epsilon") == 0
    assert sch.diffusion_loss(x0, x0, noise, t, "sample") == 0
    assert sch.diffusion_loss(v, x0, noise, t, "v_prediction", sched) < 1e-12
    assert sch.diffusion_loss(noise, x0, noise, t, "v_prediction", sched) > 0.1
    torch.testing.assert_close(sch.diffusion_loss(torch.zeros_like(x0), x0, noise, t, "epsilon"), noise.pow(2).mean())
    with pytest.raises(ValueError, match="needs the schedule"):
        sch.diffusion_loss(v, x0, noise, t, "v_prediction")
    # a DDIM step with the exact eps of a noised x0 recovers x0 as its prediction (epsilon and v models)
    for kind in ("epsilon", "v_prediction"):
        s = sch.DDIMSampler(sch.ScheduleConfig(prediction_type=kind))
        s.set_timesteps(10)
        tt = int(s.timesteps[3])
        xt = s.add_noise(x0, noise, torch.tensor([tt]))
        out = noise if kind == "epsilon" else s.velocity(x0, noise, torch.tensor([tt]))
        torch.testing.assert_close(s.step(out, tt, xt).pred_original_sample, x0, atol=1e-4, rtol=0)
