"""Rectified flow for the AsymmDiT (workbench.models.video.flow): the noising and velocity convention, Mochi's
linear-quadratic schedule (genmo's formula and diffusers' scheduler), Euler steps, the loss sign, and
classifier-free guidance."""

import pytest
import torch

from workbench.models.video import flow, mochi

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def genmo_linear_quadratic(num_steps, threshold_noise, linear_steps=None):
    """genmo's infer.py schedule, restated from its text (u rises linearly to tau over the first half, then
    quadratically to 1); returns the num_steps noise levels 1 - u."""
    m = num_steps // 2 if linear_steps is None else linear_steps
    lin = [i * threshold_noise / m for i in range(m)]
    diff = m - threshold_noise * num_steps
    q = num_steps - m
    a = diff / (m * q ** 2)
    b = threshold_noise / m - 2 * diff / q ** 2
    c = a * m ** 2
    return [1.0 - u for u in lin + [a * i ** 2 + b * i + c for i in range(m, num_steps)]]


class Oracle(torch.nn.Module):
    """Knows the data x0: returns the exact velocity x0 - eps of the straight path through z (a delta target)."""

    def __init__(self, x0, sign=1.0):
        super().__init__()
        self.x0, self.sign = x0, sign
        self.w = torch.nn.Parameter(torch.zeros(()))  # sample() reads the model dtype from a parameter

    def forward(self, z, sigma, text, mask):
        s = sigma.view(-1, 1, 1, 1, 1)
        eps = (z - (1 - s) * self.x0) / s  # z = (1 - s) x0 + s eps
        return self.sign * (self.x0 - eps)


@pytest.mark.parametrize("steps", [2, 3, 8, 28, 64])
def test_linear_quadratic_matches_genmo_and_diffusers(steps):
    ours = flow.sigma_schedule(steps)
    assert ours.shape == (steps + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
    assert (ours[1:] < ours[:-1]).all()
    torch.testing.assert_close(ours[:-1], torch.tensor(genmo_linear_quadratic(steps, 0.025), dtype=torch.float64))
    # the first half is linear down to 1 - tau
    torch.testing.assert_close(ours[steps // 2], torch.tensor(1 - 0.025, dtype=torch.float64))
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

    torch.testing.assert_close(ours[:-1], torch.tensor(linear_quadratic_schedule(steps, 0.025), dtype=torch.float64))
    # Mochi's scheduler config inverts sigmas: its sigmas are 1 - ours (float32), its timesteps 1000 (1 - sigma)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True, shift=1.0)
    sched.set_timesteps(sigmas=linear_quadratic_schedule(steps, 0.025))
    torch.testing.assert_close(1 - sched.sigmas.double(), ours, atol=1e-7, rtol=0)
    torch.testing.assert_close(sched.timesteps.double(), 1000 * (1 - ours[:-1]), atol=1e-4, rtol=0)


def test_linear_schedule_and_errors():
    torch.testing.assert_close(flow.sigma_schedule(4, "linear"), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0],
                                                                              dtype=torch.float64))
    assert flow.sigma_schedule(1).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="kind"):
        flow.sigma_schedule(4, "cosine")
    with pytest.raises(ValueError, match="steps"):
        flow.sigma_schedule(0)


def test_euler_step_matches_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

    sched = diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True, shift=1.0)
    sched.set_timesteps(sigmas=linear_quadratic_schedule(6, 0.025))
    sigmas = flow.sigma_schedule(6)
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(1, 2, 3, 4, 4, generator=g), torch.randn(1, 2, 3, 4, 4, generator=g)
    for i, t in enumerate(sched.timesteps[:3]):
        want = sched.step(v, t, z, return_dict=False)[0]
        # z_{i+1} = z_i + (sigma_i - sigma_{i+1}) v
        got = z + float(sigmas[i] - sigmas[i + 1]) * v
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        z = want


