"""Stable Diffusion 1.5-sized components against diffusers / transformers on the same random weights, and CPU speed.

    python benchmarks/sd_parity.py                 # the figures of docs/stable-diffusion.md (SD 1.5 sizes)
    python benchmarks/sd_parity.py --smoke         # the tiny "debug" flavors, seconds

Parity: diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel built at SD 1.5's
published sizes with random weights (seeded), their state dicts imported through
`workbench.checkpoint.hf.diffusers_sd` into the from-scratch models *sharing the same tensors* (so one copy of
the weights is in memory); max |ours - reference| for the UNet's noise prediction (B=2, latent --latent px,
77-token context), the VAE's posterior mean / std and decode, and CLIP's last_hidden_state, in float32 and
float64.

Pipeline: a tiny StableDiffusionPipeline (random components, an own CLIP BPE vocabulary) saved to a folder and
sampled by diffusers and by `sample_from` for the same seeds, DDIM (eta 0 and 1) and DDPM: max |image
difference| before and after 8-bit quantisation.

Speed: one UNet forward (the unit of a sampling step with CFG: batch 2), ours against diffusers, interleaved,
median of --reps, on --threads CPU threads.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from workbench.checkpoint.hf import diffusers_sd as sd_io
from workbench.models.diffusion import autoencoder, text_encoder, unet


def _share(model_cls, cfg, sd):
    """Our model on meta, then the reference's tensors assigned (no copy)."""
    with torch.device("meta"):
        ours = model_cls(cfg)
    ours.load_state_dict(sd, strict=True, assign=True)
    return ours.eval()


def _diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def unet_check(smoke: bool, latent: int, threads: int, reps: int) -> list[str]:
    import diffusers

    torch.manual_seed(0)
    if smoke:
        ref = diffusers.UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
                                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    else:
        ref = diffusers.UNet2DConditionModel(cross_attention_dim=768)  # SD 1.x (the other defaults are its values)
    ref.eval()
    cfg = sd_io.unet_config_from_diffusers(dict(ref.config))
    ours = _share(unet.UNet, cfg, sd_io.unet_state_from_diffusers(ref.state_dict()))
    n_params = sum(p.numel() for p in ours.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, latent, latent, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([981, 981])
    rows = []
    with torch.no_grad():
        want, got = ref(x, t, encoder_hidden_states=ctx).sample, ours(x, t, ctx)
        rows.append(f"| UNet ({n_params / 1e6:.0f}M), eps at {latent}x{latent} latents | float32 | {_diff(got, want):.2e} "
                    f"| {want.abs().max().item():.2f} |")
        times = {"ours": [], "diffusers": []}
        torch.set_num_threads(threads)
        for _ in range(reps):
            for name in ("ours", "diffusers"):
                t0 = time.perf_counter()
                ours(x, t, ctx) if name == "ours" else ref(x, t, encoder_hidden_states=ctx)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(f"| UNet forward, batch 2, {latent}x{latent}, {threads} thread(s), median of {reps} | ours "
                    f"{med['ours'] * 1e3:.0f} ms | diffusers {med['diffusers'] * 1e3:.0f} ms | "
                    f"ratio {med['ours'] / med['diffusers']:.2f} |")
        ref.double()  # ours shares the tensors... until .double() replaces them: re-share
        ours = _share(unet.UNet, cfg, sd_io.unet_state_from_diffusers(ref.state_dict()))
        want, got = ref(x.double(), t, encoder_hidden_states=ctx.double()).sample, ours(x.double(), t, ctx.double())
        rows.append(f"| UNet, eps at {latent}x{latent} latents | float64 | {_diff(got, want):.2e} | |")
    del ref, ours
    gc.collect()
    return rows


def vae_check(smoke: bool, size: int) -> list[str]:
    import diffusers

    torch.manual_seed(0)
    if smoke:
        kw = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2)
    else:  # SD 1.x's VAE
        kw = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, sample_size=512)
    rows = []
    for dtype in (torch.float32, torch.float64):
        ref = diffusers.AutoencoderKL(latent_channels=4, **kw).eval().to(dtype)
        cfg = sd_io.vae_config_from_diffusers(dict(ref.config))
        ours = _share(autoencoder.AutoencoderKL, cfg, sd_io.vae_state_from_diffusers(ref.state_dict()))
        g = torch.Generator().manual_seed(2)
        x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(dtype)
        z = torch.randn(1, 4, size // cfg.downscale, size // cfg.downscale, generator=g).to(dtype)
        with torch.no_grad():
            want, got = ref.encode(x).latent_dist, ours.encode(x)
            name = str(dtype).removeprefix("torch.")
            rows.append(f"| VAE posterior mean / std, {size}x{size} image | {name} | {_diff(got.mean, want.mean):.2e} / "
                        f"{_diff(got.std, want.std):.2e} | {want.mean.abs().max().item():.2f} |")
            want_x = ref.decode(z).sample
            rows.append(f"| VAE decode, {z.shape[-1]}x{z.shape[-1]} latents | {name} | {_diff(ours.decode(z), want_x):.2e} "
                        f"| {want_x.abs().max().item():.2f} |")
        del ref, ours
        gc.collect()
    return rows


def clip_check(smoke: bool) -> list[str]:
    import transformers

    kw = (dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, vocab_size=1000)
          if smoke else dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             vocab_size=49408, eos_token_id=2))  # ViT-L/14's text tower as SD 1.x ships it
    rows = []
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kw, attn_implementation="eager")).eval().to(dtype)
        cfg = sd_io.text_config_from_hf(ref.config.to_dict())
        ours = _share(text_encoder.CLIPTextModel, cfg, sd_io.text_state_from_hf(ref.state_dict()))
        ids = torch.randint(0, cfg.vocab_size - 2, (2, 77), generator=torch.Generator().manual_seed(3))
        ids[:, 0], ids[0, 12:], ids[1, 40:] = cfg.vocab_size - 2, cfg.vocab_size - 1, cfg.vocab_size - 1
        with torch.no_grad():
            want = ref(ids).last_hidden_state
            got = ours(ids)["last_hidden_state"]
        rows.append(f"| CLIP text last_hidden_state (2 x 77 tokens) | {str(dtype).removeprefix('torch.')} | "
                    f"{_diff(got, want):.2e} | {want.abs().max().item():.2f} |")
        del ref, ours
        gc.collect()
    return rows


