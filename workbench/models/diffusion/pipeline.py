"""Text-to-image sampling with classifier-free guidance: Stable Diffusion's pipeline.

What it is
    The loop that turns a prompt into an image with the four components (CLIP tokenizer and text encoder,
    UNet, VAE) and a sampler (schedulers.py), giving for the same seed the image diffusers'
    `StableDiffusionPipeline` gives (tests/integration/test_sample_cli.py states the tolerance).

The math
    c = CLIP(prompt), c_u = CLIP(negative prompt, "" by default)           (B, 77, D) each
    z_T ~ N(0, I) of shape (B, 4, H/f, W/f), times the sampler's init_noise_sigma (1 for DDPM/DDIM)
    for t in the N inference timesteps (descending):
        [e_u, e_c] = UNet([z_t, z_t], t, [c_u, c])                         one batch of 2B, uncond first
        e = e_u + w (e_c - e_u)                                            classifier-free guidance, w > 1
        (optional rescale, Lin et al. 2023:  e <- phi e std(e_c)/std(e) + (1 - phi) e)
        z_{t'} = sampler.step(e, t, z_t)
    x = VAE.decode(z_0 / scaling_factor + shift_factor);  image = round(255 clamp(x / 2 + 1/2, 0, 1))

The intuition
    The conditional and unconditional predictions differ by the direction the prompt pulls the sample;
    guidance extrapolates along it (w = 7.5 for SD), trading diversity for prompt fidelity. The
    unconditional branch is the same network fed the empty prompt: SD was trained with 10 % of
    captions dropped, which is what makes e_u meaningful.

Design choices
    The initial latents are drawn exactly as diffusers draws them: one `torch.randn` of shape (B, C, h, w)
    on the generator's device (`schedulers.randn`), before any sampler noise, from
    `torch.Generator(device).manual_seed(seed)`; DDIM with eta > 0 and DDPM then draw their step noise
    from the same generator in the same order. The loop is `denoise(predict, sampler, ...)` over any
    `predict(x, t) -> model_out`, so a class-conditioned or unconditional model (part D's `--ckpt`)
    reuses it with its own `predict`; `cfg_predict` builds the guided one for a UNet and two contexts.
    `height`/`width` must be multiples of 8 like diffusers' check (and of the VAE's factor).

Sources
    Ho & Salimans, "Classifier-Free Diffusion Guidance" (2207.12598); Lin et al. (2305.08891, rescale);
    diffusers pipeline_stable_diffusion.py and image_processor.py (read, not copied).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from workbench.models.diffusion.autoencoder import AutoencoderKL
from workbench.models.diffusion.clip_tokenizer import CLIPTokenizer
from workbench.models.diffusion.schedulers import ScheduleConfig, make_sampler, randn
from workbench.models.diffusion.text_encoder import CLIPTextModel
from workbench.models.diffusion.unet import UNet


@dataclass
class SDComponents:
    """What a Stable Diffusion directory holds (`workbench.checkpoint.hf.diffusers_sd.load_sd_dir`)."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: ScheduleConfig
    use_attention_mask: bool = False  # the text encoder config's `use_attention_mask` (SD 1.x/2.x: off)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


@torch.no_grad()
def encode_prompts(c: SDComponents, prompts: list[str]) -> torch.Tensor:
    """CLIP states after the final norm, (B, 77, D), each prompt padded/truncated to the tokenizer's length."""
    batch = c.tokenizer(prompts)
    ids = batch["input_ids"].to(c.device)
    mask = batch["attention_mask"].to(c.device) if c.use_attention_mask else None
    return c.text_encoder(ids, attention_mask=mask)["last_hidden_state"].to(c.dtype)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """e <- phi e std(e_c) / std(e) + (1 - phi) e, stds per sample (Lin et al. 2023, section 3.4)."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def cfg_predict(unet: UNet, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
                guidance_rescale: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """predict(x, t) for `denoise`: with guidance > 1 one UNet call on [uncond, cond] and the guided mix."""
    use_cfg = guidance > 1.0 and uncond is not None
    context = torch.cat([uncond, cond]) if use_cfg else cond  # (2B, L, D): uncond first, as diffusers

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not use_cfg:
            return unet(x, t, context)
        out_u, out_c = unet(torch.cat([x, x]), t, context).chunk(2)
        # e = e_u + w (e_c - e_u)
        guided = out_u + guidance * (out_c - out_u)
        return rescale_guidance(guided, out_c, guidance_rescale) if guidance_rescale > 0 else guided

    return predict


@torch.no_grad()
def denoise(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sampler, steps: int,
            latents: torch.Tensor, eta: float = 0.0, generator: torch.Generator | None = None,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run the sampler from x_T = `latents` (already scaled by init_noise_sigma) to x_0."""
    timesteps = sampler.set_timesteps(steps, device=latents.device)
    x = latents
    for t in timesteps:
        out = predict(x, t)
        x = sampler.step(out, t, x, eta=eta, generator=generator).prev_sample
        if progress is not None:
            progress(1)
    return x


def check_size(height: int, width: int, factor: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % 8 or v % factor:
            raise ValueError(f"{name}: must be a positive multiple of 8 (and of the VAE's factor {factor}), got {v}")


@torch.no_grad()
def sample_from(c: SDComponents, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                steps: int = 50, guidance: float = 7.5, seed: int = 0, height: int | None = None,
                width: int | None = None, scheduler: str = "ddim", eta: float = 0.0, guidance_rescale: float = 0.0,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Images for `prompt`, (B, H, W, 3) float32 in [0, 1] on the CPU (before 8-bit quantisation)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    B = len(prompts)
    negatives = [""] * B if negative_prompt is None else (
        [negative_prompt] * B if isinstance(negative_prompt, str) else list(negative_prompt))
    if len(negatives) != B:
        raise ValueError(f"negative_prompt: {len(negatives)} given for {B} prompts")
    f = c.vae.cfg.downscale
    height = height or c.unet.cfg.sample_size * f
    width = width or c.unet.cfg.sample_size * f
    check_size(height, width, f)
    if steps <= 0:
        raise ValueError(f"steps: must be > 0, got {steps}")
    device, dtype = c.device, c.dtype
    cond = encode_prompts(c, prompts)
    uncond = encode_prompts(c, negatives) if guidance > 1.0 else None
    sampler = make_sampler(scheduler, c.schedule)
    generator = torch.Generator(device).manual_seed(seed)
    shape = (B, c.unet.cfg.in_channels, height // f, width // f)
    latents = randn(shape, generator, device, dtype) * sampler.init_noise_sigma
    predict = cfg_predict(c.unet, cond, uncond, guidance, guidance_rescale)
    latents = denoise(predict, sampler, steps, latents, eta, generator, progress)
    image = c.vae.images_from_latents(latents.to(next(c.vae.parameters()).dtype))
    # [-1, 1] -> [0, 1], (B, H, W, 3)
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) in [0, 1] -> uint8, rounding as diffusers' `numpy_to_pil` does."""
    return (images.numpy() * 255).round().astype("uint8")


def to_pil(images: torch.Tensor) -> list:
    """(B, H, W, 3) in [0, 1] -> PIL images (RGB)."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images)]


def save_png(images: torch.Tensor, path: str) -> list[str]:
    """One PNG per image: `path` itself for one, `stem-i.png` for several. Returns the paths written."""
    from pathlib import Path

    pils = to_pil(images)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    paths = [p] if len(pils) == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix or '.png'}") for i in range(len(pils))]
    for im, q in zip(pils, paths):
        im.save(q, format="PNG")
    return [str(q) for q in paths]