def test_one_euler_step_by_hand():
    """A model returning a constant velocity c: one step from sigma 1 to sigma_1 moves z by (1 - sigma_1) c."""

    class Const(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.full((), 0.5))

        def forward(self, z, sigma, text, mask):
            assert torch.all(sigma == 1.0)  # the first step is at pure noise
            return torch.full_like(z, 0.5)

    noise = torch.randn(1, 2, 1, 2, 2)
    text, mask = torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool)
    # one step of any schedule goes from sigma 1 to 0
    z = flow.sample(Const(), noise.shape, text, mask, steps=1, guidance=1.0, noise=noise)
    torch.testing.assert_close(z, noise + 1.0 * 0.5)


def test_sampling_with_the_exact_velocity_lands_on_the_data():
    x0 = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    text, mask = torch.zeros(2, 1, 4), torch.ones(2, 1, dtype=torch.bool)
    for steps, kind in ((5, "linear"), (12, "linear_quadratic")):
        z = flow.sample(Oracle(x0), x0.shape, text, mask, steps=steps, guidance=1.0, schedule=kind,
                        generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(z, x0, atol=1e-4, rtol=0)  # straight paths: Euler is exact
    # the opposite velocity sign (SD3's eps - x0) goes the wrong way
    z = flow.sample(Oracle(x0, sign=-1.0), x0.shape, text, mask, steps=5, guidance=1.0, schedule="linear")
    assert (z - x0).abs().max() > 1.0


def test_flow_loss_sign_and_token_slices():
    x0 = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    text, mask = torch.zeros(2, 1, 4), torch.ones(2, 1, dtype=torch.bool)
    g = torch.Generator().manual_seed(4)
    assert flow.flow_loss(Oracle(x0), x0, text, mask, g) < 1e-10  # the target is x0 - eps
    assert flow.flow_loss(Oracle(x0, sign=-1.0), x0, text, mask, g) > 1.0
    # z_sigma = (1 - sigma) x0 + sigma eps
    eps = torch.randn_like(x0)
    torch.testing.assert_close(flow.noisy(x0, eps, torch.tensor([0.0, 1.0])), torch.stack([x0[0], eps[1]]))
    # with token_range the slices' losses (sum / global count) add up to the mean: a per-token model
    model = mochi.AsymmDiT(mochi.Config(in_channels=3, patch_size=2, dim=16, text_width=8, n_layers=1, n_heads=2,
                                        head_dim=8, text_dim=4, pool_heads=2, time_embed_dim=8))
    model.init_weights()
    with torch.no_grad():
        model.final.proj.bias.normal_()  # a nonzero, per-token output (a one-block model with zero gates)
    sigma = torch.tensor([0.2, 0.7])
    full = flow.flow_loss(model, x0, text, mask, sigma=sigma, eps=eps)
    parts = [flow.flow_loss(model, x0, text, mask, sigma=sigma, eps=eps, token_range=r) for r in ((0, 3), (3, 8))]
    torch.testing.assert_close(sum(parts), full)


def test_cfg_is_one_batched_pass_and_guidance_one_is_conditional():
    cfg = mochi.FLAVORS["debug"]
    model = mochi.AsymmDiT(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(5)
    shape = (2, 4, 2, 4, 4)
    text, mask = torch.randn(2, 3, 16, generator=g), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    null, null_mask = torch.randn(1, 1, 16, generator=g), torch.ones(1, 1, dtype=torch.bool)
    noise = torch.randn(shape, generator=g)
    cond = flow.sample(model, shape, text, mask, None, None, steps=3, guidance=1.0, noise=noise)
    same = flow.sample(model, shape, text, mask, null, null_mask, steps=3, guidance=1.0, noise=noise)
    assert torch.equal(cond, same)  # guidance 1 skips the unconditional pass
    # one guided step by hand: v = v_u + w (v_c - v_u), both passes separately
    w = 3.0
    got = flow.sample(model, shape, text, mask, null, null_mask, steps=1, guidance=w, noise=noise)
    with torch.no_grad():
        s = torch.ones(2)
        v_c = model(noise, s, text, mask)
        v_u = model(noise, s, null.expand(2, -1, -1), null_mask.expand(2, -1))
    torch.testing.assert_close(got, noise + (v_u + w * (v_c - v_u)), atol=1e-5, rtol=0)
    assert (got - flow.sample(model, shape, text, mask, steps=1, guidance=1.0, noise=noise)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="null_text"):
        flow.sample(model, shape, text, mask, steps=1, guidance=2.0, noise=noise)