def pipeline_check(steps: int = 4) -> list[str]:
    """A tiny StableDiffusionPipeline saved to a temporary folder (as tests/integration/test_sample_cli.py builds
    it), sampled by diffusers and by `sample_from` with the same seed: max |difference| of the float images and
    of the 8-bit ones."""
    import tempfile

    import diffusers
    import numpy as np
    import transformers

    from workbench.models.diffusion import clip_tokenizer as ct
    from workbench.models.diffusion.pipeline import sample_from, to_uint8

    root = Path(tempfile.mkdtemp())
    vocab, merges = ct.learn_bpe(["a photograph of an astronaut riding a horse", "blurry, low quality"], 100)
    ct.save_vocab(root / "tok", vocab, merges)
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
                                            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32),
        vae=diffusers.AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                                    up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, vocab_size=1000,
            bos_token_id=vocab[ct.BOS], eos_token_id=vocab[ct.EOS], pad_token_id=vocab[ct.EOS])),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tok"),
        scheduler=diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger output convs than the default init, so the image depends on the latents
        for m in (pipe.unet, pipe.vae):
            for name, p in m.named_parameters():
                if p.ndim > 1 and "conv_out" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pipe.save_pretrained(root / "sd")
    pipe.set_progress_bar_config(disable=True)
    comps = sd_io.load_sd_dir(root / "sd")
    rows, first = [], None
    for sched, eta, guidance in (("ddim", 0.0, 7.5), ("ddim", 1.0, 7.5), ("ddpm", 0.0, 3.0)):
        pipe.scheduler = (diffusers.DDIMScheduler if sched == "ddim" else diffusers.DDPMScheduler).from_config(
            pipe.scheduler.config)
        for seed in range(3):
            kw = dict(eta=eta) if sched == "ddim" else {}
            want = pipe("a photograph of an astronaut riding a horse", num_inference_steps=steps, guidance_scale=guidance,
                        generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).images[0]
            got = sample_from(comps, "a photograph of an astronaut riding a horse", steps=steps, guidance=guidance,
                              seed=seed, scheduler=sched, eta=eta)[0]
            first = got if first is None else first
            u8 = np.abs(to_uint8(got[None])[0].astype(int) - (want * 255).round().astype(int)).max()
            rows.append(f"| tiny pipeline 64x64, {sched} eta={eta}, w={guidance}, {steps} steps, seed {seed} | float32 | "
                        f"{np.abs(got.numpy() - want).max():.2e} (uint8: {u8}) | {want.std():.2f} / {((want > 0.01) & (want < 0.99)).mean():.0%} |")
    rows.append(f"| (for scale: the last image against the first, another seed and sampler) | | "
                f"{np.abs(got.numpy() - first.numpy()).max():.2e} | |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configs")
    ap.add_argument("--latent", type=int, default=32, help="UNet latent side (64 = 512 px images)")
    ap.add_argument("--image", type=int, default=128, help="VAE image side")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = ["| what | dtype | max abs diff | max abs value (pipeline: image std / unclamped pixels) |",
            "|---|---|---|---|"]
    rows += clip_check(args.smoke)
    rows += vae_check(args.smoke, args.image if not args.smoke else 32)
    rows += pipeline_check()
    rows += unet_check(args.smoke, args.latent if not args.smoke else 16, args.threads, args.reps)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
