"""Stable Diffusion components vs diffusers / transformers on the tiny configs of models.md section 6 (fp32).

Each reference is built with random weights, its state dict goes through the checkpoint adapter
(`workbench.checkpoint.hf.diffusers_sd`) into the from-scratch component, and outputs are compared."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from workbench.checkpoint.hf import diffusers_sd as sd_io  # noqa: E402
from workbench.models.diffusion import unet as unet_mod  # noqa: E402

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


# ------------------------------------------------------------------------------------------------ VAE

from workbench.models.diffusion import autoencoder as vae_mod  # noqa: E402

VAE_CASES = {
    # models.md's tiny VAE
    "tiny": dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4),
    # three levels, two layers per block, SD3-style scale + shift, no quant convs, no mid attention
    "deeper": dict(block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
                   up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=3, layers_per_block=2, norm_num_groups=4,
                   scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
                   mid_block_add_attention=False),
}


@pytest.mark.parametrize("case", list(VAE_CASES))
def test_autoencoder_matches_diffusers(case):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**VAE_CASES[case]).eval()
    _randomize(ref, 3)
    cfg = sd_io.vae_config_from_diffusers(dict(ref.config))
    ours = vae_mod.AutoencoderKL(cfg).eval()
    sd_io.load_into(ours, sd_io.vae_state_from_diffusers(ref.state_dict()), "vae")
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 16, 12, generator=g) * 2 - 1
    with torch.no_grad():
        want, got = ref.encode(x).latent_dist, ours.encode(x)
        torch.testing.assert_close(got.mean, want.mean, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.std, want.std, atol=ATOL, rtol=1e-5)
        # a posterior sample with the same generator seed draws the same noise
        torch.testing.assert_close(got.sample(torch.Generator().manual_seed(9)),
                                   want.sample(torch.Generator().manual_seed(9)), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(got.kl(), want.kl(), atol=1e-3, rtol=1e-5)
        z = torch.randn(2, cfg.latent_channels, 5, 7, generator=g)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=ATOL, rtol=0)
        # the scaled latent round trip applies scale and shift exactly once each way
        lat = ours.latents_from_images(x, sample=False)
        torch.testing.assert_close(lat, (want.mean - cfg.shift_factor) * cfg.scaling_factor, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.images_from_latents(lat), ref.decode(want.mean).sample, atol=1e-4, rtol=0)


def test_vae_pre_014_attention_names():
    """Older diffusers VAE files name the mid attention query/key/value/proj_attn (1x1-conv shaped here)."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**VAE_CASES["tiny"]).eval()
    sd = {}
    for k, v in ref.state_dict().items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
            if "mid_block.attentions.0" in k:
                k = k.replace(new, old)
        sd[k] = v[:, :, None, None] if v.ndim == 2 else v
    ours = vae_mod.AutoencoderKL(sd_io.vae_config_from_diffusers(dict(ref.config))).eval()
    sd_io.load_into(ours, sd_io.vae_state_from_diffusers(sd), "vae")
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ CLIP text

from workbench.models.diffusion import clip_tokenizer as ct  # noqa: E402
from workbench.models.diffusion import text_encoder as clip_mod  # noqa: E402


@pytest.mark.parametrize("eos", [2, 999])
def test_clip_text_model_matches_transformers(eos):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                         num_hidden_layers=5, vocab_size=1000, eos_token_id=eos,
                                         hidden_act="quick_gelu" if eos == 2 else "gelu", attn_implementation="eager")
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(hf_cfg).eval()
    _randomize(ref, 5)
    cfg = sd_io.text_config_from_hf(hf_cfg.to_dict())
    ours = clip_mod.CLIPTextModel(cfg).eval()
    sd_io.load_into(ours, sd_io.text_state_from_hf(ref.state_dict()), "text_encoder")
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 990, (3, 77), generator=g)
    ids[:, 0] = 998
    ids[0, 9:], ids[1, 30:] = 999, 999  # eos then eos-padding (SD 1.x); row 2 ends without one
    mask = (torch.arange(77)[None] < torch.tensor([[10], [31], [77]])).long()
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        got = ours(ids, output_hidden_states=True)
        torch.testing.assert_close(got["last_hidden_state"], want.last_hidden_state, atol=ATOL, rtol=0)
        torch.testing.assert_close(got["pooled"], want.pooler_output, atol=ATOL, rtol=0)
        for a, b in zip(got["hidden_states"], want.hidden_states):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        # with a padding mask: the real tokens agree (pad query rows are unspecified, see text_encoder.py)
        want_m = ref(ids, attention_mask=mask).last_hidden_state
        got_m = ours(ids, attention_mask=mask)["last_hidden_state"]
        real = mask.bool()
        torch.testing.assert_close(got_m[real], want_m[real], atol=ATOL, rtol=0)


CORPUS = ["a photograph of an astronaut riding a horse on the moon", "A painting of a red cube on a blue sphere, 4k!!",
          "it's the dog's toy; they're here and we've won", "café naïve déjà vu, über straße", "numbers 2024 and 3.14159",
          "a cat sitting on a mat", "the quick brown fox jumps over the lazy dog"]
PROMPTS = ["a photograph of an astronaut riding a horse", "  Hello,   WORLD!!  ", "it's 2024... can't stop",
           "naïve café 東京 🚀 emoji", "<|endoftext|> inside <|startoftext|>", "tab\tnew\nline\u00a0nbsp", "A's B'S",
           "don't'll 'sup ''quoted''", "3.14e-10 + ½ ² ٣", "Ǆ ǅ İstanbul ΣΊΣΥΦΟΣ", "", "   ", "x" * 300,
           "a very long prompt " * 40, "e\u0301 (combining accent, NFC)", "under_score-dash/slash\\back", "`~@#$%^&*()"]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_clip_tokenizer_matches_transformers(tmp_path, pad):
    transformers = pytest.importorskip("transformers")
    vocab, merges = ct.learn_bpe(CORPUS, 300)
    ct.save_vocab(tmp_path, vocab, merges, pad_token=pad)
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    ours = ct.CLIPTokenizer.from_dir(tmp_path)
    assert len(merges) > 100 and ours.pad_id == vocab[pad]
    assert max(ours.encode(PROMPTS[0])) >= 512  # merged symbols are used, not only single bytes
    for prompts in ([p] for p in PROMPTS):
        want = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        got = ours(prompts)
        assert got["input_ids"].tolist() == want.input_ids.tolist(), prompts
        assert got["attention_mask"].tolist() == want.attention_mask.tolist(), prompts
    # the batch form, and a folder written by transformers itself (tokenizer.json and friends)
    out = tmp_path / "resaved"
    ref.save_pretrained(out)
    again = ct.CLIPTokenizer.from_dir(out)
    torch.testing.assert_close(again(PROMPTS)["input_ids"], ref(PROMPTS, padding="max_length", max_length=77,
                                                               truncation=True, return_tensors="pt").input_ids)
